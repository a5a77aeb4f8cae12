"""Attention through time: the store's per-step maps, the x̂₀ of every step, and the
`attention --over-time` / `edit --maps --over-time` animations, on the shipped toy model."""
import pytest
import torch
from PIL import Image

from minip2p import views
from minip2p.cli import main
from minip2p.control import AttentionStore
from minip2p.samplers.ddim import DDIM
from minip2p.pipeline import X0Recorder, generate, initial_noise

PROMPT = "a big red circle on the left"
EDITED = "a big blue circle on the left"
STEPS = 4


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: tiny models, one thread


def test_x0_recovered_from_the_two_ends_of_each_step_is_the_one_ddim_used(toy, monkeypatch):
    used = []
    split = DDIM._split

    def spy(self, model_out, z, a):
        x0, eps = split(self, model_out, z, a)
        used.append(x0.clone())
        return x0, eps
    monkeypatch.setattr(DDIM, "_split", spy)
    z_T = initial_noise(toy, 0, 64, 64)
    rec = X0Recorder(toy, z_T, STEPS)
    generate(toy, [PROMPT, EDITED], steps=STEPS, latents=z_T, callback=rec, progress=False,
             return_latents=True)
    assert len(rec.x0) == len(used) == STEPS
    for mine, ddim in zip(rec.x0, used):
        assert (mine - ddim).abs().max() < 1e-3 * ddim.abs().max()


def test_per_step_maps_average_to_the_summed_maps(toy):
    store = AttentionStore(2, step_pixels=8 * 8)
    generate(toy, [PROMPT, EDITED], steps=STEPS, control=store, progress=False,
             return_latents=True)
    assert sorted(store.per_step) == list(range(STEPS))
    assert {k[-1] for step in store.per_step.values() for k in step} == {64, 16}   # ≤ 8², cross
    mean = torch.stack([store.at_step(i) for i in range(STEPS)]).mean(0)
    assert torch.allclose(mean, store.average("cross", 64), atol=1e-6)
    assert not AttentionStore(1).per_step                           # off unless asked
    maps = views.step_maps(store, 0, toy.tokenizer.word_positions(PROMPT, "circle"))
    assert len(maps) == STEPS and all(m.max() == 1 for m in maps)


def test_attention_over_time_writes_a_gif_of_every_step(tmp_path, capsys):
    out = tmp_path / "maps.gif"
    rc = main(["attention", PROMPT, "--over-time", "circle", "--steps", "3", "--quiet",
               "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    with Image.open(out) as im:
        assert im.n_frames == 3 and im.format == "GIF"


def test_edit_maps_over_time_writes_the_animation(tmp_path, capsys):
    rc = main(["edit", PROMPT, EDITED, "--maps", "--over-time", "circle", "--map-res", "16",
               "--steps", "3", "--quiet", "--out-dir", str(tmp_path / "e")])
    assert rc == 0, capsys.readouterr().err
    with Image.open(tmp_path / "e" / "over-time.gif") as im:
        assert im.n_frames == 3 and im.height > 2 * views.TILE      # a row per prompt


@pytest.mark.parametrize("argv,needle", [
    (["attention", PROMPT, "--over-time", "square", "--out", "OUT/maps.gif"], "'square' is not"),
    (["attention", PROMPT, "--over-time", "circle", "--out", "OUT/maps.png"], ".gif"),
    (["attention", PROMPT, "--over-time", "circle", "--self", "--out", "OUT/m.gif"], "--self"),
    (["edit", PROMPT, EDITED, "--over-time", "circle", "--out-dir", "OUT/e"], "add --maps"),
    (["edit", PROMPT, EDITED, "--maps", "--over-time", "green", "--out-dir", "OUT/e"], "green"),
])
def test_bad_over_time_input_is_one_line_and_writes_nothing(tmp_path, capsys, argv, needle):
    argv = [a.replace("OUT", str(tmp_path)) for a in argv] + ["--steps", "2", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("minip2p: ") and err.count("\n") == 1 and needle in err, err
    assert list(tmp_path.iterdir()) == []

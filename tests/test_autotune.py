"""Kernels chosen by measurement (minip2p/fast/autotune.py): every candidate the tuner can pick equals
the explicit path; a choice is measured once per machine key and cached; --no-autotune and
MINIP2P_NO_AUTOTUNE take PyTorch's own kernels with no file touched. The fast path is installed on
the shared tiny model (`fast.switched`) and compared with the model without it."""
import json
import os
import subprocess
import sys

import pytest
import torch

from minip2p.fast import autotune, switched
from minip2p.fast.autotune import KINDS, Tuner, forced
from minip2p.pipeline import decode

# every candidate of every kind at least once, plus the two mixed assignments
ASSIGNMENTS = [{k: names[0] for k, names in KINDS.items()},
               {k: names[1] for k, names in KINDS.items()},
               {"linear": "onednn", "geglu": "torch", "attention": "sdpa", "decode": "channels_last"},
               {"linear": "torch", "geglu": "onednn", "attention": "onednn", "decode": "contiguous"}]


@pytest.fixture
def use():
    """use(tuner): this process's tuner for the test, restored after."""
    old = autotune.set_tuner(autotune.tuner())
    yield autotune.set_tuner
    autotune.set_tuner(old)


@pytest.mark.parametrize("choice", ASSIGNMENTS, ids=lambda c: ",".join(c.values()))
def test_every_candidate_equals_the_explicit_path(sd_model, use, choice):
    """A UNet call on 32×32 latents (the top level's self-attention has 1024 keys, so the
    attention choice is made there) and a decode, under each forced assignment, against the
    model without the fast path: nn.Linear, explicit softmax(QKᵀ/√d)·V, the default layout."""
    use(forced(**choice))
    unet = sd_model.unet
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 32, 32, generator=g)
    c = torch.randn(2, 77, unet.cfg.cross_attention_dim, generator=g)
    out, images = {}, {}
    for fast in (True, False):
        with switched(sd_model, fast), torch.no_grad():
            out[fast] = unet(z, 10, c)
            images[fast] = decode(sd_model, z[:1, :, :8, :8])
    ref = out[False]
    assert (out[True] - ref).abs().max() <= 2e-5 * max(1.0, ref.abs().max().item())
    assert (images[True] - images[False]).abs().max() <= 1e-5


def test_the_decode_layout_is_tried_on_the_real_decodes_then_kept(sd_model, use, tmp_path):
    """No slice for the decoder: the first decodes at a size run once in each layout (timed),
    the faster is cached; the images of the trials equal the default layout's."""
    t = Tuner(path=tmp_path / "k.json")
    use(t)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with switched(sd_model, False):
        ref = decode(sd_model, z)
    with switched(sd_model, True):
        assert (decode(sd_model, z) - ref).abs().max() <= 1e-5           # two trials
    assert t.measured == 1 and set(t.timings["decode 4x8x8"]) == set(KINDS["decode"])
    choice, trial = t.trial("decode", (4, 8, 8))
    assert not trial and choice == min(t.timings["decode 4x8x8"], key=t.timings["decode 4x8x8"].get)
    assert json.loads((tmp_path / "k.json").read_text())[autotune.machine_key()] == {
        "decode 4x8x8": choice}
    with switched(sd_model, True):
        assert (decode(sd_model, z) - ref).abs().max() <= 1e-5


def test_a_choice_is_measured_once_and_cached(tmp_path):
    path = tmp_path / "kernels.json"
    calls = []
    run = {name: (lambda n=name: calls.append(n)) for name in KINDS["linear"]}
    t = Tuner(path=path)
    pick = t.pick("linear", (64, 8, 8), lambda: run)
    assert pick in KINDS["linear"] and t.measured == 1
    assert set(calls) == set(KINDS["linear"]) and len(calls) >= 2 * (autotune.REPS + 1)
    calls.clear()
    assert t.pick("linear", (64, 8, 8), lambda: run) == pick and not calls          # this process
    again = Tuner(path=path)                                                 # a new process
    assert again.pick("linear", (64, 8, 8), lambda: run) == pick and not calls and again.measured == 0
    data = json.loads(path.read_text())
    assert data[autotune.machine_key()] == {"linear 64x8x8": pick}
    assert autotune.cpu_model() in autotune.machine_key()
    assert torch.__version__ in autotune.machine_key()


def test_another_thread_count_measures_again(tmp_path):
    threads = torch.get_num_threads()
    run = {name: (lambda: None) for name in KINDS["geglu"]}
    t = Tuner(path=tmp_path / "k.json")
    t.pick("geglu", (4, 4, 8), lambda: run)
    try:
        torch.set_num_threads(threads + 1)
        t.pick("geglu", (4, 4, 8), lambda: run)
    finally:
        torch.set_num_threads(threads)
    assert t.measured == 2 and len(json.loads((tmp_path / "k.json").read_text())) == 2


def test_a_broken_or_unwritable_cache_is_measured_again_not_an_error(tmp_path):
    bad = tmp_path / "kernels.json"
    bad.write_text("{not json")
    run = {name: (lambda: None) for name in KINDS["attention"]}
    t = Tuner(path=bad)
    assert t.pick("attention", (1, 2, 3), lambda: run) in KINDS["attention"] and t.measured == 1
    assert json.loads(bad.read_text())                                      # repaired
    blocked = tmp_path / "file"
    blocked.write_text("")
    t = Tuner(path=blocked / "kernels.json")                                # folder is a file
    assert t.pick("attention", (1, 2, 3), lambda: run) in KINDS["attention"]


def test_disabled_and_forced_tuners_never_measure(tmp_path):
    run = {name: (lambda: pytest.fail("measured")) for name in KINDS["decode"]}
    off = Tuner(enabled=False, path=tmp_path / "k.json")
    assert off.pick("decode", (1,), lambda: run) == autotune.DEFAULT["decode"]
    assert forced(decode="channels_last").pick("decode", (1,), lambda: run) == "channels_last"
    assert not (tmp_path / "k.json").exists()
    with pytest.raises(ValueError):
        forced(linear="mkl")


def _generate(tmp_path, *flags, env=None):
    cache = tmp_path / "cache"
    run_env = {k: v for k, v in os.environ.items() if k != "MINIP2P_NO_AUTOTUNE"}
    run_env.update(MINIP2P_CACHE_DIR=str(cache), **(env or {}))
    r = subprocess.run([sys.executable, "-m", "minip2p", "generate", "a red circle", "--steps", "2",
                        "--quiet", "--out", str(tmp_path / "x.png"), *flags],
                       capture_output=True, text=True, env=run_env, timeout=300)
    assert r.returncode == 0, r.stderr
    return cache / "kernels.json"


@pytest.mark.slow
def test_the_cli_tunes_and_no_autotune_and_the_variable_switch_it_off(tmp_path):
    assert not _generate(tmp_path, "--no-autotune").exists()
    assert not _generate(tmp_path, env={"MINIP2P_NO_AUTOTUNE": "1"}).exists()
    table = json.loads(_generate(tmp_path).read_text())
    (key, sites), = table.items()
    assert "threads" in key and any(s.startswith("linear ") for s in sites)
    assert all(v in sum(KINDS.values(), ()) for s, v in sites.items() if not s.startswith("decode"))
    (decode_site, tried), = ((s, v) for s, v in sites.items() if s.startswith("decode"))
    assert list(tried) == ["contiguous"]                    # one image: one layout tried so far
    sites = json.loads(_generate(tmp_path).read_text())[key]                # the next run
    assert sites[decode_site] in KINDS["decode"]                            # tries the other: chosen

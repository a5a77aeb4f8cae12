"""Pipeline behaviour that the parity tests do not cover: callbacks, shared noise, warnings."""
import torch

from minip2p.cli import main
from minip2p.pipeline import generate, initial_noise


def test_callback_sees_every_step(sd_model):
    seen = []
    z = generate(sd_model, ["a red circle"], seed=0, steps=5, height=64, width=64,
                 progress=False, return_latents=True,
                 callback=lambda i, t, zt: seen.append((i, t, zt.clone())))
    assert [i for i, _, _ in seen] == list(range(5))
    assert [t for _, t, _ in seen] == sd_model.scheduler.timesteps(5)
    assert all(zt.dtype == torch.float32 and zt.shape == (1, 4, 8, 8) for *_, zt in seen)
    assert torch.equal(seen[-1][2], z)


def test_one_noise_shared_by_every_prompt(sd_model):
    a = initial_noise(sd_model, 7, 64, 64)
    assert a.shape == (1, 4, 8, 8)
    assert torch.equal(a, torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(7)))
    two = generate(sd_model, ["a cat", "a cat"], seed=7, steps=3, height=64, width=64,
                   progress=False, return_latents=True)
    assert (two[0] - two[1]).abs().max().item() <= 1e-5


def test_overlong_prompt_warns_in_one_line(sd_ckpt, tmp_path, capsys):
    prompt = " ".join(["word"] * 90)
    rc = main(["generate", prompt, "--model", str(sd_ckpt[1]), "--steps", "1", "--quiet",
               "--height", "64", "--width", "64", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 0 and (tmp_path / "x.png").is_file()
    assert len(err) == 1 and err[0].startswith("minip2p: warning:") and "15 tokens too long" in err[0]


def test_free_text_encoder_drops_it_after_encoding_and_changes_nothing(sd_ckpt, sd_model, tmp_path,
                                                                        capsys):
    from minip2p.errors import MinipError
    from minip2p.load import load_model
    import pytest
    lean = load_model(sd_ckpt[1])                       # its own copy: the fixture stays whole
    kw = dict(seed=3, steps=3, height=64, width=64, progress=False, return_latents=True)
    a = generate(sd_model, ["a cat", "a dog"], **kw)
    b = generate(lean, ["a cat", "a dog"], free_text_encoder=True, **kw)
    assert lean.text_encoder is None and torch.equal(a, b)
    with pytest.raises(MinipError, match="text encoder was freed"):
        generate(lean, ["a cat"], **kw)
    for argv in (["generate", "a cat", "--out", str(tmp_path / "g.png")],
                 ["edit", "a cat", "a dog", "--out-dir", str(tmp_path / "e")],
                 ["attention", "a cat", "--out", str(tmp_path / "m.png")]):
        rc = main([*argv, "--model", str(sd_ckpt[1]), "--steps", "2", "--quiet", "--height", "64",
                   "--width", "64", "--free-text-encoder"])
        assert rc == 0, capsys.readouterr().err

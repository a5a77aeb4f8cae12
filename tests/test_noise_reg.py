"""Pix2Pix-Zero's regularised DDIM inversion (noise_reg.py, `--regularise`) against diffusers'
deprecated StableDiffusionPix2PixZeroPipeline.invert on the same random SD-1.x-structured
checkpoint and the same z_0.

What is compared: z_T after 4 inversion steps with the reference's settings (λ_AC = λ_KL = 20,
5 rounds, 5 rolls), with `min_roll=0` so that our lags are diffusers' draws from the same
seeded generator (`torch.randint(h // 2)`, one per channel and pyramid level, in the same order);
z_0 is handed to diffusers as latents, so its generator draws nothing else (no posterior sample).
Measured: max|Δz_T| = 9.4e-6 regularised, 2.7e-6 without it (the UNets' rounding), while the
regularisation moves z_T by 1.7; we assert 5e-5. The regulariser's 4 × 5 × 6 gradient steps of
size 20 carry the ε rounding differences along, so a few times the unregularised gap is expected.
The loss functions alone are compared on a 32×32 noise (three pyramid levels): equal to 1e-6.
"""
import pytest
import torch
import torch.nn.functional as F

from helpers import maxdiff
from minip2p.real import images, invert
from minip2p.methods import noise_reg as nr
from minip2p.errors import MinipError
from minip2p.pipeline import encode_text


@pytest.fixture(scope="module")
def reference(sd_ckpt):
    from diffusers import DDIMInverseScheduler, StableDiffusionPix2PixZeroPipeline
    pipe, _ = sd_ckpt
    c = {k: v for k, v in pipe.components.items() if k != "image_encoder"}
    ref = StableDiffusionPix2PixZeroPipeline(
        **c, caption_generator=None, caption_processor=None, requires_safety_checker=False,
        inverse_scheduler=DDIMInverseScheduler.from_config(pipe.scheduler.config))
    ref.set_progress_bar_config(disable=True)
    return ref


def test_regularised_inversion_equals_diffusers(reference, sd_model):
    torch.manual_seed(3)
    z0 = images.encode(sd_model, torch.rand(1, 3, 64, 64) * 2 - 1)
    prompt, steps, seed = "a red circle", 4, 7
    cond = encode_text(sd_model, [prompt])
    reg = nr.Regulariser(20.0, 20.0, 5, 5, seed=seed, min_roll=0)
    ours = invert.ddim_invert(sd_model, z0, cond, steps, False, reg)[-1]
    plain = invert.ddim_invert(sd_model, z0, cond, steps, False)[-1]
    kw = dict(image=z0.clone(), num_inference_steps=steps, output_type="latent")
    theirs = reference.invert(prompt, generator=torch.Generator().manual_seed(seed),
                              lambda_auto_corr=20.0, lambda_kl=20.0, num_reg_steps=5,
                              num_auto_corr_rolls=5, **kw).latents
    theirs_plain = reference.invert(prompt, lambda_auto_corr=0.0, lambda_kl=0.0, **kw).latents
    d, d0, moved = maxdiff(ours, theirs), maxdiff(plain, theirs_plain), maxdiff(ours, plain)
    print(f"regularised inversion vs diffusers: max|Δz_T| = {d:.2e} (unregularised {d0:.2e}); "
          f"the regularisation moved z_T by {moved:.2f}")
    assert moved > 0.1 and d <= 5e-5 and d0 <= 5e-5


def test_losses_equal_diffusers(reference):
    e = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    ours = nr.auto_corr_loss(e, torch.Generator().manual_seed(1), min_roll=0)
    theirs = reference.auto_corr_loss(e, generator=torch.Generator().manual_seed(1))
    assert abs(ours.item() - theirs.item()) <= 1e-6 * theirs.item()
    assert abs(nr.kl_loss(e * 1.3 + 0.2).item() - reference.kl_divergence(e * 1.3 + 0.2).item()) < 1e-6


def test_lags_are_the_official_ones(monkeypatch):
    """min_roll = 1 (default): δ ∈ {1, …, h_ℓ/2 − 1} at each level 32, 16, 8, never the lag 0
    (whose term is (mean ε²)²); the same seed gives the same lags."""
    seen = []
    roll = torch.roll

    def spy(x, shifts, dims):
        seen.append((x.shape[2], shifts))
        return roll(x, shifts, dims)
    monkeypatch.setattr(torch, "roll", spy)
    e = torch.randn(1, 2, 32, 32)
    for seed in range(20):
        nr.auto_corr_loss(e, torch.Generator().manual_seed(seed))
    assert {h for h, _ in seen} == {32, 16, 8} and len(seen) == 20 * 2 * 3 * 2
    assert all(1 <= d <= h // 2 - 1 for h, d in seen)
    assert {d for h, d in seen if h == 8} == {1, 2, 3}
    first = seen[:12]
    seen.clear()
    nr.auto_corr_loss(e, torch.Generator().manual_seed(0))
    assert seen == first


def test_regularising_whitens_correlated_noise():
    """Smooth noise with the wrong scale and mean (32×32): both losses fall (measured KL 0.85
    -> 0.10, L_AC 27 -> 6.4), the standard deviation moves towards 1 (1.65 -> 1.18); the
    centred lag-1 correlation barely drops (0.894 -> 0.861: L_AC's products are not centred,
    so it mostly removes the mean). One inversion step's worth (K = 5 rounds)."""
    g = torch.Generator().manual_seed(0)
    e = 2.5 * F.interpolate(torch.randn(1, 4, 8, 8, generator=g), scale_factor=4,
                            mode="bilinear") + 0.3                   # (1, 4, 32, 32)
    out = nr.regularise(e, nr.Regulariser(), torch.Generator().manual_seed(0))
    lag1 = lambda x: ((x - x.mean()) * (x - x.mean()).roll(1, 3)).mean() / x.var()  # noqa: E731
    assert nr.kl_loss(out) < 0.5 * nr.kl_loss(e)
    assert lag1(out) < lag1(e) - 0.02
    assert abs(out.std() - 1) < 0.5 * abs(e.std() - 1)
    ac = lambda x: nr.auto_corr_loss(x, torch.Generator().manual_seed(5))  # noqa: E731
    assert ac(out) < 0.5 * ac(e)


@pytest.mark.parametrize("kw,needle", [
    (dict(lambda_ac=-1.0), "lambda_ac"), (dict(lambda_kl=float("inf")), "lambda_kl"),
    (dict(steps=0), "reg_steps"),
])
def test_bad_settings_are_refused(kw, needle):
    with pytest.raises(MinipError, match=needle):
        nr.Regulariser(**kw)


def test_inversion_file_records_the_regulariser(tmp_path, capsys, sd_ckpt):
    from PIL import Image
    from minip2p.cli import main
    img = tmp_path / "i.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(img)
    common = ["--model", str(sd_ckpt[1]), "--quiet", "--steps", "2", "--method", "ddim"]
    plain, reg = tmp_path / "plain.safetensors", tmp_path / "reg.safetensors"
    assert main(["invert", str(img), "a red circle", "--out", str(plain), *common]) == 0
    assert main(["invert", str(img), "a red circle", "--out", str(reg), "--regularise",
                 "--reg-steps", "2", "--lambda-kl", "10", "--seed", "3", *common]) == 0
    assert "regularised" in capsys.readouterr().out
    a, b = invert.load(plain), invert.load(reg)
    assert a.regularised == "" and b.regularised.startswith("lambda_ac=20 lambda_kl=10 steps=2")
    assert "seed=3" in b.regularised and maxdiff(a.z_T, b.z_T) > 1e-3
    out = tmp_path / "r.png"
    assert main(["reconstruct", "--inversion", str(reg), "--regularise", "--out", str(out),
                 "--model", str(sd_ckpt[1]), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "already inverted" in err and err.count("\n") == 1 and not out.exists()

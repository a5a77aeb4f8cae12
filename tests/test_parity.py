"""minip2p equals diffusers / transformers on the same safetensors files (fp32, CPU).

Each test loads the folder that diffusers wrote and compares outputs on the same inputs.
Measured maxima are printed (pytest -s) and asserted against the tolerances below.
"""
import pytest
import torch

from helpers import generate_vs_diffusers, maxdiff, unet_vs_diffusers
from minip2p.model.config import SchedulerConfig
from minip2p.samplers.ddim import DDIM
from minip2p.load import load_model

GEOMETRIES = ["sd_ckpt", "small_ckpt"]
PROMPTS = ["a photo of a red circle", "A Squirrel, eating a BURGER!"]


@pytest.fixture(params=GEOMETRIES)
def pair(request):
    pipe, folder = request.getfixturevalue(request.param)
    return pipe, load_model(folder), request.param


@torch.no_grad()
def test_text_encoder(pair):
    pipe, model, name = pair
    ids = model.tokenizer(PROMPTS + [""])
    ref = pipe.text_encoder(ids).last_hidden_state
    d = maxdiff(model.text_encoder(ids), ref)
    print(f"{name} text encoder max|Δ| = {d:.2e}")
    assert d <= 1e-5


@pytest.mark.parametrize("t", [1, 261, 981])
def test_unet(pair, t):
    pipe, model, name = pair
    d, top = unet_vs_diffusers(pipe, model, t)
    print(f"{name} unet t={t} max|Δ| = {d:.2e} (|ε| ≤ {top:.2f})")
    assert d <= 1e-4


@torch.no_grad()
def test_vae(pair):
    pipe, model, name = pair
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 64, 48, generator=g) * 2 - 1
    post = pipe.vae.encode(x).latent_dist
    d_mean = maxdiff(model.vae.encode(x), post.mean)
    d_sample = maxdiff(model.vae.encode(x, sample=True, generator=torch.Generator().manual_seed(1)),
                       post.sample(generator=torch.Generator().manual_seed(1)))
    z = post.mean
    d_dec = maxdiff(model.vae.decode(z), pipe.vae.decode(z).sample)
    print(f"{name} vae mean {d_mean:.2e} sample {d_sample:.2e} decode {d_dec:.2e}")
    assert max(d_mean, d_sample) <= 1e-5 and d_dec <= 1e-4


@pytest.mark.parametrize("steps", [1, 7, 50, 999])
def test_ddim_timesteps_and_steps(steps):
    from diffusers import DDIMScheduler
    ref = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    ref.set_timesteps(steps)
    ours = DDIM(SchedulerConfig())
    assert ours.timesteps(steps) == ref.timesteps.tolist()
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    g = torch.Generator().manual_seed(steps)
    z, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for t in ours.timesteps(steps)[:3] + ours.timesteps(steps)[-2:]:
        assert maxdiff(ours.step(eps, t, z, steps), ref.step(eps, t, z).prev_sample) <= 1e-6


def test_ddim_50_steps_are_the_papers():
    assert DDIM().timesteps(50)[:3] == [981, 961, 941] and DDIM().timesteps(50)[-1] == 1


def test_ddim_inversion_step_inverts_a_step():
    """With ε fixed, invert_step undoes step exactly (the algebra of η=0 DDIM)."""
    d = DDIM()
    g = torch.Generator().manual_seed(0)
    z, eps = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    for t in (981, 501, 1):
        back = d.invert_step(eps, t, d.step(eps, t, z, 50), 50)
        assert maxdiff(back, z) <= 1e-9


@pytest.mark.parametrize("geometry,size", [("sd_ckpt", (64, 64)), ("small_ckpt", (48, 32))])
def test_generate_equals_diffusers_pipeline(request, geometry, size):
    pipe, folder = request.getfixturevalue(geometry)
    model = load_model(folder)
    steps = 12
    d, d_img = generate_vs_diffusers(pipe, model, PROMPTS, 1234, steps, *size)
    print(f"{geometry} generate {steps} steps: latents max|Δ| = {d:.2e}, images max|Δ| = {d_img:.2e}")
    assert d <= 1e-4 and d_img <= 1e-4

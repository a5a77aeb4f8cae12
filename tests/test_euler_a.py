"""Euler ancestral (euler_a.py) against diffusers' EulerAncestralDiscreteScheduler on the same
random SD-1.x-structured checkpoint, the same seed (z_T, then one noise per step from the same
CPU generator); P2P under it; the --sampler option."""
import pytest
import torch

from minip2p.cli import main
from minip2p.samplers.euler_a import EulerAncestral
from minip2p.samplers import make_sampler
from minip2p.errors import MinipError
from minip2p.methods import p2p
from minip2p.pipeline import generate
from helpers import maxdiff, reldiff, sampler_vs_diffusers

PROMPT = "a painting of a squirrel eating a burger"


def diffusers_euler_a(**kw):
    from diffusers import EulerAncestralDiscreteScheduler
    return EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                           beta_schedule="scaled_linear", **kw)


@pytest.mark.parametrize("steps", [4, 9])
def test_euler_a_equals_diffusers(sd_ckpt, sd_model, steps):
    m, d = sampler_vs_diffusers(sd_model, sd_ckpt[0], "euler-a", diffusers_euler_a(), steps, 3)
    print(f"Euler ancestral, {steps} steps vs diffusers: latents max|Δ| = {m:.2e}, relative to "
          f"max|z| = {d:.2e}")
    assert d <= 1e-4


def test_euler_a_v_prediction_equals_diffusers(small2_ckpt):
    from minip2p.load import load_model
    pipe, folder = small2_ckpt
    _, d = sampler_vs_diffusers(load_model(folder), pipe, "euler-a",
                                diffusers_euler_a(prediction_type="v_prediction"), 5, 1)
    print(f"Euler ancestral (v-prediction) vs diffusers: latents relative max|Δ| = {d:.2e}")
    assert d <= 1e-4


@pytest.mark.parametrize("steps", [10, 100])
def test_euler_a_step_equals_diffusers_given_the_same_noise(steps):
    """The sampler alone: the same ε at every step and the same generator."""
    from diffusers import EulerAncestralDiscreteScheduler
    ref = EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                          beta_schedule="scaled_linear")
    ref.set_timesteps(steps)
    ours = EulerAncestral(generator=torch.Generator().manual_seed(5))
    gen, g_eps = torch.Generator().manual_seed(5), torch.Generator().manual_seed(9)
    assert maxdiff(ref.timesteps, torch.tensor(ours.timesteps(steps))) == 0
    assert maxdiff(ref.sigmas, ours.sigmas(steps)) <= 1e-6
    z1 = z2 = torch.randn(1, 4, 8, 8, generator=g_eps) * ours.init_sigma(steps)
    for t, t_ref in zip(ours.timesteps(steps), ref.timesteps):
        eps = torch.randn(1, 4, 8, 8, generator=g_eps)
        ref.scale_model_input(z1, t_ref)
        z1 = ref.step(eps, t_ref, z1, generator=gen).prev_sample
        z2 = ours.step(eps, t, z2, steps)
    d = maxdiff(z1, z2)
    print(f"Euler ancestral step, {steps} steps, same ε and noise: max|Δ| = {d:.2e}")
    assert d <= 1e-4


def test_schedule_and_shared_noise():
    s = EulerAncestral()
    t, sig = s.timesteps(10), s.sigmas(10)
    assert t[0] == 999.0 and t[-1] == 0.0 and len(sig) == 11 and sig[-1] == 0
    assert (sig[:-1] > sig[1:]).all()
    # identical rows stay identical: one noise for the whole batch at every step
    z = torch.randn(1, 4, 8, 8).expand(3, -1, -1, -1).clone()
    out = s.step(torch.zeros_like(z), t[0], z, 10)
    assert maxdiff(out[0], out[1]) == 0 and maxdiff(out[0], out[2]) == 0
    with pytest.raises(MinipError):
        make_sampler("plms", s.cfg)


def test_p2p_under_euler_a_keeps_the_source(sd_model):
    """Shared noise: the source row of a P2P edit is the source prompt generated alone."""
    prompts = [PROMPT, "a painting of a squirrel eating a pizza"]
    control, _ = p2p.build(sd_model.tokenizer, prompts, 5, cross_replace=0.8, self_replace=0.4)
    both = generate(sd_model, prompts, seed=2, steps=5, sampler="euler-a", control=control,
                    progress=False, return_latents=True)
    alone = generate(sd_model, [PROMPT], seed=2, steps=5, sampler="euler-a", progress=False,
                     return_latents=True)
    assert reldiff(both[0], alone[0]) <= 1e-5
    assert maxdiff(both[0], both[1]) > 1e-3


def test_cli_sampler(sd_ckpt, tmp_path, capsys):
    out = tmp_path / "a.png"
    assert main(["generate", "a cat", "--model", str(sd_ckpt[1]), "--steps", "2", "--quiet",
                 "--sampler", "euler-a", "--out", str(out)]) == 0 and out.is_file()
    assert main(["generate", "a cat", "--model", str(sd_ckpt[1]), "--sampler", "plms",
                 "--out", str(tmp_path / "b.png")]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "b.png").exists()

"""DPM-Solver++ (2M) (dpm_solver.py) against diffusers' DPMSolverMultistepScheduler (its
defaults: dpmsolver++, order 2, midpoint, "linspace", final σ 0, lower_order_final) on the same
random checkpoint files and seed; P2P's windows, LocalBlend and the attention store under it;
the --sampler option and its refusals."""
import pytest
import torch

from minip2p.cli import main
from minip2p.control import AttentionStore, Compose, Controller
from minip2p.samplers.dpm_solver import DPMSolverPP
from minip2p.guidance import TEXT
from minip2p.methods import p2p
from minip2p.pipeline import denoise, encode_text, generate, initial_noise
from helpers import maxdiff, reldiff, sampler_vs_diffusers

PROMPT = "a painting of a squirrel eating a burger"
EDIT = "a painting of a lion eating a burger"


def diffusers_dpm(**kw):
    from diffusers import DPMSolverMultistepScheduler
    return DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", steps_offset=1, **kw)


# Tolerance: relative 1e-5 of max|z|. Measured: ε-prediction 10 / 20 steps max|Δ| 9.2e-5 /
# 5.0e-5 at max|z| ≈ 60 (relative 1.5e-6 / 8e-7); v-prediction below. The two differ only in
# float rounding (diffusers forms α, σ, λ in fp32 from interpolated σs, we in fp64 from ᾱ), which
# the wild random x̂₀ magnifies; a wrong coefficient (first order where diffusers is second, a
# wrong r_i, a timestep off by one) moves the latents by ≥ 1e-2 relative.
@pytest.mark.parametrize("steps", [10, 20])
def test_dpm_equals_diffusers(sd_ckpt, sd_model, steps):
    m, d = sampler_vs_diffusers(sd_model, sd_ckpt[0], "dpm++", diffusers_dpm(), steps, 3)
    print(f"DPM-Solver++ 2M, {steps} steps vs diffusers: latents max|Δ| = {m:.2e}, relative to "
          f"max|z| = {d:.2e}")
    assert d <= 1e-5


def test_dpm_v_prediction_equals_diffusers(small2_ckpt):
    from minip2p.load import load_model
    pipe, folder = small2_ckpt
    m, d = sampler_vs_diffusers(load_model(folder), pipe, "dpm++",
                                diffusers_dpm(prediction_type="v_prediction"), 10, 1)
    print(f"DPM-Solver++ 2M (v-prediction), 10 steps vs diffusers: latents max|Δ| = {m:.2e}, "
          f"relative {d:.2e}")
    assert d <= 1e-5


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_dpm_step_equals_diffusers_given_the_same_output(pred):
    """The solver alone: the same network output at every step; timesteps identical."""
    from minip2p.model.config import SchedulerConfig
    for steps in (1, 2, 3, 14, 15, 25):
        ref = diffusers_dpm(prediction_type=pred)
        ref.set_timesteps(steps)
        ours = DPMSolverPP(SchedulerConfig(prediction_type=pred))
        assert ref.timesteps.tolist() == ours.timesteps(steps)
        g = torch.Generator().manual_seed(steps)
        z1 = z2 = torch.randn(2, 4, 8, 8, generator=g)
        for t in ours.timesteps(steps):
            out = torch.randn(2, 4, 8, 8, generator=g)
            z1, z2 = ref.step(out, t, z1).prev_sample, ours.step(out, t, z2, steps)
        assert reldiff(z2, z1) <= 1e-5, (pred, steps)          # measured ≤ 1.1e-6


def test_schedule_and_orders():
    s = DPMSolverPP()
    assert s.timesteps(20)[:3] == [999, 949, 899] and s.timesteps(20)[-1] == 50
    for n in (1, 7, 333, 999):                        # distinct, falling: every h_i > 0
        t = s.timesteps(n)
        assert len(set(t)) == n and t == sorted(t, reverse=True)
    # step 1 is first order = a DDIM step between the same two timesteps
    t0, t1 = s.timesteps(10)[:2]
    z, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    a0, a1 = s.alphas_cumprod[t0].float(), s.alphas_cumprod[t1].float()
    x0 = (z - (1 - a0).sqrt() * eps) / a0.sqrt()
    assert maxdiff(s.step(eps, t0, z, 10), a1.sqrt() * x0 + (1 - a1).sqrt() * eps) <= 1e-5
    # the last step lands on x̂₀; a step in the middle uses the history (differs from first order)
    last = s.timesteps(10)[-1]
    a = s.alphas_cumprod[last].float()
    assert maxdiff(s.step(eps, last, z, 10), (z - (1 - a).sqrt() * eps) / a.sqrt()) <= 1e-5
    fresh = DPMSolverPP()
    t2 = s.timesteps(10)[2]
    s.step(eps, t0, z, 10), s.step(eps * 0.5, t1, z, 10)    # fresh: no history, first order
    assert maxdiff(s.step(eps, t2, z, 10), fresh.step(eps, t2, z, 10)) > 1e-3


class WindowSpy(Controller):
    """After the edit: at which steps do the edited prompt's cond maps differ from the source's
    anywhere (a 1-pixel site's self map is 1 in every row, so "equal everywhere" is the test)?"""

    def __init__(self):
        self.steps, self.differ = set(), {"cross": set(), "self": set()}

    def wants(self, site):
        return site.kind in ("self", "cross")

    def probs(self, M, site):
        batch = site.batch_of(M.shape[0])
        self.steps.add(site.step)
        if not torch.equal(M[batch.row(0, TEXT)], M[batch.row(1, TEXT)]):
            self.differ[site.kind].add(site.step)
        return M


def test_p2p_windows_count_dpm_steps(sd_model):
    """cross_replace 0.8 and self_replace 0.4 of 20 dpm++ steps: the first 16 and the first 8
    (int(0.8 · 21) = 16 as the official get_time_words_attention_alpha; int(20 · 0.4) = 8)."""
    control, store = p2p.build(sd_model.tokenizer, [PROMPT, EDIT], 20, "replace", 0.8, 0.4)
    spy = WindowSpy()
    generate(sd_model, [PROMPT, EDIT], seed=2, steps=20, sampler="dpm++",
             control=Compose(control, spy), progress=False, return_latents=True)
    assert spy.steps == set(range(20))
    assert spy.differ["cross"] == set(range(16, 20)) and spy.differ["self"] == set(range(8, 20))
    assert store.steps_seen == set(range(20))


class DiffusersSampler:
    """diffusers' DPMSolverMultistepScheduler behind minip2p's sampler interface (test only):
    a controller's after_step edits the latents and diffusers keeps its model_outputs."""
    name = "diffusers-dpm++"

    def __init__(self, **kw):
        self.s = diffusers_dpm(**kw)

    def timesteps(self, steps):
        self.s.set_timesteps(steps)
        return self.s.timesteps.tolist()

    def init_sigma(self, steps):
        return 1.0

    def scale_input(self, z, t, steps):
        return z

    def step(self, out, t, z, steps):
        return self.s.step(out, t, z).prev_sample


class BlendedHistory(DPMSolverPP):
    """dpm_solver.py's rejected choice (2): x̂₀(t_{i−2}) blended with the mask the latents got
    (for a 0/1 mask: where the edited row's latents differ from the source's)."""

    def step(self, out, t, z, steps):
        if self._prev is not None:
            k, x0 = self._prev
            inside = (z[1:] != z[:1]).any(dim=1, keepdim=True).to(x0)
            self._prev = (k, torch.cat([x0[:1], x0[:1] + inside * (x0[1:] - x0[:1])]))
        return super().step(out, t, z, steps)


class RestartedHistory(DPMSolverPP):
    """dpm_solver.py's rejected choice (1): first order again after any edit of the latents."""

    def step(self, out, t, z, steps):
        if getattr(self, "given", None) is not None and not torch.equal(self.given, z.float()):
            self._prev = None
        self.given = super().step(out, t, z, steps)
        return self.given


def test_local_blend_under_dpm(sd_model):
    """Replace + LocalBlend over 8 dpm++ steps: the same as diffusers' scheduler with the same
    blend between its steps (the history kept as the model gave it, dpm_solver.py); the source
    row is the source generated alone; the edit equals the source outside its final mask.
    64×128 px and threshold 0.99 as in test_p2p.py: a partial mask on the random model."""
    prompts = [PROMPT, EDIT]
    cond, uncond = encode_text(sd_model, prompts), encode_text(sd_model, [""])
    z_T = initial_noise(sd_model, 4, 64, 128)

    def run(sampler):
        control, store = p2p.build(sd_model.tokenizer, prompts, 8, "replace", 0.8, 0.4,
                                   blend=["squirrel", "lion"], blend_threshold=0.99)
        z = denoise(sd_model, cond, uncond, z_T, 8, 7.5, control, progress=False,
                    sampler=sampler)
        blend = next(c for c in control.controllers if isinstance(c, p2p.LocalBlend))
        return z, blend._mask(z, blend.words, blend.threshold, pool=True)

    ours, mask = run(DPMSolverPP(sd_model.scheduler.cfg))
    ref, _ = run(DiffusersSampler())
    d = reldiff(ours, ref)
    print(f"P2P Replace + LocalBlend, 8 dpm++ steps vs diffusers' scheduler: relative {d:.2e}")
    assert d <= 1e-5
    alone = generate(sd_model, [PROMPT], seed=4, steps=8, height=64, width=128,
                     sampler="dpm++", progress=False, return_latents=True)
    assert reldiff(ours[0], alone[0]) <= 1e-5
    outside = ~(mask[0] | mask[1]).expand_as(ours[0])
    assert 0 < outside.sum() < outside.numel()
    assert maxdiff(ours[1][outside], ours[0][outside]) == 0
    assert maxdiff(ours[1], ours[0]) > 1e-2
    blended, restarted = run(BlendedHistory(sd_model.scheduler.cfg))[0], \
        run(RestartedHistory(sd_model.scheduler.cfg))[0]
    print(f"the other histories (tools/README.md): blended max|Δ| {maxdiff(blended, ours):.2e}, "
          f"restarted {maxdiff(restarted, ours):.2e} (max|z| {ours.abs().max():.1f})")
    assert reldiff(restarted, ours) > 1e-2             # the kept history is not a first-order run


def test_attention_store_averages_the_dpm_steps(sd_model):
    store = AttentionStore(1, step_pixels=64)
    generate(sd_model, [PROMPT], seed=1, steps=7, sampler="dpm++", control=store,
             progress=False, return_latents=True)
    assert store.steps_seen == set(range(7)) and set(store.per_step) == set(range(7))
    pixels = store.coarsest("cross")
    mean = torch.stack([store.at_step(i, pixels) for i in range(7)]).mean(0)
    assert maxdiff(store.average("cross", pixels), mean) <= 1e-6


def test_cli_dpm(sd_ckpt, tmp_path, capsys):
    model = ["--model", str(sd_ckpt[1]), "--steps", "3", "--quiet", "--sampler", "dpm++"]
    out = tmp_path / "a.png"
    assert main(["generate", "a cat", *model, "--out", str(out)]) == 0 and out.is_file()
    assert main(["edit", "a cat", "a dog", *model, "--blend", "cat", "dog",
                 "--out-dir", str(tmp_path / "e")]) == 0
    assert (tmp_path / "e" / "1.png").is_file()
    assert main(["attention", "a cat", *model, "--out", str(tmp_path / "m.png")]) == 0
    capsys.readouterr()
    photo = tmp_path / "p.png"
    from PIL import Image
    Image.new("RGB", (64, 64), "red").save(photo)
    p, x, r = str(photo), str(tmp_path / "x.png"), str(tmp_path / "r")
    refused = [
        ["generate", "a cat", "--image", p, "--strength", "0.5", "--out", x],
        ["generate", "a cat", "--excite", "cat", "--out", x],
        ["guide", "a red cat", "--move", "cat=0.8,0.5", "--out-dir", r],
        ["invert", p, "a cat", "--out", str(tmp_path / "x.safetensors")],
        ["reconstruct", p, "a cat", "--out", x],
        ["edit", "a cat", "a dog", "--image", p, "--out-dir", r],
        ["edit", "a cat", "a dog", "--image", p, "--strength", "0.5", "--out-dir", r],
        ["edit", "", "a dog", "--method", "pnp", "--image", p, "--out-dir", r],
        ["edit", "a cat", "a dog", "--method", "pix2pix-zero", "--out-dir", r],
        ["edit", "a cat", "a dog", "--maps", "--over-time", "cat", "--out-dir", r],
        ["attention", "a cat", "--over-time", "cat", "--out", str(tmp_path / "x.gif")]]
    for argv in refused:
        assert main(argv + model) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--sampler dpm++" in err and "ddim" in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "e", "m.png", "p.png"]

"""Plug-and-play (methods/pnp.py): a differential test against an independent re-implementation
of the official code on diffusers' UNet (tests/oracles/pnp_oracle.py), the no-injection property,
the sites it touches, and the refusals.

Both sides load the same random checkpoint with SD 1.x's exact block structure (`sd_ckpt`), a
64×64 picture drawn with PIL (latents 8×8), the source prompt "" of the official preprocess and
the official negative prompt. fp32 on CPU; measured maxima are printed (pytest -s).
"""
import pytest
import torch
from PIL import Image, ImageDraw

from oracles import pnp_oracle as O
from minip2p.real import images
from minip2p.control import Controller
from minip2p.errors import MinipError
from minip2p.fast import switched
from minip2p.real.invert import ddim_invert
from minip2p.methods import pnp
from minip2p.pipeline import denoise, encode_text

PROMPT, GUIDANCE = "a photo of a pink toy horse on the beach", 7.5
NEG = pnp.OFFICIAL_NEGATIVE_PROMPT                   # the official run; our default is ""
TOL, END_TO_END_TOL = 1e-4, 5e-4


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: tiny models, one thread


@pytest.fixture(scope="module")
def picture():
    """x (1, 3, 64, 64) in [−1, 1]: a red disc and a blue square on grey."""
    im = Image.new("RGB", (64, 64), (128, 128, 128))
    draw = ImageDraw.Draw(im)
    draw.ellipse([8, 10, 36, 38], fill=(230, 26, 26))
    draw.rectangle([34, 30, 58, 56], fill=(26, 64, 230))
    return images.to_tensor(im)


# steps, τ_f, τ_A, fast: the defaults on both paths; 7 steps, where ⌊7·0.8⌋ = 5 and ⌊7·0.5⌋ = 3
# round down; each injection alone; attention longer than features
CASES = {
    "default-fast": (6, 0.8, 0.5, True),
    "default-explicit": (6, 0.8, 0.5, False),
    "7-steps-rounding": (7, 0.8, 0.5, True),
    "features-only": (5, 0.8, 0.0, True),
    "attention-only-explicit": (5, 0.0, 1.0, False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_the_official_code(sd_ckpt, sd_model, picture, name):
    """The same inversion trajectory on both sides (minip2p's, checked against the official
    inversion first) -> the target and the source's reconstruction within TOL. End to end, each
    side with its own inversion, the ~4e-6 by which the trajectories differ is amplified by the
    guided steps of this random UNet (~40x, the oracle alone shows it): END_TO_END_TOL."""
    pipe, model = sd_ckpt[0], sd_model
    steps, f, a, fast = CASES[name]
    z0_ref, saved_ref = O.invert(pipe, picture, "", steps)
    with switched(model, fast):                   # the inversion and the edit on one path
        # the inversion: [z_0, z_1 … z_T] <-> the latents the official code saves per timestep
        traj = ddim_invert(model, images.encode(model, picture), encode_text(model, [""]), steps,
                           progress=False)
        z = pnp.edit(model, picture, PROMPT, negative_prompt=NEG, steps=steps,
                     guidance=GUIDANCE, features=f, attention=a, progress=False,
                     return_latents=True)
    ts = model.scheduler.timesteps(steps)[::-1]                       # τ_1 … τ_N
    saved = {t: traj[k + 1] for k, t in enumerate(ts)}
    d_traj = max([(saved[t] - saved_ref[t]).abs().max().item() for t in ts] +
                 [(traj[0] - z0_ref).abs().max().item()])

    z_ref, recon_ref = O.edit(pipe, saved, PROMPT, NEG, steps, GUIDANCE, f, a)
    z_e2e, _ = O.edit(pipe, saved_ref, PROMPT, NEG, steps, GUIDANCE, f, a)
    d_tgt = (z[1:] - z_ref).abs().max().item()
    d_src = (z[:1] - recon_ref).abs().max().item()
    d_e2e = (z[1:] - z_e2e).abs().max().item()
    print(f"\n{name:>24}: max|Δ| trajectory {d_traj:.1e}; same trajectory: target {d_tgt:.1e} "
          f"(|z| ≤ {z_ref.abs().max():.1f}), source reconstruction {d_src:.1e}; "
          f"end to end: target {d_e2e:.1e}")
    assert z.shape == (2, 4, 8, 8)
    assert d_traj <= 1e-5 and d_tgt <= TOL and d_src <= TOL and d_e2e <= END_TO_END_TOL

    # not vacuous: the injection moves the official target away from the plain edit
    z_plain, _ = O.edit(pipe, saved, PROMPT, NEG, steps, GUIDANCE, 0.0, 0.0)
    assert (z_plain - z_ref).abs().max() > 1e-2


def test_no_injection_is_generating_from_the_inverted_noise(sd_model, picture):
    """Both windows 0: the target is the plain guided DDIM run from z_T with the negative prompt
    as ∅ (one image, no source row), also when the trajectory is handed in."""
    m, steps = sd_model, 5
    traj = ddim_invert(m, images.encode(m, picture), encode_text(m, ["a red disc"]), steps,
                       progress=False)
    want = denoise(m, encode_text(m, [PROMPT]), encode_text(m, [pnp.NEGATIVE_PROMPT]), traj[-1],
                   steps, GUIDANCE, progress=False)
    kw = dict(steps=steps, guidance=GUIDANCE, features=0, attention=0, progress=False,
              return_latents=True)
    z = pnp.edit(m, picture, PROMPT, "a red disc", **kw)
    given = pnp.edit(m, None, PROMPT, **kw, trajectory=traj)
    d, d_given = (z[1:] - want).abs().max().item(), (given[1:] - want).abs().max().item()
    print(f"\nwindows 0 vs denoise(z_T): max|Δ| = {d:.1e}, with the trajectory given {d_given:.1e}")
    assert d <= 1e-4 and d_given <= 1e-4          # the 3-row and 2-row UNet batches round apart
    imgs = pnp.edit(m, None, PROMPT, steps=steps, progress=False, trajectory=traj)
    assert imgs.shape == (2, 3, 64, 64) and 0 <= imgs.min() and imgs.max() <= 1


class Spy(Controller):
    """Records the sites where `inner` wants to be called, and is called nowhere itself."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []

    def wants(self, site):
        if self.inner.wants(site):
            self.seen.append((site.kind, site.place, site.block, site.layer, site.step))
        return False


def test_sites_and_windows(sd_model):
    """⌊N·τ⌋ steps each; the feature site and the 8 decoder self-attention layers, nothing else."""
    m = sd_model
    spy = Spy(pnp.PlugAndPlay(10, features=0.8, attention=0.5))
    z, ctx = torch.zeros(3, 4, 8, 8), torch.zeros(3, 77, 32)
    for step in range(10):
        m.unet(z, 501, ctx, control=spy, step=step, batch=pnp.batch())
    res = {s for s in spy.seen if s[0] == "res"}
    self_ = {s for s in spy.seen if s[0] == "self"}
    assert res == {("res", "up", 1, 1, i) for i in range(8)}
    assert self_ == {("self", "up", b, l, i) for i in range(5)
                     for b, l in [(1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (3, 0), (3, 1), (3, 2)]}
    assert len(spy.seen) == len(res) + len(self_)
    assert pnp.batch().rows == ((0, "text"), (1, "uncond"), (1, "text"))


@pytest.mark.parametrize("kw, option", [
    (dict(features=1.5), "features"), (dict(features=-0.1), "features"),
    (dict(attention=2), "attention"), (dict(attention=True), "attention"),
    (dict(attention="0.5"), "attention"), (dict(features=float("nan")), "features")])
def test_bad_windows_are_one_line(sd_model, picture, kw, option):
    for call in (lambda: pnp.PlugAndPlay(10, **kw),
                 lambda: pnp.edit(sd_model, picture, PROMPT, steps=2, progress=False, **kw)):
        with pytest.raises(MinipError) as e:
            call()
        assert option in str(e.value) and "\n" not in str(e.value)


def test_bad_trajectory_and_image(sd_model, picture):
    with pytest.raises(MinipError, match="with 3 steps"):
        pnp.edit(sd_model, None, PROMPT, steps=3, progress=False,
                 trajectory=[torch.zeros(1, 4, 8, 8)] * 3)
    with pytest.raises(MinipError, match="multiple of 8"):
        pnp.edit(sd_model, picture[:, :, :60], PROMPT, steps=2, progress=False)


def test_bf16_runs_both_paths(sd_ckpt, picture):
    """The injected attention in bf16 (QKᵀ upcast on the explicit path): finite, close to fp32,
    from one fp32 inversion (the bf16 inversion's own error is not what is tested here)."""
    from minip2p.load import load_model
    m16, m32 = load_model(sd_ckpt[1], dtype="bf16"), load_model(sd_ckpt[1])
    traj = ddim_invert(m32, images.encode(m32, picture), encode_text(m32, [""]), 3, progress=False)
    kw = dict(steps=3, features=1.0, attention=1.0, progress=False, return_latents=True,
              trajectory=traj)
    want = pnp.edit(m32, None, PROMPT, **kw)
    for fast in (True, False):
        with switched(m16, fast):
            z = pnp.edit(m16, None, PROMPT, **kw)
        assert torch.isfinite(z).all() and (z - want).abs().max() < 0.1 * want.abs().max()

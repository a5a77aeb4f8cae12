"""SD 2.x against diffusers / transformers on random SD 2.x-shaped checkpoints (fp32, CPU).

Two geometries (tests/helpers.py): "sd2", SD 2.1 768-v's exact block structure at tiny widths
(v-prediction, upcast_attention, linear projections, per-level head counts, a 23-layer GELU text
encoder, "!" padding), and "small2" (2 levels, 2-deep transformers, per-level heads). Checked:
token ids, text states, UNet, v-prediction DDIM, whole generations, a P2P edit against the
independent reference (tests/oracles/p2p_oracle.py), inversion, and the OpenCLIP single-file layout.
Measured maxima are printed (pytest -s).
"""
import pytest
import torch

from helpers import generate_vs_diffusers, maxdiff, unet_vs_diffusers
from oracles import p2p_oracle as O
from oracles.compvis import save_sd2_single_file
from minip2p.real import invert
from minip2p.methods import p2p
from minip2p.model.config import SchedulerConfig
from minip2p.samplers.ddim import DDIM
from minip2p.load import load_model
from minip2p.pipeline import check_size, decode, generate

GEOMETRIES = ["sd2_ckpt", "small2_ckpt"]
PROMPTS = ["a photo of a red circle", "A Squirrel, eating a BURGER!"]
SIZES = {"sd2_ckpt": (64, 96), "small2_ckpt": (48, 32)}


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: tiny models, one thread


@pytest.fixture(scope="module", params=GEOMETRIES)
def pair(request):
    pipe, folder = request.getfixturevalue(request.param)
    return pipe, load_model(folder), request.param


def test_config_is_sd2(pair):
    _, model, name = pair
    assert model.scheduler.cfg.prediction_type == "v_prediction"
    assert model.unet.cfg.upcast_attention and model.unet.cfg.use_linear_projection
    assert model.text_encoder.cfg.hidden_act == "gelu" and model.tokenizer.pad == 0
    heads = [model.unet.cfg.heads(i) for i in range(len(model.unet.cfg.block_out_channels))]
    assert len(set(heads)) > 1, heads                                      # per-level heads
    if name == "sd2_ckpt":
        assert model.text_encoder.cfg.num_hidden_layers == 23
        assert check_size(model, None, None) == (96, 96)     # native: sample_size·8 (768 for 2.1)


def test_fp16_with_upcast_attention_is_close_to_fp32(sd2_ckpt):
    """SD 2.1's upcast_attention: under fp16 the softmax runs in fp32 (explicit path)."""
    _, folder = sd2_ckpt
    kw = dict(seed=0, steps=3, height=64, width=64, progress=False)
    ref = generate(load_model(folder, fast=False), ["a red circle"], **kw)
    half = load_model(folder, dtype="fp16", fast=False)
    assert all(m.upcast for m in half.unet.modules() if hasattr(m, "upcast"))
    img = generate(half, ["a red circle"], **kw)
    assert torch.isfinite(img).all() and (img - ref).abs().mean().item() < 0.05


@torch.no_grad()
def test_tokens_and_text_states(pair):
    pipe, model, name = pair
    ids = model.tokenizer(PROMPTS + [""])
    ref_ids = pipe.tokenizer(PROMPTS + [""], padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
    assert torch.equal(ids, ref_ids) and (ids[:, -1] == 0).all()          # padded with "!"
    d = maxdiff(model.text_encoder(ids), pipe.text_encoder(ref_ids).last_hidden_state)
    print(f"{name} text states max|Δ| = {d:.2e}")
    assert d <= 1e-5


@pytest.mark.parametrize("t", [1, 501, 981])
def test_unet(pair, t):
    pipe, model, name = pair
    d, top = unet_vs_diffusers(pipe, model, t)
    print(f"{name} unet t={t} max|Δ| = {d:.2e} (|v| ≤ {top:.2f})")
    assert d <= 1e-4


def test_v_prediction_ddim_matches_diffusers_and_equals_epsilon_algebra():
    from diffusers import DDIMScheduler
    ref = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                        prediction_type="v_prediction")
    ref.set_timesteps(10)
    ours = DDIM(SchedulerConfig(prediction_type="v_prediction"))
    g = torch.Generator().manual_seed(0)
    z, v = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for t in ours.timesteps(10):
        assert maxdiff(ours.step(v, t, z, 10), ref.step(v, t, z).prev_sample) <= 1e-6
    # a v output is the ε output written at the latent's own noise level: v = √ᾱ·ε − √(1−ᾱ)·ẑ_0;
    # both steps (denoise at ᾱ_t, invert at ᾱ_t') then equal the ε-prediction ones
    eps_sched = DDIM(SchedulerConfig())
    z64, eps = z.double(), v.double()
    for t in (981, 501, 21):
        for a, move, ref_move in ((ours.alpha(t), ours.step, eps_sched.step),
                                  (ours.alpha(t - 20), ours.invert_step, eps_sched.invert_step)):
            a = a.double()
            x0 = (z64 - (1 - a) ** 0.5 * eps) / a ** 0.5
            v_out = a ** 0.5 * eps - (1 - a) ** 0.5 * x0
            assert maxdiff(move(v_out, t, z64, 50), ref_move(eps, t, z64, 50)) <= 1e-12


def test_generate_equals_diffusers_pipeline(pair):
    pipe, model, name = pair
    steps = 8
    d, d_img = generate_vs_diffusers(pipe, model, PROMPTS, 7, steps, *SIZES[name])
    print(f"{name} generate {steps} steps: latents max|Δ| = {d:.2e}, images max|Δ| = {d_img:.2e}")
    assert d <= 1e-4 and d_img <= 1e-4


@pytest.mark.parametrize("name", ["replace", "reweight+blend"])
def test_p2p_edit_matches_the_reference(sd2_ckpt, name):
    """The official controllers re-implemented on diffusers' UNet (tests/oracles/p2p_oracle.py) on
    the v-prediction model: a word swap, and a re-weight on top of a word swap with LocalBlend."""
    pipe, folder = sd2_ckpt
    model = load_model(folder)
    src, tgt = "a painting of a squirrel eating a burger", "a painting of a lion eating a burger"
    prompts, steps, (h, w) = [src, tgt], 8, (64, 128)
    rc = O.resolution_constants(h // 8, w // 8)
    kw = dict(store_max_pixels=rc["store_max_pixels"], self_max_pixels=rc["self_max_pixels"])
    if name == "replace":
        oracle = O.AttentionReplace(pipe.tokenizer, prompts, steps, 0.8, 0.4, **kw)
        control, _ = p2p.build(model.tokenizer, prompts, steps, "replace", 0.8, 0.4,
                               self_max_pixels=rc["self_max_pixels"])
    else:
        blend = O.LocalBlend(pipe.tokenizer, prompts, steps=steps, map_hw=rc["blend_map"],
                             words=["squirrel", "lion"], threshold=0.99)
        base = O.AttentionReplace(pipe.tokenizer, prompts, steps, 0.8, 0.4, **kw)
        oracle = O.AttentionReweight(                       # the blend on the outer controller,
            pipe.tokenizer, prompts, steps, 0.8, 0.4,       # as in the official notebook
            O.make_equalizer(pipe.tokenizer, prompts, {"lion": 3.0}), controller=base,
            local_blend=blend, **kw)
        control, _ = p2p.build(model.tokenizer, prompts, steps, "replace", 0.8, 0.4,
                               blend=["squirrel", "lion"], blend_threshold=0.99,
                               reweight={"lion": 3.0}, self_max_pixels=rc["self_max_pixels"])
    z_ref, img_ref = O.text2image(pipe, prompts, oracle, steps, 0, 7.5, h, w)
    z = generate(model, prompts, 0, steps, 7.5, h, w, control=control, progress=False,
                 return_latents=True)
    dz, di = maxdiff(z, z_ref), maxdiff(decode(model, z), img_ref)
    print(f"\nsd2 P2P {name}: max|Δz| = {dz:.1e} (|z| ≤ {z_ref.abs().max():.0f}), "
          f"max|Δimage| = {di:.1e}")
    assert dz <= 2e-4 and di <= 2e-5
    assert (z_ref[1:] - z_ref[:1]).abs().max() > 0.1                      # the edit did something


@pytest.mark.parametrize("method", ["null-text", "negative-prompt"])
def test_inversion_reconstructs_on_v_prediction(small2_ckpt, method):
    """Inversion on the v-prediction model: reconstructing from the inversion lands close to the
    DDIM-inverted z_0 (null-text: much closer than plain DDIM with ψ("") at guidance 7.5)."""
    _, folder = small2_ckpt
    model = load_model(folder)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    steps = 6
    inv = invert.invert(model, x, "a red circle", method, steps=steps, progress=False)
    z0 = inv.latents[0]
    z = invert.run(model, inv, ["a red circle"], progress=False, return_latents=True)
    plain = invert.run(model, invert.invert(model, x, "a red circle", "ddim", steps=steps,
                                            progress=False),
                       ["a red circle"], progress=False, return_latents=True)
    d, d_plain = maxdiff(z, z0), maxdiff(plain, z0)
    print(f"v-prediction {method}: reconstruction max|Δz0| = {d:.2e} (ddim: {d_plain:.2e})")
    assert torch.isfinite(z).all() and d < d_plain


def test_openclip_single_file_loads_with_inferred_architecture(sd2_ckpt, tmp_path):
    """An SD 2.x single file (OpenCLIP text names, one extra last resblock) loads with nothing
    but the file: heads = width/64, 23 of 24 text layers, GELU, "!" padding, v-prediction."""
    pipe, _ = sd2_ckpt
    path = save_sd2_single_file(pipe, tmp_path / "v2-tiny.safetensors")
    model = load_model(path)
    assert model.scheduler.cfg.prediction_type == "v_prediction" and model.unet.cfg.upcast_attention
    assert model.text_encoder.cfg.num_hidden_layers == pipe.text_encoder.config.num_hidden_layers
    with torch.no_grad():
        ids = model.tokenizer(PROMPTS)
        d_text = maxdiff(model.text_encoder(ids), pipe.text_encoder(ids).last_hidden_state)
        g = torch.Generator().manual_seed(0)
        z, ctx = torch.randn(1, 4, 8, 12, generator=g), torch.randn(1, 77, 128, generator=g)
        d_unet = maxdiff(model.unet(z, 501, ctx), pipe.unet(z, 501, ctx).sample)
    ours = generate(model, PROMPTS[:1], seed=1, steps=4, height=64, width=64, progress=False,
                    return_latents=True)
    ref = generate(load_model(sd2_ckpt[1]), PROMPTS[:1], seed=1, steps=4, height=64, width=64,
                   progress=False, return_latents=True)
    d_gen = maxdiff(ours, ref)
    print(f"sd2 single file: text {d_text:.2e}, unet {d_unet:.2e}, 4-step latents {d_gen:.2e}")
    assert d_text <= 1e-5 and d_unet <= 1e-4 and d_gen <= 1e-4

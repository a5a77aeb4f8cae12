"""Single-file (CompVis-layout) checkpoints load into the same model as the diffusers folder.

tests/oracles/compvis.py writes a pipeline's weights under the original CompVis names,
independently of minip2p's own table. That converter is first checked against diffusers'
single-file loader (the oracle: it must rebuild the exact weights); then minip2p loads the same
file and its outputs are compared with the diffusers pipeline. Measured maxima are printed
(pytest -s).

Geometries: "sd" and "small" (conftest) use GroupNorm groups / head counts that cannot be read off
tensor shapes, so they are loaded with `config=` their folder; "sd32" below has SD 1.x's
conventions (32 groups, 8 UNet heads, CLIP heads = width/64), so minip2p infers everything.
"""
import shutil

import pytest
import torch

import helpers
from helpers import maxdiff
from oracles.compvis import save_single_file
from minip2p.errors import MinipError
from minip2p.load import load_model
from minip2p.pipeline import decode, generate, initial_noise
from minip2p.load.single_file import load_single_file

PROMPTS = ["a photo of a red circle", "A Squirrel, eating a BURGER!"]
SD32 = dict(  # SD 1.x's default groups and heads, so a file with no config can be read
    unet=dict(block_out_channels=(32, 64, 64), layers_per_block=2,
              down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
              attention_head_dim=8, cross_attention_dim=64, sample_size=8),
    vae=dict(block_out_channels=(32, 32, 64), layers_per_block=1,
             down_block_types=("DownEncoderBlock2D",) * 3,
             up_block_types=("UpDecoderBlock2D",) * 3, sample_size=32),
    text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=1, hidden_act="quick_gelu"),
)
# geometry: (fixture, whether minip2p can infer the architecture, generate size)
CASES = {"sd": ("sd_ckpt", False, (64, 64)), "small": ("small_ckpt", False, (48, 32)),
         "sd32": (None, True, (32, 48))}


@pytest.fixture(scope="session")
def sd32_ckpt(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(helpers.GEOMETRIES, "sd32", SD32)
        pipe = helpers.build_pipeline("sd32", seed=3)
    return pipe, helpers.save_pipeline(pipe, tmp_path_factory.mktemp("sd32"))


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(name, diffusers pipeline, its folder, the single file, minip2p model from the file)."""
    name = request.param
    fixture, inferable, _ = CASES[name]
    pipe, folder = request.getfixturevalue(fixture or "sd32_ckpt")
    path = save_single_file(pipe, tmp_path_factory.mktemp(f"{name}_single") / "model.safetensors")
    model = load_model(path) if inferable else load_single_file(path, config=folder)
    return name, pipe, folder, path, model


def test_converter_matches_diffusers_single_file_loader(case, tmp_path):
    """The oracle: diffusers' from_single_file rebuilds the exact weights from our CompVis file.
    Its config folder has no weights at all, so every tensor must come from the single file."""
    from diffusers import StableDiffusionPipeline
    name, pipe, folder, path, _ = case
    config = shutil.copytree(folder, tmp_path / "config",
                             ignore=shutil.ignore_patterns("*.safetensors"))
    ref = StableDiffusionPipeline.from_single_file(str(path), config=str(config),
                                                   local_files_only=True, torch_dtype=torch.float32)
    for part in ("unet", "vae", "text_encoder"):
        want, got = getattr(pipe, part).state_dict(), getattr(ref, part).state_dict()
        assert set(got) == set(want), f"{part}: {sorted(set(got) ^ set(want))[:5]}"
        assert all(torch.equal(got[k], want[k]) for k in want), part
    with torch.no_grad():
        ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77,
                             return_tensors="pt").input_ids
        d_text = maxdiff(ref.text_encoder(ids).last_hidden_state,
                         pipe.text_encoder(ids).last_hidden_state)
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        ctx = torch.randn(1, 77, pipe.unet.config.cross_attention_dim)
        d_unet = maxdiff(ref.unet(z, 501, ctx).sample, pipe.unet(z, 501, ctx).sample)
        d_vae = maxdiff(ref.vae.decode(z).sample, pipe.vae.decode(z).sample)
    print(f"{name} diffusers from_single_file vs original: text {d_text:.1e} unet {d_unet:.1e} "
          f"vae {d_vae:.1e}")
    assert max(d_text, d_unet, d_vae) <= 1e-5       # same weights; only kernels may differ


def test_single_file_equals_folder_weights(case):
    name, pipe, folder, path, model = case
    ref = load_model(folder)
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(model, part).state_dict(), getattr(ref, part).state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), part
    if CASES[name][1]:      # inferred from shapes: the same architecture as the config says
        for part in ("unet", "vae", "text_encoder"):
            ours, theirs = getattr(model, part).cfg, getattr(ref, part).cfg
            skip = {"sample_size"}      # not recorded in a single file
            assert {k: v for k, v in vars(ours).items() if k not in skip} == \
                   {k: v for k, v in vars(theirs).items() if k not in skip}, part


def test_load_model_without_config(case):
    """Without config=, an SD-convention file loads; one whose GroupNorm groups are not SD's 32
    is refused with one clear line instead of being built wrong."""
    name, _, _, path, model = case
    if CASES[name][1]:
        assert load_model(path).unet.cfg == model.unet.cfg
    else:
        with pytest.raises(MinipError, match=r"architecture read off the shapes.*num_groups"):
            load_model(path)


@torch.no_grad()
def test_components_equal_diffusers(case):
    name, pipe, _, _, model = case
    ids = model.tokenizer(PROMPTS + [""])
    d_text = maxdiff(model.text_encoder(ids), pipe.text_encoder(ids).last_hidden_state)
    g = torch.Generator().manual_seed(1)
    s = pipe.unet.config.sample_size
    z = torch.randn(2, 4, s, s + 4, generator=g)
    ctx = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g)
    d_unet = max(maxdiff(model.unet(z, t, ctx), pipe.unet(z, t, ctx).sample) for t in (1, 981))
    x = torch.rand(1, 3, 64, 48, generator=g) * 2 - 1
    post = pipe.vae.encode(x).latent_dist
    d_enc = maxdiff(model.vae.encode(x), post.mean)
    d_dec = maxdiff(model.vae.decode(post.mean), pipe.vae.decode(post.mean).sample)
    print(f"{name} single file: text {d_text:.1e} unet {d_unet:.1e} "
          f"vae encode {d_enc:.1e} decode {d_dec:.1e}")
    assert max(d_text, d_unet, d_enc, d_dec) <= 1e-4


def test_generate_equals_diffusers(case):
    name, pipe, _, _, model = case
    h, w = CASES[name][2]
    steps = 4
    z = initial_noise(model, 7, h, w)
    ours = generate(model, PROMPTS, seed=7, steps=steps, guidance=7.5, height=h, width=w,
                    progress=False, return_latents=True)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPTS, height=h, width=w, num_inference_steps=steps, guidance_scale=7.5,
               latents=z.expand(len(PROMPTS), -1, -1, -1).clone(), output_type="latent").images
    d = maxdiff(ours, ref)
    with torch.no_grad():
        img_ref = (pipe.vae.decode(ref / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    d_img = maxdiff(decode(model, ours), img_ref)
    print(f"{name} single file generate {steps} steps: latents {d:.1e} images {d_img:.1e}")
    assert d <= 1e-4 and d_img <= 1e-4

"""Tiny random-weight SD-family models, built with diffusers + transformers (the reference
oracles, test-only) and saved as real checkpoints: a diffusers-layout folder of safetensors,
and the same weights as a CompVis single file.

Geometries:
  "sd":    SD 1.x's exact block structure (4 levels, CrossAttn×3 + plain down, plain + CrossAttn×3
           up, 2 ResBlocks per level, 8 heads, 4-level VAE = 8× downscale, quick-GELU CLIP),
           only narrower.
  "small": another member of the family: 2 levels, 1 ResBlock per level, per-level head counts,
           linear proj_in/out, 2 transformer blocks deep, 3-level VAE (4× downscale), GELU CLIP.
  "sd2":   SD 2.1 (768-v)'s exact block structure at tiny widths: 4 levels as in SD 1.x, 64
           channels per head (so per-level head counts 1/2/2/2, diffusers' `attention_head_dim`
           list) and 32 GroupNorm groups as SD 2.x has (so a single file needs no config),
           linear proj_in/out, upcast_attention, v-prediction, the OpenCLIP text encoder
           as diffusers stores it (GELU, 23 layers), "!" as the pad token.
  "small2": "small" made SD 2.x-like: v-prediction, upcast_attention, "!" padding.
  "ip2p":  "sd" as InstructPix2Pix: conv_in takes 8 channels (z_t ⊕ image latents); saved from
           diffusers' StableDiffusionInstructPix2PixPipeline with Euler ancestral.

`build_clip` writes a tiny random transformers `CLIPModel` (vision + text towers, projections).

Also the small helpers the test files share: `maxdiff`, `reldiff`, `sampler_vs_diffusers`,
`unet_vs_diffusers`, `generate_vs_diffusers`,
`picture` (a test picture), `cli` / `one_line` (the CLI in-process, its stderr) and
`run_minip2p` (the CLI in a real process).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

TOKENIZER = Path(__file__).resolve().parent.parent / "weights" / "clip-tokenizer"

GEOMETRIES = {
    "sd": dict(
        unet=dict(block_out_channels=(32, 64, 64, 64), layers_per_block=2, norm_num_groups=8,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                  attention_head_dim=8, cross_attention_dim=32, sample_size=8),
        vae=dict(block_out_channels=(16, 32, 32, 32), layers_per_block=2, norm_num_groups=8,
                 down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, hidden_act="quick_gelu"),
    ),
    "small": dict(
        unet=dict(block_out_channels=(32, 48), layers_per_block=1, norm_num_groups=8,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                  attention_head_dim=(2, 4), cross_attention_dim=48, sample_size=8,
                  use_linear_projection=True, transformer_layers_per_block=2),
        vae=dict(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
                 down_block_types=("DownEncoderBlock2D",) * 3,
                 up_block_types=("UpDecoderBlock2D",) * 3, sample_size=32),
        text=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=3, hidden_act="gelu"),
    ),
    "sd2": dict(
        unet=dict(block_out_channels=(64, 128, 128, 128), layers_per_block=2, norm_num_groups=32,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                  attention_head_dim=(1, 2, 2, 2), cross_attention_dim=128, sample_size=12,
                  use_linear_projection=True, upcast_attention=True),
        vae=dict(block_out_channels=(32, 32, 64, 64), layers_per_block=2, norm_num_groups=32,
                 down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, sample_size=96),
        text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=23,
                  num_attention_heads=2, hidden_act="gelu"),
        scheduler=dict(prediction_type="v_prediction"), pad="!",
    ),
}
GEOMETRIES["ip2p"] = dict(GEOMETRIES["sd"], unet=dict(GEOMETRIES["sd"]["unet"], in_channels=8),
                          instruct=True)
GEOMETRIES["small2"] = dict(GEOMETRIES["small"], unet=dict(GEOMETRIES["small"]["unet"],
                                                           upcast_attention=True),
                            scheduler=dict(prediction_type="v_prediction"), pad="!")


def _jitter(module, seed):
    """Randomise norms and biases too (default init makes them 1 and 0, hiding mix-ups)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.05 * noise)
            else:
                p.add_(0.02 * noise)


def build_pipeline(geometry: str, seed: int = 0):
    """A diffusers StableDiffusionPipeline with random weights (DDIM, SD 1.x schedule)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    geo = GEOMETRIES[geometry]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**geo["unet"])
    vae = AutoencoderKL(latent_channels=4, **geo["vae"])
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77,
                                        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                                        **geo["text"]))
    for i, m in enumerate((unet, vae, text)):
        _jitter(m, seed * 10 + i)
    pad = {"pad_token": geo["pad"]} if "pad" in geo else {}      # SD 2.x pads with "!"
    tok = CLIPTokenizer.from_pretrained(str(TOKENIZER), model_max_length=77, **pad)  # (v5 ignores vocab_file=)
    assert len(tok) == 49408
    if geo.get("instruct"):
        from diffusers import (EulerAncestralDiscreteScheduler,
                               StableDiffusionInstructPix2PixPipeline)
        sched = EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                                beta_schedule="scaled_linear")
        return StableDiffusionInstructPix2PixPipeline(
            vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
            safety_checker=None, feature_extractor=None,
            requires_safety_checker=False).to(torch.float32)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                          **geo.get("scheduler", {}))
    return StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False).to(torch.float32)


def save_pipeline(pipe, folder: Path) -> Path:
    """Save as a real checkpoint is laid out: safetensors, and vocab.json + merges.txt in
    tokenizer/ (transformers 5 writes only tokenizer.json; SD repos have both kinds)."""
    import shutil
    pipe.save_pretrained(str(folder), safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(TOKENIZER / name, Path(folder) / "tokenizer" / name)
    return folder


def build_clip(folder: Path, seed: int = 0, image_size: int = 32):
    """A tiny random transformers CLIPModel (quick-GELU, 8-px patches) saved as its own layout
    (config.json + model.safetensors), with CLIP's BPE files beside it."""
    import shutil

    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=image_size, patch_size=8),
        projection_dim=16)
    model = CLIPModel(cfg).eval()
    _jitter(model, seed)
    model.save_pretrained(str(folder), safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(TOKENIZER / name, Path(folder) / name)
    return model, Path(folder)


def sample_with(pipe, scheduler, prompt: str, steps: int, seed: int) -> torch.Tensor:
    """diffusers' StableDiffusionPipeline on `pipe`'s components with another scheduler: final
    latents of `prompt`, guidance 7.5, noise from a CPU generator seeded `seed` (as minip2p's)."""
    from diffusers import StableDiffusionPipeline
    ref = StableDiffusionPipeline(**{**pipe.components, "scheduler": scheduler})
    ref.set_progress_bar_config(disable=True)
    return ref(prompt, num_inference_steps=steps, guidance_scale=7.5,
               generator=torch.Generator("cpu").manual_seed(seed), output_type="latent").images


def maxdiff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def reldiff(ours, ref) -> float:
    """max|Δ| / max(1, max|ref|): absolute for values of order one, relative for the large final
    latents of the random UNets (|z| ≈ 50-70), where fp32 rounding alone is ~1e-4 absolute."""
    return maxdiff(ours, ref) / max(1.0, ref.abs().max().item())


def sampler_vs_diffusers(model, pipe, sampler: str, scheduler, steps: int, seed: int,
                         prompt: str = "a painting of a squirrel eating a burger"):
    """minip2p's `sampler` on `model` against diffusers' `scheduler` on the same files (`pipe`),
    same prompt, seed and steps: (max|Δ|, reldiff) of the final latents."""
    from minip2p.pipeline import generate
    ours = generate(model, [prompt], seed=seed, steps=steps, sampler=sampler, progress=False,
                    return_latents=True)
    ref = sample_with(pipe, scheduler, prompt, steps, seed)
    return maxdiff(ours, ref), reldiff(ours, ref)


@torch.no_grad()
def unet_vs_diffusers(pipe, model, t: int) -> tuple[float, float]:
    """minip2p's UNet against diffusers' on the same random latents (not square on purpose) and
    context, seeded by `t`: (max|Δ|, max|output|)."""
    g = torch.Generator().manual_seed(t)
    s = pipe.unet.config.sample_size
    z = torch.randn(2, 4, s, s + 2, generator=g)
    ctx = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g)
    ref = pipe.unet(z, t, ctx).sample
    return maxdiff(model.unet(z, t, ctx), ref), ref.abs().max().item()


def generate_vs_diffusers(pipe, model, prompts, seed: int, steps: int, height: int, width: int):
    """minip2p's generate against the diffusers pipeline from the same z_T (guidance 7.5):
    (max|Δ| of the final latents, max|Δ| of the decoded images)."""
    from minip2p.pipeline import decode, generate, initial_noise
    z = initial_noise(model, seed, height, width)
    ours = generate(model, prompts, seed=seed, steps=steps, guidance=7.5, height=height,
                    width=width, progress=False, return_latents=True)
    ref = pipe(prompts, height=height, width=width, num_inference_steps=steps, guidance_scale=7.5,
               latents=z.expand(len(prompts), -1, -1, -1).clone(), output_type="latent").images
    img_ref = (pipe.vae.decode(ref / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    return maxdiff(ours, ref), maxdiff(decode(model, ours), img_ref)


def picture(size: int = 64):
    """A red disc on an off-white ground (PIL, RGB, size × size)."""
    from PIL import Image, ImageDraw
    im = Image.new("RGB", (size, size), (240, 240, 230))
    ImageDraw.Draw(im).ellipse((8, 12, 44, 48), fill=(200, 30, 30))
    return im


def cli(capsys, *argv):
    """minip2p's CLI in-process: (exit status, stdout, stderr)."""
    from minip2p.cli import main
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(capsys, argv, needle: str = "") -> str:
    """Run the CLI in-process, expecting a refusal: exit status 2 and one `minip2p: ` line on
    stderr (containing `needle`). -> that line."""
    rc, _, err = cli(capsys, *argv)
    lines = err.splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("minip2p: "), err
    assert needle in lines[0], lines[0]
    return lines[0]


def run_minip2p(*args, env: dict | None = None, timeout: float = 300, **kw):
    """`python -m minip2p ARGS` in a real process, offline: the CompletedProcess (text)."""
    return subprocess.run([sys.executable, "-m", "minip2p", *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
                          timeout=timeout, **kw)


# stderr lines of a run that are not its error: warnings and notes (e.g. a slow inversion)
NOT_ERRORS = ("minip2p: warning: ", "minip2p: note: ")


def build_dino(folder: Path, pooler: bool = False, eps: float = 1e-6):
    """A tiny random transformers ViTModel in DINO's layout (32 px, 8-px patches, 2 layers)
    saved as its own folder (config.json + model.safetensors) -> (the reference model, folder)."""
    import transformers
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, image_size=32, patch_size=8,
                                 layer_norm_eps=eps, qkv_bias=True)
    torch.manual_seed(0)
    ref = transformers.ViTModel(cfg, add_pooling_layer=pooler).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
    ref.save_pretrained(folder, safe_serialization=True)
    return ref, Path(folder)

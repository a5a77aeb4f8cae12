#!/usr/bin/env python
"""Parity at the full Stable Diffusion 1.5 shape: minip2p against diffusers / transformers.

The tests (tests/test_parity.py) check parity on narrow models in seconds; this tool checks the
real geometry (UNet 320/640/1280/1280, ~860M parameters; VAE 128/256/512/512; CLIP ViT-L/14 text
encoder) without downloading anything: diffusers and transformers build the models with seeded
random weights (norm scales and biases perturbed so they are not exactly 1 and 0, which would
hide a swapped or missing tensor), save them as safetensors, and both sides load that folder:

    1. minip2p loads it and computes, on the same inputs:
         text encoder states of the prompts and "", one UNet call (batch 2, size/8 latents),
         the VAE encoder's posterior mean and the decoder, and a whole generation
         generate(..., return_latents=True) from initial_noise(model, seed, h, w);
    2. the model is freed; diffusers' StableDiffusionPipeline loads the folder and computes the
       same, the generation with latents = that initial noise, output_type="latent".

Tolerance: a component passes when max|Δ| <= tol · max(1, max|reference|), i.e. absolute for
values of order one and relative for larger ones (float rounding is relative to magnitude).
  fp32: tol = 1e-4 everywhere, latents of the whole generation included. Both sides run the
        same maths in a different order (fused vs explicit attention, other reshapes), so they
        differ by float32 rounding (~1e-7 relative) grown through ~100 layers and the steps of
        sampling, where guidance 7.5 amplifies ε differences; 1e-4 leaves room for that and
        still catches any real mistake (a wrong scale, order or epsilon gives 1e-3 or more).
  fp16: tol = 2e-2 per component, 5e-2 for the latents: fp16 rounding is 2^-11 ≈ 5e-4 relative
        per operation, and diffusers keeps its latents in fp16 between steps where minip2p
        keeps them in fp32, so a gap of order 1e-2 is expected with both sides correct.
Exits with status 1 when any component is out of tolerance. Usage:
    python -m tools.parity --device cpu --steps 10 --size 512
"""
from __future__ import annotations

import argparse, gc, os, shutil, sys, tempfile, time, warnings  # noqa: E401
from pathlib import Path

import torch

from tools.harness import peak_gib, reset_peak

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local
warnings.filterwarnings("ignore")
TOKENIZER = Path(__file__).resolve().parent.parent / "weights" / "clip-tokenizer"
PROMPTS = ["a photograph of an astronaut riding a horse", "A cat, sitting on a RED sofa!"]
TOL = {"fp32": dict(text=1e-4, unet=1e-4, vae_encode=1e-4, vae_decode=1e-4, generate=1e-4),
       "fp16": dict(text=2e-2, unet=2e-2, vae_encode=2e-2, vae_decode=2e-2, generate=5e-2)}
LABELS = dict(text="text encoder", unet="unet (t=501)", vae_encode="vae encode mean",
              vae_decode="vae decode", generate="generate latents")

SD15 = dict(  # SD 1.5's configs; the defaults of diffusers/transformers fill in the rest
    unet=dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
              cross_attention_dim=768, sample_size=64),
    vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
             sample_size=512),
    text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, projection_dim=768))
TINY = dict(  # --tiny: the same structure, narrow, to check this script's logic in seconds
    unet=dict(SD15["unet"], block_out_channels=(32, 64, 64, 64), norm_num_groups=8,
              cross_attention_dim=32, sample_size=8),
    vae=dict(SD15["vae"], block_out_channels=(16, 32, 32, 32), norm_num_groups=8, sample_size=64),
    text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4))


def perturb(module: torch.nn.Module, seed: int):
    """Norm scales 1 ± 0.1 and biases ± 0.02 instead of 1 and 0. Other weights keep their
    default random init, which keeps activations at a sane scale through the deep networks."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.add_(0.02 * torch.randn(p.shape, generator=g))


def build_and_save(geo: dict, folder: Path, seed: int):
    """Random-weight SD 1.x pipeline, saved as a real checkpoint folder (see tests/helpers.py)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**geo["unet"])
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, **geo["vae"])
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77,
                                        hidden_act="quick_gelu", bos_token_id=49406,
                                        eos_token_id=49407, pad_token_id=49407, **geo["text"]))
    for i, m in enumerate((unet, vae, text)):
        perturb(m, seed * 10 + i)
    print(f"built: unet {sum(p.numel() for p in unet.parameters()) / 1e6:.0f}M, vae "
          f"{sum(p.numel() for p in vae.parameters()) / 1e6:.0f}M, text encoder "
          f"{sum(p.numel() for p in text.parameters()) / 1e6:.0f}M parameters", flush=True)
    tok = CLIPTokenizer.from_pretrained(str(TOKENIZER), model_max_length=77)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):  # transformers 5 writes only tokenizer.json
        shutil.copy(TOKENIZER / name, folder / "tokenizer" / name)


class Side:
    """Times the calls of one implementation and keeps their outputs (fp32, on the CPU)."""

    def __init__(self, name: str, device: torch.device):
        self.name, self.device, self.out, self.time = name, device, {}, {}
        gc.collect()
        reset_peak(device)

    def run(self, key: str, fn):
        sync = torch.cuda.synchronize if self.device.type == "cuda" else lambda: None
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            y = fn()
        sync()
        self.time[key] = time.perf_counter() - t0
        if isinstance(y, torch.Tensor):
            self.out[key] = y.float().cpu()
        print(f"  {self.name:9} {key:11} {self.time[key]:8.2f} s", flush=True)
        return y

    def finish(self):
        self.peak = peak_gib(self.device)


def run_ours(folder, inp, args, device, dtype) -> tuple[Side, torch.Tensor]:
    from minip2p.load import load_model
    from minip2p.pipeline import generate, initial_noise
    side = Side("minip2p", device)
    m = side.run("load", lambda: load_model(folder, dtype=args.dtype, device=device))
    cast = lambda t: t.to(device, dtype)  # noqa: E731
    side.run("text", lambda: m.text_encoder(m.tokenizer(args.prompts + [""]).to(device)))
    side.run("unet", lambda: m.unet(cast(inp["z"]), 501, cast(inp["ctx"])))
    side.run("vae_encode", lambda: m.vae.encode(cast(inp["x"])))
    side.run("vae_decode", lambda: m.vae.decode(cast(inp["zdec"])))
    z0 = initial_noise(m, args.seed, args.size, args.size)
    if not args.skip_generate:
        side.run("generate", lambda: generate(m, args.prompts, args.seed, args.steps, args.guidance,
                                              args.size, args.size, return_latents=True))
    side.finish()
    del m
    return side, z0


def run_diffusers(folder, inp, args, device, dtype, z0) -> Side:
    from diffusers import StableDiffusionPipeline
    side = Side("diffusers", device)
    p = side.run("load", lambda: StableDiffusionPipeline.from_pretrained(
        str(folder), torch_dtype=dtype, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False).to(device))
    cast = lambda t: t.to(device, dtype)  # noqa: E731
    ids = p.tokenizer(args.prompts + [""], padding="max_length", max_length=77, truncation=True,
                      return_tensors="pt").input_ids.to(device)
    side.run("text", lambda: p.text_encoder(ids).last_hidden_state)
    side.run("unet", lambda: p.unet(cast(inp["z"]), 501, cast(inp["ctx"])).sample)
    side.run("vae_encode", lambda: p.vae.encode(cast(inp["x"])).latent_dist.mean)
    side.run("vae_decode", lambda: p.vae.decode(cast(inp["zdec"])).sample)
    if not args.skip_generate:
        latents = cast(z0.expand(len(args.prompts), -1, -1, -1).clone())
        side.run("generate", lambda: p(args.prompts, height=args.size, width=args.size,
                                       num_inference_steps=args.steps, guidance_scale=args.guidance,
                                       latents=latents, output_type="latent").images)
    side.finish()
    del p
    return side


def report(ours: Side, ref: Side, tol: dict, args) -> bool:
    mem = "GPU allocated" if ours.device.type == "cuda" else "RSS"
    print(f"\nparity, SD 1.5 shape{' (TINY)' if args.tiny else ''}, random weights: "
          f"{args.dtype} on {ours.device}, {args.size}x{args.size}, {args.steps} steps, "
          f"guidance {args.guidance}, seed {args.seed}")
    print(f"{'component':24} {'max|Δ|':>9} {'limit':>9} {'max|ref|':>9} "
          f"{'diffusers s':>12} {'minip2p s':>10}  ok")
    print(f"{'load':24} {'':>9} {'':>9} {'':>9} {ref.time['load']:12.2f} {ours.time['load']:10.2f}")
    ok = True
    for key in ref.out:
        a, b = ours.out[key], ref.out[key]
        d, scale = (a - b).abs().max().item(), b.abs().max().item()
        limit = tol[key] * max(1.0, scale)
        good = a.shape == b.shape and d <= limit  # NaN fails too
        ok &= good
        label = LABELS[key] + (f" ({args.steps} st)" if key == "generate" else "")
        print(f"{label:24} {d:9.2e} {limit:9.2e} {scale:9.2e} {ref.time[key]:12.2f} "
              f"{ours.time[key]:10.2f}  {'yes' if good else 'NO'}")
    print(f"{'peak ' + mem + ' GiB':24} {'':>9} {'':>9} {'':>9} {ref.peak:12.2f} {ours.peak:10.2f}")
    print("PASS" if ok else "FAIL: some component is out of tolerance")
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    ap.add_argument("--steps", type=int, help="DDIM steps (default 50 on GPU, 10 on CPU)")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    ap.add_argument("--prompts", nargs="+", default=PROMPTS)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--skip-generate", action="store_true")
    ap.add_argument("--keep", type=Path, help="save the random checkpoint here and keep it")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), {"fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    if args.steps is None:
        args.steps = 50 if device.type == "cuda" else 10
    geo = TINY if args.tiny else SD15

    g = torch.Generator().manual_seed(args.seed)  # shared inputs, drawn once on the CPU
    s = args.size // 8
    inp = dict(z=torch.randn(2, 4, s, s, generator=g),
               ctx=torch.randn(2, 77, geo["unet"]["cross_attention_dim"], generator=g),
               x=torch.rand(1, 3, args.size, args.size, generator=g) * 2 - 1,
               zdec=torch.randn(1, 4, s, s, generator=g))

    tmp = None if args.keep else tempfile.TemporaryDirectory(prefix="parity-")
    folder = args.keep or Path(tmp.name)
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    build_and_save(geo, folder, args.seed)
    gc.collect()
    print(f"saved random checkpoint to {folder} in {time.perf_counter() - t0:.1f} s", flush=True)
    try:
        ours, z0 = run_ours(folder, inp, args, device, dtype)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        ref = run_diffusers(folder, inp, args, device, dtype, z0)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0 if report(ours, ref, TOL[args.dtype], args) else 1


if __name__ == "__main__":
    sys.exit(main())

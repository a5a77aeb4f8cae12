"""A toy InstructPix2Pix (Brooks et al., CVPR 2023), trained on CPU from Prompt-to-Prompt pairs
that the toy model made itself (tools/make_instruct_pairs.py), shipped in weights/toy-instruct.

The UNet is the toy model's, its conv_in widened from 4 to 8 input channels: z_t ⊕ E(I), the
BEFORE picture's VAE posterior mode, unscaled (as the official code and diffusers' pipeline).
The new input channels start at zero (the official recipe), so step 0 is the toy model itself.
The text encoder and VAE stay frozen; the whole UNet learns. Where we differ: with Adam, weights
that start at zero and see a weak signal move slowly, too slowly for a CPU budget (figures in
tools/README.md); the new channels therefore see k·E(I) in training (--image-lr-scale k, 20)
and ship as k × their weights: the same network, their learning rate k times the rest. Optional
(--x0-weight c): each example's ε-MSE weighted by clamp(1/SNR_t, 1, c), the x̂₀ error, so that
the high t where the layout is decided (and the picture matters) weigh more; --high-t f: that
fraction of each batch draws t from the upper half of the schedule; --shift s: each example
(both pictures) moved by up to ±s latent pixels at every step, so that the place can only come
from E(I); --init starts from another run's checkpoint (weights and EMA). One step, for a batch
of pairs (before I, after x, instruction T):

    z₀ = E(x)·scaling_factor,  ε ~ N(0, 1),  t ~ U{0 … 999},  z_t = √ᾱ_t z₀ + √(1 − ᾱ_t) ε
    r ~ U(0, 1) per example, p = 0.05 (the official ddpm_edit.py / diffusers' script):
        text dropped to ""  where r < 2p            (5 % text only, 5 % both)
        E(I) set to zeros   where p ≤ r < 3p        (5 % both, 5 % image only)
    loss = mean of w_t ‖ε_θ(z_t ⊕ k·E(I), t, T) − ε‖²     (w_t = 1 unless --x0-weight)

AdamW (λ 1e-2), linear warm-up then constant (the official config; --schedule linear: a decay
to 0); an EMA of the weights ships. The loop is the shared one (minip2p/train/loop.py: seed,
checkpoint every --save-every steps, exact resume); a rerun with the same --work resumes, on
the pairs as they are then (the checkpoint's settings do not name the data).

    python -m tools.train_instruct --minutes 45          # train (resumes tools/out/instruct/train)
    python -m tools.train_instruct --export-only         # write weights/toy-instruct from the last checkpoint
    python -m tools.train_instruct --init CKPT --x0-weight 20 --high-t 0.3 --shift 2 --work DIR \
        --eval-every 500 --eval-cases 26     # and export DIR/model-K, evaluate it, every 500
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from minip2p.fast import install
from minip2p.load import load_model
from minip2p.model.config import UNetConfig
from minip2p.model.unet import UNet2DConditionModel
from minip2p.pipeline import encode_text
from tools.make_instruct_pairs import OUT
from tools.toy_layout import ROOT

P_DROP = 0.05
SRC = ROOT / "weights" / "toy"
DEST = ROOT / "weights" / "toy-instruct"


def widen(unet4: UNet2DConditionModel) -> UNet2DConditionModel:
    """The same UNet with conv_in taking 8 channels; channels 4…7 zero-initialised."""
    cfg = UNetConfig(**{**unet4.cfg.__dict__, "in_channels": 2 * unet4.cfg.in_channels})
    unet = UNet2DConditionModel(cfg)
    state = unet4.state_dict()
    w = state["conv_in.weight"]
    state["conv_in.weight"] = torch.cat([w, torch.zeros_like(w)], 1)
    unet.load_state_dict(state, strict=True)
    return unet


def load_pairs(model, kept: Path):
    """kept.jsonl -> (E(I) unscaled (n, 4, h, w), z₀ = E(x)·sf (n, 4, h, w), instruction index
    (n,), instructions), n = 2 × the lines: each also mirrored left-right (both pictures, as
    the official dataset's random flip; in pixels: the VAE is not mirror-symmetric). Encoded
    256 pictures at a time; a line's "before_shift" / "after_shift" (make_instruct_pairs
    --align) moves that picture first."""
    from PIL import Image
    rows = [json.loads(x) for x in kept.read_text().splitlines() if x.strip()]
    if not rows:
        raise SystemExit(f"{kept}: no pairs; run tools/make_instruct_pairs.py first")
    texts = sorted({r["instruction"] for r in rows})

    def pic(path, shift=None):                  # shift: (dy, dx) px, the edges replicated
        a = np.asarray(Image.open(path).convert("RGB"), np.float32) / 127.5 - 1
        if shift:
            (dy, dx), (h, w) = shift, a.shape[:2]
            m = max(abs(dy), abs(dx))
            a = np.pad(a, ((m, m), (m, m), (0, 0)), mode="edge")[m - dy:m - dy + h,
                                                                  m - dx:m - dx + w]
        return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)
    e_img, z0 = [], []
    with torch.no_grad():
        for at in range(0, len(rows), 256):
            part = rows[at:at + 256]
            before = torch.stack([pic(r["before"], r.get("before_shift")) for r in part])
            after = torch.stack([pic(r["after"], r.get("after_shift")) for r in part])
            for b, a in ((before, after), (before.flip(3), after.flip(3))):
                e_img.append(model.vae.encode(b))
                z0.append(model.vae.encode(a) * model.vae.cfg.scaling_factor)
    which = torch.tensor([texts.index(r["instruction"]) for r in rows])
    which = torch.cat([which[at:at + 256].repeat(2) for at in range(0, len(rows), 256)])
    return torch.cat(e_img), torch.cat(z0), which, texts


def shifted(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Each example of x (n, c, h, w) moved by its own (dy, dx) latent pixels, the edges
    replicated (the toy pictures' backgrounds are flat): a gather, so one call for the batch."""
    n, _, h, w = x.shape
    rows = (torch.arange(h)[None] - dy[:, None]).clamp(0, h - 1)            # (n, h)
    cols = (torch.arange(w)[None] - dx[:, None]).clamp(0, w - 1)            # (n, w)
    i = torch.arange(n)[:, None, None]
    return x.permute(0, 2, 3, 1)[i, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def make_step(unet, data, abar, batch: int, until: float | None, k_img: float = 1.0,
              x0_cap: float = 0.0, shift: int = 0, high_t: float = 0.0):
    """The learner's step for minip2p/train/loop.py: step(k, g) draws a batch of examples, their
    augmentation, dropout, noise and t from g, and returns the loss (the loop does backward and
    AdamW). Past `until` (a time.time()) it raises TimeUp, which the loop answers with a
    checkpoint. `shift`: each example (E(I) and z₀ alike) moved by up to ±shift latent pixels (a
    latent pixel is 4 px of picture, and the VAE a convolution), a new draw every step;
    `high_t`: that fraction of the batch draws t from the upper half U{T/2 … T−1}."""
    e_img, z0, which, text_emb, null = data

    def step(k, g):
        if until is not None and time.time() > until:
            raise TimeUp
        j = torch.randint(len(z0), (batch,), generator=g)
        text, img, z = text_emb[which[j]], e_img[j], z0[j]
        if shift:
            dy, dx = torch.randint(-shift, shift + 1, (2, batch), generator=g)
            img, z = shifted(img, dy, dx), shifted(z, dy, dx)
        r = torch.rand(batch, generator=g)
        text = torch.where((r < 2 * P_DROP)[:, None, None], null.expand_as(text), text)
        img = img * ~((r >= P_DROP) & (r < 3 * P_DROP))[:, None, None, None]
        eps = torch.randn(z.shape, generator=g)
        T = len(abar)
        t = torch.randint(0, T, (batch,), generator=g)
        if high_t:
            up = torch.rand(batch, generator=g) < high_t
            t = torch.where(up, torch.randint(T // 2, T, (batch,), generator=g), t)
        a = abar[t][:, None, None, None]
        zt = a.sqrt() * z + (1 - a).sqrt() * eps
        per = (unet(torch.cat([zt, k_img * img], 1), t, text) - eps).pow(2).mean((1, 2, 3))
        if x0_cap:                              # w_t = clamp(1/SNR_t, 1, cap) (see --x0-weight)
            per = per * ((1 - abar[t]) / abar[t]).clamp(1, x0_cap)
        return per.mean()
    return step


class TimeUp(KeyboardInterrupt):
    """--minutes ran out: the loop checkpoints the last whole step, as for Ctrl-C."""


def export(ema, dest: Path, info: dict, k_img: float = 1.0) -> None:
    """weights/toy with the 8-channel UNet (fp16; the image channels' weights × k_img, see
    --image-lr-scale), written beside `dest` and renamed into place; an existing README.md is
    kept."""
    tmp = dest.with_name(f".{dest.name}-new")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(SRC, tmp, ignore=shutil.ignore_patterns("README.md", "figures",
                                                            "training-*.json"))
    cfg = json.loads((SRC / "unet" / "config.json").read_text())
    cfg["in_channels"] = ema.cfg.in_channels
    (tmp / "unet" / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    index = json.loads((SRC / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionInstructPix2PixPipeline"
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    state = {k: v.detach().clone() for k, v in ema.state_dict().items()}
    c = ema.cfg.in_channels // 2
    state["conv_in.weight"][:, c:] *= k_img
    save_file({k: v.to(torch.float16).contiguous() for k, v in state.items()},
              str(tmp / "unet" / "diffusion_pytorch_model.safetensors"))
    (tmp / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    for f in tmp.rglob("*"):                     # save_file leaves its files private (0600)
        f.chmod(0o755 if f.is_dir() else 0o644)
    if (dest / "README.md").is_file():
        shutil.copy(dest / "README.md", tmp / "README.md")
    old = dest.with_name(f".{dest.name}-old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


def mid_check(ema, work: Path, step: int, n: int, k_img: float) -> None:
    """--eval-every: the EMA as WORK/model-STEP on eval_instruct's first n cases (evals.jsonl)."""
    from tools.eval_instruct import evaluate
    dest = work / f"model-{step}"
    export(ema, dest, dict(step=step), k_img)
    rows, _ = evaluate(load_model(str(dest)), n, 20, progress=lambda _: None)
    sums = {m: sum(r[m] for r in rows) for m in ("done", "kept", "clean")}
    kept = [r["kind"] for r in rows if r["kept"]]
    sums |= {f"kept_{k}": kept.count(k) for k in ("color", "shape", "size")}
    with open(work / "evals.jsonl", "a") as f:
        f.write(json.dumps(dict(step=step, cases=n, **sums)) + "\n")
    print(f"\nstep {step}: {sums} of {n}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", default=str(OUT / "kept.jsonl"))
    p.add_argument("--work", default=str(OUT / "train"), help="checkpoint folder (resumed)")
    p.add_argument("--out", default=str(DEST))
    p.add_argument("--steps", type=int, default=4000, help="total steps")
    p.add_argument("--minutes", type=float, default=0,
                   help="stop (checkpoint, export) after this many minutes of this run (0: never)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--schedule", default="constant", help="constant | linear | cosine (to 0)")
    p.add_argument("--eval-every", type=int, default=0, metavar="N", help="see mid_check (0)")
    p.add_argument("--eval-cases", type=int, default=26)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--image-lr-scale", type=float, default=20.0,
                   help="k: the new channels see k·E(I), ship as k × their weights (20)")
    p.add_argument("--x0-weight", type=float, default=0.0,
                   help="cap c: ε-MSE weighted by clamp(1/SNR_t, 1, c) (0: the official loss)")
    p.add_argument("--shift", type=int, default=0,
                   help="move each example by up to ±N latent pixels at every step (0)")
    p.add_argument("--high-t", type=float, default=0.0,
                   help="this fraction of each batch draws t from the upper half (0)")
    p.add_argument("--init", default=None, metavar="CKPT",
                   help="start from another run's checkpoint weights (and EMA); fresh optimizer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save-every", type=int, default=25)
    p.add_argument("--export-only", action="store_true")
    args = p.parse_args(argv)
    from minip2p.cli import _terminate
    from minip2p.train.loop import Plan, train
    signal.signal(signal.SIGTERM, _terminate)   # kill -TERM: checkpoint the last whole step
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt, clock = work / "unet.ckpt.safetensors", work / "clock.json"
    model = load_model(None, fast=False)
    unet = widen(model.unet).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    install(unet)                               # fused attention for training
    params = dict(unet.named_parameters())
    state = {f"ema.{n}": q for n, q in ema.named_parameters()}
    plan = Plan(steps=args.steps, lr=args.lr, seed=args.seed, weight_decay=1e-2,
                warmup=args.warmup, schedule=args.schedule, save_every=args.save_every,
                desc="toy instruct")
    settings = dict(batch=args.batch, ema=args.ema, p_drop=P_DROP, k_img=args.image_lr_scale,
                    x0_weight=args.x0_weight, init=args.init, shift=args.shift,
                    high_t=args.high_t)
    if args.init and not (work / "unet.ckpt.json").is_file():
        from safetensors.torch import load_file
        saved = load_file(str(args.init))
        with torch.no_grad():
            for pre, d in (("param", params), ("state", state)):
                for n, q in d.items():
                    q.copy_(saved[f"{pre}.{n}"])
    info = json.loads(clock.read_text()) if clock.is_file() else dict(seconds=0.0, runs=[])
    if args.export_only:
        from safetensors.torch import load_file
        saved = load_file(str(ckpt))
        ema.load_state_dict({n[len("state.ema."):]: v for n, v in saved.items()
                             if n.startswith("state.ema.")}, strict=False)
        step = json.loads(ckpt.with_suffix(".json").read_text())["step"]
        export(ema, Path(args.out), dict(info, step=step), args.image_lr_scale)
        print(f"wrote {args.out} (step {step})")
        return
    e_img, z0, which, texts = load_pairs(model, Path(args.pairs))
    data = (e_img, z0, which, encode_text(model, texts), encode_text(model, [""]))
    print(f"{len(z0)} examples (kept lines and mirrors), {len(texts)} instructions", flush=True)
    abar = model.scheduler.alphas_cumprod.float()
    t0 = time.time()
    until = t0 + 60 * args.minutes if args.minutes else None

    def after(k):                               # the EMA of the weights (what ships)
        d = min(args.ema, (1 + k) / (10 + k))
        for e, q in zip(ema.parameters(), unet.parameters()):
            e.lerp_(q, 1 - d)
        if args.eval_every and (k + 1) % args.eval_every == 0:
            mid_check(ema, work, k + 1, args.eval_cases, args.image_lr_scale)

    try:
        step_fn = make_step(unet, data, abar, args.batch, until, args.image_lr_scale,
                            args.x0_weight, args.shift, args.high_t)
        step = train(params, step_fn, plan, ckpt, settings, after=after, state=state).step
    except TimeUp:
        step = json.loads(ckpt.with_suffix(".json").read_text())["step"]
    info["seconds"] += time.time() - t0
    info["runs"].append(dict(examples=len(z0), pairs=len(z0) // 4,
                             until_step=step, minutes=round((time.time() - t0) / 60, 1)))
    clock.write_text(json.dumps(info) + "\n")
    export(ema, Path(args.out), dict(info, step=step, batch=args.batch, lr=args.lr, ema=args.ema,
                                     schedule=args.schedule, p_drop=P_DROP, instructions=texts,
                                     image_lr_scale=args.image_lr_scale), args.image_lr_scale)
    print(f"step {step}: wrote {args.out} ({info['seconds'] / 60:.1f} min trained in all)")


if __name__ == "__main__":
    main()

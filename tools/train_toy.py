"""Train the small model that ships in weights/toy: a latent diffusion model of the SD 1.x family
(AutoencoderKL, CLIP text encoder trained from scratch jointly with the UNet, DDIM schedule) on
procedurally drawn shapes (minip2p/toydata.py). Seeded and repeatable on one machine.

    stage 1  VAE: 64x64 px <-> 4x16x16 latents; L1 + L2 + edge (finite-difference) L1
             reconstruction + a small KL term; scaling_factor = 1 / std of the latents
    stage 2  UNet + text encoder jointly: ε-prediction with Min-SNR-γ weighting on the SD 1.x
             noise schedule, 10 % of captions dropped to "" (for classifier-free guidance),
             AdamW, EMA; optionally multi-resolution ("pyramid") noise

The result is written in diffusers layout (fp16 safetensors) into a temporary folder next to
--out and renamed into place when complete, so a half-written model never sits in --out.
The shipped model took three runs (stage 1; stage 2; stage 2 continued with --pyramid-noise):
their exact commands and times are in weights/toy/README.md.

    python -m tools.train_toy --steps-unet 0 --out /tmp/vae         # stage 1 only
    python -m tools.train_toy --vae-from /tmp/vae --out /tmp/toy    # stage 2 on that VAE
    python -m tools.train_toy --init /tmp/toy --pyramid-noise 0.5   # continue stage 2
    python -m tools.train_toy --quick --out /tmp/t                  # a few steps, for CI
"""
from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tools import toydata
from minip2p.fast import install
from minip2p.model.clip import CLIPTextModel
from minip2p.model.config import SchedulerConfig, TextConfig, UNetConfig, VAEConfig
from minip2p.samplers.ddim import DDIM
from minip2p.model.tokenizer import ClipTokenizer
from minip2p.model.unet import UNet2DConditionModel
from minip2p.model.vae import AutoencoderKL
from tools.toy_layout import ROOT, SCHEDULER, TEXT, TOKENIZER, UNET, VAE, export


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def lr_at(step, total, peak, warmup):
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def train_vae(vae, caps, args, gen, device):
    with torch.no_grad():                    # start with a narrow posterior (σ ≈ 0.05), not σ = 1,
        vae.quant_conv.bias[vae.cfg.latent_channels:] = -6.0     # so the decoder sees the signal
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr_vae, weight_decay=0.0)
    t0 = time.time()
    for step in range(args.steps_vae):
        x = toydata.draw(caps.attrs[caps.sample(args.batch_vae, gen)], gen).to(device)
        mean, logvar = vae.quant_conv(vae.encoder(x)).chunk(2, dim=1)
        logvar = logvar.clamp(-30, 20)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen).to(device)
        rec = vae.decode(z)
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()
        # edges: L1 between the finite differences of the picture and of its reconstruction,
        # which keeps corners sharp (the shape analyser reads them)
        edge = ((rec.diff(dim=2) - x.diff(dim=2)).abs().mean() + (rec.diff(dim=3) - x.diff(dim=3)).abs().mean())
        loss = (rec - x).abs().mean() + ((rec - x) ** 2).mean() + args.edge * edge + args.kl * kl
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps_vae, args.lr_vae, min(100, args.steps_vae // 10 + 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % args.log_every == 0 or step == args.steps_vae - 1:
            el = time.time() - t0
            log(f"vae {step + 1}/{args.steps_vae} loss {loss.item():.4f} kl {kl.item():.3f} "
                f"{(step + 1) / el:.2f} it/s")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        x = toydata.draw(caps.attrs[caps.sample(256 if args.batch_vae > 4 else 8, gen)], gen).to(device)
        z = torch.cat([vae.encode(c) for c in x.split(64)])
        std = z.std().item()
        err = (vae.decode(z[:64]) - x[:64]).abs().mean().item()
    log(f"vae done in {time.time() - t0:.0f}s: latent std {std:.4f}, L1 reconstruction {err:.4f}")
    return 1.0 / std, err, time.time() - t0


def fresh_unet_and_text(device):
    """A randomly initialised UNet and text encoder (token and position tables as small as
    CLIP's own initialisation), drawn from torch's global generator."""
    unet = UNet2DConditionModel(UNetConfig.from_dict(UNET)).to(device)
    text = CLIPTextModel(TextConfig.from_dict(TEXT)).to(device)
    torch.nn.init.normal_(text.text_model.embeddings.token_embedding.weight, std=0.02)
    torch.nn.init.normal_(text.text_model.embeddings.position_embedding.weight, std=0.01)
    return unet, text


def ema_update(ema, model, decay):
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def train_diffusion(unet, text, vae, sf, caps, args, gen, device):
    install(unet)                      # fused attention; oneDNN only where autograd is off
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ema_u, ema_t = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text).requires_grad_(False)
    sched = DDIM(SchedulerConfig.from_dict(SCHEDULER))
    abar = sched.alphas_cumprod.to(device)
    caps_empty = ClipTokenizer.from_dir(TOKENIZER)([""])[0].to(device)
    if args.steps_unet == 0:                     # stage 1 only (see --vae-from)
        return ema_u, ema_t, None, 0.0, 0
    # A pool of encoded pictures: the VAE encoder runs once per picture, not once per step.
    t0 = time.time()
    pool_idx = caps.sample(args.pool, gen)
    with torch.no_grad():
        pool = torch.cat([vae.encode(toydata.draw(caps.attrs[i], gen).to(device)) * sf
                          for i in pool_idx.split(256)])
    log(f"pool of {args.pool} encoded pictures in {time.time() - t0:.0f}s")
    t0, avg, done = time.time(), None, 0
    for step in range(args.steps_unet):
        if args.max_minutes and time.time() - args.started > 60 * args.max_minutes:
            log(f"time limit: stopping after {step} steps")
            break
        j = torch.randint(args.pool, (args.batch,), generator=gen)
        idx, z0 = pool_idx[j], pool[j.to(device)]
        ids = caps.ids[idx].to(device)
        drop = (torch.rand(args.batch, generator=gen) < args.drop).to(device)
        ids = torch.where(drop[:, None], caps_empty[None], ids)
        noise = torch.randn(z0.shape, generator=gen)
        if args.pyramid_noise:  # multi-resolution noise: the same at 8², 4², 2², 1² (weights d^i;
            # the 1² level is "offset noise"), so the coarse layout of z_t at high t is noise too
            # and the caption has to set the background (and position); rescaled to unit variance
            side, level, var = z0.shape[-1] // 2, 1, 1.0
            while side >= 1:
                w = args.pyramid_noise ** level
                coarse = torch.randn(*z0.shape[:2], side, side, generator=gen)
                noise = noise + w * F.interpolate(coarse, size=z0.shape[-2:], mode="nearest")
                var, side, level = var + w * w, side // 2, level + 1
            noise = noise / var ** 0.5
        noise = noise.to(device)
        t = torch.randint(0, 1000, (args.batch,), generator=gen).to(device)
        a = abar[t][:, None, None, None]
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            eps = unet(zt, t, text(ids))
        # Min-SNR-γ weighting (Hang et al. 2023, arXiv 2303.09556) for ε-prediction:
        # w_t = min(SNR_t, γ) / SNR_t with SNR_t = ᾱ_t / (1 - ᾱ_t); γ = 0 turns it off
        per = (eps.float() - noise).pow(2).mean(dim=(1, 2, 3))
        if args.min_snr:
            snr = abar[t] / (1 - abar[t])
            per = per * snr.clamp(max=args.min_snr) / snr
        loss = per.mean()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps_unet, args.lr, args.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        ema_update(ema_u, unet, decay)
        ema_update(ema_t, text, decay)
        done = step + 1
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        if step % args.log_every == 0 or step == args.steps_unet - 1:
            el = time.time() - t0
            log(f"unet {step + 1}/{args.steps_unet} loss {loss.item():.4f} (avg {avg:.4f}) "
                f"{(step + 1) / el:.2f} it/s, eta {(args.steps_unet - step - 1) * el / (step + 1) / 60:.1f} min")
        if args.snapshot and args.snapshot_every and (step + 1) % args.snapshot_every == 0:
            export(Path(args.snapshot), ema_u, vae, ema_t, sf, dict(vars(args), at_step=step + 1))
            log(f"snapshot at step {step + 1} -> {args.snapshot}")
    return ema_u, ema_t, avg, time.time() - t0, done


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "weights" / "toy"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda ...")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps-vae", type=int, default=500)
    p.add_argument("--steps-unet", type=int, default=4000)
    p.add_argument("--batch-vae", type=int, default=16)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr-vae", type=float, default=1e-3)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--kl", type=float, default=1e-4, help="KL weight (per element)")
    p.add_argument("--edge", type=float, default=1.0, help="weight of the VAE's edge (gradient) L1")
    p.add_argument("--min-snr", type=float, default=5.0, help="Min-SNR-γ loss weight (0: plain MSE)")
    p.add_argument("--pyramid-noise", type=float, default=0.0,
                   help="multi-resolution noise discount d (0: off; e.g. 0.5)")
    p.add_argument("--drop", type=float, default=0.1, help="caption dropout for CFG")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--snapshot", default=None, help="folder for periodic snapshots (EMA weights)")
    p.add_argument("--snapshot-every", type=int, default=0)
    p.add_argument("--pool", type=int, default=32768, help="encoded pictures drawn up front")
    p.add_argument("--max-minutes", type=float, default=0, help="stop stage 2 early (0: never)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--init", default=None, help="continue stage 2 from this model folder")
    start.add_argument("--vae-from", default=None,
                   help="take the trained VAE (and scaling factor) from this model folder, skip stage 1")
    p.add_argument("--quick", action="store_true", help="a few tiny steps (CI smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps_vae, args.steps_unet, args.batch_vae, args.batch = 2, 3, 4, 4
        args.warmup, args.log_every, args.pool = 1, 1, 16
    args.started = time.time()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    gen = torch.Generator().manual_seed(args.seed)
    log(f"device {device}, threads {torch.get_num_threads()}, args {vars(args)}")
    caps = toydata.Captions(ClipTokenizer.from_dir(TOKENIZER))
    log(f"{len(caps.texts)} captions, {int(caps.train.sum())} for training, held out: "
        f"{sorted(toydata.HELD_OUT)}")

    if args.vae_from:                            # stage 1 done by an earlier run
        from minip2p.load import load_folder
        vae = load_folder(args.vae_from, device=device).vae
        unet, text = fresh_unet_and_text(device)
    elif args.init:                              # continue from a trained folder (stage 2 only)
        from minip2p.load import load_folder
        m = load_folder(args.init, device=device)
        vae, unet, text = m.vae, m.unet.train().requires_grad_(True), \
            m.text_encoder.train().requires_grad_(True)
    else:
        vae = AutoencoderKL(VAEConfig.from_dict(VAE)).to(device)
        unet, text = fresh_unet_and_text(device)
    for name, m in (("vae", vae), ("unet", unet), ("text encoder", text)):
        log(f"{name}: {sum(q.numel() for q in m.parameters()) / 1e6:.2f} M parameters")

    if args.init or args.vae_from:
        vae.eval().requires_grad_(False)
        sf, vae_err, t_vae = vae.cfg.scaling_factor, None, 0.0
    else:
        sf, vae_err, t_vae = train_vae(vae, caps, args, gen, device)
    unet, text, loss, t_unet, done = train_diffusion(unet, text, vae, sf, caps, args, gen, device)
    info = dict(vars(args), steps_unet_done=done, scaling_factor=sf, vae_l1=vae_err, final_loss=loss,
                seconds_vae=round(t_vae), seconds_unet=round(t_unet), device=str(device),
                torch=torch.__version__)
    export(Path(args.out), unet, vae, text, sf, info)
    log(f"wrote {args.out} (vae {t_vae / 60:.1f} min, unet+text {t_unet / 60:.1f} min)")


if __name__ == "__main__":
    main()

"""Train the toy ControlNet that ships in weights/toy-controlnet: the toy model (weights/toy)
conditioned on the Canny edges of its own pictures, so the shape follows a drawn outline while
the prompt still sets the colour. The official recipe (Zhang et al. 2023, `tutorial_train.py`),
scaled to the toy:

    net = ControlNet.from_unet(toy UNet)        encoder copied from the UNet, zero convs zero
    hint = canny(picture) / 255, 3 channels     our Canny (minip2p/real/canny.py), 100 / 200,
                                                at the picture's 64×64 (hint encoder 16-32-96,
                                                two stride-2 convs: 4× down, the toy VAE's factor)
    loss = ‖ε − ε_θ(z_t, t, c, residuals = net(z_t, t, c, hint))‖²,  t ~ U{0 … 999}
    the UNet, the VAE and the text encoder frozen (sd_locked); AdamW on the net only

Where we differ from the official code: the hint encoder's last conv keeps PyTorch's default
initialisation (--hint-init default) instead of zeros. With both it and the zero convs at zero the
hint's gradient is second order, and the net starts to read the hint far later than a CPU run
can wait (tools/README.md); the zero convs alone already make the untrained net add nothing.

Toy recipe on top: pictures and captions from tools/toydata.py (held-out pairs excluded), drawn and
encoded once into a pool; multi-resolution noise as the toy model's last stage (so the layout of
z_t at large t is noise and the net has to put the shape where the hint says); captions replaced
by "" with probability --drop (the paper drops 50 %: the net learns to read the hint alone);
EMA of the net's weights, which is what is exported.

Resumable: every --save-every steps the net, its EMA, AdamW's moments and the generator's state
go to OUT.state/ (safetensors + JSON); a restart with the same command continues from there.

    python -m tools.train_controlnet --out weights/toy-controlnet     # 1 thread, CPU
    python -m tools.train_controlnet --quick --out /tmp/cn            # a few steps (CI)
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from minip2p.load import load_folder
from minip2p.load.controlnet import save_controlnet
from minip2p.model.controlnet import ControlNet
from minip2p.real.canny import canny
from tools import toydata
from tools.toy_layout import ROOT

HINT_WIDTHS = (16, 32, 96)          # the toy's hint encoder: 64 px → 16 latents (two stride-2)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def lr_at(step, total, peak, warmup):
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def hints_of(pictures: torch.Tensor) -> torch.Tensor:
    """Pictures (n, 3, H, W) in [-1, 1] → their Canny edge maps (n, 3, H, W) in [0, 1], as the
    official annotator: uint8 RGB → cv2.Canny(100, 200) → HWC3 → /255."""
    u8 = ((pictures.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    edges = np.stack([canny(np.ascontiguousarray(p)) for p in u8])          # (n, H, W)
    return torch.from_numpy(edges).float().div(255)[:, None].expand(-1, 3, -1, -1).contiguous()


def make_pool(model, caps, n, seed):
    """n training pictures, drawn from their own seed (the same on a restart): latents z₀,
    hints, caption indices."""
    gen = torch.Generator().manual_seed(seed + 1)
    idx = caps.sample(n, gen)
    z0, hints = [], []
    with torch.no_grad():
        for i in idx.split(256):
            x = toydata.draw(caps.attrs[i], gen)
            hints.append(hints_of(x))
            z0.append(model.vae.encode(x) * model.vae.cfg.scaling_factor)
    return torch.cat(z0), torch.cat(hints), idx


def pyramid(noise, d, gen):
    """Multi-resolution noise (tools/train_toy.py): extra components constant over 2×2 … whole
    latent blocks, weights d, d², …, rescaled to unit variance."""
    side, level, var = noise.shape[-1] // 2, 1, 1.0
    while side >= 1:
        w = d ** level
        coarse = torch.randn(*noise.shape[:2], side, side, generator=gen)
        noise = noise + w * F.interpolate(coarse, size=noise.shape[-2:], mode="nearest")
        var, side, level = var + w * w, side // 2, level + 1
    return noise / var ** 0.5


def save_state(folder: Path, net, ema, opt, step, gen, info):
    """Everything a restart needs, safetensors + JSON (no pickles), written then renamed."""
    folder.mkdir(parents=True, exist_ok=True)
    t = {f"net.{k}": v.contiguous() for k, v in net.state_dict().items()}
    t.update({f"ema.{k}": v.contiguous() for k, v in ema.state_dict().items()})
    names = [n for n, _ in net.named_parameters()]
    for p, n in zip(net.parameters(), names):
        s = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in s:
                t[f"opt.{key}.{n}"] = s[key].contiguous()
    t["gen"], t["step"] = gen.get_state(), torch.tensor(step)     # the step: with the weights
    steps = {n: float(opt.state[p]["step"]) for p, n in zip(net.parameters(), names)
             if p in opt.state}
    save_file(t, str(folder / "state.tmp"))
    (folder / "state.json.tmp").write_text(json.dumps(dict(info, step=step, adam_steps=steps)))
    (folder / "state.tmp").rename(folder / "state.safetensors")
    (folder / "state.json.tmp").rename(folder / "state.json")


def load_state(folder: Path, net, ema, opt, gen) -> tuple[int, dict]:
    t, info = load_file(str(folder / "state.safetensors")), json.loads((folder / "state.json").read_text())
    net.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("net.")})
    ema.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("ema.")})
    for n, p in net.named_parameters():
        if f"opt.exp_avg.{n}" in t:
            opt.state[p] = dict(step=torch.tensor(info["adam_steps"][n]),
                                exp_avg=t[f"opt.exp_avg.{n}"], exp_avg_sq=t[f"opt.exp_avg_sq.{n}"])
    gen.set_state(t["gen"])
    return int(t["step"]) if "step" in t else info["step"], info


def export(ema, out: Path, info: dict):
    """The EMA weights in fp16, diffusers layout (load.controlnet.save_controlnet), and the run's
    arguments and figures in training.json."""
    half = ControlNet(ema.cfg)
    half.load_state_dict(ema.state_dict())
    save_controlnet(half.half(), out)
    (out / "training.json").write_text(json.dumps(dict(info, torch=torch.__version__), indent=1) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "weights" / "toy"))
    p.add_argument("--out", default=str(ROOT / "weights" / "toy-controlnet"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--drop", type=float, default=0.5, help="caption dropout (the paper's 50 %%)")
    p.add_argument("--pyramid-noise", type=float, default=0.5, help="0: plain Gaussian noise")
    p.add_argument("--ema", type=float, default=0.99)
    p.add_argument("--pool", type=int, default=2048, help="pictures drawn and encoded up front")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--hint-init", choices=["zero", "default"], default="default",
                   help="the hint encoder's last conv: zero (the official code) or PyTorch's default "
                        "init (the zero convs alone keep the start harmless; learns sooner)")
    p.add_argument("--stop-after", type=int, default=0,
                   help="stop once this step is saved (0: run to --steps); a restart resumes")
    p.add_argument("--quick", action="store_true", help="a few tiny steps (CI smoke test)")
    p.add_argument("--export", default=None, help="only write the EMA weights saved so far in "
                                                    "OUT.state/ to this folder (a look mid-run)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.batch, args.pool, args.warmup, args.log_every, args.save_every = 3, 4, 8, 1, 1, 2
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out, state_dir = Path(args.out), Path(str(args.out) + ".state")
    model = load_folder(args.model)
    for m in (model.unet, model.vae, model.text_encoder):
        m.eval().requires_grad_(False)
    caps = toydata.Captions(model.tokenizer)
    net = ControlNet.from_unet(model.unet, conditioning_embedding_out_channels=HINT_WIDTHS).train()
    ema = ControlNet.from_unet(model.unet, conditioning_embedding_out_channels=HINT_WIDTHS).eval()
    if args.hint_init == "default":
        net.controlnet_cond_embedding.conv_out.reset_parameters()
    ema.load_state_dict(net.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    step, t_before = 0, 0.0
    if (state_dir / "state.json").is_file():
        step, info = load_state(state_dir, net, ema, opt, gen)
        t_before = info.get("seconds", 0.0)
        log(f"resumed at step {step} from {state_dir}")
    if args.export:
        export(ema, Path(args.export), dict(vars(args), steps_done=step, seconds=round(t_before)))
        return log(f"wrote the EMA weights of step {step} to {args.export}")
    log(f"net {sum(q.numel() for q in net.parameters()) / 1e6:.2f} M parameters, args {vars(args)}")
    t0 = time.time()
    z0s, hints, idx = make_pool(model, caps, args.pool, args.seed)
    log(f"pool of {args.pool} pictures (latents, Canny hints) in {time.time() - t0:.0f}s; "
        f"edge pixels {hints[:, 0].mean().item():.3f}")
    empty = model.tokenizer([""])[0]
    with torch.no_grad():
        ctx_all = model.text_encoder(caps.ids[idx.unique()])
        ctx_empty = model.text_encoder(empty[None])[0]
    ctx_row = {int(i): r for r, i in enumerate(idx.unique().tolist())}
    abar = model.scheduler.alphas_cumprod
    t0, avg, first = time.time(), None, step
    while step < args.steps:
        j = torch.randint(args.pool, (args.batch,), generator=gen)
        z0, hint = z0s[j], hints[j]
        ctx = ctx_all[[ctx_row[int(i)] for i in idx[j]]]
        drop = torch.rand(args.batch, generator=gen) < args.drop
        ctx = torch.where(drop[:, None, None], ctx_empty[None], ctx)
        noise = torch.randn(z0.shape, generator=gen)
        if args.pyramid_noise:
            noise = pyramid(noise, args.pyramid_noise, gen)
        t = torch.randint(0, 1000, (args.batch,), generator=gen)
        a = abar[t][:, None, None, None]
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        down, mid = net(zt, t, ctx, hint)
        eps = model.unet(zt, t, ctx, residuals=(down, mid))
        loss = F.mse_loss(eps, noise)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for e, q in zip(ema.parameters(), net.parameters()):
                e.lerp_(q, 1 - decay)
        step += 1
        avg = loss.item() if avg is None else 0.95 * avg + 0.05 * loss.item()
        if step % args.log_every == 0 or step == args.steps:
            el = time.time() - t0
            rate = (step - first) / (time.time() - t0)
            log(f"step {step}/{args.steps} loss {loss.item():.4f} (avg {avg:.4f}), {rate:.2f} it/s, "
                f"eta {(args.steps - step) / rate / 60:.0f} min")
        if step % args.save_every == 0 or step == args.steps:
            save_state(state_dir, net, ema, opt, step, gen,
                       dict(args=vars(args), seconds=t_before + time.time() - t0, loss_avg=avg))
            if args.stop_after and step >= args.stop_after:
                return log(f"stopped after step {step} (--stop-after); run again to resume")
    seconds = t_before + time.time() - t0
    export(ema, out, dict(vars(args), steps_done=step, seconds=round(seconds), loss_avg=avg))
    log(f"wrote {out} ({seconds / 60:.1f} min of training)")


if __name__ == "__main__":
    main()

"""A toy structure judge: a small ViT in DINO's layout whose last-layer keys see outlines, trained
on drawn toy pictures with their masks, for DiffuseIT's structure losses on the toy model.

Real DINO learns by self-distillation, and its last-layer keys come out grouped by object: the
key self-similarity S_ij = cos(k_i, k_j) of a picture is, roughly, its layout. This stand-in is
taught that property directly (it is not DINO). For a drawn picture x with object coverage
m_i ∈ [0, 1] of each patch i (the fraction of the patch inside an object, from the drawing):

    T_ij   = cos(π/2 · (m_i − m_j))            1 for two patches alike, 0 for object vs background
    L_keys = mean_ij (S_ij(x) − T_ij)²          over the patch tokens ([CLS] left free)
    L_cls  = CE(colour) + CE(shape) + CE(background)  of linear heads on [CLS] (the last block's
                                                       output, before the final norm)
    L      = L_keys + 0.1 · L_cls

T is realisable (k_i = (cos πm_i/2, sin πm_i/2) gives it) and depends on the masks only, so the
keys learn where the object's outline runs, whatever its colour: the structure loss then holds
the shape while CLIP changes the colour. [CLS] learns what the picture shows (DiffuseIT's
semantic and target losses read it). Pictures: tools/toydata.py at 64 px, a quarter with two
objects, blurred (σ up to 1.2 px) and noised (up to 0.04) at random so that decoded pictures
read as drawn ones do; fed as DiffuseIT feeds them (model/dino.py `preprocess`: Resize(224),
ImageNet normalisation). Layout: 4 layers, width 128, 4 heads, patch 16 on 224 px (14 × 14
patches, about 4.6 source pixels each).

    OMP_NUM_THREADS=1 python -m tools.train_toy_dino --out tools/out/toy-dino --steps 250 --batch 24

Resumable (a checkpoint every 50 steps in OUT/checkpoint/); writes OUT/dino, a transformers
ViTModel folder (config.json + fp16 model.safetensors) that model/dino.py loads.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from minip2p.model.dino import DinoConfig, DinoViT, preprocess
from tools import toydata

SIZE, PATCH, WIDTH, LAYERS, HEADS = 224, 16, 128, 4, 4
WHITE, BLACK = toydata.COLOR_NAMES.index("white"), toydata.COLOR_NAMES.index("black")


def config() -> dict:
    return {"model_type": "vit", "architectures": ["ViTModel"], "hidden_size": WIDTH,
            "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "intermediate_size": 4 * WIDTH, "image_size": SIZE, "patch_size": PATCH,
            "num_channels": 3, "qkv_bias": True, "hidden_act": "gelu", "layer_norm_eps": 1e-6}


class Judge(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.dino = DinoViT(DinoConfig.from_dict(config(), "toy dino"))
        n = len(toydata.COLOR_NAMES)
        self.heads = torch.nn.ModuleDict({"colour": torch.nn.Linear(WIDTH, n),
                                          "shape": torch.nn.Linear(WIDTH, 3),
                                          "background": torch.nn.Linear(WIDTH, n + 1)})


def batch(rows: torch.Tensor, single: torch.Tensor, n: int, gen: torch.Generator):
    """n drawn pictures in [0, 1] (n, 3, 64, 64), their attributes (n, 7) and object coverage
    (n, 64, 64): the same geometry drawn white on black (toydata.draw's randomness does not
    depend on the colours), a quarter of the pictures with two objects."""
    one = torch.rand(n, generator=gen) < 0.75
    pick = torch.where(one, single[torch.randint(len(single), (n,), generator=gen)],
                       torch.randint(len(rows), (n,), generator=gen))
    attrs = rows[pick]
    seed = int(torch.randint(2 ** 31, (1,), generator=gen))
    x = toydata.draw(attrs, torch.Generator().manual_seed(seed)) / 2 + 0.5
    mono = attrs.clone()
    mono[:, 0], mono[:, 4] = WHITE, BLACK
    mono[:, 5] = torch.where(mono[:, 5] >= 0, WHITE, -1)
    m = toydata.draw(mono, torch.Generator().manual_seed(seed)).mean(1) / 2 + 0.5
    return x, attrs, ((m - 0.05) / 0.92).clamp(0, 1)


def degrade(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random Gaussian blur (σ ∈ [0, 1.2] px, one per batch) and noise (std ∈ [0, 0.04])."""
    sigma = 1.2 * float(torch.rand(1, generator=gen))
    if sigma > 0.2:
        r = torch.arange(-3, 4, dtype=torch.float)
        k = (-r ** 2 / (2 * sigma ** 2)).exp()
        k = k / k.sum()
        x = F.conv2d(F.pad(x, (3, 3, 0, 0), mode="replicate"), k.view(1, 1, 1, 7).repeat(3, 1, 1, 1),
                     groups=3)
        x = F.conv2d(F.pad(x, (0, 0, 3, 3), mode="replicate"), k.view(1, 1, 7, 1).repeat(3, 1, 1, 1),
                     groups=3)
    std = 0.04 * torch.rand(len(x), 1, 1, 1, generator=gen)
    return (x + std * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def coverage(m: torch.Tensor) -> torch.Tensor:
    """(n, 64, 64) coverage -> (n, P) per patch of the 224-px input, as the ViT sees it."""
    up = F.interpolate(m[:, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return F.avg_pool2d(up, PATCH).flatten(1)


def self_similarity(k: torch.Tensor) -> torch.Tensor:
    k = F.normalize(k, dim=-1)
    return k @ k.transpose(1, 2)


def losses(judge: Judge, x, attrs, m) -> dict:
    feats = judge.dino(preprocess(x, patch=PATCH))
    cov = coverage(m)
    target = torch.cos(math.pi / 2 * (cov[:, :, None] - cov[:, None, :]))
    S = self_similarity(feats.keys[:, 1:])
    cls = feats.cls
    out = {"keys": (S - target).pow(2).mean()}
    labels = {"colour": attrs[:, 0], "shape": attrs[:, 1], "background": attrs[:, 4] + 1}
    out["cls"] = sum(F.cross_entropy(judge.heads[k](cls), y) for k, y in labels.items())
    # read-out: S within objects minus S across the outline (hard patches only)
    obj, bg = cov > 0.9, cov < 0.1
    pair = lambda a, b: (S * (a[:, :, None] & b[:, None, :])).sum() / (a[:, :, None] & b[:, None, :]).sum().clamp(min=1)  # noqa: E731
    out["gap"] = (pair(obj, obj) - pair(obj, bg)).detach()
    return out


@torch.no_grad()
def check(folder: str, n: int = 48, seed: int = 1) -> dict:
    """What a DINO-layout folder's structure loss sees on n drawn single objects: L_ssim (as
    DiffuseIT computes it) between a picture and (a) the same drawing recoloured (object and
    background), (b) the object moved by 4 px; and the key-similarity gap (within objects minus
    object/background) on the patch tokens."""
    from minip2p.methods.diffuseit_losses import structure_loss
    from minip2p.model.dino import load_dino
    dino = load_dino(folder)
    rows = toydata.all_captions()[1]
    single = rows[rows[:, 5] < 0]
    gen = torch.Generator().manual_seed(seed)
    attrs = single[torch.randint(len(single), (n,), generator=gen)]
    x = toydata.draw(attrs, torch.Generator().manual_seed(seed)) / 2 + 0.5
    other = attrs.clone()
    other[:, 0] = (attrs[:, 0] + 1 + torch.randint(6, (n,), generator=gen)) % 8
    other[:, 4] = torch.where(other[:, 4] == other[:, 0], (other[:, 0] + 1) % 8, other[:, 4])
    recoloured = toydata.draw(other, torch.Generator().manual_seed(seed)) / 2 + 0.5
    moved = torch.cat([x[..., :, 4:], x[..., :, -1:].expand(-1, -1, -1, 4)], dim=-1)
    p = dino.cfg.patch_size
    out = {"recoloured": float(sum(structure_loss(dino, recoloured[i:i + 1], x[i:i + 1])
                                   for i in range(n)) / n),
           "moved 4 px": float(sum(structure_loss(dino, moved[i:i + 1], x[i:i + 1])
                                   for i in range(n)) / n)}
    k = F.normalize(dino(preprocess(x, patch=p)).keys[:, 1:], dim=-1)
    S = k @ k.transpose(1, 2)
    mono = attrs.clone()
    mono[:, 0], mono[:, 4] = WHITE, BLACK
    m = toydata.draw(mono, torch.Generator().manual_seed(seed)).mean(1) / 2 + 0.5
    up = F.interpolate(((m - 0.05) / 0.92).clamp(0, 1)[:, None], size=(224, 224), mode="bilinear")
    cov = F.avg_pool2d(up, p).flatten(1)
    obj, bg = cov > 0.9, cov < 0.1
    pair = lambda a, b: float((S * (a[:, :, None] & b[:, None, :])).sum() / (a[:, :, None] & b[:, None, :]).sum())  # noqa: E731
    out["S within object"], out["S object/background"] = pair(obj, obj), pair(obj, bg)
    return out


def main(argv=None):
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--out", default="tools/out/toy-dino")
    a.add_argument("--steps", type=int, default=250)
    a.add_argument("--batch", type=int, default=24)
    a.add_argument("--lr", type=float, default=1e-3)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--check", nargs="+", metavar="DIR", help="only report what these DINO-layout "
                   "folders see (`check`)")
    args = a.parse_args(argv)
    if args.check:
        for folder in args.check:
            print(folder, {k: round(v, 4) for k, v in check(folder).items()})
        return
    out, ckpt = Path(args.out), Path(args.out) / "checkpoint"
    ckpt.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    judge = Judge()
    for n, p in judge.named_parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.02)
        elif n.endswith("weight") and "norm" in n:
            torch.nn.init.ones_(p)
        else:
            torch.nn.init.zeros_(p)
    rows = toydata.all_captions()[1]
    single = torch.nonzero(rows[:, 5] < 0)[:, 0]
    opt = torch.optim.AdamW(judge.parameters(), lr=args.lr, weight_decay=0.05)
    step = 0
    if (ckpt / "state.json").is_file():
        judge.load_state_dict(load_file(ckpt / "judge.safetensors"))
        opt.load_state_dict(torch.load(ckpt / "opt.pt", weights_only=True))
        step = json.loads((ckpt / "state.json").read_text())["step"]
        print(f"resumed at step {step}")
    gen = torch.Generator().manual_seed(args.seed * 100003 + step)
    t0 = time.time()
    while step < args.steps:
        lr = args.lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        x, attrs, m = batch(rows, single, args.batch, gen)
        terms = losses(judge, degrade(x, gen), attrs, m)
        loss = terms["keys"] + 0.1 * terms["cls"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 10 == 0:
            print(f"step {step}/{args.steps} keys {terms['keys'].item():.4f} cls "
                  f"{terms['cls'].item():.3f} gap {terms['gap'].item():.3f} lr {lr:.2e} "
                  f"{time.time() - t0:.0f}s", flush=True)
        if step % 50 == 0 or step == args.steps:
            save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, ckpt / "judge.tmp")
            torch.save(opt.state_dict(), ckpt / "opt.tmp")
            (ckpt / "judge.tmp").replace(ckpt / "judge.safetensors")
            (ckpt / "opt.tmp").replace(ckpt / "opt.pt")
            (ckpt / "state.json").write_text(json.dumps({"step": step}))
    folder = out / "dino"
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().half().contiguous() for k, v in judge.dino.state_dict().items()},
              folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config(), indent=2))
    print(f"wrote {folder}")


if __name__ == "__main__":
    main()

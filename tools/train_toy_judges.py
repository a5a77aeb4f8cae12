"""The toy domain's own judges: a small CLIP (image tower + projections over the toy model's text
encoder) and a small DINO-layout ViT, so that DiffuseIT's losses (structure from a ViT's keys,
meaning from CLIP) have something to read on the toy model without downloading real weights.

Both image towers are trained from scratch by the CLIP objective (Radford et al. 2021) against
the toy model's frozen text encoder: for a batch of n pictures and their captions,

    f_i = normalize(W_I · tower(x_i)),  g_j = normalize(W_T · text(c_j)),  ℓ_ij = e^τ · f_i·g_j
    L   = ½ (CE(ℓ, diag) + CE(ℓᵀ, diag))                                   (τ learnt, init log 1/0.07)

The DINO-layout tower uses its [CLS] (before the final norm) as tower(x); it is not DINO
(no self-distillation), but the same architecture and input pipeline (Resize(224) + ImageNet
normalisation), so `model/dino.py` loads it and DiffuseIT reads its keys and [CLS] as it would
DINO's. Pictures come from tools/toydata.py (64 px, upsampled to 224 as the judges' input).

    OMP_NUM_THREADS=1 python -m tools.train_toy_judges --out weights/toy-judges --steps 3000

The shipped weights/toy-judges/dino is no longer this caption-trained tower (its keys carry little
of the outline) but tools/train_toy_dino.py's structure judge: to retrain the CLIP, write to
another --out and copy its clip/ folder.

Resumable: a checkpoint (safetensors + json) every 200 steps in OUT/checkpoint/.
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

from minip2p.data.clip_image import MEAN, STD, CLIPConfig, CLIPModel
from minip2p.load import load_model
from minip2p.model.dino import IMAGENET_MEAN, IMAGENET_STD, DinoConfig, DinoViT
from tools import toydata

SIZE, PATCH, WIDTH, LAYERS, HEADS = 224, 32, 128, 4, 4


def configs(text_cfg: dict):
    vision = dict(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, image_size=SIZE, patch_size=PATCH,
                  hidden_act="quick_gelu", layer_norm_eps=1e-5)
    clip = {"model_type": "clip", "architectures": ["CLIPModel"], "projection_dim": 64,
            "text_config": {**text_cfg, "model_type": "clip_text_model"},
            "vision_config": {**vision, "model_type": "clip_vision_model"}}
    dino = {"model_type": "vit", "architectures": ["ViTModel"], "hidden_size": WIDTH,
            "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "intermediate_size": 4 * WIDTH, "image_size": SIZE, "patch_size": PATCH,
            "num_channels": 3, "qkv_bias": True, "hidden_act": "gelu", "layer_norm_eps": 1e-6}
    return clip, dino


class Judges(torch.nn.Module):
    def __init__(self, clip_cfg: dict, dino_cfg: dict):
        super().__init__()
        self.clip = CLIPModel(CLIPConfig.from_dict(clip_cfg, "toy clip"))
        self.dino = DinoViT(DinoConfig.from_dict(dino_cfg, "toy dino"))
        self.dino_proj = torch.nn.Linear(WIDTH, 64, bias=False)
        self.scale = torch.nn.Parameter(torch.tensor([math.log(1 / 0.07)] * 2))

    def images(self, x01: torch.Tensor):
        """x in [0, 1] (n, 3, 64, 64) -> (CLIP features, DINO-tower features), normalised."""
        x = F.interpolate(x01, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        norm = lambda x, m, s: (x - torch.tensor(m)[:, None, None]) / torch.tensor(s)[:, None, None]  # noqa: E731
        f = self.clip.visual_projection(self.clip.vision_model(norm(x, MEAN, STD)))
        d = self.dino_proj(self.dino(norm(x, IMAGENET_MEAN, IMAGENET_STD)).cls)
        return F.normalize(f, dim=-1), F.normalize(d, dim=-1)


def clip_loss(f, g, log_scale):
    logits = log_scale.exp().clamp(max=100) * f @ g.T
    target = torch.arange(len(f))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def main(argv=None):
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--out", default="weights/toy-judges")
    a.add_argument("--steps", type=int, default=3000)
    a.add_argument("--batch", type=int, default=64)
    a.add_argument("--lr", type=float, default=1e-3)
    a.add_argument("--seed", type=int, default=0)
    args = a.parse_args(argv)
    out, ckpt = Path(args.out), Path(args.out) / "checkpoint"
    ckpt.mkdir(parents=True, exist_ok=True)
    from minip2p.load.checkpoint import DEFAULT_MODEL
    toy = load_model()
    text_cfg = json.loads((DEFAULT_MODEL / "text_encoder" / "config.json").read_text())
    clip_cfg, dino_cfg = configs(text_cfg)
    torch.manual_seed(args.seed)
    judges = Judges(clip_cfg, dino_cfg)
    for n, p in judges.named_parameters():                  # fresh towers, the toy's text encoder
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.02)
        elif n.endswith("weight") and "norm" in n:
            torch.nn.init.ones_(p)
        elif n != "scale":
            torch.nn.init.zeros_(p)
    judges.clip.text_model.load_state_dict(
        {k.removeprefix("text_model."): v.float() for k, v in toy.text_encoder.state_dict().items()})
    judges.clip.text_model.requires_grad_(False)
    judges.clip.logit_scale.data.fill_(math.log(1 / 0.07))
    captions = toydata.Captions(toy.tokenizer)
    with torch.no_grad():                                    # the frozen text side, once
        hidden = torch.cat([judges.clip.text_model.final_layer_norm(
            run_text(judges.clip, captions.ids[i:i + 512])) for i in range(0, len(captions.ids), 512)])
    params = [p for p in judges.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    step = 0
    if (ckpt / "state.json").is_file():
        state = json.loads((ckpt / "state.json").read_text())
        judges.load_state_dict(load_file(ckpt / "judges.safetensors"))
        step = state["step"]
        print(f"resumed at step {step}")
    gen = torch.Generator().manual_seed(args.seed + step)
    t0 = time.time()
    while step < args.steps:
        lr = args.lr * min(1.0, (step + 1) / max(1, min(200, args.steps // 10))) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = captions.sample(args.batch, gen)
        x = toydata.draw(captions.attrs[idx], gen) / 2 + 0.5
        g = F.normalize(text_features(judges.clip, hidden[idx], captions.ids[idx]), dim=-1)
        f, d = judges.images(x)
        loss = clip_loss(f, g, judges.scale[0]) + clip_loss(d, g, judges.scale[1])
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 20 == 0:
            print(f"step {step}/{args.steps} loss {loss.item():.3f} lr {lr:.2e} "
                  f"{time.time() - t0:.0f}s", flush=True)
        if step % 200 == 0 or step == args.steps:
            save_file({k: v.contiguous() for k, v in judges.state_dict().items()},
                      ckpt / "judges.tmp")
            (ckpt / "judges.tmp").replace(ckpt / "judges.safetensors")
            (ckpt / "state.json").write_text(json.dumps({"step": step}))
    export(judges, clip_cfg, dino_cfg, out, toy)


def run_text(clip, ids):
    m = clip.text_model
    x = m.embeddings(ids)
    for layer in m.encoder.layers:
        x = layer(x)
    return x


def text_features(clip, hidden, ids):
    eos = (ids == clip.cfg.eos_token_id).int().argmax(dim=1)
    return clip.text_projection(hidden[torch.arange(len(ids)), eos])


def export(judges: Judges, clip_cfg: dict, dino_cfg: dict, out: Path, toy) -> None:
    """OUT/clip (a CLIPModel folder; its tokenizer is the shipped CLIP BPE) and OUT/dino (a
    ViTModel folder), stored in fp16 (the loaders compute in fp32)."""
    for name, module, cfg in (("clip", judges.clip, clip_cfg), ("dino", judges.dino, dino_cfg)):
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().half().contiguous() for k, v in module.state_dict().items()}
        save_file(state, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    print(f"wrote {out / 'clip'} and {out / 'dino'}")


if __name__ == "__main__":
    main()

"""Loading ControlNets: safetensors only, strict, in the two layouts public checkpoints come in.

1. diffusers (`lllyasviel/control_v11p_sd15_canny`): a folder with config.json and
   diffusion_pytorch_model[.fp16].safetensors, keys equal to our module names; a Hub repo id is
   resolved in huggingface_hub's cache as the model is (hub.py), only those two files fetched.
2. the original single file (`control_v11p_sd15_canny.pth` converted to .safetensors): keys under
   `control_model.` (some redistributions drop the prefix), CompVis names: time_embed.{0,2},
   input_blocks.*, input_hint_block.{0,2,…,14}, zero_convs.i.0, middle_block.*,
   middle_block_out.0. Renamed here, in `original_table`, on top of single_file.py's UNet table.
   It has no config: the copied encoder's is read off the shapes (heads and norm groups cannot be:
   taken from `base`'s UNet when given, else SD 1.x's 8 heads, or 64 channels per head with
   linear projections as SD 2.x). ControlNet v1.0 files also bundle the whole SD model
   (model.diffusion_model., first_stage_model., cond_stage_model.): those tensors are not the
   ControlNet's and are skipped; any other unknown tensor is an error.

A missing, unexpected or mis-shaped tensor is one line naming it (checkpoint.strict_build). A
pickle (.pth, .ckpt, .bin) is refused: unpickling runs code. `base`: the Model the net will
condition; a net made for another base model (other widths, levels, text width or input
channels) is refused in one line (`check_fits`).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import MinipError
from ..model.config import UNetConfig, read_json
from ..model.controlnet import ControlNet, ControlNetConfig
from . import _weights_file
from .checkpoint import DTYPES, PICKLE_SUFFIXES, read_safetensors, strict_build
from .single_file import RESNET, _count, rename, unet_table

PREFIX = "control_model."
BUNDLED = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")   # v1.0 files
STEM = "diffusion_pytorch_model"


def original_table(n: int, L: int, hint_widths: int) -> dict[str, str]:
    """Original block prefix -> ours: the UNet encoder's (single_file.unet_table), the hint
    encoder's (input_hint_block.0 conv_in, .2 … blocks, last conv_out; SiLUs at odd indices)
    and the zero convs."""
    t = {k: v for k, v in unet_table(n, L).items() if not k.startswith(("output_blocks", "out."))}
    convs = 2 * (hint_widths - 1)                               # blocks between conv_in, conv_out
    t["input_hint_block.0"] = "controlnet_cond_embedding.conv_in"
    for j in range(convs):
        t[f"input_hint_block.{2 * (j + 1)}"] = f"controlnet_cond_embedding.blocks.{j}"
    t[f"input_hint_block.{2 * (convs + 1)}"] = "controlnet_cond_embedding.conv_out"
    for i in range(n * (L + 1)):
        t[f"zero_convs.{i}.0"] = f"controlnet_down_blocks.{i}"
    t["middle_block_out.0"] = "controlnet_mid_block"
    return t


def infer_config(s: dict, base: UNetConfig | None) -> ControlNetConfig:
    """The architecture of an original-layout file, read off its shapes (`base`: heads etc.)."""
    n = _count(s, r"input_blocks\.(\d+)\.0\.op") + 1
    L = _count(s, r"input_blocks\.(\d+)\.0\.in_layers") // n
    ch = tuple(s[f"input_blocks.{1 + i * (L + 1)}.0.out_layers.3.weight"].shape[0]
               for i in range(n))
    down = tuple("CrossAttnDownBlock2D" if f"input_blocks.{1 + i * (L + 1)}.1.proj_in.weight" in s
                 else "DownBlock2D" for i in range(n))
    hint = [int(m.group(1)) for k in s for m in [re.match(r"input_hint_block\.(\d+)\.weight", k)]
            if m]
    widths = tuple(s[f"input_hint_block.{i}.weight"].shape[0] for i in sorted(hint)[:-1:2])
    linear = s["middle_block.1.proj_in.weight"].ndim == 2
    k = next(v for key, v in s.items() if key.endswith("attn2.to_k.weight"))
    shape = dict(in_channels=s["input_blocks.0.0.weight"].shape[1], block_out_channels=ch,
                 down_block_types=down, up_block_types=tuple(reversed(down)), layers_per_block=L,
                 cross_attention_dim=k.shape[1], use_linear_projection=linear,
                 transformer_layers_per_block=_count(
                     s, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    shape["up_block_types"] = tuple(t.replace("Down", "Up") for t in shape["up_block_types"])
    if base is not None:
        cfg = UNetConfig(**{**base.__dict__, **shape, "out_channels": base.out_channels})
    else:
        sd2 = dict(attention_head_dim=tuple(max(c // 64, 1) for c in ch),
                   upcast_attention=True) if linear else {}
        cfg = UNetConfig(**shape, **sd2)
    return ControlNetConfig(unet=cfg, conditioning_channels=s["input_hint_block.0.weight"].shape[1],
                            conditioning_embedding_out_channels=widths)


def from_original(state: dict, source: str, base: UNetConfig | None):
    """An original-layout state dict -> (config, our names)."""
    if any(k.startswith(PREFIX) for k in state):
        state = {k[len(PREFIX):]: v for k, v in state.items()
                 if k.startswith(PREFIX) or not k.startswith(BUNDLED)}
    try:
        cfg = infer_config(state, base)
    except (KeyError, StopIteration, ValueError, IndexError, ZeroDivisionError) as e:
        raise MinipError(f"{source}: cannot read the ControlNet's architecture off the tensors "
                         f"({e}); not an original-layout ControlNet file") from None
    u = cfg.unet
    table = original_table(len(u.block_out_channels), u.layers_per_block,
                           len(cfg.conditioning_embedding_out_channels))
    return cfg, rename(state, "", table, RESNET)


def check_fits(net: ControlNet, unet_cfg: UNetConfig, latent_channels: int, source: str):
    """Refuse a net whose residuals cannot be added to this UNet's skips (another base model)."""
    a, b = net.cfg.unet, unet_cfg
    for field in ("block_out_channels", "layers_per_block", "cross_attention_dim"):
        if getattr(a, field) != getattr(b, field):
            raise MinipError(f"{source}: a ControlNet for another base model ({field} "
                             f"{getattr(a, field)}, the model's UNet has {getattr(b, field)})")
    if a.in_channels not in (b.in_channels, latent_channels):
        raise MinipError(f"{source}: a ControlNet for another base model (it takes "
                         f"{a.in_channels} input channels, the model's UNet {b.in_channels})")


def _resolve(repo_id: str, revision: str | None, variant: str | None) -> Path:
    """A Hub repo id -> a snapshot folder holding config.json and the weights (HF cache)."""
    from huggingface_hub import constants, snapshot_download
    from .hub import cached
    v = f".{variant}" if variant else ""
    weights = [f"{STEM}{v}.safetensors"] if variant else \
        [f"{STEM}.safetensors", f"{STEM}.fp16.safetensors"]
    snap, _ = cached(repo_id, revision)
    if snap is not None and (snap / "config.json").is_file() and \
            any((snap / w).is_file() for w in weights):
        return snap
    fetch = (f"hf download {repo_id}{f' --revision {revision}' if revision else ''} "
             f"config.json {weights[0]}")
    if constants.HF_HUB_OFFLINE:
        raise MinipError(f"the ControlNet '{repo_id}' is not in the Hugging Face cache, offline "
                         f"(HF_HUB_OFFLINE=1); fetch it: {fetch}")
    try:
        return Path(snapshot_download(repo_id, revision=revision,
                                      allow_patterns=["config.json", *weights]))
    except Exception as e:                      # not found, gated, no network: one line
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise MinipError(f"could not get the ControlNet '{repo_id}' from the Hugging Face Hub "
                         f"({type(e).__name__}: {first[:60]}); fetch it: {fetch}") from None


def load_controlnet(spec, dtype="fp32", device="cpu", variant=None, revision=None, base=None,
                    fast: bool = True) -> ControlNet:
    """`spec`: a diffusers-layout folder, a .safetensors file (original layout, or diffusers keys
    with a config.json beside it) or a Hub repo id. `base`: the load.Model it will condition
    (its UNet sets what an original file cannot say, and a net that does not fit it is refused).
    `fast`: install the fast path's attention kernels (minip2p/fast/), as load_model does."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    path = Path(str(spec))
    base_cfg = base.unet.cfg if base is not None else None
    if path.suffix in PICKLE_SUFFIXES:
        raise MinipError(f"{path.name}: pickle checkpoints are refused (unpickling runs code); "
                         "convert it to .safetensors")
    if not path.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", str(spec)) \
            and path.suffix != ".safetensors" and not str(spec).startswith("."):
        path = _resolve(str(spec), revision, variant)
    elif revision is not None:
        raise MinipError(f"a revision applies to Hub repo ids only, not to '{spec}'")
    if path.is_dir():
        cfg = ControlNetConfig.from_dict(read_json(path / "config.json"), f"{path / 'config.json'}")
        state = read_safetensors(_weights_file(path, STEM, variant,
                                               "; not a diffusers-layout ControlNet folder"))
    elif path.is_file() or path.suffix == ".safetensors":
        state = read_safetensors(path)
        if any(k.endswith("zero_convs.0.0.weight") for k in state):
            cfg, state = from_original(state, str(path), base_cfg)
        elif (path.parent / "config.json").is_file():
            cfg = ControlNetConfig.from_dict(read_json(path.parent / "config.json"),
                                             f"{path.parent / 'config.json'}")
        else:
            raise MinipError(f"{path}: neither an original-layout ControlNet (no zero_convs) nor "
                             "diffusers keys with a config.json beside it")
    else:
        raise MinipError(f"ControlNet '{spec}' not found: give a folder, a .safetensors file or "
                         "a Hub repo id (owner/name)")
    net = strict_build(ControlNet, cfg, state, f"{path}", dtype, device)
    if base is not None:
        check_fits(net, base.unet.cfg, base.vae.cfg.latent_channels, str(spec))
    if fast:
        from ..fast import install
        install(net)
    return net


def config_dict(cfg: ControlNetConfig) -> dict:
    """A ControlNetConfig as diffusers writes a ControlNet's config.json."""
    from dataclasses import asdict
    own = asdict(cfg)
    unet = own.pop("unet")
    for k in ("out_channels", "up_block_types", "sample_size"):
        unet.pop(k, None)
    return {"_class_name": "ControlNetModel", **unet, **own}


def save_controlnet(net: ControlNet, folder) -> Path:
    """Write `net` in the diffusers layout (config.json + diffusion_pytorch_model.safetensors),
    which load_controlnet reads back. The weights file is written last (a folder without it is
    refused as incomplete)."""
    import json

    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_dict(net.cfg), indent=2) + "\n")
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(folder / f"{STEM}.safetensors"))
    return folder

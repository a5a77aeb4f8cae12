"""What every loader shares: where the shipped weights are, the `Model` bundle, strict loading.

`loading.py` (folders, Hub ids) and `single_file.py` (CompVis files) both import this module
and not each other. The shipped files (the toy model, CLIP's BPE tables) sit in the repository's
top-level `weights/`; a regular install carries them as the package data `minip2p/weights/`
(pyproject.toml maps the subpackage `minip2p.weights` onto `weights/`). Nothing is ever written
there: Hub downloads go to huggingface_hub's own cache (see hub.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..model.clip import CLIPTextModel
from ..samplers.ddim import DDIM
from ..errors import MinipError
from ..model.tokenizer import ClipTokenizer
from ..model.unet import UNet2DConditionModel
from ..model.vae import AutoencoderKL

_PACKAGE = Path(__file__).resolve().parent.parent                    # minip2p/
# installed (wheel, sdist): minip2p/weights/; a checkout or an editable install: ../weights/
WEIGHTS = _PACKAGE / "weights" if (_PACKAGE / "weights").is_dir() else _PACKAGE.parent / "weights"
DEFAULT_MODEL = WEIGHTS / "toy"                      # the small model that ships with minip2p
CLIP_TOKENIZER = WEIGHTS / "clip-tokenizer"          # CLIP's vocab.json + merges.txt
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Model:
    """Everything a pipeline needs. `text_encoder` may be freed (set to None) after encoding.
    `fast`: the fast path is installed (minip2p/fast/: `install`, `uninstall`).
    `loras`: the LoRA files merged into the weights, in order (lora.py: `add_lora`,
    `remove_lora`, `clear_loras`);
    `conditioning`: ControlNets taking part in every UNet call (conditioning.conditioned);
    `decode_tile`: the VAE decodes in tiles of this many latents a side (0: whole pictures;
    None: by size, memory.decode_tile);
    `free_unet`: the first decode (pipeline.decode) drops the UNet's weights, so the decoder's
    activations do not come on top of them -- for a one-shot command that runs the UNet no more
    once it decodes (the CLI's edit and generate set it)."""
    tokenizer: ClipTokenizer
    text_encoder: CLIPTextModel | None
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler: DDIM
    name: str
    fast: bool = False
    loras: list = field(default_factory=list)     # the merged LoRA files (lora.py's `Lora`)
    conditioning: Any = None
    decode_tile: int | None = None
    free_unet: bool = False

    @property
    def dtype(self):
        return self.unet.conv_in.weight.dtype

    @property
    def device(self):
        w = self.unet.conv_in.bias                   # on "meta" once freed: the VAE's device
        return self.vae.post_quant_conv.weight.device if w.is_meta else w.device


def read_safetensors(path: Path, convert=None) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file; a pickle, a truncated or a garbage file is refused.
    `convert(key, tensor) -> {key: tensor, …}` is applied to each tensor as it is read (a cast
    to the compute dtype, int8.converter), so the file's precision is never held whole."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise MinipError(f"{path.name}: pickle checkpoints are refused (unpickling runs code); "
                         "use a .safetensors file")
    if not path.is_file():
        raise MinipError(f"missing weights file {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            if convert is None:
                return {k: f.get_tensor(k) for k in f.keys()}
        return _read_each(path, convert)
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MinipError(f"{path}: not a readable safetensors file ({msg}); "
                         "the download may be truncated") from None


ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
             "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
             "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _read_each(path: Path, convert) -> dict[str, torch.Tensor]:
    """The tensors one at a time into fresh memory with plain reads, each handed to `convert`:
    safetensors' own reader maps the whole file, and those mapped pages count in the process's
    resident memory as a second full copy while the file is open. safe_open has checked the
    header already; the offsets are checked here."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        start, size, state = 8 + n, path.stat().st_size, {}
        for k, info in header.items():
            if k == "__metadata__":
                continue
            a, b = info["data_offsets"]
            if not 0 <= a <= b <= size - start:
                raise ValueError(f"tensor {k} lies outside the file")
            buf = torch.empty(b - a, dtype=torch.uint8)
            f.seek(start + a)
            if f.readinto(buf.numpy()) != b - a:
                raise ValueError(f"tensor {k} is truncated")
            t = buf.view(ST_DTYPES[info["dtype"]]).reshape(info["shape"])
            state.update(convert(k, t))
    return state


def strict_build(cls, cfg, state, source: str, dtype=torch.float32, device="cpu",
                 prepare=None) -> nn.Module:
    """Build `cls(cfg)` without initialising it, then assign `state`, checking every tensor.
    `prepare(module)` may change the meta module first (int8.prepare); `state` may then be a
    function of its result, called once the module is built (to read the file only then)."""
    try:
        with torch.device("meta"):
            module = cls(cfg)
    except ValueError as e:  # e.g. GroupNorm: channels not divisible by norm_num_groups
        raise MinipError(f"{source}: the config describes no buildable model ({e})") from None
    prepared = prepare(module) if prepare else None
    if callable(state):
        state = state(prepared)
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    wrong = [f"{k} {tuple(state[k].shape)} (expected {want[k]})"
             for k in sorted(set(want) & set(state)) if tuple(state[k].shape) != want[k]]
    for problem, names in (("missing tensors", missing), ("unexpected tensors", extra),
                           ("tensors of the wrong shape", wrong)):
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            raise MinipError(f"{source}: {len(names)} {problem}: {', '.join(names[:3])}{more}; "
                             "do the weights and config.json belong together?")
    state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
             for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)

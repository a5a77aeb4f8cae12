"""LoRA (Hu et al. 2021, arXiv 2106.09685): low-rank updates of the weights, merged at load.

A LoRA file holds, for some linear and conv layers W (out × in, or out × in × k × k) of the UNet
and the text encoder, a down factor A (r × in [× k × k]), an up factor B (out × r [× 1 × 1]) and
optionally α. Merged with the user's scale s:

    W' = W + s · (α / r) · B A            (α absent: α = r)

A conv LoRA (kohya's LoCon) has A a k × k conv and B a 1 × 1 conv, so B A is B (out, r) times A
read as (r, in·k·k), reshaped to W's (out, in, k, k). W' is formed in fp32 and cast back to W's
dtype. Merging once costs nothing at each step afterwards (unlike a LoRA run beside W).

Layouts (safetensors only; a pickle is refused: unpickling runs code). Every key is renamed to
our module names -- which equal the diffusers checkpoint keys -- in `_layer`, the one place:

  kohya / sd-scripts  lora_unet_<module path with "." -> "_">.lora_down.weight / .lora_up.weight
                      / .alpha;  lora_te_… (SDXL's lora_te1_…) for the text encoder. "_" is also
                      inside module names (to_q, proj_in), so the name is found by looking it up
                      among the model's own layers written the same way, never by guessing.
  diffusers / PEFT    unet.<module path>.lora_A.weight / .lora_B.weight, text_encoder.<…>; α from
                      a `<module path>.alpha` tensor, else the file's `lora_adapter_metadata`
                      (PEFT's LoraConfig: lora_alpha, alpha_pattern, use_rslora → α/√r), else r.
  older diffusers     …attn1.processor.to_q_lora.down.weight (to_out_lora = to_out.0; the text
                      encoder's to_q_lora = q_proj, to_out_lora = out_proj), …lora_linear_layer.up.

Strict: a key that matches no layer, a factor whose shape does not fit its layer (a LoRA for
another base model), a down without its up: each is a one-line error naming the key, raised
before any weight is changed. DoRA and LyCORIS' LoHa/LoKr are refused by name.

Unmerging: a merged file keeps its factors (small: r·(in + out) per layer), so `remove_lora`
subtracts the same fp32 ΔW again; several files can be merged and removed in any
order. In fp32, W + ΔW − ΔW equals W to the rounding of one addition. In fp16/bf16 each merge
and each removal rounds W' to that precision, so a removed LoRA leaves W within two roundings
of its original values, not equal to them: reload the model for the exact weights.

Deliberate difference from diffusers: a kohya file whose α differ from layer to layer gives each
layer its own α (kohya's rule); diffusers 0.42 gives the UNet's attention layers and the text
encoder's layers the file's most common α. With one α in the file, as kohya writes by default,
the two agree.

The fast path (minip2p/fast/) shares the modules' parameters and packs nothing, so merging in
place is seen by it at the next call; nothing needs reinstalling.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import PICKLE_SUFFIXES
from ..errors import MinipError

PARTS = ("unet", "text_encoder")
KOHYA = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
KOHYA_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
PEFT_ROLES = {"lora_A.weight": "down", "lora_B.weight": "up", "alpha": "alpha"}
# older diffusers names -> PEFT names, per part (as diffusers' UNET_TO_DIFFUSERS and
# DIFFUSERS_OLD_TO_PEFT tables)
OLD = {"unet": [(r"\.processor\.", "."), (r"\.to_(q|k|v)_lora\.", r".to_\1.lora."),
                (r"\.to_out_lora\.", ".to_out.0.lora.")],
       "text_encoder": [(r"\.to_(q|k|v)_lora\.", r".\1_proj.lora."),
                        (r"\.to_out_lora\.", ".out_proj.lora.")]}
OLD_ROLES = [(r"\.(lora_linear_layer|lora)\.down\.weight$", ".lora_A.weight"),
             (r"\.(lora_linear_layer|lora)\.up\.weight$", ".lora_B.weight")]
UNSUPPORTED = {"dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "hada_": "LyCORIS LoHa",
               "lokr_": "LyCORIS LoKr", "lora_mid": "LoCon's Tucker form",
               "lora_te2_": "SDXL's second text encoder",
               "text_encoder_2.": "SDXL's second text encoder"}


@dataclass
class Factors:
    """One layer's update: ΔW = gain · B A, gain = s · α / r."""
    down: torch.Tensor                       # A: (r, in) or (r, in, k, k), fp32
    up: torch.Tensor                         # B: (out, r) or (out, r, 1, 1), fp32
    gain: float

    def merge(self, w: torch.Tensor, sign: int = 1):
        """W ← W + sign · gain · B A, in place, formed in fp32 (`sign` −1: take it out again).
        W is read as (out, in·k·k); in fp32 the update is one fused addmm, with no ΔW kept."""
        up, down = (t.to(w.device, torch.float32).flatten(1) for t in (self.up, self.down))
        w32 = w.float().contiguous()                         # w itself when fp32 and contiguous
        w32.view(w.shape[0], -1).addmm_(up, down, alpha=sign * self.gain)
        if w32.data_ptr() != w.data_ptr():
            w.copy_(w32)


@dataclass
class Lora:
    """A LoRA file merged into a model: what `remove_lora` needs to take it out again."""
    path: str
    scale: float
    layers: dict[tuple[str, str], Factors]    # (part, module name) -> its factors


def layers(model) -> dict[tuple[str, str], nn.Module]:
    """The layers a LoRA may change: every linear and conv layer of the UNet and of the text
    encoder (when it is loaded), by (part, module name)."""
    found = {}
    for part in PARTS:
        module = getattr(model, part)
        if module is not None:
            found.update({(part, name): m for name, m in module.named_modules()
                          if isinstance(m, (nn.Linear, nn.Conv2d))})
    return found


def _unsupported(key: str):
    for mark, what in UNSUPPORTED.items():
        if mark in key:
            return what
    return None


def _layer(key: str, kohya: dict[tuple[str, str], str]) -> tuple[tuple[str, str], str] | None:
    """A file's key -> ((part, module name), role ∈ down/up/alpha); None if it names no layer.
    The only place where LoRA names are translated into ours; `kohya`: (part, module name with
    "_" for ".") -> module name, for this model's layers."""
    if key.startswith("lora_"):                                   # kohya: <stem>.<role>
        stem, _, role = key.partition(".")
        for prefix, part in KOHYA.items():
            if stem.startswith(prefix) and role in KOHYA_ROLES:
                name = kohya.get((part, stem[len(prefix):]))
                return ((part, name), KOHYA_ROLES[role]) if name else None
        return None
    part, _, rest = key.partition(".")
    if part not in PARTS:
        return None
    rest = "." + rest
    for pattern, new in OLD[part] + OLD_ROLES:
        rest = re.sub(pattern, new, rest)
    for role, ours in PEFT_ROLES.items():
        if rest.endswith("." + role):
            return (part, rest[1:-len(role) - 1]), ours
    return None


def _alphas(metadata: dict | None, path: Path) -> dict:
    """{part: PEFT LoraConfig fields} from diffusers' `lora_adapter_metadata` entry."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except ValueError:
        raise MinipError(f"'{path}': its lora_adapter_metadata is not JSON") from None
    config = {}
    for key, value in flat.items():
        part, _, field = key.partition(".")
        config.setdefault(part, {})[field] = value
    if any(c.get("use_dora") for c in config.values()):
        raise MinipError(f"'{path}': a DoRA file; only plain LoRA is supported")
    return config


def _peft_alpha(config: dict, name: str, r: int) -> float:
    """α of layer `name` under a PEFT LoraConfig (alpha_pattern matches a name's dotted tail)."""
    alpha = config.get("lora_alpha", r)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            alpha = value
            break
    return alpha * math.sqrt(r) if config.get("use_rslora") else alpha    # rsLoRA: gain α/√r


def _kernel(t: torch.Tensor) -> tuple:
    return tuple(t.shape[2:]) or (1, 1)


def read_lora(path, model, scale: float = 1.0) -> Lora:
    """Read a LoRA file for `model` and check every tensor against its layer; nothing changes."""
    from safetensors import safe_open
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise MinipError(f"{path.name}: pickled LoRA files are refused (unpickling runs code); "
                         "use a .safetensors file")
    if path.is_dir():
        raise MinipError(f"LoRA '{path}' is a folder; give the LoRA's .safetensors file")
    if not path.is_file():
        raise MinipError(f"LoRA file '{path}' not found")
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise MinipError(f"LoRA '{path}': scale {scale!r} is not a number") from None
    if not math.isfinite(scale):
        raise MinipError(f"LoRA '{path}': scale {scale} is not a finite number")
    try:
        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata()
    except Exception as e:                    # safetensors raises several types on bad files
        first = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise MinipError(f"'{path}' is not a readable safetensors LoRA ({first})") from None
    if not state:
        raise MinipError(f"'{path}' holds no tensors; not a LoRA file")
    targets = layers(model)
    kohya = {(part, name.replace(".", "_")): name for part, name in targets}
    config = _alphas(metadata, path)
    groups: dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]] = {}
    for key in sorted(state):
        what = _unsupported(key)
        if what:
            raise MinipError(f"'{path}': tensor '{key}' is {what}, which is not supported")
        found = _layer(key, kohya)
        if found is None or found[0] not in targets:
            te = model.text_encoder is None and key.startswith(("lora_te", "text_encoder."))
            raise MinipError(f"'{path}': tensor '{key}' matches no layer of this model's UNet or "
                             "text encoder" + (" (the text encoder was freed: add LoRAs before "
                                               "encoding prompts)" if te else ""))
        groups.setdefault(found[0], {})[found[1]] = (key, state[key])
    merged = {}
    for (part, name), g in groups.items():
        if "down" not in g or "up" not in g:
            key = (g.get("down") or g.get("up") or g["alpha"])[0]
            missing = "up" if "down" in g else "down"
            raise MinipError(f"'{path}': tensor '{key}' has no {missing} factor beside it")
        (kd, down), (ku, up) = g["down"], g["up"]
        w = targets[part, name].weight
        r = down.shape[0]
        if not (r > 0 and down.dim() in (2, 4) and up.dim() in (2, 4)
                and down.shape[1] == w.shape[1] and _kernel(down) == _kernel(w)
                and _kernel(up) == (1, 1) and tuple(up.shape[:2]) == (w.shape[0], r)):
            raise MinipError(f"'{path}': '{kd}' {tuple(down.shape)} with '{ku}' "
                             f"{tuple(up.shape)} does not fit {part} layer {name} "
                             f"{tuple(w.shape)}: a LoRA for another base model?")
        if "alpha" in g:
            if g["alpha"][1].numel() != 1:
                raise MinipError(f"'{path}': '{g['alpha'][0]}' holds {g['alpha'][1].numel()} "
                                 "numbers; α is one number")
            alpha = float(g["alpha"][1].float().reshape(()))
        elif part in config:
            alpha = _peft_alpha(config[part], name, r)
        else:
            alpha = r
        down, up, gain = down.float(), up.float(), scale * alpha / r
        if not (math.isfinite(gain) and down.isfinite().all() and up.isfinite().all()):
            raise MinipError(f"'{path}': the factors or α of '{kd}' are not all finite numbers")
        merged[part, name] = Factors(down, up, gain)
    return Lora(str(path), scale, merged)


def _apply(model, lora: Lora, sign: int):
    targets = layers(model)
    with torch.no_grad():
        for key, factors in lora.layers.items():
            if key in targets:                # a freed text encoder has nothing to take back
                factors.merge(targets[key].weight, sign)


def add_lora(model, path, scale: float = 1.0) -> Lora:
    """Merge the LoRA file `path` with `scale` into `model`'s weights; returns what was merged."""
    key = str(Path(path))
    if any(lora.path == key for lora in model.loras):
        raise MinipError(f"LoRA '{path}' is merged already; remove it first, or give it once "
                         "with the sum of the scales")
    lora = read_lora(path, model, scale)
    _apply(model, lora, +1)
    model.loras.append(lora)
    return lora


def remove_lora(model, path) -> None:
    """Take the LoRA file `path` out of `model`'s weights again (see the module's note on fp16)."""
    key = str(Path(path))
    for lora in model.loras:
        if lora.path == key:
            _apply(model, lora, -1)
            model.loras.remove(lora)
            return
    have = ", ".join(repr(lora.path) for lora in model.loras) or "none"
    raise MinipError(f"LoRA '{path}' is not merged into this model (merged: {have})")


def clear_loras(model) -> None:
    """Take every merged LoRA out, the last merged first."""
    for lora in reversed(list(model.loras)):
        remove_lora(model, lora.path)

"""Loading checkpoints: safetensors only, strict, from three layouts.

1. a diffusers-layout folder (model_index.json; unet/ vae/ text_encoder/ tokenizer/ scheduler/),
   fp32 or fp16-variant files;
2. a Hub repo id ("stable-diffusion-v1-5/stable-diffusion-v1-5"): only the needed files are
   downloaded into weights/ with huggingface_hub, then loaded as in 1;
3. a single-file original checkpoint (CompVis key names), see single_file.py.

Our module names equal the diffusers keys, so each component needs at most a tiny mapping
function (`_vae_keys`, `_text_keys`). Models are built on the meta device and the tensors are
assigned, so no memory or time goes into random initialisation. Strictness: a missing,
unexpected or mis-shaped tensor is an error that names it. Pickles (.ckpt/.bin/.pt) are refused:
unpickling a file can run arbitrary code.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .clip import CLIPTextModel
from .config import SchedulerConfig, TextConfig, UNetConfig, VAEConfig, read_json
from .ddim import DDIM
from .errors import MinipError
from .tokenizer import ClipTokenizer
from .unet import UNet2DConditionModel
from .vae import AutoencoderKL

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = ROOT / "weights"
DEFAULT_MODEL = WEIGHTS / "toy"          # the small model that ships with the repository
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Model:
    """Everything a pipeline needs. `text_encoder` may be freed (set to None) after encoding."""
    tokenizer: ClipTokenizer
    text_encoder: CLIPTextModel | None
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler: DDIM
    name: str

    @property
    def dtype(self):
        return self.unet.conv_in.weight.dtype

    @property
    def device(self):
        return self.unet.conv_in.weight.device


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file; a pickle, a truncated or a garbage file is refused."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise MinipError(f"{path.name}: pickle checkpoints are refused (unpickling runs code); "
                         "use a .safetensors file")
    if not path.is_file():
        raise MinipError(f"missing weights file {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MinipError(f"{path}: not a readable safetensors file ({msg}); "
                         "the download may be truncated") from None


def strict_build(cls, cfg, state: dict[str, torch.Tensor], source: str,
                 dtype=torch.float32, device="cpu") -> nn.Module:
    """Build `cls(cfg)` without initialising it, then assign `state`, checking every tensor."""
    try:
        with torch.device("meta"):
            module = cls(cfg)
    except ValueError as e:  # e.g. GroupNorm: channels not divisible by norm_num_groups
        raise MinipError(f"{source}: the config describes no buildable model ({e})") from None
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


def _vae_keys(state):
    """Older diffusers VAEs name the bottleneck attention query/key/value/proj_attn."""
    old = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
    return {re.sub(r"attentions\.0\.(query|key|value|proj_attn)\.",
                   lambda m: f"attentions.0.{old[m.group(1)]}.", k): v for k, v in state.items()}


def _text_keys(state):
    """position_ids is a constant buffer older transformers saved; some files lack 'text_model.'."""
    return {(k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in state.items() if not k.endswith("embeddings.position_ids")}


COMPONENTS = {  # folder: (config file, weights file stem, config class, module class, key map)
    "unet": ("config.json", "diffusion_pytorch_model", UNetConfig, UNet2DConditionModel, dict),
    "vae": ("config.json", "diffusion_pytorch_model", VAEConfig, AutoencoderKL, _vae_keys),
    "text_encoder": ("config.json", "model", TextConfig, CLIPTextModel, _text_keys),
}


def _weights_file(folder: Path, stem: str, variant: str | None) -> Path:
    """Pick <stem>.safetensors or <stem>.fp16.safetensors; refuse pickle-only folders."""
    names = [f"{stem}.{variant}.safetensors"] if variant else \
        [f"{stem}.safetensors", f"{stem}.fp16.safetensors"]
    for name in names:
        if (folder / name).is_file():
            return folder / name
    pickles = [p.name for p in folder.glob(f"{stem}*") if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise MinipError(f"{folder}: only pickle weights ({pickles[0]}); they are refused "
                         "(unpickling runs code): get the .safetensors files")
    raise MinipError(f"{folder}: no {names[0]} found; is the download complete?")


def load_component(folder: Path, name: str, dtype=torch.float32, device="cpu", variant=None):
    cfg_file, stem, cfg_cls, cls, keymap = COMPONENTS[name]
    sub = Path(folder) / name
    if not sub.is_dir():
        raise MinipError(f"{folder}: missing component folder '{name}/'")
    cfg = cfg_cls.from_dict(read_json(sub / cfg_file), f"{sub / cfg_file}")
    state = keymap(read_safetensors(_weights_file(sub, stem, variant)))
    return strict_build(cls, cfg, state, f"{sub}", dtype, device)


def load_folder(folder, dtype=torch.float32, device="cpu", variant=None) -> Model:
    """A diffusers-layout folder -> Model."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise MinipError(f"{folder}: no model_index.json; not a diffusers-style model folder")
    read_json(folder / "model_index.json")
    tokenizer = ClipTokenizer.from_dir(folder / "tokenizer")
    sched = SchedulerConfig.from_dict(read_json(folder / "scheduler" / "scheduler_config.json"),
                                      f"{folder / 'scheduler'}")
    parts = {n: load_component(folder, n, dtype, device, variant) for n in COMPONENTS}
    if parts["text_encoder"].cfg.hidden_size != parts["unet"].cfg.cross_attention_dim:
        raise MinipError(f"{folder}: text encoder width {parts['text_encoder'].cfg.hidden_size} "
                         f"≠ UNet cross_attention_dim {parts['unet'].cfg.cross_attention_dim}")
    return Model(tokenizer, parts["text_encoder"], parts["unet"], parts["vae"], DDIM(sched),
                 folder.name)


HUB_FILES = ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json",
             "tokenizer/merges.txt", "unet/config.json", "vae/config.json",
             "text_encoder/config.json"]


def download(repo_id: str, variant=None) -> Path:
    """Fetch only the files minip2p needs from the Hugging Face Hub into weights/<owner>--<name>."""
    local = WEIGHTS / repo_id.replace("/", "--")
    v = f".{variant}" if variant else ""
    patterns = HUB_FILES + [f"unet/diffusion_pytorch_model{v}.safetensors",
                            f"vae/diffusion_pytorch_model{v}.safetensors",
                            f"text_encoder/model{v}.safetensors"]
    if all((local / p).is_file() for p in patterns):
        return local
    try:
        from huggingface_hub import snapshot_download
        snapshot_download(repo_id, allow_patterns=patterns, local_dir=local)
    except Exception as e:  # offline, unknown repo, gated repo ...: one line, no traceback
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise MinipError(f"could not download '{repo_id}' from the Hugging Face Hub "
                         f"({type(e).__name__}: {first[:160]}); are you offline? Download it "
                         "elsewhere and pass its folder with --model") from None
    return local


def load_model(spec=None, dtype="fp32", device="cpu", variant=None) -> Model:
    """`spec`: a folder, a .safetensors single file, or a Hub repo id (None: the shipped model)."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise MinipError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    try:
        device = torch.device(device)
    except RuntimeError:
        raise MinipError(f"unknown device {device!r}; use cpu, cuda, cuda:1, mps ...") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MinipError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    path = Path(spec) if spec is not None else DEFAULT_MODEL
    if path.is_dir():
        return load_folder(path, dtype, device, variant)
    if path.is_file() or path.suffix in (".safetensors",) + PICKLE_SUFFIXES:
        from .single_file import load_single_file
        return load_single_file(path, dtype, device)
    if spec is not None and re.fullmatch(r"[\w.-]+/[\w.-]+", str(spec)) and not str(spec).startswith("."):
        return load_folder(download(str(spec), variant), dtype, device, variant)
    raise MinipError(f"model '{spec if spec is not None else path}' not found: give a model "
                     "folder, a .safetensors file or a Hub repo id (owner/name)")

"""Loading checkpoints: safetensors only, strict, from three layouts.

1. a diffusers-layout folder (model_index.json; unet/ vae/ text_encoder/ tokenizer/ scheduler/),
   fp32 or fp16-variant files;
2. a Hub repo id ("stable-diffusion-v1-5/stable-diffusion-v1-5"): resolved in huggingface_hub's
   own cache (HF_HOME / HF_HUB_CACHE), where only the needed files are fetched (hub.py), then
   loaded as in 1 -- a model that diffusers or `hf download` already cached is used as it is;
3. a single-file original checkpoint (CompVis / OpenCLIP key names), see single_file.py.

SD 1.x and SD 2.x (v-prediction, OpenCLIP text encoder, linear projections) load the same way:
their differences are all in the config.json files. Textual-inversion embeddings are added
afterwards (embeddings.py), and LoRA files merged into the weights (lora.py).

Our module names equal the diffusers keys, so each component needs at most a tiny mapping
function (`_vae_keys`, `_text_keys`). Models are built on the meta device and the tensors are
assigned, so no memory or time goes into random initialisation. Strictness: a missing,
unexpected or mis-shaped tensor is an error that names it. Pickles (.ckpt/.bin/.pt) are refused:
unpickling a file can run arbitrary code.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from .checkpoint import (CLIP_TOKENIZER, DEFAULT_MODEL, DTYPES, PICKLE_SUFFIXES,  # noqa: F401
                         WEIGHTS, Model, read_safetensors, strict_build)
from ..model.clip import CLIPTextModel
from ..model.config import SchedulerConfig, TextConfig, UNetConfig, VAEConfig, read_json
from ..samplers.ddim import DDIM
from ..errors import MinipError, ParameterError
from ..model.tokenizer import ClipTokenizer
from ..model.unet import UNet2DConditionModel
from ..model.vae import ENCODER, AutoencoderKL
from . import int8 as int8_


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
    # read in this order: the text encoder's large token embedding is read (and cast) while
    # nothing else is loaded yet, so its file-precision copy does not add to the UNet's
    "text_encoder": ("config.json", "model", TextConfig, CLIPTextModel, _text_keys),
    "vae": ("config.json", "diffusion_pytorch_model", VAEConfig, AutoencoderKL, _vae_keys),
    "unet": ("config.json", "diffusion_pytorch_model", UNetConfig, UNet2DConditionModel, dict),
}


def _weights_file(folder: Path, stem: str, variant: str | None,
                  missing: str = " found; is the download complete?") -> Path:
    """Pick <stem>.safetensors or <stem>.<variant>.safetensors (no variant asked: the plain
    file, else the fp16 one); refuse pickle-only folders and name the variants that exist.
    `missing`: the end of the message when no file is there (e.g. what the folder is not)."""
    names = [f"{stem}.{variant}.safetensors"] if variant else \
        [f"{stem}.safetensors", f"{stem}.fp16.safetensors"]
    for name in names:
        if (folder / name).is_file():
            return folder / name
    pickles = [p.name for p in folder.glob(f"{stem}*") if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise MinipError(f"{folder}: only pickle weights ({pickles[0]}); they are refused "
                         "(unpickling runs code): get the .safetensors files")
    if variant:
        found = sorted(p.name[len(stem) + 1:-len(".safetensors")] or "(none)"
                       for p in folder.glob(f"{stem}*.safetensors"))
        have = ", ".join("none (plain files)" if v == "" else v for v in found) or "none"
        raise MinipError(f"{folder}: no {names[0]}: variant {variant!r} is unknown here "
                         f"(variants found: {have}); drop the variant or use one of those")
    raise MinipError(f"{folder}: no {names[0]}{missing}")


def load_component(folder: Path, name: str, dtype=torch.float32, device="cpu", variant=None,
                   int8: bool = False):
    """One component, each tensor cast to `dtype` (or, `int8`, quantised: int8.py) as it is read."""
    cfg_file, stem, cfg_cls, cls, keymap = COMPONENTS[name]
    sub = Path(folder) / name
    if not sub.is_dir():
        raise MinipError(f"{folder}: missing component folder '{name}/'")
    cfg = cfg_cls.from_dict(read_json(sub / cfg_file), f"{sub / cfg_file}")
    file = _weights_file(sub, stem, variant)

    def state(names):
        return keymap(read_safetensors(file, int8_.converter(names or set(), dtype, keymap)))
    return strict_build(cls, cfg, state, f"{sub}", dtype, device,
                        prepare=int8_.prepare if int8 and name in INT8_PARTS else None)


INT8_PARTS = ("unet", "text_encoder")                      # the VAE stays in the compute dtype


def load_folder(folder, dtype=torch.float32, device="cpu", variant=None, name=None,
                int8: bool = False) -> Model:
    """A diffusers-layout folder -> Model."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise MinipError(f"{folder}: no model_index.json; not a diffusers-style model folder")
    read_json(folder / "model_index.json")
    tokenizer = ClipTokenizer.from_dir(folder / "tokenizer")
    sched = SchedulerConfig.from_dict(read_json(folder / "scheduler" / "scheduler_config.json"),
                                      f"{folder / 'scheduler'}")
    parts = {n: load_component(folder, n, dtype, device, variant, int8) for n in COMPONENTS}
    if parts["text_encoder"].cfg.hidden_size != parts["unet"].cfg.cross_attention_dim:
        raise MinipError(f"{folder}: text encoder width {parts['text_encoder'].cfg.hidden_size} "
                         f"≠ UNet cross_attention_dim {parts['unet'].cfg.cross_attention_dim}")
    _lazy_encoder(parts["vae"], folder, dtype, variant)
    return Model(tokenizer, parts["text_encoder"], parts["unet"], parts["vae"], DDIM(sched),
                 name or folder.name)


def _lazy_encoder(vae: AutoencoderKL, folder: Path, dtype, variant):
    """Leave the VAE's encoder unread until a picture is encoded (model/vae.py): checked with
    the rest of the file now, then dropped to the meta device; read again on first use."""
    file = _weights_file(folder / "vae", COMPONENTS["vae"][1], variant)
    cast = int8_.converter(set(), dtype)
    vae.encoder_state = lambda: _vae_keys(read_safetensors(
        file, lambda k, t: cast(k, t) if k.startswith(ENCODER) else {}))
    vae.encoder.to("meta"), vae.quant_conv.to("meta")


def load_model(spec=None, dtype="fp32", device="cpu", variant=None, revision=None,
               embeddings=(), fast: bool = True, strict_length: bool = False,
               loras=(), weights: str = "full") -> Model:
    """`spec`: a folder, a .safetensors single file, or a Hub repo id (None: the shipped model).

    `variant` ("fp16"): prefer `*.<variant>.safetensors` files; `revision`: a branch, tag or
    commit of a Hub repo; `embeddings`: textual-inversion .safetensors files to add;
    `loras`: LoRA .safetensors files to merge, each a path or (path, scale) (lora.py).
    `fast`: install the fast path (minip2p/fast/: fused attention wherever no controller reads
    the maps, kernels picked by measurement); False: the reference path, every M formed.
    `strict_length`: a prompt longer than the text encoder's 77 tokens is an error (default: a
    warning naming how many tokens were dropped); it sets `model.tokenizer.strict`.
    `dtype`: "fp32", "fp16", "bf16" or "auto" (bf16 where the CPU has it and it measured faster,
    else fp32: fast/precision.py). `weights`: "full" (the compute dtype) or "int8" (int8.py)."""
    if weights not in ("full", "int8"):
        raise ParameterError("weights", f"{weights!r} is not a weight format; use full or int8")
    if dtype == "auto":
        from ..fast.precision import choose, width_of
        dtype = choose(device, width_of(spec if spec is not None else DEFAULT_MODEL))
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise MinipError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    try:
        device = torch.device(device)
    except RuntimeError:
        raise MinipError(f"unknown device {device!r}; use cpu, cuda, cuda:1, mps ...") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError("device", "cuda was asked for but no CUDA GPU is available; use cpu")
    if device.type == "meta":                    # shapes only, no data: nothing to compute on
        raise ParameterError("device", "meta holds no data; use cpu, cuda, cuda:1, mps ...")
    try:                                         # mps on Linux, cuda:7 of 1 GPU, xpu without one
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError, ValueError):
        raise ParameterError("device", f"{str(device)!r} is not available here; use cpu") \
            from None
    if variant is not None and not re.fullmatch(r"[A-Za-z0-9_]+", str(variant)):
        raise MinipError(f"unknown variant {variant!r}; a variant is a name such as fp16")
    path = Path(spec) if spec is not None else DEFAULT_MODEL
    hub = (spec is not None and not path.exists() and not str(spec).startswith(".")
           and path.suffix not in (".safetensors",) + PICKLE_SUFFIXES
           and re.fullmatch(r"[\w.-]+/[\w.-]+", str(spec)) is not None)
    if revision is not None and not hub:
        raise ParameterError("revision", f"{revision} applies to Hub repo ids only, not to "
                         f"'{spec if spec is not None else path}'; drop it")
    int8 = weights == "int8"
    if int8 and dtype == torch.float16 and device.type == "cpu":
        raise ParameterError("weights", "int8 weights dequantise to the compute dtype, and fp16 "
                                        "is not a CPU compute dtype; use bf16 or fp32 with int8")
    if int8 and loras:
        raise ParameterError("weights", "int8 weights cannot take a LoRA merge after quantising; "
                                        "merge the LoRA into a full-precision model instead")
    if path.is_dir():
        model = load_folder(path, dtype, device, variant, int8=int8)
    elif path.is_file() or path.suffix in (".safetensors",) + PICKLE_SUFFIXES:
        if variant is not None:
            raise ParameterError("variant", f"{variant} applies to model folders and Hub ids, not to "
                             f"the single file '{path}'; drop it")
        from .single_file import load_single_file
        model = load_single_file(path, dtype, device)
        if int8:
            for part in (model.unet, model.text_encoder):
                int8_.quantize_module(part, dtype)
    elif hub:
        from .hub import resolve
        model = load_folder(resolve(str(spec), revision, variant), dtype, device, variant,
                            name=str(spec), int8=int8)
    else:
        raise MinipError(f"model '{spec}' not found: give a model folder, a .safetensors file "
                         "or a Hub repo id (owner/name)")
    model.tokenizer.strict = bool(strict_length)
    if embeddings:
        from .embeddings import add_embeddings
        add_embeddings(model, embeddings)
    for lora in loras:
        from .lora import add_lora
        add_lora(model, *((lora,) if isinstance(lora, (str, Path)) else lora))
    if fast:
        from ..fast import install
        install(model)
    return model

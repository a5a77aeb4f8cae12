"""What every command shares: the argument parser, number parsing, the model options, loading
the model from them, and checked, atomic output files."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..atomic import atomic_write, atomic_write_all
from ..errors import MinipError


class Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage block) with exit status 2."""

    def error(self, message):
        raise MinipError(f"{message} (see '{self.prog} --help')")


def int_arg(name, minimum=1, maximum=None):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{name} must be ≥ {minimum}, got {v}")
        if maximum is not None and v > maximum:
            raise argparse.ArgumentTypeError(f"{name} must be ≤ {maximum}, got {v}")
        return v
    return parse


def float_arg(name):
    def parse(text):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if v != v or v in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number, got {text!r}")
        return v
    return parse


def sampler_arg(text):
    from ..samplers import SAMPLERS
    if text not in SAMPLERS:
        raise argparse.ArgumentTypeError(f"--sampler must be one of {', '.join(SAMPLERS)}, "
                                         f"got {text!r}")
    return text


def ddim_only(args, what: str):
    """Inversion and starting part-way (real images, SDEdit) are DDIM's; refuse another sampler."""
    if getattr(args, "sampler", "ddim") != "ddim":
        raise MinipError(f"--sampler {args.sampler}: {what} needs the ddim sampler; "
                         "drop --sampler")


def add_model_options(p: argparse.ArgumentParser, out: str | None = None, lean: bool = False):
    """Options shared by every command that runs the model (`lean`: --free-text-encoder too,
    for the commands that encode their prompts once)."""
    p.add_argument("--model", default=None,
                   help="model folder, .safetensors single file, or Hub repo id "
                        "(default: the small model shipped in weights/toy)")
    p.add_argument("--revision", default=None,
                   help="branch, tag or commit of a Hub repo id (default: main)")
    p.add_argument("--variant", default=None,
                   help="prefer *.VARIANT.safetensors weights, e.g. fp16 (folders and Hub ids)")
    p.add_argument("--embedding", action="append", default=[], metavar="FILE.safetensors",
                   help="textual-inversion embedding: its token becomes usable in prompts "
                        "(repeatable)")
    p.add_argument("--seed", type=int_arg("--seed", 0, 2 ** 64 - 1), default=0,
                   help="noise seed, 0 … 2⁶⁴ − 1 (torch's generator) (default 0)")
    p.add_argument("--steps", type=int_arg("--steps"), default=50,
                   help="sampling steps, from 1 to the scheduler's largest: (steps − 1)·⌊N/steps⌋ + "
                        "steps_offset must be a training timestep < N, so 999 for SD 1.x/2.x "
                        "(N = 1000, offset 1) (50)")
    p.add_argument("--sampler", type=sampler_arg, default="ddim",
                   help="ddim (deterministic), euler-a (Euler ancestral: fresh noise at each "
                        "step, one noise shared by the images of an edit) or dpm++ "
                        "(DPM-Solver++ 2M: deterministic, second order, for 20-25 steps) (ddim)")
    p.add_argument("--guidance", type=float_arg("--guidance"), default=7.5,
                   help="classifier-free guidance scale (7.5)")
    p.add_argument("--height", type=int_arg("--height"), default=None,
                   help="image height in pixels, a multiple of the VAE's downscale factor so "
                        "that it maps to whole latents (8 for SD 1.x/2.x, 4 for the toy model); "
                        "as large as fits in memory: a request whose estimated peak exceeds the "
                        "available memory is refused before any work (default: the model's "
                        "native size)")
    p.add_argument("--width", type=int_arg("--width"), default=None,
                   help="image width, the same rule as --height")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="weights and activations (fp32; fp16/bf16 are meant for GPUs)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ... (cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--explicit", action="store_true",
                   help="form every attention map explicitly (the reference path; slower)")
    p.add_argument("--no-autotune", action="store_true",
                   help="do not time the fast path's kernel choices on this machine; take "
                        "PyTorch's own kernels (reproducible runs; also MINIP2P_NO_AUTOTUNE=1)")
    p.add_argument("--strict-length", action="store_true",
                   help="refuse a prompt longer than the text encoder's 77 tokens (default: "
                        "warn and drop the tokens past 77)")
    if lean:
        p.add_argument("--free-text-encoder", action="store_true",
                       help="free the text encoder once the prompts are encoded (less memory)")
    if out:
        p.add_argument("--out", default=out, help=f"output image file ({out})")


def check_out_file(path: str, gif: bool = False) -> Path:
    """Fail before any work if the image (`gif`: the animation) cannot be written there."""
    out = Path(path)
    if gif and out.suffix.lower() != ".gif":
        raise MinipError(f"output file {path!r}: an animation is written as GIF; end it in .gif")
    if not gif and out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise MinipError(f"output file {path!r} must end in .png, .jpg or .webp")
    if not out.parent.is_dir():
        raise MinipError(f"output folder '{out.parent}' does not exist; create it first")
    if out.is_dir():
        raise MinipError(f"output file '{path}' is a folder; give a file name")
    if not os.access(out.parent, os.W_OK):
        raise MinipError(f"output folder '{out.parent}' is not writable")
    return out


def save_image(image, path: Path):
    """Write atomically: complete or absent."""
    atomic_write(path, image.save)


def save_images(images: dict, folder: Path):
    """{name: image} into `folder` (made if missing): every file complete, or none of them and
    no folder made (a full disk half-way through an edit leaves nothing behind)."""
    made = not folder.is_dir()
    try:
        folder.mkdir(exist_ok=True)
    except OSError as e:
        raise MinipError(f"cannot make the folder '{folder}': {e.strerror or e}") from None
    try:
        atomic_write_all([(folder / name, im.save) for name, im in images.items()])
    except MinipError:
        if made:
            folder.rmdir()
        raise


def load(args):
    from ..fast.autotune import Tuner, set_tuner
    from ..load import load_model
    if getattr(args, "no_autotune", False):
        set_tuner(Tuner(enabled=False))
    return load_model(args.model, dtype=args.dtype, device=args.device, variant=args.variant,
                      revision=args.revision, embeddings=args.embedding,
                      fast=not getattr(args, "explicit", False),     # --explicit: reference
                      strict_length=getattr(args, "strict_length", False))


def preflight(args, model, images: int = 1, size=None, **kw) -> tuple[int, int]:
    """Before any work: the size (default: the model's native one, or `size`) and the steps
    checked, then a request whose estimated peak memory exceeds what is available refused
    (memory.check; `kw`: rows_per_image, controlled, grad). Returns (height, width)."""
    from .. import memory
    from ..pipeline import check_size
    height, width = size or check_size(model, args.height, args.width)
    model.scheduler.timesteps(args.steps)
    memory.check(model, images, height, width, explicit=args.explicit, **kw)
    return height, width


def settings_of(args, **extra) -> dict:
    """The run settings every method takes (methods.base.Settings), from the shared options."""
    return dict(steps=args.steps, seed=args.seed, guidance=args.guidance, height=args.height,
                width=args.width, sampler=args.sampler, progress=not args.quiet,
                free_text_encoder=getattr(args, "free_text_encoder", False), **extra)


def flag_of(name: str, flags: dict | None = None) -> str:
    """The flag a parameter is given by: the command's table, else --the-name."""
    return (flags or {}).get(name) or "--" + name.replace("_", "-")


def check_out_dir(path: str) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise MinipError(f"--out-dir '{out}' is a file; give a folder")
    if not out.parent.is_dir():
        raise MinipError(f"the folder holding --out-dir '{out}' does not exist; create it first")
    if not os.access(out if out.is_dir() else out.parent, os.W_OK):
        raise MinipError(f"--out-dir '{out}' is not writable (checked before any work)")
    return out

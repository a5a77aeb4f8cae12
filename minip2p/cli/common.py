"""What every command shares: the argument parser, number parsing, the model options, loading
the model from them, and checked, atomic output files."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..atomic import atomic_write, check_replaceable, write_folder
from ..errors import MinipError


class Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage block) with exit status 2, and a flag is
    taken only spelled out in full (argparse would read `--out` as `--out-dir`, `--step` as
    `--steps`). The subcommands' parsers are Parsers too (parser_class)."""

    def __init__(self, *args, **kw):
        kw.setdefault("allow_abbrev", False)
        super().__init__(*args, **kw)

    def parse_known_args(self, args=None, namespace=None):
        """An unknown flag is refused by the (sub)command's own parser, which knows its flags:
        `edit --out x` -> "… did you mean --out-dir?" and the command's --help."""
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            near = sorted({o for e in extras if e.startswith("--") for o in
                           self._option_string_actions if o.startswith(e.split("=")[0])})
            self.error(f"unrecognized arguments: {' '.join(extras)}" + (
                f"; flags are not abbreviated: did you mean {' or '.join(near[:3])}?"
                if near else ""))
        return namespace, extras

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


def lora_arg(text):
    """--lora FILE[:SCALE] -> (FILE, SCALE); SCALE 1 when absent (a FILE with a colon in its
    name that exists is taken whole)."""
    path, colon, scale = text.rpartition(":")
    if not colon or os.path.exists(text):
        return text, 1.0
    return path, float_arg("the scale")(scale)


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
    p.add_argument("--lora", type=lora_arg, action="append", default=[],
                   metavar="FILE.safetensors[:SCALE]",
                   help="LoRA (kohya or diffusers layout) merged into the UNet and text encoder "
                        "weights at load, with SCALE (1) (repeatable)")
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
    p.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                   help="weights and activations: auto = bf16 on a CPU with native bf16 where "
                        "it measured faster, else fp32; fp16 is for GPUs (auto)")
    p.add_argument("--weights", choices=["full", "int8"], default="full",
                   help="int8: UNet and text encoder weights stored as 8-bit integers, one scale "
                        "per output channel, dequantised layer by layer (less memory) (full)")
    p.add_argument("--decode-tile", type=int_arg("--decode-tile", 0), default=None,
                   metavar="PX", help="decode pictures in overlapping tiles of PX pixels a side "
                   "(less memory; 0: whole; default: tiled only when a picture is large or "
                   "the memory is short)")
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
    if lean:                                  # freed by default; the flag stays accepted
        p.add_argument("--keep-text-encoder", dest="free_text_encoder", action="store_false",
                       help="keep the text encoder in memory after the prompts are encoded "
                            "(default: freed then, less memory)")
        p.add_argument("--free-text-encoder", action="store_true", help=argparse.SUPPRESS)
        p.set_defaults(free_text_encoder=True)
    if out:
        p.add_argument("--out", default=out, help=f"output image file ({out})")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def check_out_file(path: str, gif: bool = False, suffixes=IMAGE_SUFFIXES) -> Path:
    """--out names a file: fail before any work if it is a folder, lacks the suffix of what is
    written (`gif`: an animation; `suffixes`: another kind of file), or cannot be written."""
    out = Path(path)
    if out.is_dir():
        raise MinipError(f"--out '{path}' is a folder; --out names a file, e.g. "
                         f"'{out / ('a.gif' if gif else 'a' + suffixes[0])}'")
    if gif and out.suffix.lower() != ".gif":
        raise MinipError(f"output file {path!r}: an animation is written as GIF; end it in .gif")
    if not gif and out.suffix.lower() not in suffixes:
        ends = ".png, .jpg or .webp" if suffixes == IMAGE_SUFFIXES else " or ".join(suffixes)
        raise MinipError(f"output file {path!r} must end in {ends}")
    if not out.parent.is_dir():
        raise MinipError(f"output folder '{out.parent}' does not exist; create it first")
    if not os.access(out.parent, os.W_OK):
        raise MinipError(f"output folder '{out.parent}' is not writable")
    return out


def save_image(image, path: Path):
    """Write atomically: complete or absent."""
    atomic_write(path, image.save)


def save_images(files: dict, folder: Path, command: str):
    """{name: image or write(path)} as the whole content of `folder` (atomic.write_folder): all
    written, the previous run's files of the folder replaced, or on any failure the folder as
    it was. A folder holding other files is refused."""
    write_folder(folder, {n: im if callable(im) else im.save for n, im in files.items()}, command)


def load(args):
    from ..fast.autotune import Tuner, set_tuner
    from ..memory import release
    from ..load import load_model
    if getattr(args, "no_autotune", False):
        set_tuner(Tuner(enabled=False))
    if hasattr(args, "control"):                     # the ControlNet options (cli/control.py)
        from .control import attach, check_controls
        check_controls(args)
    model = load_model(args.model, dtype=args.dtype, device=args.device, variant=args.variant,
                       revision=args.revision, embeddings=args.embedding,
                       fast=not getattr(args, "explicit", False),     # --explicit: reference
                       strict_length=getattr(args, "strict_length", False),
                       loras=getattr(args, "lora", ()),
                       weights=getattr(args, "weights", "full"))
    tile = getattr(args, "decode_tile", None)
    if tile is not None:
        f = model.vae.cfg.downscale
        if tile % f or tile and tile < 2 * f:
            raise MinipError(f"--decode-tile {tile}: a tile is a multiple of the VAE's "
                             f"downscale factor {f}, at least {2 * f} (or 0: whole pictures)")
        model.decode_tile = tile // f
    release()                                      # the load's freed pages back to the system
    return attach(args, model) if hasattr(args, "control") else model


def preflight(args, model, images: int = 1, size=None, **kw) -> tuple[int, int]:
    """Before any work: the size (default: the model's native one, or `size`) and the steps
    checked, then a request whose estimated peak memory exceeds what is available refused
    (memory.check; `kw`: rows_per_image, controlled, grad). Returns (height, width)."""
    from .. import memory
    from ..pipeline import check_size
    height, width = size or check_size(model, args.height, args.width)
    model.scheduler.timesteps(args.steps)
    kw.setdefault("free_text", getattr(args, "free_text_encoder", False))
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


def check_out_dir(path: str, command: str | None = None) -> Path:
    """--out-dir names a folder: fail before any work if it is a file, cannot be made or
    written, or (`command`: a folder the command replaces as a whole) holds anything but an
    earlier output of `command`, or holds the current folder."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise MinipError(f"--out-dir '{out}' is a file; --out-dir names a folder")
    if not out.parent.is_dir():
        raise MinipError(f"the folder holding --out-dir '{out}' does not exist; create it first")
    if not os.access(out if out.is_dir() else out.parent, os.W_OK):
        raise MinipError(f"--out-dir '{out}' is not writable (checked before any work)")
    if command:
        here = Path.cwd().resolve()
        if out.resolve() in (here, *here.parents):
            raise MinipError(f"--out-dir '{out}' holds the current folder; give a new folder")
        check_replaceable(out, command)
    return out

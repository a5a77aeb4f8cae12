"""Command line: `minip2p generate "PROMPT" ...` (and `python -m minip2p`).

Every user mistake ends as one line on stderr, `minip2p: <what was wrong; what to do>`, exit
status 2, no traceback, and no output file (images are written to a temporary file in the target
folder and renamed into place only when complete).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from .atomic import atomic_write
from .errors import MinipError


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage block) with exit status 2."""

    def error(self, message):
        raise MinipError(f"{message} (see '{self.prog} --help')")


def _int(name, minimum=1):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{name} must be ≥ {minimum}, got {v}")
        return v
    return parse


_positive_int = _int


def _float(name):
    def parse(text):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if v != v or v in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number, got {text!r}")
        return v
    return parse


def add_model_options(p: argparse.ArgumentParser, out: str | None = None, lean: bool = False):
    """Options shared by every command that runs the model (`lean`: --free-text-encoder too,
    for the commands that encode their prompts once)."""
    p.add_argument("--model", default=None,
                   help="model folder, .safetensors single file, or Hub repo id "
                        "(default: the small model shipped in weights/toy)")
    p.add_argument("--seed", type=_int("--seed", 0), default=0, help="noise seed (default 0)")
    p.add_argument("--steps", type=_positive_int("--steps"), default=50, help="DDIM steps (50)")
    p.add_argument("--guidance", type=_float("--guidance"), default=7.5,
                   help="classifier-free guidance scale (7.5)")
    p.add_argument("--height", type=_positive_int("--height"), default=None,
                   help="image height, a multiple of 8 (default: the model's native size)")
    p.add_argument("--width", type=_positive_int("--width"), default=None, help="image width")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="weights and activations (fp32; fp16/bf16 are meant for GPUs)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ... (cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--explicit", action="store_true",
                   help="form every attention map explicitly (the reference path; slower)")
    if lean:
        p.add_argument("--free-text-encoder", action="store_true",
                       help="free the text encoder once the prompts are encoded (less memory)")
    if out:
        p.add_argument("--out", default=out, help=f"output image file ({out})")


def check_out_file(path: str) -> Path:
    """Fail before any work if the image cannot be written there."""
    out = Path(path)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
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


def load(args):
    from .loading import load_model
    return load_model(args.model, dtype=args.dtype, device=args.device)


def cmd_generate(args):
    from .pipeline import check_size, generate, to_pil
    out = check_out_file(args.out)
    model = load(args)
    check_size(model, args.height, args.width)
    images = generate(model, [args.prompt], seed=args.seed, steps=args.steps,
                      guidance=args.guidance, height=args.height, width=args.width,
                      progress=not args.quiet, fast=not args.explicit,
                      free_text_encoder=args.free_text_encoder)
    save_image(to_pil(images)[0], out)
    print(f"wrote {out}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="minip2p", description="Minimal Stable Diffusion 1.x with Prompt-to-Prompt.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    g = sub.add_parser("generate", help="text -> image")
    g.add_argument("prompt")
    add_model_options(g, out="minip2p.png", lean=True)
    g.set_defaults(run=cmd_generate)
    from . import cli_invert, cli_p2p
    cli_p2p.add_commands(sub)
    cli_invert.add_commands(sub)
    return p


def main(argv=None) -> int:
    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        print(f"minip2p: warning: {message}", file=sys.stderr)
    warnings.showwarning = one_line_warning
    try:
        args = build_parser().parse_args(argv)
        args.run(args)
    except MinipError as e:
        print(f"minip2p: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("minip2p: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("minip2p: out of memory; try a smaller --height/--width or --dtype fp16 on a GPU",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Command line for real images: `minip2p invert …`, `minip2p reconstruct …`, and the
`--image` / `--inversion` options of `minip2p edit` (see edit.cmd_edit).

    minip2p invert photo.jpg "a red circle" --inversion-method direct --out inversion.safetensors
    minip2p edit --inversion inversion.safetensors "a blue circle"      # source from the file
    minip2p edit "a red circle" "a blue circle" --image photo.jpg         # inverts, then edits
    minip2p reconstruct photo.jpg "a red circle"   (or --inversion FILE; = edit with no target)
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from ..errors import MinipError
from .control import add_control_options
from .common import (add_model_options, check_out_file, ddim_only, float_arg, int_arg, load,
                     preflight, save_image)


def add_inversion_options(p: argparse.ArgumentParser, flag: str = "--method"):
    """`flag`: `--method` for invert/reconstruct (where `--inversion-method` is the same option),
    `--inversion-method` for edit (whose `--method` picks the editing method; default None
    there, filled in by edit.check_method_flags)."""
    from ..real.invert import METHODS
    flags = ("--method", "--inversion-method") if flag == "--method" else (flag,)
    p.add_argument(*flags, choices=METHODS, default="null-text" if flag == "--method" else None,
                   help="ddim: DDIM inversion, ∅ = \"\"; null-text: optimise ∅ per step "
                        "(slow); negative-prompt: ∅ = the prompt (fast); direct: Direct "
                        "Inversion, the source kept on its DDIM trajectory (fast); edict: exact "
                        "coupled pair; renoise: refined DDIM steps (null-text)")
    p.add_argument("--inner-steps", type=int_arg("--inner-steps"), default=None,
                   help="null-text: at most this many Adam steps per denoising step (10)")
    p.add_argument("--renoise-steps", type=int_arg("--renoise-steps", 0), default=None,
                   help="renoise: fixed-point iterations per inversion step (1)")
    p.add_argument("--regularise", action="store_true",
                   help="Pix2Pix-Zero's regularised DDIM inversion: each ε pushed towards white "
                        "noise (auto-correlation and KL terms; lags drawn from --seed)")
    p.add_argument("--reg-steps", type=int_arg("--reg-steps"), default=None,
                   help="--regularise: rounds of gradient steps per inversion step (5)")
    p.add_argument("--lambda-ac", type=float_arg("--lambda-ac"), default=None,
                   help="--regularise: auto-correlation step size λ_AC (20)")
    p.add_argument("--lambda-kl", type=float_arg("--lambda-kl"), default=None,
                   help="--regularise: KL step size λ_KL (20)")
    p.add_argument("--crop", default=None, metavar="L,T,R,B",
                   help="pixels cut off the left, top, right, bottom edges before the centre "
                        "crop (none)")


def add_edit_options(e: argparse.ArgumentParser):
    """The options `edit` gains: a real image to invert, or an inversion file to reuse."""
    e.add_argument("--image", help="edit this real image: invert it with the SOURCE prompt first")
    e.add_argument("--inversion", metavar="FILE",
                   help="edit the image of this inversion file (its prompt is the source; "
                        "every positional prompt is a target)")
    add_inversion_options(e, "--inversion-method")


POSITIONAL = {"image": "IMAGE"}        # a bad picture is named as the argument the user gave
REG_FLAGS = {"reg_steps": "--reg-steps", "lambda_ac": "--lambda-ac", "lambda_kl": "--lambda-kl"}


def regulariser(args, not_inverting: str | None = None):
    """--regularise and its settings -> noise_reg.Regulariser (None without it). Refused, with
    the reason `not_inverting`, where this command DDIM-inverts nothing; its settings without
    --regularise are refused too (and the Pix2Pix-Zero settings with renoise, whose regulariser
    has its own constants; --renoise-steps without renoise; --regularise with edict)."""
    from ..methods.noise_reg import Regulariser
    given = [flag for key, flag in REG_FLAGS.items() if getattr(args, key) is not None]
    method = getattr(args, "inversion_method", None) or args.method
    if args.renoise_steps is not None and method != "renoise":
        raise MinipError("--renoise-steps sets ReNoise's iterations; add --inversion-method "
                         "renoise")
    if given and method == "renoise":
        raise MinipError(f"{given[0]} sets Pix2Pix-Zero's regulariser; ReNoise's has its own "
                         "constants: leave it out")
    if args.regularise and method == "edict":
        raise MinipError("--regularise regularises a DDIM-type inversion; EDICT's is exact: "
                         "leave it out")
    if given and not args.regularise:
        raise MinipError(f"{given[0]} sets the regularised inversion; add --regularise")
    if not args.regularise:
        return None
    if not_inverting:
        raise MinipError(f"--regularise regularises the DDIM inversion of --image, and "
                         f"{not_inverting}; leave it out")
    pick = lambda key, default: default if getattr(args, key) is None else getattr(args, key)  # noqa: E731
    return Regulariser(pick("lambda_ac", 20.0), pick("lambda_kl", 20.0), pick("reg_steps", 5),
                       seed=args.seed)


def check_inversion_out(path: str) -> Path:
    return check_out_file(path, suffixes=(".safetensors",))


def read_input(image: str | None, inversion: str | None, crop: str | None, prompt: str | None,
               needs_prompt: bool = True):
    """Before the model loads: read --inversion (-> Inversion) or --image (-> the margin-cropped
    RGB image, which needs `prompt` when it is to be inverted with it), so that bad input fails
    before any work."""
    from ..real import images, invert
    for name, value in (("image", image), ("inversion file", inversion)):
        if value is not None and not value.strip():
            raise MinipError(f"the {name} path is empty; give a file")
    if image and inversion:
        raise MinipError("give --image or --inversion, not both")
    left, top, right, bottom = images.parse_crop(crop)
    if inversion:
        return invert.load(inversion)
    if not image:
        return None
    if needs_prompt and not prompt:
        raise MinipError("a real image needs the prompt that describes it (the SOURCE prompt)")
    im = images.open_image(image)
    return images.cut_margins(im, (left, top, right, bottom))


def inversion_for(args, model, got, prompt: str | None):
    """An Inversion for `got` (from read_input): checked against the model and options, or made
    now from the image, described by `prompt`."""
    from ..real import images, invert
    from ..pipeline import check_size
    if isinstance(got, invert.Inversion):
        invert.check(got, model, args.steps, args.height, args.width, f"'{args.inversion}'")
        if args.guidance != got.guidance:
            warnings.warn(f"'{args.inversion}' was made for guidance {got.guidance:g}; editing at "
                          f"{args.guidance:g} will not reproduce the image exactly")
        return got
    height, width = check_size(model, args.height, args.width)
    x = images.to_tensor(images.fit(got, height, width))                # (1, 3, H, W)
    method = getattr(args, "inversion_method", None) or args.method
    say_inversion(method, args.inner_steps or 10, "--inversion-method")
    return invert.invert(model, x, prompt, method, args.steps, args.guidance,
                         args.inner_steps or 10, progress=not args.quiet, reg=regulariser(args),
                         renoise_steps=1 if args.renoise_steps is None else args.renoise_steps)


def say_inversion(method: str, inner_steps: int, flag: str):
    """Before a null-text inversion, one line on stderr: it is slow, and what is fast."""
    if method == "null-text":
        print(f"minip2p: note: inverting with null-text (up to {inner_steps} optimisation steps per "
              f"denoising step: slow on a CPU; {flag} direct is fast)", file=sys.stderr,
              flush=True)


def input_pil(inv):
    """The inversion's input image as PIL (None if the file has none)."""
    from PIL import Image
    return None if inv.image is None else Image.fromarray(inv.image.numpy())


def cmd_invert(args):
    from ..real import invert
    ddim_only(args, "inversion")
    out = check_inversion_out(args.out)
    regulariser(args)
    got = read_input(args.image, None, args.crop, args.prompt)
    model = load(args)
    preflight(args, model, grad=args.method == "null-text")
    inv = inversion_for(args, model, got, args.prompt)
    invert.save(inv, out)
    print(f"wrote {out} ({inv.method}" + (", regularised" if inv.regularised else "") +
          f", {inv.steps} steps, guidance {inv.guidance:g}, {inv.width}×{inv.height}, "
          f"prompt {inv.prompt!r})")


def cmd_reconstruct(args):
    from ..real import images, invert
    from ..pipeline import decode, to_pil
    ddim_only(args, "reconstruction from an inversion")
    out = check_out_file(args.out)
    if args.inversion and (args.image or args.prompt):
        raise MinipError("reconstruct takes IMAGE PROMPT or --inversion FILE, not both")
    if not args.inversion and not (args.image and args.prompt):
        raise MinipError("reconstruct needs IMAGE PROMPT (to invert) or --inversion FILE")
    regulariser(args, "an --inversion file is already inverted" if args.inversion else None)
    got = read_input(args.image, args.inversion, args.crop, args.prompt)
    model = load(args)
    from_file = isinstance(got, invert.Inversion)
    preflight(args, model, size=(got.height, got.width) if from_file else None,
              grad=not from_file and args.method == "null-text")
    inv = inversion_for(args, model, got, args.prompt)
    rec = invert.run(model, inv, [inv.prompt], progress=not args.quiet)   # (1, 3, H, W)
    save_image(to_pil(rec)[0], out)
    line = f"wrote {out} ({inv.method}"
    if inv.image is not None:
        x = inv.image.permute(2, 0, 1)[None].float() / 255                # (1, 3, H, W) in [0, 1]
        vae = decode(model, images.encode(model, x * 2 - 1)).cpu()
        line += (f"; PSNR {images.psnr(rec.cpu(), x):.2f} dB vs the input, "
                 f"VAE alone {images.psnr(vae, x):.2f} dB")
    print(line + ")")


def add_commands(sub):

    i = sub.add_parser("invert", help="real image -> inversion file (z_T and ∅ per step)")
    i.add_argument("image", help="any image file PIL reads (PNG, JPEG, WebP …)")
    i.add_argument("prompt", help="a prompt describing the image (the edits' source prompt)")
    add_inversion_options(i)
    add_model_options(i)
    add_control_options(i)
    i.add_argument("--out", default="inversion.safetensors",
                   help="inversion file to write (inversion.safetensors)")
    i.set_defaults(run=cmd_invert, flags=POSITIONAL)

    r = sub.add_parser("reconstruct", help="invert a real image and denoise it back")
    r.add_argument("image", nargs="?", help="image file (or give --inversion)")
    r.add_argument("prompt", nargs="?", help="a prompt describing the image")
    r.add_argument("--inversion", metavar="FILE", help="reuse this inversion file")
    add_inversion_options(r)
    add_model_options(r, out="reconstruction.png")
    add_control_options(r)
    r.set_defaults(run=cmd_reconstruct, flags=POSITIONAL)

"""`minip2p guide PROMPT --move WORD=X,Y --resize WORD=S [--no-keep-background]`: Self-Guidance
(methods/self_guidance.py). Writes 0.png (unguided), 1.png (guided) and strip.png as the whole of
--out-dir (a second run's files replace the first's).

    guide "a red circle" --move circle=0.8,0.5            the circle to the right half
    guide "a red circle" --resize circle=0.5
"""
from __future__ import annotations

import argparse

from ..errors import MinipError
from .control import add_control_options
from .common import (add_model_options, check_out_dir, float_arg, int_arg, load, preflight,
                     save_images, settings_of)


def parse_pairs(items, flag: str, n: int) -> dict[str, tuple[float, ...]]:
    """["circle=0.8,0.5"] -> {"circle": (0.8, 0.5)} (n numbers after '=')."""
    out = {}
    for item in items or []:
        word, sep, values = item.rpartition("=")
        try:
            nums = tuple(float(v) for v in values.split(","))
            if not sep or not word or len(nums) != n or any(v != v or abs(v) == float("inf")
                                                             for v in nums):
                raise ValueError
        except ValueError:
            form = "WORD=X,Y, e.g. circle=0.8,0.5" if n == 2 else "WORD=S, e.g. circle=0.5"
            raise MinipError(f"{flag} {item!r}: expected {form}") from None
        out[word] = nums
    return out


def cmd_guide(args):
    from .. import methods, views
    params = dict(move=parse_pairs(args.move, "--move", 2),
                  resize={w: k for w, (k,) in parse_pairs(args.resize, "--resize", 1).items()},
                  keep_appearance=args.keep_appearance, keep_background=args.keep_background,
                  guidance_weight=args.guidance_weight,
                  guide_steps=args.guide_steps, resize_steps=args.resize_steps,
                  guide_iterations=args.guide_iterations, heal=args.heal)
    s = settings_of(args)
    methods.prepare("self-guidance", [args.prompt], **params, **s)
    out = check_out_dir(args.out_dir, "guide")
    model = load(args)
    preflight(args, model, grad=True)
    r = methods.run(model, "self-guidance", [args.prompt], **params, **s)
    files = {"0.png": r.images[0], "1.png": r.images[1], "strip.png": views.strip(r.images,
                                                                                  r.labels)}
    save_images(files, out, "guide")      # all or none, replacing the previous run's
    print(f"wrote {', '.join(str(out / n) for n in files)}")


def add_commands(sub):
    g = sub.add_parser("guide", help="Self-Guidance: move or resize an object of PROMPT")
    g.add_argument("prompt")
    g.add_argument("--move", nargs="+", metavar="WORD=X,Y",
                   help="move WORD's object to (X, Y), fractions of the image in [0, 1]")
    g.add_argument("--resize", nargs="+", metavar="WORD=S", help="scale WORD's object by S > 0")
    g.add_argument("--keep-appearance", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the moved/resized objects' appearance from the unguided image "
                        "(on by default)")
    g.add_argument("--keep-background", action=argparse.BooleanOptionalAction, default=True,
                   help="keep everything outside the edited objects' old and new places from "
                        "the unguided image (on by default)")
    g.add_argument("--guidance-weight", type=float_arg("--guidance-weight"), default=0.25,
                   help="largest RMS v of a guidance step of z (0.25): z ← z − d, "
                        "d = E·∇E/‖∇E‖² capped at rms(d) ≤ v (v·σ_t for resizes)")
    g.add_argument("--guide-steps", type=float_arg("--guide-steps"), default=0.3,
                   help="guide the moves in this first fraction of the steps (0.3; 1.0: all)")
    g.add_argument("--resize-steps", type=float_arg("--resize-steps"), default=1.0,
                   help="guide the resizes in this first fraction of the steps (1.0: all)")
    g.add_argument("--heal", type=float_arg("--heal"), default=0.2,
                   help="resizes: re-noise the result back to this fraction of the steps and "
                        "guide that part again, to repaint specks (0.2; 0: off)")
    g.add_argument("--guide-iterations", type=int_arg("--guide-iterations", 1, 50), default=None,
                   metavar="N", help="gradient steps per guided step (2 for moves; resizes: "
                                     "120 spread over the steps)")
    g.add_argument("--out-dir", default="guide",
                   help="output folder, replaced as a whole by each run (guide)")
    add_model_options(g)
    add_control_options(g)
    g.set_defaults(run=cmd_guide)

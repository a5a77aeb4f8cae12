"""`minip2p generate PROMPT`: text -> image; with `--image PHOTO --strength S`, SDEdit."""
from __future__ import annotations

from ..errors import MinipError
from .common import add_model_options, check_out_file, float_arg, load, preflight, save_image


def cmd_generate(args):
    from ..methods import sdedit
    from ..pipeline import generate, to_pil
    out = check_out_file(args.out)
    photo = None
    if args.strength is not None and not args.image:
        raise MinipError("--strength sets how far SDEdit noises --image; add --image PHOTO")
    if args.image is not None:                                        # "" too: refused there
        from .. import images
        sdedit.check_strength(args.strength)
        photo = images.open_image(args.image)                        # before the model loads
    model = load(args)
    height, width = preflight(args, model)
    kw = dict(seed=args.seed, steps=args.steps, guidance=args.guidance, height=height, width=width,
              progress=not args.quiet, fast=not args.explicit,
              free_text_encoder=args.free_text_encoder)
    if photo is None:
        result = generate(model, [args.prompt], **kw)
    else:
        result = sdedit.generate(model, photo, [args.prompt], strength=args.strength, **kw)
    save_image(to_pil(result)[0], out)
    print(f"wrote {out}")


def add_commands(sub):
    g = sub.add_parser("generate", help="text -> image (SDEdit: from a noised --image)")
    g.add_argument("prompt")
    g.add_argument("--image", help="SDEdit: start from this picture, noised to --strength")
    g.add_argument("--strength", type=float_arg("--strength"), default=None,
                   help="SDEdit: how much noise, in (0, 1]; 1 = from pure noise (0.6 with --image)")
    add_model_options(g, out="minip2p.png", lean=True)
    g.set_defaults(run=cmd_generate)

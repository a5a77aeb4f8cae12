"""`minip2p generate PROMPT`: text -> image; with `--image PHOTO --strength S`, SDEdit; with
`--excite WORD …`, Attend-and-Excite (methods/attend_excite.py)."""
from __future__ import annotations

from ..errors import MinipError
from .control import add_control_options
from .common import (add_model_options, check_out_file, float_arg, int_arg, load, preflight,
                     save_image, settings_of)


FLAGS = {"words": "--excite"}


def cmd_generate(args):
    """Plain text -> image, or through the registry: Attend-and-Excite, SDEdit."""
    from .. import methods
    from ..pipeline import generate, to_pil
    out = check_out_file(args.out)
    if args.strength is not None and not args.image:
        raise MinipError("--strength sets how far SDEdit noises --image; add --image PHOTO")
    if args.excite_steps is not None and not args.excite:
        raise MinipError("--excite-steps sets how long Attend-and-Excite runs; add --excite WORD")
    if args.excite and args.image is not None:
        raise MinipError("--excite does not combine with --image (SDEdit); leave one out")
    name, params, s = None, {}, settings_of(args)
    if args.excite:
        name, params = "attend-excite", dict(words=args.excite, excite_steps=args.excite_steps)
        s["free_text_encoder"] = False
    elif args.image is not None:                                      # "" too: refused there
        from ..real import images
        name = "sdedit"
        params = {} if args.strength is None else dict(strength=args.strength)
        s["image"] = images.open_image(args.image)                    # before the model loads
    if name:
        methods.prepare(name, [args.prompt], **params, **s)
    model = load(args)
    model.free_unet = True          # its weights dropped at the decode (load.Model)
    height, width = preflight(args, model)
    if name:
        image = methods.run(model, name, [args.prompt], **params, **s).images[0]
    else:
        image = to_pil(generate(model, [args.prompt], args.seed, args.steps, args.guidance,
                                height, width, progress=not args.quiet, sampler=args.sampler,
                                free_text_encoder=args.free_text_encoder))[0]
    save_image(image, out)
    print(f"wrote {out}")


def add_commands(sub):
    g = sub.add_parser("generate", help="text -> image (SDEdit: from a noised --image)")
    g.add_argument("prompt")
    g.add_argument("--image", help="SDEdit: start from this picture, noised to --strength")
    g.add_argument("--strength", type=float_arg("--strength"), default=None,
                   help="SDEdit: how much noise, in (0, 1]; 1 = from pure noise (0.6 with --image)")
    g.add_argument("--excite", nargs="+", metavar="WORD",
                   help="Attend-and-Excite: make sure each of these words of the prompt appears")
    g.add_argument("--excite-steps", type=int_arg("--excite-steps", 0), default=None,
                   help="Attend-and-Excite: update z_t in the first N of 50 steps, scaled to "
                        "--steps (25)")
    add_model_options(g, out="minip2p.png", lean=True)
    add_control_options(g)
    g.set_defaults(run=cmd_generate, flags=FLAGS)

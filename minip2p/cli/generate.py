"""`minip2p generate PROMPT`: text -> image; with `--image PHOTO --strength S`, SDEdit; with
`--excite WORD …`, Attend-and-Excite (methods/attend_excite.py)."""
from __future__ import annotations

from ..errors import MinipError
from .common import (add_model_options, check_out_file, ddim_only, float_arg, int_arg, load,
                     preflight, save_image)


def cmd_generate(args):
    from ..methods import sdedit
    from ..pipeline import generate, to_pil
    out = check_out_file(args.out)
    photo = None
    if args.strength is not None and not args.image:
        raise MinipError("--strength sets how far SDEdit noises --image; add --image PHOTO")
    if args.excite_steps is not None and not args.excite:
        raise MinipError("--excite-steps sets how long Attend-and-Excite runs; add --excite WORD")
    if args.excite:
        for w in args.excite:
            if w not in args.prompt.split(" "):
                raise MinipError(f"--excite {w!r}: the word is not in the prompt "
                                 f"{args.prompt!r}; give words of the prompt")
        if args.image is not None:                                        # "" too: refused there
            raise MinipError("--excite does not combine with --image (SDEdit); leave one out")
        ddim_only(args, "Attend-and-Excite (--excite)")
    if args.image is not None:                                        # "" too: refused there
        from ..real import images
        sdedit.check_strength(args.strength)
        ddim_only(args, "SDEdit (--image)")
        photo = images.open_image(args.image)                        # before the model loads
    model = load(args)
    height, width = preflight(args, model)
    kw = dict(seed=args.seed, steps=args.steps, guidance=args.guidance, height=height, width=width,
              progress=not args.quiet,
              free_text_encoder=args.free_text_encoder)
    if args.excite:
        from ..methods import attend_excite
        from ..pipeline import encode_text
        kw["free_text_encoder"] = False
        ctrl = attend_excite.build(model, args.prompt, encode_text(model, [args.prompt]),
                                   args.excite, args.steps, height, width, args.excite_steps)
        result = generate(model, [args.prompt], control=ctrl, sampler=args.sampler, **kw)
    elif photo is None:
        result = generate(model, [args.prompt], sampler=args.sampler, **kw)
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
    g.add_argument("--excite", nargs="+", metavar="WORD",
                   help="Attend-and-Excite: make sure each of these words of the prompt appears")
    g.add_argument("--excite-steps", type=int_arg("--excite-steps", 0), default=None,
                   help="Attend-and-Excite: update z_t in the first N of 50 steps, scaled to "
                        "--steps (25)")
    add_model_options(g, out="minip2p.png", lean=True)
    g.set_defaults(run=cmd_generate)

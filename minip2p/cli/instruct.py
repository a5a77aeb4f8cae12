"""`minip2p instruct IMAGE "INSTRUCTION"`: InstructPix2Pix (instruct.py), "make it blue".

    instruct photo.jpg "make it snowy" --image-guidance 1.5 --guidance 7.5 --steps 100 --out o.png

Euler ancestral with 100 steps by default (the official edit_cli.py); `--maps` also writes the
instruction's cross-attention maps to OUT-maps.png.
"""
from __future__ import annotations

from .common import add_model_options, check_out_file, float_arg, load, preflight, save_image


def cmd_instruct(args):
    from ..real import images
    from ..methods import instruct
    from .. import views
    from ..control import AttentionStore
    from ..pipeline import check_size, to_pil
    out = check_out_file(args.out)
    photo = images.open_image(args.image)                            # before the model loads
    model = load(args)
    instruct.check_model(model)
    if args.height is None and args.width is None:
        height, width = instruct.default_size(model, photo)
    else:
        height, width = check_size(model, args.height, args.width)
    preflight(args, model, size=(height, width), rows_per_image=3,
              controlled=32 ** 2 if args.maps else 1)
    store = AttentionStore(1) if args.maps else None
    result = to_pil(instruct.edit(model, images.fit(photo, height, width), args.instruction,
                                  args.seed, args.steps, args.guidance, args.image_guidance,
                                  args.sampler, control=store, progress=not args.quiet))[0]
    files = {out: result}
    if store is not None:
        pixels = views.pick_pixels(store, "cross", None, result)
        files[out.with_name(out.stem + "-maps.png")] = views.cross_attention_image(
            store, model.tokenizer, args.instruction, 0, result, pixels)
    for path, im in files.items():
        save_image(im, path)
    print(f"wrote {', '.join(str(p) for p in files)}")


def add_commands(sub):
    p = sub.add_parser("instruct", help="InstructPix2Pix: edit IMAGE by an INSTRUCTION")
    p.add_argument("image", help="the picture to edit")
    p.add_argument("instruction", help='what to change, e.g. "make it blue"')
    p.add_argument("--image-guidance", type=float_arg("--image-guidance"), default=1.5,
                   help="s_I: how closely to keep the picture (1.5)")
    p.add_argument("--maps", action="store_true",
                   help="also write the instruction's cross-attention maps (OUT-maps.png)")
    add_model_options(p, out="instruct.png")
    p.set_defaults(run=cmd_instruct, sampler="euler-a", steps=100)

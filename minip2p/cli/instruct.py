"""`minip2p instruct IMAGE "INSTRUCTION"`: InstructPix2Pix (instruct.py), "make it blue".

    instruct photo.jpg "make it snowy" --image-guidance 1.5 --guidance 7.5 --steps 100 --out o.png

Euler ancestral with 100 steps by default (the official edit_cli.py); `--maps` also writes the
instruction's cross-attention maps to OUT-maps.png. `--instruction-embedding instr.safetensors`
uses an instruction learned from a before/after pair (`learn-instruction`, Visii) instead; the
INSTRUCTION's words, if given, are added to it (a hybrid instruction).
"""
from __future__ import annotations

from ..errors import MinipError
from .control import add_control_options
from .common import (add_model_options, check_out_file, float_arg, load, preflight, save_image,
                     settings_of)


def cmd_instruct(args):
    from .. import methods, views
    from ..methods import instruct
    from ..real import images
    out = check_out_file(args.out)
    photo = images.open_image(args.image)                            # before the model loads
    s = settings_of(args, image=photo, maps=args.maps)
    params = dict(image_guidance=args.image_guidance)
    if args.instruction_embedding:          # Visii: learned rows (+ the INSTRUCTION's words)
        if args.maps:
            raise MinipError("--maps shows the words of a typed instruction; leave it out with "
                             "--instruction-embedding")
        from ..load.embeddings import read_instruction
        read_instruction(args.instruction_embedding)                     # before the model loads
        params["instruction_embedding"] = args.instruction_embedding
    elif not args.instruction.strip():
        raise MinipError("give an INSTRUCTION, e.g. \"make it blue\" (or a learned one with "
                         "--instruction-embedding)")
    methods.prepare("instruct", [args.instruction], **params, **s)
    model = load(args)
    instruct.check_model(model)
    size = instruct.default_size(model, photo) if args.height is None and args.width is None \
        else None
    preflight(args, model, size=size, rows_per_image=3, controlled=32 ** 2 if args.maps else 1)
    r = methods.run(model, "instruct", [args.instruction], **params, **s)
    files = {out: r.images[0]}
    if r.store is not None:
        pixels = views.pick_pixels(r.store, "cross", None, r.images[0])
        files[out.with_name(out.stem + "-maps.png")] = views.cross_attention_image(
            r.store, model.tokenizer, args.instruction, 0, r.images[0], pixels)
    for path, im in files.items():
        save_image(im, path)
    print(f"wrote {', '.join(str(p) for p in files)}")


def add_commands(sub):
    p = sub.add_parser("instruct", help="InstructPix2Pix: edit IMAGE by an INSTRUCTION")
    p.add_argument("image", help="the picture to edit")
    p.add_argument("instruction", nargs="?", default="",
                   help='what to change, e.g. "make it blue"; with --instruction-embedding, '
                        "words added to the learned instruction (optional)")
    p.add_argument("--instruction-embedding", default=None, metavar="FILE.safetensors",
                   help="an instruction learned by `minip2p learn-instruction` (Visii)")
    p.add_argument("--image-guidance", type=float_arg("--image-guidance"), default=1.5,
                   help="s_I: how closely to keep the picture (1.5)")
    p.add_argument("--maps", action="store_true",
                   help="also write the instruction's cross-attention maps (OUT-maps.png)")
    add_model_options(p, out="instruct.png")
    add_control_options(p)
    p.set_defaults(run=cmd_instruct, sampler="euler-a", steps=100, flags={"image": "IMAGE"})

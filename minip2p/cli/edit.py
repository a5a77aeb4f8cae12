"""Command line for Prompt-to-Prompt: `minip2p edit …` and `minip2p attention …`."""
from __future__ import annotations

from pathlib import Path

from ..errors import MinipError
from . import invert as cli_invert
from .common import (add_model_options, check_out_dir, check_out_file, int_arg, load,
                     save_image)


def parse_reweight(items: list[str]) -> dict[str, float]:
    """["smiling=2", "dog=-0.5"] -> {"smiling": 2.0, "dog": -0.5}."""
    out = {}
    for item in items or []:
        word, sep, value = item.rpartition("=")
        try:
            if not sep or not word:
                raise ValueError
            out[word] = float(value)
        except ValueError:
            raise MinipError(f"--reweight {item!r}: expected WORD=FACTOR, e.g. smiling=2 or "
                             "dog=-0.5") from None
        if out[word] != out[word] or abs(out[word]) == float("inf"):
            raise MinipError(f"--reweight {item!r}: the factor must be a finite number")
    return out


MAP_RES = ("show the stored maps with this many rows (default: the coarsest stored down/up "
           "resolution, 16 at 512 px as in the P2P reference)")


def cmd_edit(args):
    from .. import invert, views
    from ..methods import p2p
    from ..methods.align import parse_window
    from ..pipeline import check_size, generate, to_pil

    prompts = [p for p in [args.source] + args.targets if p is not None]
    real = cli_invert.read_input(args.image, args.inversion, args.crop,  # before the model loads
                                 prompts[0] if prompts else None)
    if real is None and len(prompts) < 2:
        raise MinipError("edit needs a SOURCE prompt and at least one TARGET prompt "
                         "(or --image/--inversion: with no target, the reconstruction)")
    out = check_out_dir(args.out_dir)
    if args.map_res is not None and not args.maps:
        raise MinipError("--map-res chooses the maps of --maps; add --maps")
    cross = parse_window(args.cross_replace)
    self_ = parse_window(args.self_replace)
    if isinstance(self_, dict):
        raise MinipError("--self-replace takes a number (0.4) or a start,end pair (0.1,0.4)")
    reweight = parse_reweight(args.reweight)
    model = load(args)
    height, width = check_size(model, args.height, args.width)
    model.scheduler.timesteps(args.steps)
    inv = None
    if real is not None:          # real image: the inversion's prompt is the source
        if isinstance(real, invert.Inversion):
            prompts = [real.prompt] + prompts
        inv = cli_invert.inversion_for(args, model, real, prompts[0] if prompts else None)
    if len(prompts) > 1:
        control, store = p2p.build(model.tokenizer, prompts, args.steps, args.mode, cross, self_,
                                   reweight, args.blend, args.blend_threshold,
                                   store=args.maps)
    else:                         # no target: the reconstruction
        control = store = p2p.AttentionStore(1) if args.maps else None
    if inv is None:
        images = to_pil(generate(model, prompts, args.seed, args.steps, args.guidance, height,
                                 width, control=control, progress=not args.quiet,
                                 fast=not args.explicit, free_text_encoder=args.free_text_encoder))
    else:
        images = to_pil(invert.run(model, inv, prompts, control, args.guidance,
                                   progress=not args.quiet,
                                   free_text_encoder=args.free_text_encoder))
    files = {f"{i}.png": im for i, im in enumerate(images)}
    shown = [cli_invert.input_pil(inv)] if inv is not None and inv.image is not None else []
    files["strip.png"] = views.strip(shown + images, ["input"] * len(shown) + prompts)
    if args.maps:
        pixels = views.pick_pixels(store, "cross", args.map_res, images[0])
        for i, (prompt, im) in enumerate(zip(prompts, images)):
            files[f"maps-{i}.png"] = views.cross_attention_image(store, model.tokenizer, prompt, i,
                                                                 im, pixels)
    out.mkdir(exist_ok=True)
    for name, im in files.items():
        save_image(im, out / name)
    print(f"wrote {', '.join(str(out / n) for n in files)}")


def cmd_attention(args):
    from .. import views
    from ..control import AttentionStore
    from ..pipeline import check_size, generate, to_pil

    out = check_out_file(args.out)
    model = load(args)
    height, width = check_size(model, args.height, args.width)
    model.scheduler.timesteps(args.steps)
    store = AttentionStore(1)
    image = to_pil(generate(model, [args.prompt], args.seed, args.steps, args.guidance, height,
                            width, control=store, progress=not args.quiet,
                            fast=not args.explicit, free_text_encoder=args.free_text_encoder))[0]
    kind = "self" if args.self else "cross"
    pixels = views.pick_pixels(store, kind, args.map_res, image)
    if args.self:
        sheet = views.self_attention_image(store, args.prompt, 0, image, args.components, pixels)
    else:
        sheet = views.cross_attention_image(store, model.tokenizer, args.prompt, 0, image, pixels)
    save_image(sheet, out)
    print(f"wrote {out}")


def add_commands(sub):

    e = sub.add_parser("edit", help="Prompt-to-Prompt: edit SOURCE into each TARGET")
    e.add_argument("source", nargs="?", help="the source prompt (with --inversion: a target)")
    e.add_argument("targets", nargs="*", metavar="TARGET")
    e.add_argument("--mode", choices=["auto", "replace", "refine"], default="auto",
                   help="replace: word swap (same word count); refine: words added; "
                        "auto: replace when the word counts match, else refine")
    e.add_argument("--cross-replace", default="0.8",
                   help="cross-attention window: 0.8, 0.2,0.8 or default=1.0,lion=0.4 (0.8)")
    e.add_argument("--self-replace", default="0.4", help="self-attention window (0.4)")
    e.add_argument("--blend", nargs="+", metavar="WORD",
                   help="LocalBlend: a word of the source, then one of each target")
    e.add_argument("--blend-threshold", type=float, default=0.3, help="LocalBlend threshold (0.3)")
    e.add_argument("--reweight", nargs="+", metavar="WORD=FACTOR",
                   help="scale the attention of words of the targets, e.g. smiling=2")
    e.add_argument("--maps", action="store_true", help="also write maps-N.png per prompt")
    e.add_argument("--map-res", type=int_arg("--map-res"), metavar="ROWS", help=MAP_RES)
    e.add_argument("--out-dir", default="edit", help="output folder (edit)")
    add_model_options(e, lean=True)
    cli_invert.add_edit_options(e)
    e.set_defaults(run=cmd_edit)

    a = sub.add_parser("attention", help="show each token's cross-attention map")
    a.add_argument("prompt")
    a.add_argument("--self", action="store_true", help="self-attention SVD components instead")
    a.add_argument("--components", type=int, default=6, help="how many components (--self)")
    a.add_argument("--map-res", type=int_arg("--map-res"), metavar="ROWS", help=MAP_RES)
    add_model_options(a, out="maps.png", lean=True)
    a.set_defaults(run=cmd_attention)

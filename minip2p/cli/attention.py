"""`minip2p attention PROMPT`: each token's cross-attention map (or the self-attention SVD
components), and attention through time (`--over-time WORD`: a GIF of the word's map and of x̂₀
at every step; `edit --maps --over-time` uses the same helpers)."""
from __future__ import annotations

from ..errors import MinipError
from .control import add_control_options
from .common import (add_model_options, check_out_file, ddim_only, int_arg, load, preflight,
                     save_image)

MAP_RES = ("show the stored maps with this many rows (default: the coarsest stored down/up "
           "resolution, 16 at 512 px as in the P2P reference)")


OVER_TIME = ("write an animation of WORD's cross-attention map and of the predicted x̂₀ at each "
             "denoising step (decodes every step: slow with full-size weights on a CPU)")


def save_over_time(model, store, prompts, word, x0, map_res, image, path) -> str:
    """Decode every step's x̂₀ and write the GIF of `word`'s map and x̂₀ over the steps."""
    from .. import views
    from ..atomic import atomic_write
    from ..pipeline import decode, to_pil
    pixels = views.pick_pixels(store, "cross", map_res, image)
    x0_images = [to_pil(decode(model, z)) for z in x0.x0]
    frames = views.over_time(store, model.tokenizer, prompts, word, x0_images, pixels)
    atomic_write(path, lambda tmp: views.save_gif(frames, tmp))
    return str(path)


def cmd_attention(args):
    from .. import views
    from ..methods.editing import over_time
    from ..control import AttentionStore
    from ..pipeline import generate, to_pil

    if args.over_time is not None:
        if args.self:
            raise MinipError("--over-time shows a word's cross-attention; leave out --self")
        views.prompts_with([args.prompt], args.over_time)
        ddim_only(args, "--over-time (x̂₀ of each DDIM step)")
    out = check_out_file(args.out, gif=args.over_time is not None)
    model = load(args)
    height, width = preflight(args, model, controlled=32 ** 2)
    step_pixels, z_T, x0 = over_time(model, args.seed, args.steps, height, width, args.map_res) \
        if args.over_time is not None else (None, None, None)
    store = AttentionStore(1, step_pixels=step_pixels)
    image = to_pil(generate(model, [args.prompt], args.seed, args.steps, args.guidance, height,
                            width, control=store, progress=not args.quiet, latents=z_T,
                            callback=x0,
                            free_text_encoder=args.free_text_encoder, sampler=args.sampler))[0]
    if args.over_time is not None:
        save_over_time(model, store, [args.prompt], args.over_time, x0, args.map_res, image, out)
        print(f"wrote {out}")
        return
    kind = "self" if args.self else "cross"
    pixels = views.pick_pixels(store, kind, args.map_res, image)
    if args.self:
        sheet = views.self_attention_image(store, args.prompt, 0, image, args.components, pixels)
    else:
        sheet = views.cross_attention_image(store, model.tokenizer, args.prompt, 0, image, pixels)
    save_image(sheet, out)
    print(f"wrote {out}")


def add_commands(sub):
    a = sub.add_parser("attention", help="show each token's cross-attention map")
    a.add_argument("prompt")
    a.add_argument("--self", action="store_true", help="self-attention SVD components instead")
    a.add_argument("--components", type=int_arg("--components"), default=6,
                   help="how many components (--self)")
    a.add_argument("--map-res", type=int_arg("--map-res"), metavar="ROWS", help=MAP_RES)
    a.add_argument("--over-time", metavar="WORD", help=OVER_TIME + " (--out NAME.gif)")
    add_model_options(a, out="maps.png", lean=True)
    add_control_options(a)
    a.set_defaults(run=cmd_attention)

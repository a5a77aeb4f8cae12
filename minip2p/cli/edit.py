"""`minip2p edit SOURCE TARGET … --method p2p|masactrl|pnp|pix2pix-zero|diffuseit`: parse, map the flags to
the method's parameters (FLAGS), `methods.run`, save.

    edit "a cat" "a dog"                                   Prompt-to-Prompt (the default method)
    edit "a cat" "a dog" --image cat.jpg                   … on a real image (inverted first)
    edit "a cat" "a dog" --image cat.jpg --strength 0.6    … from the noised picture (SDEdit)
    edit "a cat" "a sitting cat" --method masactrl         MasaCtrl (--masa-step/-layer/-mask)
    edit "" "a blue square" --method pnp --image sq.png    plug-and-play (--pnp-features/-attention)
    edit "a cat" "a dog" --method pix2pix-zero             Pix2Pix-Zero (--xa-guidance, sentences)
    edit "a cat" --method asyrp --direction d.safetensors:3 --strength 2   Asyrp (h-space;
                                                           --image: its DDIM inversion)
    edit "a lion" "a black leopard" --method diffuseit --image lion.jpg     DiffuseIT

Every method writes 0.png (the source), 1.png … (the targets), strip.png, and with --maps
maps-N.png (and with --over-time WORD over-time.gif: the word's map and x̂₀ at each step): the
whole of --out-dir, a second run's files replacing the first's (common.save_images). A flag of
one method given to another is refused, as is anything out of range, before the model loads.
"""
from __future__ import annotations

import argparse

from ..errors import MinipError
from .attention import MAP_RES, OVER_TIME, save_over_time
from .control import add_control_options
from .common import (add_model_options, check_out_dir, float_arg, int_arg, load, preflight,
                     save_images, settings_of)
from .invert import add_edit_options, read_input, say_inversion

EDIT_METHODS = ("p2p", "masactrl", "pnp", "pix2pix-zero", "asyrp", "diffuseit")
# the one table: each method parameter `edit` takes -> its flag (argparse's dest: the flag's name)
FLAGS = {"mode": "--mode", "cross_replace": "--cross-replace", "self_replace": "--self-replace",
         "blend": "--blend", "blend_threshold": "--blend-threshold", "reweight": "--reweight",
         "start_step": "--masa-step", "start_layer": "--masa-layer", "mask_words": "--masa-mask",
         "features": "--pnp-features", "attention": "--pnp-attention",
         "negative_prompt": "--negative-prompt", "source_sentences": "--source-sentences",
         "target_sentences": "--target-sentences", "xa_guidance": "--xa-guidance",
         "strength": "--strength", "inversion": "--inversion-method",
         "inner_steps": "--inner-steps", "regularise": "--regularise", "reg_steps": "--reg-steps",
         "lambda_ac": "--lambda-ac", "lambda_kl": "--lambda-kl",
         "direction": "--direction", "t_edit": "--t-edit", "t_boost": "--t-boost",
         "asymmetric": "--symmetric", "repeats": "--repeats",
         "renoise_steps": "--renoise-steps",
         "target_image": "--target-image", "dino": "--dino", "clip": "--clip",
         "clip_weight": "--clip-weight", "structure_weight": "--structure-weight",
         "contrastive_weight": "--contrastive-weight", "semantic_weight": "--semantic-weight",
         "semantic_until": "--semantic-until", "range_weight": "--range-weight",
         "target_weight": "--target-weight", "pixel_weight": "--pixel-weight", "cuts": "--cuts",
         "resample": "--resample", "noise_aug": "--noise-aug",
         "regularize_content": "--regularize-content",
         "scale": "--guide-scale", "start": "--start-from"}


def dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


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


def parameters(args) -> dict:
    """The flags the user gave, as the method's parameters (a flag left out: the default)."""
    from ..methods.align import parse_window
    from ..methods.pix2pix_zero import read_sentences
    from ..real.invert import METHODS
    if args.method in METHODS:                     # `edit --method null-text` (before --method p2p)
        if args.inversion_method not in (None, args.method):
            raise MinipError(f"--method {args.method} and --inversion-method "
                             f"{args.inversion_method} disagree; give --inversion-method only")
        args.method, args.inversion_method = "p2p", args.method
    args.method = args.method or "p2p"
    given = {name: getattr(args, dest(flag)) for name, flag in FLAGS.items()}
    p = {name: v for name, v in given.items() if v is not None and v is not False}
    if p.get("asymmetric"):                          # --symmetric: Asyrp's asymmetric step off
        p["asymmetric"] = False
    p.update({k: False for k in ("noise_aug", "regularize_content") if given[k] is False})
    for key in ("cross_replace", "self_replace"):
        if key in p:
            p[key] = parse_window(p[key])
    if "reweight" in p:
        p["reweight"] = parse_reweight(p["reweight"])
    files = [k for k in ("source_sentences", "target_sentences") if k in p]
    if args.method == "pix2pix-zero" and len(files) == 1:
        raise MinipError("give --source-sentences and --target-sentences together (or "
                         "neither: built-in sentences around the words that differ)")
    for key in files if args.method == "pix2pix-zero" else ():   # the method that reads them
        p[key] = read_sentences(p[key], key)
    return p


def cmd_edit(args):
    from .. import methods, views
    from ..real.images import check_picture
    from ..real.invert import Inversion
    params = parameters(args)
    if args.map_res is not None and not args.maps:
        raise MinipError("--map-res chooses the maps of --maps; add --maps")
    if args.over_time is not None and not args.maps:
        raise MinipError("--over-time animates a word's map of --maps; add --maps")
    if args.over_time is not None and (args.image or args.inversion):
        raise MinipError("--over-time follows prompts generated from noise; leave out "
                         "--image/--inversion")
    prompts = [p for p in [args.source] + args.targets if p is not None]
    if args.over_time is not None:
        views.prompts_with(prompts, args.over_time)
    inverted = args.method not in ("pnp", "diffuseit") and args.strength is None
    real = read_input(args.image, args.inversion, args.crop, prompts[0] if prompts else None,
                      needs_prompt=inverted)                          # before the model loads
    s = settings_of(args, image=real, maps=args.maps, map_res=args.map_res,
                    over_time=args.over_time is not None)
    chosen = methods.prepare(args.method, prompts, **params, **s)[1]  # every value, before loading
    out = check_out_dir(args.out_dir, "edit")
    model = load(args)
    model.free_unet = True          # its weights dropped at the decode (load.Model)
    from_file = isinstance(real, Inversion)
    size = preflight(args, model, images=1 if args.method == "pnp" else 2 if args.method == "asyrp"
                     else len(prompts) + from_file,
                     size=(real.height, real.width) if from_file else None,
                     rows_per_image=3 if args.method == "pnp" else 2,
                     controlled=(32 ** 2 if args.maps else 16 ** 2 if args.method == "p2p" else 1),
                     grad=args.method == "diffuseit" or inverted and real is not None
                     and not from_file and params.get("inversion", "null-text") == "null-text")
    if real is not None and not from_file:
        check_picture(real, *size)                     # before the line on a slow inversion
        if getattr(chosen, "strength", None) is None:
                say_inversion(getattr(chosen, "inversion", ""), getattr(chosen, "inner_steps", 10),
                          "--inversion-method")
    result = methods.run(model, args.method, prompts, **params, **s)
    files = {f"{i}.png": im for i, im in enumerate(result.images)}
    files["strip.png"] = views.strip(result.inputs + result.images,
                                     ["input"] * len(result.inputs) + result.labels)
    if args.maps:
        pixels = views.pick_pixels(result.store, "cross", args.map_res, result.images[0])
        for i, (prompt, im) in enumerate(zip(result.labels, result.images)):
            files[f"maps-{i}.png"] = views.cross_attention_image(
                result.store, model.tokenizer, prompt, i, im, pixels)
    if args.over_time is not None:
        files["over-time.gif"] = lambda path: save_over_time(
            model, result.store, result.labels, args.over_time, result.x0, args.map_res,
            result.images[0], path)
    save_images(files, out, "edit")          # all or none, replacing the previous run's
    written = [str(out / n) for n in files]
    print(f"wrote {', '.join(written)}")


def add_commands(sub):
    from ..real.invert import METHODS
    e = sub.add_parser("edit", help="edit SOURCE into each TARGET (Prompt-to-Prompt, MasaCtrl, "
                                    "plug-and-play; SDEdit with --image --strength)")
    e.add_argument("source", nargs="?", help="the source prompt (with --inversion: a target)")
    e.add_argument("targets", nargs="*", help="edited prompts")
    e.add_argument("--method", choices=EDIT_METHODS + METHODS, default=None,
                   help="p2p (default), masactrl (mutual self-attention), pnp (plug-and-play "
                        "feature injection: needs --image) or pix2pix-zero (an edit direction "
                        "in text space, cross-attention guidance). (ddim, null-text, "
                        "negative-prompt: the inversion method, as before; same as "
                        "--inversion-method)")
    g = e.add_argument_group("Prompt-to-Prompt (--method p2p)")
    g.add_argument("--mode", choices=["auto", "replace", "refine"], default=None,
                   help="replace: word swap (same word count); refine: words added; "
                        "auto: replace when the word counts match, else refine")
    g.add_argument("--cross-replace", default=None,
                   help="cross-attention window τ_c: 0.8, 0.2,0.8 or default=1.0,lion=0.4 (0.8)")
    g.add_argument("--self-replace", default=None, help="self-attention window τ_s (0.4)")
    g.add_argument("--blend", nargs="+", metavar="WORD",
                   help="LocalBlend: a word of the source, then one of each target")
    g.add_argument("--blend-threshold", type=float_arg("--blend-threshold"), default=None,
                   help="LocalBlend threshold (0.3)")
    g.add_argument("--reweight", nargs="+", metavar="WORD=FACTOR",
                   help="scale the attention of words of the targets, e.g. smiling=2")
    m = e.add_argument_group("MasaCtrl (--method masactrl)")
    m.add_argument("--masa-step", type=int_arg("--masa-step", -10 ** 9), default=None,
                   help="mutual self-attention from this step on (4, or the last step of a "
                        "shorter run)")
    m.add_argument("--masa-layer", type=int_arg("--masa-layer", -10 ** 9), default=None,
                   help="… in transformer layers from this one on (default: the decoder's two "
                        "finest resolutions, 10 of SD 1.x's 16, 3 of the toy model's 7)")
    m.add_argument("--masa-mask", nargs=2, metavar=("WORD_IN_SOURCE", "WORD_IN_TARGET"),
                   help="mask-guided: foreground reads foreground, background background")
    q = e.add_argument_group("plug-and-play (--method pnp)")
    q.add_argument("--pnp-features", type=float_arg("--pnp-features"), default=None,
                   help="inject ResBlock features for this fraction of the steps (0.8)")
    q.add_argument("--pnp-attention", type=float_arg("--pnp-attention"), default=None,
                   help="inject self-attention queries and keys for this fraction (0.5)")
    q.add_argument("--negative-prompt", default=None,
                   help="the target's unconditional prompt (\"\"; the official config's: "
                        "\"ugly, blurry, black, low res, unrealistic\")")
    z = e.add_argument_group("Pix2Pix-Zero (--method pix2pix-zero)")
    z.add_argument("--source-sentences", metavar="FILE", default=None,
                   help="sentences about the source concept, one a line (default: the source "
                        "prompt itself)")
    z.add_argument("--target-sentences", metavar="FILE", default=None,
                   help="sentences about the target concept, one a line")
    z.add_argument("--xa-guidance", type=float_arg("--xa-guidance"), default=None,
                   help="cross-attention guidance step λ (0.1)")
    a = e.add_argument_group("Asyrp (--method asyrp; directions from `minip2p hspace`)")
    a.add_argument("--direction", metavar="FILE:K", default=None,
                   help="direction K of a directions file, e.g. dirs.safetensors:3; --strength "
                        "scales it (1)")
    a.add_argument("--t-edit", type=int_arg("--t-edit", 0, 1000), default=None,
                   help="edit h at timesteps t ≥ this, of 1000 (500)")
    a.add_argument("--t-boost", type=int_arg("--t-boost", 0, 1000), default=None,
                   help="stochastic steps (η = 1) below this timestep (200)")
    a.add_argument("--symmetric", action="store_true",
                   help="the edited ε in both terms of the step (Haas et al.), not Asyrp's "
                        "asymmetric step")
    a.add_argument("--repeats", type=int_arg("--repeats", 0, 1000), default=None,
                   help="pullback directions: x-space guidance steps at z_t (16)")
    d = e.add_argument_group("DiffuseIT (--method diffuseit; defaults set on the toy model, "
                             "the official after ';')")
    d.add_argument("--target-image", metavar="FILE", help="image-guided: take this picture's "
                   "appearance (the CLIP loss is then off)")
    d.add_argument("--dino", metavar="DIR|REPO", help="DINO ViT (facebook/dino-vitb8, cached)")
    d.add_argument("--clip", metavar="DIR|REPO", help="CLIP (openai/clip-vit-base-patch16, cached)")
    for flag, what in (("--clip-weight", "CLIP directional loss (200; official 2000)"),
                       ("--structure-weight", "DINO key self-similarity (20000; official 1000)"),
                       ("--contrastive-weight", "PatchNCE on DINO keys (200)"),
                       ("--semantic-weight", "[CLS] divergence (0; official 100)"),
                       ("--range-weight", "range loss (200)"),
                       ("--target-weight", "[CLS] to --target-image (2000)"),
                       ("--pixel-weight", "pixel MSE to --target-image (3000)"),
                       ("--guide-scale", "multiplies the whole correction (1)")):
        d.add_argument(flag, type=float_arg(flag), default=None, help=what)
    d.add_argument("--cuts", type=int_arg("--cuts", 0), default=None,
                   help="random views for the CLIP loss (8)")
    d.add_argument("--resample", type=int_arg("--resample", 1), default=None,
                   help="take the first step this many times, back to t₀ in between (10)")
    d.add_argument("--semantic-until", type=int_arg("--semantic-until", 0), default=None,
                   help="the semantic loss acts while t > this, of 1000 (500)")
    d.add_argument("--start-from", choices=("noised", "inverted"), default=None,
                   help="the picture noised to --strength (as SDEdit) or DDIM-inverted there "
                        "under SOURCE (noised)")
    d.add_argument("--noise-aug", action=argparse.BooleanOptionalAction, default=None,
                   help="losses on the noise-augmented x̂₀ (on)")
    d.add_argument("--regularize-content", action=argparse.BooleanOptionalAction, default=None,
                   help="double the contrastive loss once the CLIP loss is below −0.5 (on)")
    e.add_argument("--strength", type=float_arg("--strength"), default=None,
                   help="SDEdit: with --image, start from the picture noised this much, in "
                        "(0, 1]; Asyrp: how far along --direction (1)")
    e.add_argument("--maps", action="store_true", help="also write maps-N.png per prompt")
    e.add_argument("--map-res", type=int_arg("--map-res"), metavar="ROWS", help=MAP_RES)
    e.add_argument("--over-time", metavar="WORD", help=OVER_TIME + " (over-time.gif)")
    e.add_argument("--out-dir", default="edit",
                   help="output folder, replaced as a whole by each run (edit)")
    add_model_options(e, lean=True)
    add_control_options(e)
    add_edit_options(e)
    e.set_defaults(run=cmd_edit, flags=FLAGS)

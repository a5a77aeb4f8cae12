"""`minip2p edit SOURCE TARGET … --method p2p|masactrl|pnp` and `minip2p attention PROMPT`.

    edit "a cat" "a dog"                                   Prompt-to-Prompt (the default method)
    edit "a cat" "a dog" --image cat.jpg                   … on a real image (inverted first)
    edit "a cat" "a dog" --image cat.jpg --strength 0.6    … from the noised picture (SDEdit)
    edit "a cat" "a sitting cat" --method masactrl         MasaCtrl (--masa-step/-layer/-mask)
    edit "" "a blue square" --method pnp --image sq.png    plug-and-play (--pnp-features/-attention)
    edit "a cat" "a dog" --method pix2pix-zero             Pix2Pix-Zero (--xa-guidance, sentences)
    edit "a cat" "a dog" --method pix2pix-zero --image cat.jpg --regularise
                                                           … its regularised DDIM inversion

Real images with MasaCtrl: `--image` inverts the picture and pins the source row to its DDIM
trajectory at every step (the official `ref_intermediate_latents`); an `--inversion` file keeps
no trajectory, so the source follows the file's ∅_t (null-text) reconstruction instead.

Every method writes 0.png (the source), 1.png … (the targets), strip.png, and with --maps
maps-N.png (and with --over-time WORD over-time.gif: the word's map and x̂₀ at each step). Flags
of one method given to another are refused, as is anything out of range, before the model loads
where possible.
"""
from __future__ import annotations


from ..errors import MinipError
from .attention import MAP_RES, OVER_TIME, over_time_pixels, save_over_time, with_x0
from .invert import add_edit_options, input_pil, inversion_for, read_input, regulariser
from .common import (add_model_options, check_out_dir, ddim_only, float_arg,
                     int_arg, load, preflight, save_images)


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


EDIT_METHODS = ("p2p", "masactrl", "pnp", "pix2pix-zero")
P2P_FLAGS = {"mode": "--mode", "cross_replace": "--cross-replace", "self_replace": "--self-replace",
             "blend": "--blend", "blend_threshold": "--blend-threshold", "reweight": "--reweight"}
MASA_FLAGS = {"masa_step": "--masa-step", "masa_layer": "--masa-layer", "masa_mask": "--masa-mask"}
PNP_FLAGS = {"pnp_features": "--pnp-features", "pnp_attention": "--pnp-attention",
             "negative_prompt": "--negative-prompt"}
P2PZ_FLAGS = {"source_sentences": "--source-sentences", "target_sentences": "--target-sentences",
              "xa_guidance": "--xa-guidance"}
DEFAULTS = dict(xa_guidance=0.1, mode="auto", cross_replace="0.8", self_replace="0.4", blend_threshold=0.3,
                pnp_features=0.8, pnp_attention=0.5)


def check_method_flags(args):
    """`--method` (legacy: an inversion method name) and no flag of another method; fill defaults."""
    from ..real.invert import METHODS
    if args.method in METHODS:                     # `edit --method null-text` (before --method p2p)
        if args.inversion_method not in (None, args.method):
            raise MinipError(f"--method {args.method} and --inversion-method "
                             f"{args.inversion_method} disagree; give --inversion-method only")
        args.method, args.inversion_method = "p2p", args.method
    args.method = args.method or "p2p"
    if args.method == "pix2pix-zero" and args.inversion_method is None:
        args.inversion_method = "ddim"                    # the paper inverts with DDIM
    args.inversion_method = args.inversion_method or "null-text"
    own = {"p2p": P2P_FLAGS, "masactrl": MASA_FLAGS, "pnp": PNP_FLAGS,
           "pix2pix-zero": P2PZ_FLAGS}[args.method]
    for flags in (P2P_FLAGS, MASA_FLAGS, PNP_FLAGS, P2PZ_FLAGS):
        for key, flag in flags.items():
            if flags is not own and getattr(args, key) is not None:
                raise MinipError(f"{flag} belongs to another method, not --method {args.method}; "
                                 "leave it out or change --method")
    for key, value in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.masa_step is None:                       # the paper's S = 4 (the last step if fewer)
        args.masa_step = min(4, args.steps - 1)
    if args.method == "pnp" and args.negative_prompt is None:
        from ..methods.pnp import NEGATIVE_PROMPT
        args.negative_prompt = NEGATIVE_PROMPT
    if args.method == "pnp" and not args.image:
        raise MinipError("--method pnp edits a real image: add --image PHOTO (SOURCE may be \"\")"
                         + (" (an inversion file keeps no trajectory)" if args.inversion else ""))
    if args.method == "pnp" and args.strength is not None:
        raise MinipError("--strength (SDEdit) does not combine with --method pnp; leave it out")
    if args.strength is not None and not args.image:
        raise MinipError("--strength sets how far SDEdit noises --image; add --image PHOTO")
    if args.method == "pix2pix-zero":
        if args.strength is not None:
            raise MinipError("--strength (SDEdit) does not combine with --method pix2pix-zero")
        if (args.source_sentences is None) != (args.target_sentences is None):
            raise MinipError("give --source-sentences and --target-sentences together (or "
                             "neither: built-in sentences around the words that differ)")
        if args.maps:
            raise MinipError("--maps is not available with --method pix2pix-zero")
    if args.method == "masactrl" and not 0 <= args.masa_step < args.steps:
        raise MinipError(f"--masa-step must be in [0, {args.steps}) (a step of the {args.steps} "
                         f"denoising steps), got {args.masa_step}")
    for key, flag in (("pnp_features", "--pnp-features"), ("pnp_attention", "--pnp-attention")):
        v = getattr(args, key)
        if args.method == "pnp" and not 0.0 <= v <= 1.0:
            raise MinipError(f"{flag} is a fraction of the steps in [0, 1], got {v:g}")


def method_control(args, model, prompts, steps, step_pixels=None):
    """(controller, attention store or None) of the chosen method for `prompts` over `steps`;
    `step_pixels`: the store also keeps each step's cross maps up to that size (--over-time)."""
    from ..control import AttentionStore, Compose
    from ..methods import p2p
    from ..methods.align import parse_window
    from ..pipeline import check_size
    if args.method == "masactrl":
        from ..methods import masactrl
        layers = len(model.unet.transformer_blocks())
        height, width = check_size(model, args.height, args.width)
        ctrl = masactrl.build(model.tokenizer, prompts, steps, args.masa_step, args.masa_layer,
                              layers, tuple(args.masa_mask) if args.masa_mask else None,
                              masactrl.mask_pixels_for(height, width, model.vae.cfg.downscale))
        store = AttentionStore(len(prompts), step_pixels=step_pixels) if args.maps else None
        return Compose(ctrl, store), store
    cross, self_ = parse_window(args.cross_replace), parse_window(args.self_replace)
    if isinstance(self_, dict):
        raise MinipError("--self-replace takes a number (0.4) or a start,end pair (0.1,0.4)")
    return p2p.build(model.tokenizer, prompts, steps, args.mode, cross, self_,
                     parse_reweight(args.reweight), args.blend, args.blend_threshold,
                     store=args.maps, step_pixels=step_pixels)


def cmd_edit(args):
    import torch

    from ..real import images, invert
    from .. import views
    from ..control import AttentionStore, Compose, PinSource
    from ..methods import sdedit
    from ..pipeline import generate, to_pil

    check_method_flags(args)
    if args.strength is not None:
        sdedit.check_strength(args.strength)
    if args.map_res is not None and not args.maps:
        raise MinipError("--map-res chooses the maps of --maps; add --maps")
    prompts = [p for p in [args.source] + args.targets if p is not None]
    sentences = (None, None)
    if args.method == "pix2pix-zero" and args.source_sentences is not None:
        from ..methods.pix2pix_zero import read_sentences
        sentences = (read_sentences(args.source_sentences, "--source-sentences"),
                     read_sentences(args.target_sentences, "--target-sentences"))
    if args.over_time is not None:
        if not args.maps:
            raise MinipError("--over-time animates a word's map of --maps; add --maps")
        if args.image or args.inversion:
            raise MinipError("--over-time follows prompts generated from noise; leave out "
                             "--image/--inversion")
        views.prompts_with(prompts, args.over_time)
        ddim_only(args, "--over-time (x̂₀ of each DDIM step)")
        if args.method not in ("p2p", "masactrl") or args.strength is not None:
            raise MinipError(f"--over-time follows p2p and masactrl edits generated from noise, "
                             f"not --method {args.method}" +
                             (" with --strength" if args.strength is not None else ""))
    noised = args.strength is not None                   # SDEdit: the picture is noised, not inverted
    inverted = not noised and args.method != "pnp"      # pnp inverts with SOURCE, "" allowed
    regulariser(args, "an --inversion file is already inverted" if args.inversion else
                "SDEdit (--strength) noises the picture" if noised else
                "--method pnp keeps the plain DDIM trajectory" if args.method == "pnp" else
                "nothing is inverted without --image" if not args.image else None)
    real = read_input(args.image, args.inversion, args.crop,  # before the model loads
                                 prompts[0] if prompts else None, needs_prompt=inverted)
    if real is not None or args.method in ("pnp", "pix2pix-zero"):
        ddim_only(args, "a real image (inversion, SDEdit, plug-and-play) or Pix2Pix-Zero")
    if (real is None or noised or args.method != "p2p") and len(prompts) < 2:
        raise MinipError("edit needs a SOURCE prompt and at least one TARGET prompt "
                         "(or --image/--inversion with p2p: with no target, the reconstruction)")
    out = check_out_dir(args.out_dir)
    model = load(args)
    from_file = isinstance(real, invert.Inversion)
    height, width = preflight(
        args, model, images=1 if args.method == "pnp" else len(prompts) + from_file,
        size=(real.height, real.width) if from_file else None,
        rows_per_image=3 if args.method == "pnp" else 2,
        controlled=(32 ** 2 if args.maps else 16 ** 2 if args.method == "p2p" else 1),
        grad=inverted and real is not None and not from_file
        and args.inversion_method == "null-text")
    if args.method == "masactrl":
        from ..methods import masactrl
        if args.masa_layer is None:
            args.masa_layer = masactrl.default_layer(model.unet)
        masactrl.check(args.steps, args.masa_step, args.masa_layer,
                       len(model.unet.transformer_blocks()))
    kw = dict(progress=not args.quiet, free_text_encoder=args.free_text_encoder)
    shown = []
    if args.method == "pix2pix-zero":
        from ..methods import pix2pix_zero as pz
        from ..pipeline import decode, initial_noise
        if isinstance(real, invert.Inversion):
            prompts = [real.prompt] + prompts
        if len(prompts) != 2:
            raise MinipError("--method pix2pix-zero edits SOURCE into one TARGET")
        src_s, tgt_s = sentences
        if src_s is None:
            src_s, tgt_s = pz.sentences(prompts[0], prompts[1])
        delta = pz.direction(model, src_s, tgt_s)
        store = None
        if real is None:
            z = initial_noise(model, args.seed, height, width)
        else:
            inv = inversion_for(args, model, real, prompts[0])
            z = inv.z_T
            shown = [input_pil(inv)] if inv.image is not None else []
        z_src, z_edit = pz.edit(model, prompts[0], delta, z, args.steps, args.guidance,
                                args.xa_guidance, progress=not args.quiet)
        result = to_pil(decode(model, torch.cat([z_src, z_edit])))
    elif args.method == "pnp":
        from ..methods import pnp
        x = images.to_tensor(images.fit(real, height, width))
        store = None
        result = [pnp.edit(model, x, target, prompts[0], args.negative_prompt, args.steps,
                           args.guidance, args.pnp_features, args.pnp_attention,
                           progress=not args.quiet)
                  for target in prompts[1:]]
        result = to_pil(torch.cat([result[0][:1]] + [r[1:] for r in result]))  # source, targets
        shown = [real.resize((width, height))]
    elif noised:                                         # SDEdit, under P2P or MasaCtrl
        steps_run = args.steps - sdedit.start_index(args.steps, args.strength)
        control, store = method_control(args, model, prompts, steps_run)
        result = to_pil(sdedit.generate(model, images.fit(real, height, width), prompts,
                                        args.strength, args.seed, args.steps, args.guidance,
                                        height, width, control, **kw))
        shown = [images.fit(real, height, width)]
    elif real is None:
        step_pixels = over_time_pixels(args, model, height, width)
        control, store = method_control(args, model, prompts, args.steps, step_pixels)
        z_T, x0 = with_x0(args, model, height, width)
        result = to_pil(generate(model, prompts, args.seed, args.steps, args.guidance, height,
                                 width, control=control, latents=z_T,
                                 callback=x0, sampler=args.sampler, **kw))
    else:                        # real image: the inversion's prompt is the source
        if isinstance(real, invert.Inversion):
            prompts = [real.prompt] + prompts
        inv = inversion_for(args, model, real, prompts[0] if prompts else None)
        if len(prompts) > 1:
            control, store = method_control(args, model, prompts, args.steps)
            if args.method == "masactrl" and inv.latents is not None:
                control = Compose(PinSource(inv.latents), control)   # source on its trajectory
        else:                     # no target: the reconstruction
            control = store = AttentionStore(1) if args.maps else None
        result = to_pil(invert.run(model, inv, prompts, control, args.guidance, **kw))
        shown = [input_pil(inv)] if inv.image is not None else []
    files = {f"{i}.png": im for i, im in enumerate(result)}
    files["strip.png"] = views.strip(shown + result, ["input"] * len(shown) + prompts)
    if args.maps and store is not None:
        pixels = views.pick_pixels(store, "cross", args.map_res, result[0])
        for i, (prompt, im) in enumerate(zip(prompts, result)):
            files[f"maps-{i}.png"] = views.cross_attention_image(store, model.tokenizer, prompt, i,
                                                                 im, pixels)
    elif args.maps:
        raise MinipError("--maps is not available with --method pnp")
    save_images(files, out)                              # all or none
    written = [str(out / n) for n in files]
    if args.over_time is not None:
        written.append(save_over_time(model, store, prompts, args.over_time, x0, args.map_res,
                                      result[0], out / "over-time.gif"))
    print(f"wrote {', '.join(written)}")


def add_commands(sub):
    from ..real.invert import METHODS
    e = sub.add_parser("edit", help="edit SOURCE into each TARGET (Prompt-to-Prompt, MasaCtrl, "
                                    "plug-and-play; SDEdit with --image --strength)")
    e.add_argument("source", nargs="?", help="the source prompt (with --inversion: a target)")
    e.add_argument("targets", nargs="*", metavar="TARGET")
    e.add_argument("--method", choices=EDIT_METHODS + METHODS, default=None,
                   help="p2p: Prompt-to-Prompt (default); masactrl: mutual self-attention; pnp: "
                        "plug-and-play (needs --image); pix2pix-zero: edit direction + "
                        "cross-attention guidance. (ddim, null-text, negative-prompt: the "
                        "inversion method, as before; same as --inversion-method)")
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
                   help="the target's unconditional prompt (the official one)")
    z = e.add_argument_group("Pix2Pix-Zero (--method pix2pix-zero)")
    z.add_argument("--source-sentences", metavar="FILE", default=None,
                   help="sentences about the source concept, one a line (default: templates "
                        "around the words that differ)")
    z.add_argument("--target-sentences", metavar="FILE", default=None,
                   help="sentences about the target concept, one a line")
    z.add_argument("--xa-guidance", type=float_arg("--xa-guidance"), default=None,
                   help="cross-attention guidance step λ (0.1)")
    e.add_argument("--strength", type=float_arg("--strength"), default=None,
                   help="SDEdit: with --image, start from the picture noised this much, in (0, 1]")
    e.add_argument("--maps", action="store_true", help="also write maps-N.png per prompt")
    e.add_argument("--map-res", type=int_arg("--map-res"), metavar="ROWS", help=MAP_RES)
    e.add_argument("--over-time", metavar="WORD", help=OVER_TIME + " (over-time.gif)")
    e.add_argument("--out-dir", default="edit", help="output folder (edit)")
    add_model_options(e, lean=True)
    add_edit_options(e)
    e.set_defaults(run=cmd_edit)

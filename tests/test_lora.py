"""LoRA files merged at load equal diffusers' `load_lora_weights` + `fuse_lora` on random models
(both layouts, UNet + text encoder, linear + 1×1 + 3×3 conv layers); removing a LoRA gives the
weights back; bad files and bad `--lora` values are one-line errors."""
import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from helpers import cli, generate_vs_diffusers, maxdiff, one_line
from minip2p.errors import MinipError
from minip2p.load import load_model
from minip2p.load.lora import add_lora, clear_loras, layers, remove_lora

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a photo of a red circle", "A Squirrel, eating a BURGER!"]


def factors(w, r, g):
    """Random (down, up) for weight `w`: conv LoRAs as kohya's LoCon writes them (k×k down,
    1×1 up)."""
    down = torch.randn(r, *w.shape[1:], generator=g) * 0.2
    up = torch.randn(w.shape[0], r, *([1, 1] if w.dim() == 4 else []), generator=g) * 0.2
    return down, up


def random_lora(model, path, layout="kohya", seed=0, alpha=1.5, every=1, metadata=None,
                only=("unet", "text_encoder")):
    """A LoRA over every `every`-th linear/conv layer of `model`'s UNet and text encoder (`only`
    those parts), ranks 2-4. `alpha`: one α for all (a number), α per layer (a function of its
    index) or none."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    targets = [(k, m) for k, m in sorted(layers(model).items()) if k[0] in only]
    for i, ((part, name), m) in enumerate(targets[::every]):
        r = 2 + i % 3
        down, up = factors(m.weight, r, g)
        if layout == "kohya":
            stem = ("lora_unet_" if part == "unet" else "lora_te_") + name.replace(".", "_")
            keys = (f"{stem}.lora_down.weight", f"{stem}.lora_up.weight", f"{stem}.alpha")
        elif layout == "peft":
            keys = (f"{part}.{name}.lora_A.weight", f"{part}.{name}.lora_B.weight",
                    f"{part}.{name}.alpha")
        else:                                             # older diffusers: attention processors
            head, _, last = name.rpartition(".")
            if name.endswith("to_out.0"):
                head, last = name[:-len(".to_out.0")], "to_out"
            proj = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}
            if part == "unet" and last in ("to_q", "to_k", "to_v", "to_out"):
                stem = f"unet.{head}.processor.{last}_lora"
            elif part == "text_encoder" and last in proj:
                stem = f"text_encoder.{head}.{proj[last]}_lora"
            else:
                stem = f"{part}.{name}." + ("lora" if part == "unet" else "lora_linear_layer")
            keys = (f"{stem}.down.weight", f"{stem}.up.weight", None)
        state[keys[0]], state[keys[1]] = down, up
        a = alpha(i) if callable(alpha) else alpha
        if a is not None and keys[2]:
            state[keys[2]] = torch.tensor(float(a))
    meta = {"lora_adapter_metadata": json.dumps(metadata)} if metadata else None
    save_file(state, str(path), metadata=meta)
    return path


def fused_reference(pipe, path, scale):
    ref = copy.deepcopy(pipe)
    ref.load_lora_weights(str(path))
    ref.fuse_lora(lora_scale=scale)
    ref.unload_lora_weights()                       # the fused weights stay, the adapters go
    return ref


def weights_diff(model, pipe) -> float:
    """max|Δ| over every UNet and text-encoder tensor (transformers 5 names the text encoder's
    tensors without our leading 'text_model.')."""
    worst = 0.0
    for part in ("unet", "text_encoder"):
        ref = getattr(pipe, part).state_dict()
        for k, v in getattr(model, part).state_dict().items():
            k = k if k in ref else k.removeprefix("text_model.")
            worst = max(worst, maxdiff(v, ref[k]))
    return worst


def snapshot(model):
    return {(p, k): v.clone() for p in ("unet", "text_encoder")
            for k, v in getattr(model, p).state_dict().items()}


@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_generate_equals_diffusers_fuse_lora(sd_ckpt, tmp_path, layout):
    """SD 1.x's block structure (1×1 conv proj_in/proj_out): every linear and conv layer of the
    UNet (3×3 resnet convs, 1×1 shortcuts, attention, feed-forward, time embedding) and of the
    text encoder gets a LoRA; the fast path is installed."""
    pipe, folder = sd_ckpt
    model = load_model(folder)
    lora = random_lora(model, tmp_path / f"{layout}.safetensors", layout,
                       alpha=1.5 if layout == "kohya" else None)
    ref = fused_reference(pipe, lora, 0.7)
    model = load_model(folder, loras=[(lora, 0.7)])
    dw = weights_diff(model, ref)
    d, d_img = generate_vs_diffusers(ref, model, PROMPTS, 1234, 8, 64, 64)
    print(f"LoRA {layout}: weights max|Δ| = {dw:.1e}, latents {d:.1e}, images {d_img:.1e}")
    # latents: the fast path's packed convolutions sum in oneDNN's order, diffusers' in PyTorch's
    assert dw <= 1e-6 and d <= 2e-4 and d_img <= 2 / 255


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["kohya", "peft-metadata", "old"])
def test_weights_equal_diffusers_fuse_lora_linear_projections(small_ckpt, tmp_path, layout):
    """The 'small' geometry (linear proj_in/out, 2 transformer blocks); the PEFT file carries
    diffusers' lora_adapter_metadata (α and a per-layer α pattern); the older diffusers names."""
    pipe, folder = small_ckpt
    model = load_model(folder)
    metadata = None
    if layout == "peft-metadata":
        # the layers diffusers' train_text_to_image_lora targets; α 6, but 2 on to_k, 5 on k_proj
        targets = {"unet": ["to_q", "to_k", "to_v", "to_out.0"],
                   "text_encoder": ["q_proj", "k_proj", "v_proj", "out_proj"]}
        metadata = {}
        for part, pattern, rs in (("unet", {"to_k": 2.0}, False),
                                  ("text_encoder", {"k_proj": 5.0}, True)):   # rsLoRA: α/√r
            config = dict(r=3, lora_alpha=6.0, alpha_pattern=pattern, use_rslora=rs,
                          target_modules=targets[part])
            metadata.update({f"{part}.{k}": v for k, v in config.items()})
    lora = random_lora(model, tmp_path / "l.safetensors", layout.split("-")[0], seed=1,
                       alpha=None if metadata else 2.5, metadata=metadata)
    if metadata:                                       # r = 3 everywhere, as the config says
        state = {}
        g = torch.Generator().manual_seed(1)
        for part, name in sorted(layers(model)):
            if not name.endswith(tuple("." + t for t in targets[part])):
                continue
            w = layers(model)[part, name].weight
            state[f"{part}.{name}.lora_A.weight"], state[f"{part}.{name}.lora_B.weight"] = \
                factors(w, 3, g)
        save_file(state, str(lora), metadata={"lora_adapter_metadata": json.dumps(metadata)})
    ref = fused_reference(pipe, lora, 1.3)
    dw = weights_diff(load_model(folder, loras=[(lora, 1.3)]), ref)
    print(f"LoRA {layout} (linear projections): weights max|Δ| = {dw:.1e}")
    assert dw <= 1e-6


def test_each_layer_takes_its_own_alpha(small_ckpt, tmp_path):
    """W' = W + s·(α/r)·B A with each layer's α and r (kohya's rule), checked by hand on a
    linear, a 3×3 conv and a 1×1 conv layer. (diffusers 0.42 gives some layers of a kohya file
    whose α differ the file's most common α instead: tools/README.md, LoRA.)"""
    _, folder = small_ckpt
    model = load_model(folder)
    before = snapshot(model)
    path = random_lora(model, tmp_path / "a.safetensors", alpha=lambda i: 1 + i % 4)
    add_lora(model, path, 0.6)
    g = torch.Generator().manual_seed(0)
    for i, ((part, name), m) in enumerate(sorted(layers(model).items())):
        r = 2 + i % 3
        down, up = factors(m.weight, r, g)
        want = before[part, name + ".weight"] + 0.6 * (1 + i % 4) / r * (
            up.flatten(1) @ down.flatten(1)).reshape(m.weight.shape)
        assert maxdiff(m.weight, want) <= 1e-6, name
    kinds = {tuple(m.weight.shape[2:]) for m in layers(model).values()}
    assert kinds == {(), (1, 1), (3, 3)} or kinds == {(), (3, 3)}


def test_remove_restores_the_weights_and_switches(small_ckpt, tmp_path):
    _, folder = small_ckpt
    model = load_model(folder)
    before = snapshot(model)
    a = random_lora(model, tmp_path / "a.safetensors", "kohya", seed=1)
    b = random_lora(model, tmp_path / "b.safetensors", "peft", seed=2, every=2)
    add_lora(model, a, 0.8)
    add_lora(model, b, -1.2)
    assert [lora.path for lora in model.loras] == [str(a), str(b)]
    remove_lora(model, a)                                  # out of order
    only_b = snapshot(load_model(folder, loras=[(b, -1.2)]))
    assert max(maxdiff(v, only_b[k]) for k, v in snapshot(model).items()) <= 1e-6
    clear_loras(model)
    assert model.loras == []
    d = max(maxdiff(v, before[k]) for k, v in snapshot(model).items())
    print(f"LoRA merge → remove: weights max|Δ| = {d:.1e}")
    assert d <= 1e-6
    with pytest.raises(MinipError, match="is not merged into this model"):
        remove_lora(model, a)


def test_half_precision_merges_in_fp32_and_rounds_once(small_ckpt, tmp_path):
    """bf16 weights: W' = bf16(W + ΔW) with ΔW formed in fp32; removing it leaves W within a
    rounding of its original (not equal: the documented half-precision caveat)."""
    _, folder = small_ckpt
    path = random_lora(load_model(folder), tmp_path / "a.safetensors")
    exact = snapshot(load_model(folder, dtype="fp32", loras=[(path, 0.9)]))
    model = load_model(folder, dtype="bf16")
    before = snapshot(model)
    add_lora(model, path, 0.9)
    ulp = 2 ** -7                                                     # bf16: 8 significant bits
    for k, v in snapshot(model).items():
        assert v.dtype == torch.bfloat16
        w = before[k].float()                   # two roundings: of W, then of W + ΔW
        assert (v.float() - exact[k]).abs().le(ulp * (w.abs() + exact[k].abs())).all(), k
    merged = snapshot(model)
    clear_loras(model)
    for k, v in snapshot(model).items():         # two roundings: of W + ΔW, then of W' − ΔW
        bound = ulp * (merged[k].float().abs() + before[k].float().abs())
        assert (v.float() - before[k].float()).abs().le(bound).all(), k


def test_merging_under_the_installed_fast_path(small_ckpt, tmp_path):
    """The fast path's modules share the weights: a LoRA merged after it was installed (and its
    kernels tuned) gives the reference path's latents."""
    from minip2p.fast import switched
    from minip2p.pipeline import generate
    _, folder = small_ckpt
    model = load_model(folder)
    run = dict(seed=3, steps=3, height=32, width=32, progress=False, return_latents=True)
    plain = generate(model, PROMPTS[:1], **run)
    add_lora(model, random_lora(model, tmp_path / "a.safetensors"), 1.0)
    fast = generate(model, PROMPTS[:1], **run)
    with switched(model, False):
        explicit = generate(model, PROMPTS[:1], **run)
    assert maxdiff(fast, explicit) <= 1e-4 and maxdiff(fast, plain) > 1e-2


def test_bad_files_are_one_line_errors(small_ckpt, sd_ckpt, tmp_path):
    _, folder = small_ckpt
    model = load_model(folder)
    before = snapshot(model)
    cases = {}
    good = random_lora(model, tmp_path / "good.safetensors")
    state = dict(__import__("safetensors.torch").torch.load_file(str(good)))
    cases["nowhere"] = ({**state, "lora_unet_nowhere_to_q.lora_down.weight": torch.zeros(2, 4),
                         "lora_unet_nowhere_to_q.lora_up.weight": torch.zeros(4, 2)},
                        "tensor 'lora_unet_nowhere_to_q.lora_down.weight' matches no layer")
    cases["flux"] = ({"transformer.x.lora_A.weight": torch.zeros(2, 4)},
                     "tensor 'transformer.x.lora_A.weight' matches no layer")
    up = "lora_unet_conv_in.lora_up.weight"
    cases["no-up"] = ({k: v for k, v in state.items() if k != up},
                      "'lora_unet_conv_in.lora_down.weight' has no up factor")
    cases["dora"] = ({**state, "lora_unet_conv_in.dora_scale": torch.ones(1)}, "DoRA")
    down = "lora_unet_conv_in.lora_down.weight"
    cases["nan"] = ({**state, down: state[down] * float("nan")}, "are not all finite")
    cases["alpha"] = ({**state, "lora_unet_conv_in.alpha": torch.ones(2)}, "α is one number")
    cases["sdxl"] = ({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight":
                      torch.zeros(2, 4)}, "SDXL's second text encoder")
    for name, (content, needle) in cases.items():
        save_file(content, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(MinipError, match=needle.replace("(", r"\(")):
            add_lora(model, tmp_path / f"{name}.safetensors")
    other = random_lora(load_model(sd_ckpt[1]), tmp_path / "sd.safetensors",  # another base
                        only=["text_encoder"])
    with pytest.raises(MinipError, match=r"does not fit text_encoder layer .* another base"):
        add_lora(model, other)
    (tmp_path / "x.pt").write_bytes(b"pickle")
    with pytest.raises(MinipError, match="pickled LoRA files are refused"):
        add_lora(model, tmp_path / "x.pt")
    with pytest.raises(MinipError, match="not found"):
        add_lora(model, tmp_path / "missing.safetensors")
    with pytest.raises(MinipError, match="not a finite number"):
        add_lora(model, good, float("nan"))
    assert model.loras == [] and all(torch.equal(v, before[k]) for k, v in snapshot(model).items())
    add_lora(model, good)
    with pytest.raises(MinipError, match="merged already"):
        add_lora(model, good, 0.5)
    model.text_encoder = None                    # freed: its LoRA can no longer be added
    with pytest.raises(MinipError, match="the text encoder was freed"):
        add_lora(model, random_lora(load_model(folder), tmp_path / "te.safetensors", seed=4))
    clear_loras(model)


def test_cli_lora(toy, sd_model, tmp_path, capsys):
    """`--lora FILE[:SCALE]` (repeatable) on a sampling command; bad ones exit 2, write nothing."""
    lora = random_lora(toy, tmp_path / "toy.safetensors", every=3)
    run = ["generate", "a red circle", "--steps", "2", "--quiet", "--no-autotune"]
    plain, with_lora, twice = (tmp_path / f"{n}.png" for n in ("plain", "lora", "twice"))
    assert cli(capsys, *run, "--out", plain)[0] == 0
    assert cli(capsys, *run, "--out", with_lora, "--lora", f"{lora}:0.8")[0] == 0
    assert cli(capsys, *run, "--out", twice, "--lora", f"{lora}:0.4",
               "--lora", tmp_path / "toy.safetensors")[0] == 2          # the same file twice
    assert plain.read_bytes() != with_lora.read_bytes()
    other = random_lora(load_model(None, fast=False), tmp_path / "bad.safetensors")
    state = __import__("safetensors.torch").torch.load_file(str(other))
    save_file({**state, "lora_unet_up_blocks_9_x.lora_down.weight": torch.zeros(1, 1)},
              str(tmp_path / "stray.safetensors"))
    out = tmp_path / "never.png"
    for arg, needle in [(tmp_path / "missing.safetensors", "not found"),
                        (f"{lora}:nan", "--lora"), (f"{lora}:big", "--lora"),
                        (tmp_path / "stray.safetensors", "matches no layer"),
                        (random_lora(sd_model, tmp_path / "sd.safetensors", only=["text_encoder"]),
                         "a LoRA for another base model")]:
        one_line(capsys, run + ["--out", out, "--lora", arg], needle)
        assert not out.exists()
    one_line(capsys, ["explore", "--port", "0", "--lora", tmp_path / "missing.safetensors"],
             "not found")                             # the explorer's model options too

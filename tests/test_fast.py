"""The fast path (fused SDPA wherever no controller reads the probabilities, oneDNN linear layers,
channels-last decoding), installed on a loaded model by minip2p/fast/, equals the explicit path;
it forms no map at the full-resolution self-attention and runs every transformer linear layer on
oneDNN (guards that are not timings). `uninstall` gives the plain modules back with the same
weights; a model loaded without it never asks the tuner; the reference model never imports it.

Tiny model: latents 8×8, so the attention resolutions are 8² (= "64²" at 512 px), 4², 2², 1².
The reference limits scale with it: store ≤ 4² (= 32² at 512 px), self-replace ≤ 2² (= 16²).
"""
import ast
from pathlib import Path

import pytest
import torch

from minip2p import fast as fastpath
from minip2p.attention import Attention
from minip2p.fast import autotune, kernels as ops
from minip2p.control import Controller
from minip2p.load import load_model
from minip2p.methods import p2p
from minip2p.pipeline import decode, generate

PROMPTS = ["a painting of a squirrel eating a burger", "a painting of a lion eating a burger"]
REFINE = ["a painting of a squirrel eating a burger", "a painting of a squirrel eating a big burger"]
KW = dict(seed=3, steps=6, height=64, width=64, progress=False, return_latents=True)


def run(model, fast: bool, *args, **kw):
    """generate() with the fast path installed (fast) or not, the model left as it was."""
    with fastpath.switched(model, fast):
        return generate(model, *args, **kw)


class Recorder(Controller):
    """Wraps a controller and notes every site whose probabilities were formed."""

    def __init__(self, inner):
        self.inner, self.formed = inner, []

    def wants(self, site):
        return self.inner.wants(site)

    def probs(self, M, site):
        self.formed.append(site)
        return self.inner.probs(M, site)

    def after_step(self, z, step):
        return self.inner.after_step(z, step)


def controllers(tok):
    small = dict(self_max_pixels=4)
    yield "store", PROMPTS[:1], p2p.AttentionStore(1, max_pixels=16)
    yield "replace", PROMPTS, p2p.build(tok, PROMPTS, 6, "replace", **small)[0]
    yield "refine", REFINE, p2p.build(tok, REFINE, 6, "refine", **small)[0]
    yield "reweight", PROMPTS, p2p.build(tok, PROMPTS, 6, reweight={"burger": -1.5}, **small)[0]
    yield "blend", PROMPTS, p2p.build(tok, PROMPTS, 6, blend=["squirrel", "lion"], **small)[0]
    # no store: the edit alone at every cross site, where the fast path never forms M* (p2p.py)
    nostore = dict(small, store=False)
    yield "replace-fused", PROMPTS, p2p.build(tok, PROMPTS, 6, "replace", **nostore)[0]
    yield "refine-fused", REFINE, p2p.build(tok, REFINE, 6, "refine", **nostore)[0]
    yield "reweight-fused", PROMPTS, p2p.build(tok, PROMPTS, 6, reweight={"burger": -1.5},
                                               **nostore)[0]
    yield "refine-reweight-fused", REFINE, p2p.build(tok, REFINE, 6, reweight={"big": 2.0},
                                                     **nostore)[0]
    yield "reweight-alone-fused", PROMPTS[:1] * 2, p2p.build(
        tok, PROMPTS[:1] * 2, 6, reweight={"squirrel": 3.0}, **nostore)[0]
    yield "replace-window-fused", PROMPTS, p2p.build(tok, PROMPTS, 6, "replace", cross_replace=0.5,
                                                     **nostore)[0]


def test_fast_equals_explicit_without_controller(sd_model):
    assert sd_model.fast                                     # load_model installs it by default
    a = run(sd_model, True, PROMPTS, **KW)
    b = run(sd_model, False, PROMPTS, **KW)
    assert (a - b).abs().max().item() <= 1e-4


FUSED = ["replace-fused", "refine-fused", "reweight-fused", "refine-reweight-fused",
         "reweight-alone-fused", "replace-window-fused"]


@pytest.mark.parametrize("name", ["store", "replace", "refine", "reweight", "blend"] + FUSED)
def test_fast_equals_explicit_for_every_controller(sd_model, name):
    runs = {}
    for fast in (True, False):
        label, prompts, control = next(c for c in controllers(sd_model.tokenizer) if c[0] == name)
        runs[fast] = run(sd_model, fast, prompts, control=control, **KW)
    d = (runs[True] - runs[False]).abs().max().item()
    print(f"{name}: fast vs explicit max|Δ| = {d:.2e}")
    assert d <= 1e-4


def test_a_lone_edit_forms_no_cross_map_on_the_fast_path_and_shares_them_with_a_store(sd_model):
    """Alone, the edit's cross sites go through `Edit.attend` (two fused attentions, no M*);
    beside a store (which reads the maps) the shortcut steps aside and the maps are formed."""
    tok = sd_model.tokenizer
    alone = Recorder(p2p.build(tok, PROMPTS, 6, "replace", store=False)[0])
    alone.attend = alone.inner.attend
    run(sd_model, True, PROMPTS, control=alone, **KW)
    assert alone.formed and not [s for s in alone.formed if s.kind == "cross"]
    shared, st = p2p.build(tok, PROMPTS, 6, "replace", store=True)
    run(sd_model, True, PROMPTS, control=shared, **KW)
    stored_cross = {key for key in st.sums if key[4] == "cross"}          # key: …, kind, pixels
    assert st.steps_seen == set(range(6)) and len(stored_cross) == 16     # every cross site


def test_fast_path_forms_no_full_resolution_self_attention_map(sd_model):
    tok = sd_model.tokenizer
    control = Recorder(p2p.build(tok, PROMPTS, 6, blend=["squirrel", "lion"], self_max_pixels=4,
                                 store=True)[0])
    # the store inside build keeps ≤ 32² at 512 px; give it the tiny model's equivalent
    next(c for c in control.inner.controllers if isinstance(c, p2p.AttentionStore)).max_pixels = 16
    run(sd_model, True, PROMPTS, control=control, **KW)
    full = 8 * 8
    assert not [s for s in control.formed if s.kind == "self" and s.pixels == full]
    per_step = {}
    for s in control.formed:
        per_step.setdefault(s.step, []).append(s)
    # SD 1.x structure, 16 transformers: inside the edit's cross window every cross map is
    # formed (P2P edits them all, the store reads them); after it only the store's (≤ 4², 11);
    # of the 16 self maps, the 5 at 8² (down0 ×2, up3 ×3, = 64² at 512 px) never are.
    edit = control.inner.controllers[0]
    assert sorted(per_step) == list(range(6))
    for step, sites in per_step.items():
        cross = [s for s in sites if s.kind == "cross"]
        selfs = [s for s in sites if s.kind == "self"]
        assert len(cross) == (16 if edit.tau_cross[step].any() else 11)
        assert all(s.pixels <= 16 for s in selfs) and len(selfs) == 16 - 5   # 5 sites at 8²


def test_fast_decode_equals_the_default_layout(sd_model):
    """The fast path decodes in channels-last layout; the images agree within float rounding."""
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    with fastpath.switched(sd_model, True):
        fast = decode(sd_model, z)
    with fastpath.switched(sd_model, False):
        plain = decode(sd_model, z)
    assert fast.shape == plain.shape == (2, 3, 64, 64) and fast.is_contiguous()
    assert (fast - plain).abs().max().item() <= 1e-5
    images = [run(sd_model, f, ["a cat"], seed=1, steps=2, height=64, width=64, progress=False)
              for f in (True, False)]
    assert (images[0] - images[1]).abs().max().item() <= 1e-4


# ------------------------------------------- oneDNN linear layers (minip2p/fast/kernels.py)

def _layers():
    g = torch.Generator().manual_seed(0)
    lin, conv = torch.nn.Linear(24, 40), torch.nn.Conv2d(24, 40, 1)
    nobias = torch.nn.Linear(24, 40, bias=False)
    for layer in (lin, conv, nobias):
        for p in layer.parameters():
            p.data = torch.randn(p.shape, generator=g)
    return lin, conv, nobias, torch.randn(3, 17, 24, generator=g)


@pytest.fixture
def onednn():
    """Every oneDNN candidate forced, whatever this machine's tuner would pick."""
    old = autotune.set_tuner(autotune.forced(linear="onednn", geglu="onednn", attention="onednn"))
    yield
    autotune.set_tuner(old)


def test_onednn_linear_equals_nn_linear(onednn):
    lin, conv, nobias, x = _layers()
    with torch.no_grad():
        for layer in (lin, nobias):
            assert (ops.linear(layer, x) - layer(x)).abs().max() <= 1e-5
        # a 1×1 conv on a (b, c, h, w) map = the same linear map on its (b, h·w, c) tokens
        img = x.reshape(3, 17, 1, 24).permute(0, 3, 1, 2)                 # (b, c, h=17, w=1)
        ref = conv(img).permute(0, 2, 3, 1).reshape(3, 17, 40)
        assert (ops.linear(conv, x) - ref).abs().max() <= 1e-5
        proj = torch.nn.Linear(24, 2 * 40)
        a, g = proj(x).chunk(2, dim=-1)
        assert (ops.geglu(proj, x) - a * torch.nn.functional.gelu(g)).abs().max() <= 1e-5
        assert ops.geglu(proj, x).shape == (3, 17, 40)


def test_onednn_linear_is_not_used_under_autograd(onednn):
    """oneDNN's op has no backward: with gradients on, the fast path must take F.linear
    (null-text inversion differentiates through the UNet with the fast path installed)."""
    lin, _, _, x = _layers()
    x = x.clone().requires_grad_()
    ops.linear(lin, x).square().sum().backward()
    ref = x.detach().clone().requires_grad_()
    lin(ref).square().sum().backward()
    assert x.grad is not None and (x.grad - ref.grad).abs().max() <= 1e-4


@pytest.mark.skipif(not ops.ONEDNN, reason="this PyTorch build has no oneDNN linear")
def test_fast_unet_call_runs_its_linear_layers_on_onednn(sd_model, onednn):
    """A guard that is not a timing: with oneDNN picked, every linear layer of a fast UNet call
    (q, k, v, out, proj_in/out, GEGLU, FF) goes to oneDNN, and none of the explicit call does."""
    unet = sd_model.unet
    z, c = torch.randn(2, 4, 8, 8), torch.randn(2, 77, unet.cfg.cross_attention_dim)
    counts = {}
    for fast in (True, False):
        with fastpath.switched(sd_model, fast), torch.no_grad(), torch.profiler.profile() as prof:
            unet(z, 10, c)
        names = [e.name for e in prof.events()]
        counts[fast] = (names.count("mkldnn::_linear_pointwise"), names.count("aten::linear"))
    from minip2p.model.unet import BasicTransformerBlock, Transformer2DModel
    blocks = sum(isinstance(m, BasicTransformerBlock) for m in unet.modules())
    spatial = sum(isinstance(m, Transformer2DModel) for m in unet.modules())
    # per transformer block: attn1 q k v out, attn2 q k v out, GEGLU as 2 fused calls, FF out;
    # per spatial transformer: proj_in, proj_out. (Only the tiny time-embedding MLPs stay.)
    assert counts[True][0] == blocks * 11 + spatial * 2
    assert counts[False][0] == 0 and counts[False][1] > 0


@pytest.mark.parametrize("n,m,chunk", [(50, 1100, 1 << 22), (50, 1100, 3000), (7, 1024, 1024)])
def test_sdpa_slices_equal_fused_attention(n, m, chunk, onednn):
    """ops.sdpa's oneDNN query slices (long key sequences) = F.scaled_dot_product_attention,
    including slices that do not divide the queries evenly (chunk // m rows per slice)."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, n, 16, generator=g)
    k, v = torch.randn(2, 3, m, 16, generator=g), torch.randn(2, 3, m, 16, generator=g)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with torch.no_grad():
        out = ops.dnn_attention(q, k, v, chunk=chunk)
        assert (ops.sdpa(q, k, v, min_keys=m) - ref).abs().max() <= 1e-5
    assert out.shape == ref.shape and (out - ref).abs().max() <= 1e-5
    q.requires_grad_()                                     # under autograd: PyTorch's kernel,
    out = ops.sdpa(q, k, v, min_keys=m)                   # so gradients reach q
    assert (out - ref).abs().max() <= 1e-5
    out.sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0


def test_a_bare_store_holds_the_same_maps_on_both_paths(sd_model):
    """The explicit path calls a controller only where it `wants` the site, like the fast path:
    a bare AttentionStore (maps ≤ 32²... here ≤ 4² pixels) stores the same keys and values
    whichever path runs, and no map above its limit."""
    stores = {}
    for fast in (True, False):
        stores[fast] = p2p.AttentionStore(2, max_pixels=16)
        run(sd_model, fast, PROMPTS, control=stores[fast], **KW)
    assert stores[True].sums.keys() == stores[False].sums.keys()
    assert stores[True].sums and all(k[5] <= 16 for k in stores[False].sums)
    for k in stores[True].sums:
        assert (stores[True].sums[k] - stores[False].sums[k]).abs().max() < 1e-5, k


# ------------------------------------------------ install / uninstall (minip2p/fast/__init__.py)

def test_uninstall_gives_the_plain_modules_back_with_the_same_weights(sd_ckpt):
    model = load_model(sd_ckpt[1], fast=False)
    kinds = [(name, type(m)) for name, m in model.unet.named_modules()]
    state = {k: v.data_ptr() for k, v in model.unet.state_dict().items()}
    assert not model.fast and model.unet.fused is None
    fastpath.install(model)
    swapped = [m for m in model.unet.modules() if type(m) in fastpath.PLAIN]
    full = set(fastpath.PLAIN) - {fastpath.FastInt8Linear, fastpath.FastInt8TokenConv}
    assert model.fast and swapped and {type(m) for m in swapped} == full
    attns = [m for m in model.unet.modules() if isinstance(m, Attention)]
    assert model.unet.fused is ops.sdpa and all(m.fused is ops.sdpa for m in attns)
    assert {k: v.data_ptr() for k, v in model.unet.state_dict().items()} == state   # shared
    fastpath.install(model)                                                         # no-op
    fastpath.uninstall(model)
    assert [(name, type(m)) for name, m in model.unet.named_modules()] == kinds
    assert {k: v.data_ptr() for k, v in model.unet.state_dict().items()} == state
    assert not model.fast and model.unet.fused is None and all(m.fused is None for m in attns)


class NeverAsked(autotune.Tuner):
    def pick(self, *args, **kw):
        raise AssertionError("the tuner was asked to pick a kernel")

    def trial(self, *args, **kw):
        raise AssertionError("the tuner was asked for a decode layout")


def test_a_model_loaded_without_the_fast_path_never_asks_the_tuner(sd_ckpt):
    model = load_model(sd_ckpt[1], fast=False)
    assert not any(type(m) in fastpath.PLAIN for m in model.unet.modules())
    old = autotune.set_tuner(NeverAsked())
    try:
        store = p2p.AttentionStore(2, max_pixels=16)
        generate(model, PROMPTS, seed=0, steps=2, height=64, width=64, progress=False,
                 control=store)
        with pytest.raises(AssertionError, match="tuner"):              # the guard is live
            with torch.no_grad(), fastpath.switched(model, True):
                decode(model, torch.zeros(1, 4, 8, 8))
    finally:
        autotune.set_tuner(old)
    assert not model.fast


def test_the_reference_model_never_imports_the_fast_path():
    root = Path(ops.__file__).resolve().parent.parent                    # minip2p/
    for path in [root / "attention.py", *sorted((root / "model").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or "", *(a.name for a in node.names)] \
                if isinstance(node, ast.ImportFrom) else []
            assert not any("fast" in n.split(".") for n in names), path

"""The fast path (fused SDPA wherever no controller reads the probabilities) equals the explicit
path, and it forms no map at the full-resolution self-attention (a guard that is not a timing).

Tiny model: latents 8×8, so the attention resolutions are 8² (= "64²" at 512 px), 4², 2², 1².
The reference limits scale with it: store ≤ 4² (= 32² at 512 px), self-replace ≤ 2² (= 16²).
"""
import pytest
import torch

from minip2p import p2p
from minip2p.pipeline import decode, generate

PROMPTS = ["a painting of a squirrel eating a burger", "a painting of a lion eating a burger"]
REFINE = ["a painting of a squirrel eating a burger", "a painting of a squirrel eating a big burger"]
KW = dict(seed=3, steps=6, height=64, width=64, progress=False, return_latents=True)


class Recorder:
    """Wraps a controller and notes every site whose probabilities were formed."""

    def __init__(self, inner):
        self.inner, self.formed = inner, []

    def wants(self, site):
        return self.inner.wants(site)

    def __call__(self, probs, site):
        self.formed.append(site)
        return self.inner(probs, site)

    def after_step(self, z, step):
        return self.inner.after_step(z, step) if hasattr(self.inner, "after_step") else z


def controllers(tok):
    small = dict(self_max_pixels=4)
    yield "store", PROMPTS[:1], p2p.AttentionStore(1, max_pixels=16)
    yield "replace", PROMPTS, p2p.build(tok, PROMPTS, 6, "replace", **small)[0]
    yield "refine", REFINE, p2p.build(tok, REFINE, 6, "refine", **small)[0]
    yield "reweight", PROMPTS, p2p.build(tok, PROMPTS, 6, reweight={"burger": -1.5}, **small)[0]
    yield "blend", PROMPTS, p2p.build(tok, PROMPTS, 6, blend=["squirrel", "lion"], **small)[0]


def test_fast_equals_explicit_without_controller(sd_model):
    a = generate(sd_model, PROMPTS, fast=True, **KW)
    b = generate(sd_model, PROMPTS, fast=False, **KW)
    assert (a - b).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ["store", "replace", "refine", "reweight", "blend"])
def test_fast_equals_explicit_for_every_controller(sd_model, name):
    runs = {}
    for fast in (True, False):
        label, prompts, control = next(c for c in controllers(sd_model.tokenizer) if c[0] == name)
        runs[fast] = generate(sd_model, prompts, control=control, fast=fast, **KW)
    d = (runs[True] - runs[False]).abs().max().item()
    print(f"{name}: fast vs explicit max|Δ| = {d:.2e}")
    assert d <= 1e-4


def test_fast_path_forms_no_full_resolution_self_attention_map(sd_model):
    tok = sd_model.tokenizer
    control = Recorder(p2p.build(tok, PROMPTS, 6, blend=["squirrel", "lion"], self_max_pixels=4,
                                 store=True)[0])
    # the store inside build keeps ≤ 32² at 512 px; give it the tiny model's equivalent
    next(c for c in control.inner.controllers if isinstance(c, p2p.AttentionStore)).max_pixels = 16
    generate(sd_model, PROMPTS, control=control, fast=True, **KW)
    full = 8 * 8
    assert not [s for s in control.formed if s.kind == "self" and s.pixels == full]
    per_step = {}
    for s in control.formed:
        per_step.setdefault(s.step, []).append(s)
    # SD 1.x structure, 16 transformers: every cross map is formed (P2P edits them all); of the
    # 16 self maps, the 5 at 8² (down0 ×2, up3 ×3, = 64² at 512 px) never are.
    assert sorted(per_step) == list(range(6))
    for step, sites in per_step.items():
        cross = [s for s in sites if s.kind == "cross"]
        selfs = [s for s in sites if s.kind == "self"]
        assert len(cross) == 16
        assert all(s.pixels <= 16 for s in selfs) and len(selfs) == 16 - 5   # 5 sites at 8²


def test_fast_decode_equals_the_default_layout(sd_model):
    """The fast path decodes in channels-last layout; the images agree within float rounding."""
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    fast, plain = decode(sd_model, z, fast=True), decode(sd_model, z, fast=False)
    assert fast.shape == plain.shape == (2, 3, 64, 64) and fast.is_contiguous()
    assert (fast - plain).abs().max().item() <= 1e-5
    images = [generate(sd_model, ["a cat"], seed=1, steps=2, height=64, width=64, progress=False,
                       fast=f) for f in (True, False)]
    assert (images[0] - images[1]).abs().max().item() <= 1e-4

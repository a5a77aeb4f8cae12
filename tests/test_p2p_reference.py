"""Differential test: minip2p's Prompt-to-Prompt equals an independent re-implementation of the
official controllers (tests/oracles/p2p_oracle.py) running on diffusers' UNet.

Both sides load the same random checkpoint with SD 1.x's exact block structure (`sd_ckpt`) and
start from the same seed, prompts and noise, with DDIM (8 steps) and guidance 7.5. The oracle
hooks diffusers' attention processors, counts layers to know where it is, edits the conditional
half of (2B·heads, pixels, tokens) in place and blends latents in `step_callback`; minip2p gets
explicit `Site`s and its own UNet, tokenizer and DDIM (the fast path installed, as by default; at these sizes the
attention store asks for every map, so all of them are formed explicitly anyway). Measured
maxima are printed (pytest -s).

Resolution constants. The official code hard-codes pixel counts for 512 px (latents 64²): store
maps with ≤ 32² pixels, replace self-attention at ≤ 16² pixels, LocalBlend on the 16×16 maps.
Here the latents are 8×8 (64 px) or 8×16 (64×128 px, for LocalBlend: at 8×8 the coarsest maps
are 2×2 and the 3×3 max-pool makes every mask all-true). The same layers are those of the second
and third UNet levels, so both sides get the moved constants of
`p2p_oracle.resolution_constants`: minip2p's `self_max_pixels` and the oracle's three
parameters. minip2p's LocalBlend picks "the coarsest down/up cross-attention resolution" by
itself; that is the oracle's "down_cross[2:4] + up_cross[:3]" of the store limited to (h/2)(w/2).

Tolerances: fp32 on CPU, two different UNet implementations (their ε agree to ~1e-5, see
test_parity), and 8 guided steps amplify that: latents (|z| up to ~40) agree to ~4e-5 and
images to ~2e-6. We assert LATENT_TOL / IMAGE_TOL below, 5-10× above what was measured.
"""
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from oracles import p2p_oracle as O
from minip2p.methods import align, p2p
from minip2p.pipeline import decode, generate

STEPS, SEED, GUIDANCE = 8, 0, 7.5
LATENT_TOL, IMAGE_TOL, MAP_TOL = 2e-4, 2e-5, 1e-5

SQUIRREL = "a painting of a squirrel eating a burger"
LION = "a painting of a lion eating a burger"
LEMUR = "a painting of a lemur eating a burger"        # lemur: 2 tokens (le + mur)
CAT = "a painting of a cat eating a burger"
HOUSE = "a photo of a house on a mountain"
FALL = "a photo of a house on a mountain at fall"
SMALL = "a photo of a small house on a big mountain"
BUNNY = "a smiling bunny doll"


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: tiny models, one thread


@pytest.fixture(scope="module")
def pair(sd_ckpt, sd_model):
    return sd_ckpt[0], sd_model


# ------------------------------------------------------------------------------ the cases

@dataclass
class Case:
    prompts: list
    oracle: Callable          # (hf tokenizer, resolution constants) -> oracle controller
    minip2p: Callable         # (minip2p tokenizer, resolution constants) -> (controller, store)
    size: tuple = (64, 64)
    blend: bool = False


def _oracle_kw(rc):
    return dict(store_max_pixels=rc["store_max_pixels"], self_max_pixels=rc["self_max_pixels"])


def _replace(prompts, cross, self_, **lb):
    def oracle(tok, rc):
        blend = O.LocalBlend(tok, prompts, steps=STEPS, map_hw=rc["blend_map"], **lb) if lb \
            else None
        return O.AttentionReplace(tok, prompts, STEPS, cross, self_, local_blend=blend,
                                  **_oracle_kw(rc))
    return oracle


def _blend3_minip2p(prompts, words, threshold, start, subtract, sub_threshold):
    """LocalBlend with a subtraction threshold: built from the classes (build() has no knob)."""
    def make(tok, rc):
        edit = p2p.Replace(tok, prompts, STEPS, cross_replace=0.8, self_replace=0.4,
                           self_max_pixels=rc["self_max_pixels"])
        store = p2p.AttentionStore(len(prompts))
        blend = p2p.LocalBlend(tok, prompts, words, store, STEPS, threshold, start, subtract,
                               sub_threshold)
        return p2p.Compose(edit, store, blend), store
    return make


WINDOWS = {"default_": (0.1, 0.9), "lion": (0.25, 0.6), "burger": 0.3}
SUBTRACT = ["painting", "eating", "burger"]
BLEND3 = ["squirrel", ["painting", "of"], "cat"]

CASES = {
    # word swap, 3 prompts; lemur has 2 tokens for squirrel's 1 (weights 1/2, and the tail i->j)
    "replace": Case(
        [SQUIRREL, LION, LEMUR], _replace([SQUIRREL, LION, LEMUR], 0.8, 0.4),
        lambda tok, rc: p2p.build(tok, [SQUIRREL, LION, LEMUR], STEPS, "replace", 0.8, 0.4,
                                  self_max_pixels=rc["self_max_pixels"])),
    "refine": Case(
        [HOUSE, FALL, SMALL],
        lambda tok, rc: O.AttentionRefine(tok, [HOUSE, FALL, SMALL], STEPS, 0.6, (0.1, 0.5),
                                          **_oracle_kw(rc)),
        lambda tok, rc: p2p.build(tok, [HOUSE, FALL, SMALL], STEPS, "refine", 0.6, (0.1, 0.5),
                                  self_max_pixels=rc["self_max_pixels"])),
    "reweight": Case(
        [BUNNY, BUNNY],
        lambda tok, rc: O.AttentionReweight(
            tok, [BUNNY] * 2, STEPS, 0.8, 0.4, O.make_equalizer(tok, [BUNNY] * 2, {"smiling": 5.0}),
            **_oracle_kw(rc)),
        lambda tok, rc: p2p.build(tok, [BUNNY] * 2, STEPS, "auto", 0.8, 0.4,
                                  reweight={"smiling": 5.0}, self_max_pixels=rc["self_max_pixels"])),
    "reweight+replace": Case(
        [SQUIRREL, LION],
        lambda tok, rc: O.AttentionReweight(
            tok, [SQUIRREL, LION], STEPS, 0.8, 0.4,
            O.make_equalizer(tok, [SQUIRREL, LION], {"lion": 3.0, "burger": -1.0}),
            controller=_replace([SQUIRREL, LION], 0.8, 0.4)(tok, rc), **_oracle_kw(rc)),
        lambda tok, rc: p2p.build(tok, [SQUIRREL, LION], STEPS, "replace", 0.8, 0.4,
                                  reweight={"lion": 3.0, "burger": -1.0},
                                  self_max_pixels=rc["self_max_pixels"])),
    "word-windows": Case(
        [SQUIRREL, LION], _replace([SQUIRREL, LION], WINDOWS, (0.2, 0.6)),
        lambda tok, rc: p2p.build(tok, [SQUIRREL, LION], STEPS, "replace", WINDOWS, (0.2, 0.6),
                                  self_max_pixels=rc["self_max_pixels"])),
    # the stable notebook's local edit (official code works for 2 prompts)
    "blend2": Case(
        [SQUIRREL, LION],
        _replace([SQUIRREL, LION], {"default_": 1.0, "lion": 0.4}, 0.4,
                 words=["squirrel", "lion"], threshold=0.99),
        lambda tok, rc: p2p.build(tok, [SQUIRREL, LION], STEPS, "replace",
                                  {"default_": 1.0, "lion": 0.4}, 0.4, blend=["squirrel", "lion"],
                                  blend_threshold=0.99, self_max_pixels=rc["self_max_pixels"]),
        size=(64, 128), blend=True),
    # 3 prompts: the oracle's corrected mask (source OR own). Prompt 1 blends on two words
    # whose mask is smaller than the source's, so the OR shows.
    "blend3": Case(
        [SQUIRREL, LION, CAT],
        _replace([SQUIRREL, LION, CAT], 0.8, 0.4, words=BLEND3, threshold=0.99),
        lambda tok, rc: p2p.build(tok, [SQUIRREL, LION, CAT], STEPS, "replace", 0.8, 0.4,
                                  blend=BLEND3, blend_threshold=0.99,
                                  self_max_pixels=rc["self_max_pixels"]),
        size=(64, 128), blend=True),
    # + the null-text notebook's start (after 25% of the steps) and subtracted words
    "blend3-start-subtract": Case(
        [SQUIRREL, LION, CAT],
        _replace([SQUIRREL, LION, CAT], 0.8, 0.4, words=["squirrel", "lion", "cat"],
                 threshold=0.99, start=0.25, subtract=SUBTRACT, subtract_threshold=0.95),
        _blend3_minip2p([SQUIRREL, LION, CAT], ["squirrel", "lion", "cat"], 0.99, 0.25, SUBTRACT,
                        0.95),
        size=(64, 128), blend=True),
}


# ------------------------------------------------------------------------------ alignment

def test_oracle_alignment_agrees_with_minip2p_align(pair):
    """The oracle's own mappers, schedules and word positions equal minip2p.align's for every
    prompt used here (and a few more shapes of swap), so a mismatch below is about attention."""
    pipe, model = pair
    hf, tok = pipe.tokenizer, model.tokenizer
    for prompt in (SQUIRREL, LION, LEMUR, CAT, HOUSE, FALL, SMALL, BUNNY):
        for n, word in enumerate(prompt.split(" ")):
            assert O.word_token_positions(hf, prompt, word) == tok.word_positions(prompt, word)
            assert O.word_token_positions(hf, prompt, n) == tok.word_positions(prompt, n)
    platypus = "a painting of a platypus eating a burger"
    for src, tgt in [(SQUIRREL, LION), (SQUIRREL, LEMUR), (LEMUR, SQUIRREL), (LEMUR, platypus),
                     (SQUIRREL, CAT)]:
        assert torch.equal(O.swap_mapper(hf, src, tgt), align.replace_mapper(tok, src, tgt))
    for src, tgt in [(HOUSE, FALL), (HOUSE, SMALL), ("soup", "pea soup with croutons"),
                     (FALL, HOUSE)]:
        m_ref, a_ref = O.refine_mapper(hf, src, tgt)
        m, a = align.refine_mapper(tok, src, tgt)
        assert torch.equal(m_ref, m) and torch.equal(a_ref, a), (src, tgt)
    for prompts, window in [([SQUIRREL, LION, LEMUR], 0.8), ([HOUSE, FALL], 0.6),
                            ([SQUIRREL, LION], WINDOWS),
                            ([SQUIRREL, LION], {"default_": 1.0, "lion": 0.4})]:
        ref = O.time_word_alpha(hf, prompts, STEPS, window).reshape(STEPS + 1, len(prompts) - 1, 77)
        assert torch.equal(ref, align.cross_replace_window(tok, prompts, STEPS, window))
    factors = {"lion": 3.0, "burger": -1.0}
    assert torch.equal(O.make_equalizer(hf, [SQUIRREL, LION], factors),
                       p2p.equalizer(tok, [SQUIRREL, LION], factors))


# ------------------------------------------------------------------------------ the runs

def head_mean(maps, B):
    """(B·heads, p, t) -> (B, p, t)."""
    return maps.reshape(B, -1, *maps.shape[1:]).mean(1)


def compare_stores(oracle, store, max_pixels, B):
    """max |Δ| between the oracle's averaged store (which holds the *edited* maps, through
    aliasing) and minip2p's AttentionStore, layer by layer in call order."""
    assert oracle.cur_step == STEPS and store.steps_seen == set(range(STEPS))
    worst = 0.0
    for key, ref_maps in oracle.get_average_attention().items():
        place, kind = key.split("_")
        mine = sorted((k for k in store.sums
                       if k[0] == place and k[4] == kind and k[5] <= max_pixels),
                      key=lambda k: k[1:4])                       # (block, layer, depth)
        assert len(mine) == len(ref_maps), key
        for k, ref in zip(mine, ref_maps):
            assert ref.shape[1] == k[5], (key, k)
            worst = max(worst, (store.sums[k] / STEPS - head_mean(ref, B)).abs().max().item())
    return worst


@pytest.mark.parametrize("name", list(CASES))
def test_matches_the_official_controllers(pair, name):
    pipe, model = pair
    case = CASES[name]
    (h, w), B = case.size, len(case.prompts)
    rc = O.resolution_constants(h // 8, w // 8)

    oracle = case.oracle(pipe.tokenizer, rc)
    z_ref, img_ref = O.text2image(pipe, case.prompts, oracle, STEPS, SEED, GUIDANCE, h, w)

    control, store = case.minip2p(model.tokenizer, rc)
    z = generate(model, case.prompts, SEED, STEPS, GUIDANCE, h, w, control=control,
                 progress=False, return_latents=True)
    img = decode(model, z)

    dz = (z - z_ref).abs().max().item()
    di = (img - img_ref).abs().max().item()
    dm = compare_stores(oracle, store, rc["store_max_pixels"], B) if store is not None else None
    print(f"\n{name:>22}: max|Δz| = {dz:.1e} (|z| ≤ {z_ref.abs().max():.0f}), "
          f"max|Δimage| = {di:.1e}" + ("" if dm is None else f", stored maps max|Δ| = {dm:.1e}"))
    assert dz <= LATENT_TOL and di <= IMAGE_TOL
    if dm is not None:
        assert dm <= MAP_TOL

    # not a vacuous comparison: the edit moves the edited images away from the source
    assert (z_ref[1:] - z_ref[:1]).abs().max() > 0.1
    if case.blend:
        # the final masks are partial: each edited latent equals the source's exactly on some
        # latent pixels (outside the mask) and differs on others
        for b in range(1, B):
            same = ((z_ref[b] - z_ref[0]).abs().amax(0) == 0)
            assert 0 < same.float().mean() < 1, (name, b)
            assert torch.equal(same, (z[b] - z[0]).abs().amax(0) == 0), (name, b)

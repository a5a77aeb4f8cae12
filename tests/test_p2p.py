"""Properties of the Prompt-to-Prompt controllers (minip2p/p2p.py) and of the edit/attention CLI,
on the tiny random-weight models of tests/helpers.py.

Both geometries run at latents 8×8 (sd: 64 px, 8× VAE; small: 32 px, 4× VAE), except where a
test says otherwise, with a few DDIM steps, on the explicit attention path (no fast path).
Tolerances: comparisons within one batch composition are exact (the controllers copy, select or
scale maps by 0/1, so what should be unchanged stays bit-identical); the one comparison across
batch sizes allows float32 batch-size numerics (see SOURCE_TOL).
"""
import pytest
import torch
import torch.nn.functional as F

from helpers import cli, maxdiff
from minip2p import views
from minip2p.methods import p2p
from minip2p.attention import Site
from minip2p.control import Controller
from minip2p.errors import MinipError
from minip2p.fast import switched
from minip2p.load import load_model
from minip2p.pipeline import generate

STEPS = 6
SIZES = {"sd_ckpt": 64, "small_ckpt": 32}        # image side giving latents 8×8
SQUIRREL = "a painting of a squirrel eating a burger"
LION = "a painting of a lion eating a burger"
CAT = "a painting of a cat eating a burger"
SOURCE_TOL = 2e-4    # |Δz| of the source row, batch of 1 vs 3: measured ≤ 5e-5 (|z| ≲ 40)


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: tiny models, one thread


@pytest.fixture(scope="module", params=list(SIZES))
def geo(request):
    """(model, image side, name) for each tiny geometry."""
    _, folder = request.getfixturevalue(request.param)
    return load_model(folder), SIZES[request.param], request.param


def run(model, prompts, side, control=None, width=None, steps=STEPS):
    """z_0 on the explicit attention path (the fast path uninstalled: every M formed, with or
    without a controller), so that runs with and without a controller compare bit for bit."""
    with switched(model, False):
        return generate(model, prompts, seed=3, steps=steps, height=side, width=width or side,
                        control=control, progress=False, return_latents=True)


# ------------------------------------------------------------------------------ edit identities

@pytest.mark.parametrize("mode", ["replace", "refine"])
def test_edit_to_the_same_prompt_reproduces_the_source(geo, mode):
    model, side, _ = geo
    control, _ = p2p.build(model.tokenizer, [LION, LION], STEPS, mode, store=False)
    assert isinstance(control.controllers[0], p2p.Replace if mode == "replace" else p2p.Refine)
    z = run(model, [LION, LION], side, control)
    assert maxdiff(z[1], z[0]) == 0


def test_zero_windows_equal_independent_generation(geo):
    """No cross- nor self-attention window: each prompt is generated on its own from the
    shared noise (the same batch, no controller)."""
    model, side, _ = geo
    prompts = [SQUIRREL, LION, CAT]
    control, _ = p2p.build(model.tokenizer, prompts, STEPS, "replace", cross_replace=0.0,
                           self_replace=0.0, store=False)
    plain = run(model, prompts, side)
    assert maxdiff(run(model, prompts, side, control), plain) == 0
    assert maxdiff(plain[1], plain[0]) > 1e-2            # the prompts do make a difference


def test_reweight_with_factor_one_is_the_identity(geo):
    model, side, _ = geo
    tok = model.tokenizer
    # alone (identical prompts): the same as no controller at all
    control, _ = p2p.build(tok, [LION, LION], STEPS, reweight={"lion": 1.0}, store=False)
    assert isinstance(control.controllers[0], p2p.Reweight) and control.controllers[0].prev is None
    assert maxdiff(run(model, [LION, LION], side, control), run(model, [LION, LION], side)) == 0
    # on top of a word swap: the same as the word swap alone
    with_rw, _ = p2p.build(tok, [SQUIRREL, LION], STEPS, "replace", reweight={"lion": 1.0},
                           store=False)
    without, _ = p2p.build(tok, [SQUIRREL, LION], STEPS, "replace", store=False)
    assert isinstance(with_rw.controllers[0].prev, p2p.Replace)
    assert maxdiff(run(model, [SQUIRREL, LION], side, with_rw),
                   run(model, [SQUIRREL, LION], side, without)) == 0


# ------------------------------------------------------------------------------ attention store

def test_stored_maps_are_distributions(geo):
    """Every stored map is a mean of softmax rows: ≥ 0, each cross map sums to 1 over the 77
    tokens and each self map to 1 over the key pixels."""
    model, side, name = geo
    store = p2p.AttentionStore(2)
    run(model, [SQUIRREL, LION], side, store)
    assert store.steps_seen == set(range(STEPS))
    kinds = {k[4] for k in store.sums}
    assert kinds == {"self", "cross"}
    for key, total in store.sums.items():
        mean = total / STEPS                                  # (B, pixels, keys)
        assert mean.min() >= 0, key
        keys = 77 if key[4] == "cross" else key[5]
        assert mean.shape == (2, key[5], keys), key
        assert (mean.sum(-1) - 1).abs().max() < 1e-5, key
    coarsest = min(k[5] for k in store.sums if k[0] in ("down", "up") and k[4] == "cross")
    avg = store.average("cross")                              # default: the coarsest layers
    assert avg.shape == (2, coarsest, 77) and (avg.sum(-1) - 1).abs().max() < 1e-5


def test_source_is_the_same_alone_or_edited_alongside_others(geo):
    model, side, name = geo
    prompts = [SQUIRREL, LION, CAT]
    control, _ = p2p.build(model.tokenizer, prompts, STEPS, "replace",
                           blend=["squirrel", "lion", "cat"], blend_threshold=0.9)
    edited = run(model, prompts, side, control)
    alone = run(model, prompts[:1], side)
    d = maxdiff(edited[0], alone[0])
    print(f"{name}: source alone vs in a batch of 3 edited prompts: max|Δz| = {d:.1e}")
    assert d <= SOURCE_TOL


# ------------------------------------------------------------------------------ local blend

def blend_mask(store, alpha, z, threshold):
    """LocalBlend's mask, recomputed from the stored maps as P2P_REFERENCE.md states it:
    coarsest down/up cross maps, averaged; words' tokens summed; 3×3 max-pool; nearest
    upsampling; divided by the per-image max; > threshold; source OR own."""
    coarsest = min(k[5] for k in store.sums if k[0] in ("down", "up") and k[4] == "cross")
    picked = [v for k, v in store.sums.items()
              if k[0] in ("down", "up") and k[4] == "cross" and k[5] == coarsest]
    maps = torch.stack(picked).mean(0)                        # (B, pixels, 77)
    h, w = z.shape[2:]
    f = round((h * w / coarsest) ** 0.5)
    maps = (maps * alpha[:, None, :]).sum(-1).reshape(-1, 1, h // f, w // f)
    maps = F.interpolate(F.max_pool2d(maps, 3, 1, 1), size=(h, w), mode="nearest")
    mask = maps / maps.amax(dim=(2, 3), keepdim=True) > threshold
    return mask[:1] | mask                                    # (B, 1, h, w)


@pytest.mark.parametrize("prompts", [[SQUIRREL, LION], [SQUIRREL, LION, CAT]], ids=["B2", "B3"])
def test_local_blend_keeps_the_source_outside_the_mask(geo, prompts):
    """After the final step, every edited latent equals the source's outside the mask (exactly)
    and differs inside. The sd geometry runs at 64×128 px here: at latents 8×8 its coarsest
    cross maps are 2×2, which the 3×3 max-pool turns into an all-true mask."""
    model, side, name = geo
    width = 2 * side if name == "sd_ckpt" else side
    words = ["squirrel", "lion", "cat"][: len(prompts)]
    threshold = 0.99                      # random weights: maps are nearly flat
    control, store = p2p.build(model.tokenizer, prompts, STEPS, "replace", blend=words,
                               blend_threshold=threshold, store=False)
    z = run(model, prompts, side, control, width=width)
    blend = control.controllers[-1]
    mask = blend_mask(store, blend.words, z, threshold).expand_as(z)
    for b in range(1, len(prompts)):
        inside, outside = mask[b], ~mask[b]
        assert 0 < inside.float().mean() < 1, "the mask must be partial for this test to mean much"
        assert (z[b] - z[0])[outside].abs().max() == 0
        assert (z[b] - z[0])[inside].abs().max() > 1e-2


# ------------------------------------------------------------------------------ sites

class Recorder(Controller):
    """A controller that asks for every map, changes nothing, and writes down the sites."""

    def __init__(self):
        self.sites = []

    def wants(self, site):
        return True

    def probs(self, probs, site):
        self.sites.append(site)
        return probs


def test_sites_have_sd_block_structure(sd_model):
    """SD 1.x (sd_ckpt): per step 16 self + 16 cross sites, places down 6 / mid 1 / up 9, in
    call order, with the resolutions of SD's levels (here latents 8×8 instead of 64×64)."""
    rec = Recorder()
    run(sd_model, [LION], 64, rec, steps=2)
    assert [s.step for s in rec.sites] == [0] * 32 + [1] * 32
    step0 = rec.sites[:32]
    assert len(set(step0)) == 32 and len({s.name for s in step0}) == 32
    assert [s.kind for s in step0] == ["self", "cross"] * 16        # attn1 then attn2
    for kind in ("self", "cross"):
        sites = [s for s in step0 if s.kind == kind]
        assert [s.place for s in sites] == ["down"] * 6 + ["mid"] + ["up"] * 9
        assert [(s.block, s.layer) for s in sites] == (
            [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)] + [(0, 0)]
            + [(b, n) for b in (1, 2, 3) for n in range(3)])
        assert all(s.depth == 0 for s in sites)
        l = 8 * 8                                                    # latent pixels at level 0
        assert [s.pixels for s in sites] == (
            [l, l, l // 4, l // 4, l // 16, l // 16] + [l // 64]
            + [l // 16] * 3 + [l // 4] * 3 + [l] * 3)
    assert step0[0].name == "down0.0.self@8x8" and step0[13].name == "mid0.0.cross@1x1"


def test_sites_of_deeper_transformers(small_ckpt):
    """The small geometry has 2 transformer blocks per spatial transformer: `depth` tells them
    apart and every site is still distinct."""
    model = load_model(small_ckpt[1])
    rec = Recorder()
    run(model, [LION], 32, rec, steps=1)
    assert len(set(rec.sites)) == len(rec.sites)
    assert {s.depth for s in rec.sites} == {0, 1}


# ------------------------------------------------------------------------------ CLI

@pytest.fixture
def common(sd_ckpt):
    return ["--model", sd_ckpt[1], "--steps", 2, "--height", 64, "--width", 64, "--quiet"]


@pytest.mark.parametrize("argv, needle", [
    (["edit", "a cat", "a big cat", "--mode", "replace"], "refine"),
    (["edit", "a cat", "a dog", "--blend", "cat", "horse"], "horse"),
    (["edit", "a cat", "a dog", "--blend", "cat"], "--blend"),
    (["edit", "a cat", "a dog", "--reweight", "cat=2"], "'cat'"),
    (["edit", "a cat", "a dog", "--reweight", "dog=big"], "WORD=FACTOR"),
    (["edit", "a cat", "a dog", "--reweight", "dog"], "WORD=FACTOR"),
    (["edit", "a cat", "a dog", "--reweight", "dog=nan"], "finite"),
    (["edit", "a cat", "a dog", "--cross-replace", "abc"], "window"),
    (["edit", "a cat", "a dog", "--cross-replace", "0.2,0.5,0.7"], "window"),
    (["edit", "a cat", "a dog", "--cross-replace", "1.5"], "0 <= start <= end <= 1"),
    (["edit", "a cat", "a dog", "--cross-replace", "default=1,dog=-0.1"], "0 <= start"),
    (["edit", "a cat", "a dog", "--cross-replace", "default=1,horse=0.5"], "horse"),
    (["edit", "a cat", "a dog", "--self-replace", "0.6,0.2"], "0 <= start <= end <= 1"),
    (["edit", "a cat", "a dog", "--self-replace", "dog=0.2"], "--self-replace"),
    (["edit", "a cat"], "TARGET"),
    (["edit", "a cat", "a dog", "--map-res", "4"], "add --maps"),
    (["edit", "a cat", "a dog", "--maps", "--map-res", "0"], "--map-res must be"),
    (["edit", "a cat", "a dog", "--maps", "--map-res", "3"], "stored: "),   # after generating
], ids=lambda v: v if isinstance(v, str) else " ".join(v[3:]) or "single prompt")
def test_cli_edit_bad_input_is_one_line(capsys, common, tmp_path, argv, needle):
    rc, out, err = cli(capsys, *argv, *common, "--out-dir", tmp_path / "out")
    assert rc == 2
    assert err.startswith("minip2p: ") and err.count("\n") == 1, err
    assert needle in err, err
    assert not (tmp_path / "out").exists()


def test_cli_edit_writes_images_and_maps(capsys, common, tmp_path):
    out = tmp_path / "edit"
    rc, _, err = cli(capsys, "edit", SQUIRREL, LION, *common, "--out-dir", out)
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == [".minip2p-run", "0.png", "1.png", "strip.png"]
    out = tmp_path / "maps"
    rc, _, err = cli(capsys, "edit", SQUIRREL, LION, CAT, *common, "--out-dir", out, "--maps",
                     "--blend", "squirrel", "lion", "cat", "--reweight", "burger=2")
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == [
        ".minip2p-run", "0.png", "1.png", "2.png", "maps-0.png", "maps-1.png", "maps-2.png",
        "strip.png"]


@pytest.mark.parametrize("extra", [[], ["--self"], ["--map-res", "4"], ["--self", "--map-res", "8"]],
                         ids=["cross", "self", "cross at 4x4", "self at 8x8"])
def test_cli_attention_writes_the_sheet(capsys, common, tmp_path, extra):
    from PIL import Image
    target = tmp_path / "maps.png"
    rc, out, err = cli(capsys, "attention", SQUIRREL, *common, "--out", target, *extra)
    assert rc == 0, err
    assert str(target) in out
    with Image.open(target) as im:
        assert im.width > 0 and im.height > 0


def test_pick_pixels_selects_a_stored_resolution_by_rows():
    from PIL import Image
    store = p2p.AttentionStore(1)
    for pixels in (64, 16, 4):
        site = Site("down", 0, 0, 0, "cross", pixels, 0)
        store(torch.rand(2, 1, pixels, 77).softmax(-1), site)
    image = Image.new("RGB", (64, 64))
    assert views.pick_pixels(store, "cross", None, image) is None
    assert views.pick_pixels(store, "cross", 4, image) == 16
    assert views.pick_pixels(store, "cross", 8, image) == 64
    with pytest.raises(MinipError, match=r"stored: 2x2, 4x4, 8x8"):
        views.pick_pixels(store, "cross", 16, image)

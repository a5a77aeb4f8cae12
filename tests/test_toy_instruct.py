"""The toy InstructPix2Pix: its captions and pair filter (tools/make_instruct_pairs.py), its
trainer's widened UNet and conditioning dropout (tools/train_instruct.py), and the shipped
weights/toy-instruct carrying out an instruction on a drawn picture."""
from pathlib import Path

import numpy as np
import pytest
import torch

from tools import make_instruct_pairs as mip
from tools import toydata

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("mix", sorted(mip.MIXES))
def test_captions_change_one_attribute(mix):
    items = mip.make_captions(52, seed=3, mix=mix)
    assert len(mip.instructions()) >= 12
    if mix == "hard":                  # weighted: shape and size instructions, small sources
        kind = {t: attr for t, attr, _ in mip.instructions()}
        kinds = [kind[it["edit"]] for it in items]
        assert min(kinds.count("size"), kinds.count("shape")) >= kinds.count("color") / 2
        assert sum("small" in it["caption"] for it in items) > len(items) / 3
    ins = {t: (a, v) for t, a, v in mip.instructions()}
    for it in items:
        a, b = mip.parse_caption(it["caption"]), mip.parse_caption(it["output"])
        attr, value = ins[it["edit"]]
        assert b[attr] == value and a[attr] != value, it
        assert {k for k in a if a[k] != b[k]} == {attr}, it
        assert mip.caption_of(a) == it["caption"]


def test_pair_filter_reads_edits():
    def pic(color, shape, size, seed=0):
        row = torch.tensor([[toydata.COLOR_NAMES.index(color), toydata.SHAPES.index(shape),
                             toydata.SIZES.index(size), 0, -1, -1, -1]])
        return ((toydata.draw(row, torch.Generator().manual_seed(seed))[0] + 1) / 2).numpy()
    red, blue = mip.read(pic("red", "circle", None)), mip.read(pic("blue", "circle", None))
    assert red["background"] == "grey"
    assert mip.judge_pair(red, blue, "color", "blue") == dict(done=True, kept=True, shift=0.0,
                                                                ratio=1.0)
    assert not mip.judge_pair(red, blue, "color", "green")["done"]
    moved = mip.read(pic("blue", "circle", None, seed=5))                # another place
    assert not mip.judge_pair(red, moved, "color", "blue")["kept"]
    big = mip.read(pic("red", "circle", "big"))
    assert mip.judge_pair(red, big, "size", "big")["done"]
    assert not mip.judge_pair(red, big, "color", "red")["kept"]          # size not kept
    assert mip.reverse("color", "blue", dict(color="red")) == "make it red"
    assert mip.reverse("size", "big", {}) == "make it small"


def test_widened_unet_starts_as_the_toy_model(toy):
    from tools.train_instruct import widen
    unet = widen(toy.unet)
    assert unet.conv_in.weight.shape[1] == 8 and not unet.conv_in.weight[:, 4:].any()
    z, c = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 64)
    with torch.no_grad():
        a = toy.unet(z, torch.tensor([500]), c)
        b = unet(torch.cat([z, torch.randn(1, 4, 16, 16)], 1), torch.tensor([500]), c)
    assert (a - b).abs().max() <= 1e-5


def test_conditioning_dropout_is_the_official_scheme():
    """r ~ U(0,1): text dropped where r < 2p, image where p ≤ r < 3p (5 % each alone, 5 % both)."""
    from tools.train_instruct import P_DROP, make_step
    seen = {}

    def fake_unet(x, t, text):
        seen["img"], seen["text"] = x[:, 4:, 0, 0].mean(1), text[:, 0, 0]
        return x[:, :4]
    n = 40000
    data = (torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), torch.zeros(1, dtype=torch.long),
            torch.ones(1, 3, 2), torch.zeros(1, 3, 2))
    step = make_step(fake_unet, data, torch.linspace(0.99, 0.01, 1000), n, None)
    step(0, torch.Generator().manual_seed(0))
    no_text, no_img = seen["text"] == 0, seen["img"] == 0
    for got, want in [((no_text & ~no_img), P_DROP), ((no_text & no_img), P_DROP),
                      ((~no_text & no_img), P_DROP), ((~no_text & ~no_img), 1 - 3 * P_DROP)]:
        assert abs(got.float().mean().item() - want) < 0.006


def test_toy_instruct_makes_a_red_circle_blue():
    """The shipped model on a drawn picture: the object turns blue (the instruction carried out;
    keeping the rest it does in about half the cases, tools/README.md). Margin: the
    object's colour is nearer blue than any other palette colour by a margin in RGB distance
    (measured: 0.472–0.477 over seeds 0–5, 10 steps; asserted 0.3)."""
    from minip2p.load import load_model
    from minip2p.methods.instruct import edit
    from tools.eval_instruct import drawn
    model = load_model(ROOT / "weights" / "toy-instruct")
    assert model.unet.cfg.in_channels == 8
    x = drawn(dict(color="red", shape="circle", size=None, pos=None, bg=None), 10_000)
    y = edit(model, x, "make it blue", seed=0, steps=10, progress=False)[0]
    after = toydata.analyse(y)
    rgb = torch.as_tensor(y)[:, torch.from_numpy(after["mask"])].median(1).values
    d = ((toydata.PALETTE - rgb) ** 2).sum(1).sqrt()
    blue = toydata.COLOR_NAMES.index("blue")
    assert after["color"] == "blue" and d.sort().values[1] - d[blue] > 0.3, (after["color"], d)

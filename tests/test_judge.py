"""The shared case list, the clean rate and the contact sheets of the toy evaluations
(tools/judge.py, tools/sheets.py), on drawn pictures: no model is run."""
import argparse

import numpy as np
from PIL import Image

from tools import judge
from tools.artifacts import inject
from tools.toydata import all_captions


def test_cases_vary_the_prompt_style_and_are_captions_of_the_grammar():
    cases = judge.CASES
    assert len(cases) == 24 and len({c.source for c in cases}) == 24
    texts = set(all_captions()[0])
    assert all(c.source in texts and c.target in texts for c in cases)
    assert {c.objects for c in cases} == {1, 2}
    assert {c.kind for c in cases} == {"colour", "shape", "size"}
    for part in (" big ", " small ", " on the left", " on the right", " background", " and a "):
        assert any(part in c.source for c in cases), part
    assert any(not (c.size or c.pos or c.bg or c.second) for c in cases)
    assert all(judge.objects_in(c.source) == c.objects for c in cases)


def test_clean_rate_of_drawn_and_spoilt_pictures():
    pics = [c.drawn(i) for i, c in enumerate(judge.CASES[:6])]
    counts = [c.source for c in judge.CASES[:6]]
    assert judge.clean_rate(pics, counts) == 1.0
    rng = np.random.default_rng(0)
    spoilt = [inject(p.numpy(), kind, rng) for p, kind in zip(pics[:2], ("blotches", "noise"))]
    assert judge.clean_rate(spoilt + pics[2:4], counts[:4]) == 0.5
    as_pil = Image.fromarray((pics[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    assert judge.is_clean(as_pil, 1)


def test_evaluate_writes_the_row_and_the_sheets(tmp_path):
    p = argparse.ArgumentParser()
    judge.add_args(p, ["fake"])
    args = p.parse_args(["--clean", "--clean-n", "3", "--sheets", str(tmp_path / "s"),
                         "--sheet-figures", str(tmp_path / "f")])
    rng = np.random.default_rng(1)

    def run(model, case, i, args):
        src = case.drawn(i)
        if i == 2:
            raise RuntimeError("boom")
        return src, inject(src.numpy(), "holes", rng) if i == 1 else src, True, None
    row = judge.evaluate(None, "fake", judge.make_cases(3), args, run)
    assert row["clean"] == "33 % (1/3)" and row["failed"] == 1
    assert row["accurate"] == "100 % (2/2)"
    big = Image.open(tmp_path / "s" / "fake-50-ddim.png")
    assert big.size[0] > 4 * 2 * 64
    assert (tmp_path / "f" / "fake.png").stat().st_size < 60_000
    assert "| fake | 33 % (1/3) |" in judge.table([row], args)


def test_a_run_the_method_refuses_is_reported_as_refused(tmp_path):
    p = argparse.ArgumentParser()
    judge.add_args(p, ["fake"])
    args = p.parse_args(["--clean", "--sheets", str(tmp_path)])

    def run(model, case, i, args):
        raise ValueError("sampler euler-a: needs the ddim sampler")
    row = judge.evaluate(None, "fake", judge.make_cases(2), args, run)
    assert row["clean"] == "refused" and "needs the ddim sampler" in row["accurate"]

"""tools/eval_inversion --edits (tools/inversion_edits.py): one JSON line per (case, inversion)
as soon as it is done, a restart runs only what is missing, the table and the sheets come from
the file; on the toy model at 2 steps."""
import json

import pytest

from minip2p.load import DEFAULT_MODEL
from tools import eval_inversion, inversion_edits


def row(case, method, **kw):
    return dict(case=case, method=method, steps=2, guidance=7.5, inner_steps=10, rec=30.0,
                ok=True, bg=40.0, structure=1.0, structure_rec=0.5, secs=2.0) | kw


def test_table_means_and_medians_and_lines_of_other_settings_ignored(tmp_path):
    path = tmp_path / "results.jsonl"
    lines = [row(0, "ddim", rec=20.0), row(1, "ddim", rec=30.0, ok=False),
             row(2, "ddim", rec=70.0), row(0, "ddim", steps=50, rec=99.0)]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"case": 3, "meth')
    done = inversion_edits.load_results(path, dict(steps=2, guidance=7.5, inner_steps=10))
    assert sorted(done) == [(0, "ddim"), (1, "ddim"), (2, "ddim")]   # cut line, 50 steps: out
    assert done[0, "ddim"]["rec"] == 20.0
    text = inversion_edits.table({"ddim": list(done.values()), "edict": []})
    ddim = next(line for line in text.splitlines() if line.startswith("| ddim"))
    assert ddim.startswith("| ddim | 3 | 40.00 / 30.00 | 67 % (2/3) | 40.00 / 40.00 |")
    assert "| edict | 0 |" in text


@pytest.mark.skipif(not DEFAULT_MODEL.is_dir(), reason="weights/toy is absent")
def test_edits_resume_from_the_results_file(tmp_path, monkeypatch, capsys):
    argv = ["--edits", "1", "--steps", "2", "--methods", "ddim", "direct", "--out",
            str(tmp_path / "o"), "--sheets", str(tmp_path / "s"), "--sheet-figures",
            str(tmp_path / "f")]
    eval_inversion.main(argv[:6] + argv[7:])                             # ddim only
    results = tmp_path / "o" / "results.jsonl"
    assert [json.loads(x)["method"] for x in results.read_text().splitlines()] == ["ddim"]
    eval_inversion.main(argv)                                            # resumes: direct
    rows = [json.loads(x) for x in results.read_text().splitlines()]
    assert [r["method"] for r in rows] == ["ddim", "direct"]
    for r in rows:
        assert r["structure"] >= 0 and r["structure_rec"] >= 0 and r["secs"] > 0
        assert (tmp_path / "o" / "images" / f"00-{r['method']}.png").is_file()
        assert (tmp_path / "s" / f"inversion-edit-{r['method']}-2.png").is_file()
        assert (tmp_path / "f" / f"inversion-edit-{r['method']}.png").is_file()

    def refuse(*a, **k):
        raise AssertionError("recomputed")
    monkeypatch.setattr(inversion_edits, "one", refuse)
    capsys.readouterr()
    eval_inversion.main(argv)                                            # all done: table only
    monkeypatch.setattr(eval_inversion, "load_model", refuse)
    eval_inversion.main(argv + ["--table-only"])                         # no model loaded
    out = capsys.readouterr().out
    assert out.count("| direct | 1 |") == 2 and "0 to run" in out
    eval_inversion.main(argv + ["--table-only", "--rescore"])           # from the 8-bit PNGs
    again = [json.loads(x) for x in results.read_text().splitlines()]
    assert [r["method"] for r in again] == ["ddim", "direct"]
    for r, s in zip(rows, again):
        assert s["structure"] == pytest.approx(r["structure"], rel=0.05, abs=0.05)
        assert s["rec"] == r["rec"]

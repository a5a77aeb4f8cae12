"""tools/bench.py's OpenVINO rows without OpenVINO: a one-line note, the rows skipped, nothing
converted; and the rows are known names whose images are compared with minip2p-plain's."""
import sys

from tools import bench, bench_openvino


def test_missing_openvino_is_one_note_and_the_rows_are_skipped(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "openvino", None)           # `import openvino` fails
    note = bench_openvino.missing()
    assert note and "pip install --no-deps openvino" in note and "\n" not in note
    monkeypatch.setattr("tools.floor.best_rate", lambda: (1e9, "stub"))
    ran = []
    monkeypatch.setattr(bench, "child", lambda name, *a: ran.append(name))
    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: ran.append("convert"))
    assert bench.main(["--rows", "openvino-default,openvino-f32", "--model", str(tmp_path),
                       "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"note: {note}" in out and ran == []


def test_openvino_rows_are_rows():
    for row in ("openvino-default", "openvino-f32"):
        assert row in bench.ROWS and bench.REF[row] == "minip2p-plain"

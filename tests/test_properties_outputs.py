"""The CLI's output places and flags, property-tested like tests/test_properties.py (whose
`check_cli` checks every run's promise: one line and nothing written on failure):

    a flag is taken only spelled out in full: an abbreviation of any command's flag (`--out`
        for `--out-dir`, `--step`, `--guid`) is refused by the parser, before any work;
    `--out` names a file, `--out-dir` a folder: an existing folder, or a name without the
        suffix of what is written, given to --out, and an existing file given to --out-dir,
        are refused in one line;
    a second run of edit or guide into the same --out-dir leaves exactly the second run's files
        (and its marker), or -- refused, a user's file there, another command's output -- the
        first run's folder exactly as it was, and no temporary folder beside it.
"""
import tempfile
from pathlib import Path

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from cli_strategies import MISMATCHED, RERUN, abbreviated
from helpers import NOT_ERRORS
import test_properties
from test_properties import MARKER, SETTINGS, check_cli, expand, files, run_main

assets = test_properties.assets                      # the same inputs (a module-scoped fixture)

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: tiny models, one thread

PARSER = ("minip2p: unrecognized arguments: ", "minip2p: argument ",
          "minip2p: the following arguments are required")


@pytest.mark.parametrize("argv,near", [
    (["edit", "a red circle", "a blue circle", "--out", "@out/result.png"], "--out-dir"),
    (["guide", "a red circle", "--move", "circle=0.7,0.5", "--out", "@out/x.png"], "--out-dir"),
    (["generate", "a red circle", "--step", "2"], "--steps"),
    (["guide", "a red circle", "--move", "circle=0.7,0.5", "--guid", "2"], "--guidance"),
    (["pairs", "@caps.jsonl", "--out-d", "@out/p"], "--out-dir")])
def test_abbreviations_are_refused_and_the_flag_named(assets, argv, near):
    rc, err = check_cli(argv + ["--quiet"], assets)
    assert rc == 2 and err.startswith(PARSER[0]) and f"did you mean {near}" in err, err


@SETTINGS
@given(argv=abbreviated())
def test_an_abbreviated_flag_is_refused_by_the_parser(assets, argv):
    rc, err = check_cli(argv, assets)
    error = [x for x in err.splitlines() if not x.startswith(NOT_ERRORS)][-1]
    assert rc == 2 and error.startswith(PARSER), err


@SETTINGS
@given(argv=MISMATCHED)
def test_out_is_a_file_and_out_dir_a_folder(assets, argv):
    rc, err = check_cli(argv, assets)
    assert rc == 2 and any(w in err for w in ("is a folder", "must end in", "is a file")), err


def folder_state(folder: Path) -> dict:
    return {p.name: p.read_bytes() if p.is_file() else "folder" for p in folder.iterdir()} \
        if folder.is_dir() else {}


@SETTINGS
@given(first=RERUN, second=RERUN, intruder=st.sampled_from([None, None, "notes.txt", "sub/"]))
def test_a_second_run_leaves_exactly_its_own_files(assets, first, second, intruder):
    with tempfile.TemporaryDirectory(prefix="minip2p-prop-") as tmp:
        out = Path(tmp)
        folder = out / "run"
        rc1, std1, _ = run_main(expand(first, out, assets))
        if intruder:                                    # a user's file or folder put there
            folder.mkdir(exist_ok=True)
            (folder / intruder).mkdir() if intruder.endswith("/") else \
                (folder / intruder).write_text("mine")
        before = folder_state(folder)
        rc2, std2, err = run_main(expand(second, out, assets))
        event(f"exit statuses {rc1}, {rc2}")
        assert {p for p in files(out) if p != "run" and not p.startswith("run/")} == set(), \
            "a temporary folder left beside the output"
        if rc2 == 0:
            written = {Path(p).name for p in std2.strip().removeprefix("wrote ").split(", ")}
            assert set(folder_state(folder)) == written | {MARKER}, (std2, folder_state(folder))
            assert not intruder and (rc1 != 0 or first[0] == second[0]), (first, second)
        else:
            errors = [x for x in err.splitlines() if not x.startswith(NOT_ERRORS)]
            assert rc2 == 2 and len(errors) == 1 and errors[0].startswith("minip2p: "), err
            assert folder_state(folder) == before, "the first run's folder was changed"
            if "swap" not in second and (intruder or (rc1 == 0 and first[0] != second[0])):
                assert "give an empty or new folder" in err, err

"""`minip2p pairs` (pairs.py, cli/pairs.py) on the shipped toy model with a tiny random CLIP:
two processes under torchrun equal one process; a run killed with SIGKILL half-way and run again
equals a clean run; bad input is refused with its line number and nothing is written; --check;
the self-attention copy controller."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minip2p.data import pairs
from minip2p.cli import main

ROOT = Path(__file__).resolve().parent.parent
LINES = [{"caption": "a red circle", "edit": "make it blue", "output": "a blue circle"},
         {"caption": "a green square", "edit": "make it a triangle", "output": "a green triangle"},
         {"caption": "a small yellow circle", "edit": "make it big", "output": "a big yellow circle"},
         {"caption": "a purple square", "edit": "make it orange", "output": "an orange square"}]


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        e.pop(k, None)
    return e


def args(caps, out, clip):
    return ["pairs", str(caps), "--out-dir", str(out), "--samples", "3", "--keep", "2", "--steps", "3",
            "--height", "64", "--width", "64", "--seed", "5", "--clip", str(clip), "--quiet",
            "--clip-threshold", "-1", "--clip-dir-threshold", "-1", "--clip-img-threshold", "-1"]


@pytest.fixture(scope="module")
def job(tmp_path_factory, clip_ckpt):
    tmp = tmp_path_factory.mktemp("pairs")
    caps = tmp / "captions.jsonl"
    caps.write_text("".join(json.dumps(x) + "\n" for x in LINES))
    clean = tmp / "clean"
    subprocess.run([sys.executable, "-m", "minip2p", *args(caps, clean, clip_ckpt[1])],
                   cwd=ROOT, env=env(), check=True, capture_output=True)
    return tmp, caps, clean, clip_ckpt[1]


def same(a: Path, b: Path):
    """Same items, seeds and parameters; scores within 1e-4; the JPEG-decoded images within 6/255
    at any pixel and 0.5/255 on average (JPEG's quantisation can turn a last-bit difference of
    the picture, from another batch size's kernels, into a few levels of its 8×8 block)."""
    items = sorted(p.name for p in a.iterdir() if p.is_dir())
    assert items == sorted(p.name for p in b.iterdir() if p.is_dir()) == [f"{i:07d}" for i in range(4)]
    for it in items:
        fa, fb = sorted(p.name for p in (a / it).iterdir()), sorted(p.name for p in (b / it).iterdir())
        assert fa == fb and len(fa) == 6, (fa, fb)                 # prompt, metadata, 2 × 2 images
        assert (a / it / "prompt.json").read_text() == (b / it / "prompt.json").read_text()
        ra = [json.loads(x) for x in (a / it / "metadata.jsonl").read_text().splitlines()]
        rb = [json.loads(x) for x in (b / it / "metadata.jsonl").read_text().splitlines()]
        assert [(r["seed"], r["p2p_threshold"], r["cfg_scale"]) for r in ra] == \
               [(r["seed"], r["p2p_threshold"], r["cfg_scale"]) for r in rb]
        for x, y in zip(ra, rb):
            assert abs(x["clip_sim_dir"] - y["clip_sim_dir"]) <= 1e-4
        for name in fa:
            if name.endswith(".jpg"):
                ia = np.asarray(Image.open(a / it / name), dtype=np.int16)
                ib = np.asarray(Image.open(b / it / name), dtype=np.int16)
                d = np.abs(ia - ib)
                assert d.max() <= 6 and d.mean() <= 0.5, (name, d.max(), d.mean())


@pytest.mark.slow   # the module's `job` runs pairs in a subprocess
def test_two_processes_under_torchrun_equal_one(job):
    tmp, caps, clean, clip = job
    out, logs = tmp / "torchrun", tmp / "torchrun-tmp"           # its log folder: not in /tmp
    logs.mkdir()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node", "2", "-m", "minip2p", *args(caps, out, clip)],
                       cwd=ROOT, env={**env(), "TMPDIR": str(logs)}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in out.glob("run-*.json")) == ["run-000-of-002.json",
                                                               "run-001-of-002.json"]
    same(clean, out)


@pytest.mark.slow
def test_sigkill_half_way_then_rerun_equals_a_clean_run(job):
    tmp, caps, clean, clip = job
    out = tmp / "killed"
    p = subprocess.Popen([sys.executable, "-m", "minip2p", *args(caps, out, clip)], cwd=ROOT,
                         env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "0000001" / "metadata.jsonl").exists():
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (out / "0000003" / "metadata.jsonl").exists(), "killed too late to test anything"
    r = subprocess.run([sys.executable, "-m", "minip2p", *args(caps, out, clip)], cwd=ROOT,
                       env=env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not list(out.rglob(".minip2p-*"))
    same(clean, out)
    # --check: all done; a lost image is broken, a lost done mark is missing
    assert main(["pairs", str(caps), "--check", str(out)]) == 0
    next((out / "0000002").glob("*_1.jpg")).unlink()
    (out / "0000003" / "metadata.jsonl").unlink()
    assert main(["pairs", str(caps), "--check", str(out)]) == 1


BAD = [("{\"caption\": \"a\", \"edit\": \"b\", \"output\": \"c\"}\nnot json\n", "line 2"),
       ("{\"caption\": \"a\", \"edit\": \"b\"}\n", "line 1: missing or empty 'output'"),
       ("[1, 2]\n", "line 1: expected a JSON object"),
       ("\n\n", "is empty"),
       ("", "is empty")]


@pytest.mark.parametrize("text,message", BAD)
def test_bad_captions_are_refused_and_nothing_is_written(tmp_path, capsys, text, message):
    caps = tmp_path / "c.jsonl"
    caps.write_text(text)
    assert main(["pairs", str(caps), "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minip2p: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_dir_of_other_captions_or_settings_is_refused(job, tmp_path, capsys):
    tmp, caps, clean, clip = job
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps(LINES[0]) + "\n")
    before = sorted(str(p) for p in clean.rglob("*"))
    assert main(["pairs", str(other), "--out-dir", str(clean)]) == 2
    assert "other captions" in capsys.readouterr().err
    assert main(args(caps, clean, clip)[:-1] + ["0.5"]) == 2
    assert "other settings" in capsys.readouterr().err
    for bad in (["--partition", "2/2"], ["--partition", "x"], ["--min-p2p", "0.9", "--max-p2p", "0.1"]):
        assert main(["pairs", str(caps), "--out-dir", str(tmp_path / "n"), *bad]) == 2
        assert capsys.readouterr().err.count("\n") == 1
    assert sorted(str(p) for p in clean.rglob("*")) == before and not (tmp_path / "n").exists()


def test_partitions_and_params():
    chunks = [list(pairs.partition(10, k, 3)) for k in range(3)]
    assert chunks == [list(c) for c in np.array_split(np.arange(10), 3)]
    assert pairs.parse_partition(None, {"RANK": "1", "WORLD_SIZE": "4"}) == (1, 4)
    assert pairs.parse_partition("2/3", {}) == (2, 3) and pairs.parse_partition(None, {}) == (0, 1)
    s = pairs.Settings(seed=1)
    seed, thr, g = pairs.sample_params(s, 7, 3)
    assert (seed, thr, g) == pairs.sample_params(s, 7, 3) != pairs.sample_params(s, 7, 4)
    assert 0.1 <= thr <= 0.9 and 7.5 <= g <= 15


def test_self_copy_copies_image_0s_self_attention_in_both_halves():
    from minip2p.control import Run, Site
    from minip2p.guidance import GuidanceBatch
    from minip2p.data.pairs import SelfCopy
    c = SelfCopy(0.5, 5)                                   # active while 0.5 > i/4: steps 0, 1
    assert [c.active(i) for i in range(5)] == [True, True, False, False, False]
    site = Site("down", 0, 0, 0, "self", 16, step=0, run=Run(GuidanceBatch.cfg_layout(2)))
    assert c.wants(site) and not c.wants(Site("down", 0, 0, 0, "cross", 16, step=0))
    M = torch.rand(4, 2, 16, 16)
    out = c.probs(M, site)
    assert torch.equal(out[1], M[0]) and torch.equal(out[3], M[2]) and torch.equal(out[0], M[0])


def test_self_copy_in_groups_copies_each_pairs_first_image():
    """Batched tries: image 2q+1 copies image 2q, while try q's own threshold holds."""
    from minip2p.control import Run, Site
    from minip2p.guidance import GuidanceBatch
    from minip2p.data.pairs import SelfCopy
    c = SelfCopy([0.5, 0.0], 5, group=2)                   # try 0: steps 0, 1; try 1: never
    M = torch.rand(8, 2, 16, 16)                           # rows [∅ × 4, c × 4]
    site = Site("down", 0, 0, 0, "self", 16, step=1, run=Run(GuidanceBatch.cfg_layout(4)))
    out = c.probs(M, site)
    assert c.wants(site) and torch.equal(out[1], M[0]) and torch.equal(out[5], M[4])
    assert all(torch.equal(out[r], M[r]) for r in (0, 2, 3, 4, 6, 7))
    assert not c.wants(Site("down", 0, 0, 0, "self", 16, step=2, run=site.run))


@pytest.mark.slow   # the module's `job`
def test_batched_tries_equal_one_by_one(job, tmp_path):
    """--batch 5: the 12 tries of the 4 items in batches across items, the same pairs."""
    tmp, caps, clean, clip = job
    assert main([*args(caps, tmp_path / "batched", clip), "--batch", "5"]) == 0
    same(clean, tmp_path / "batched")


def test_out_is_the_old_name_of_out_dir(tmp_path, capsys):
    """`pairs --out DIR` still works, with a one-line warning; given beside --out-dir, refused."""
    caps = tmp_path / "c.jsonl"
    caps.write_text(json.dumps(LINES[0]) + "\n")
    assert main(["pairs", str(caps), "--out", str(tmp_path / "o"), "--partition", "x"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("minip2p: warning: pairs --out DIR is now --out-dir DIR"), err
    assert len(err) == 2 and "--partition" in err[1], err
    assert main(["pairs", str(caps), "--out", "a", "--out-dir", "b"]) == 2
    assert "give --out-dir only" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()

"""Hub ids resolve through huggingface_hub's cache, as diffusers and `hf download` leave it.

A random model is laid out in a temporary HF_HUB_CACHE the way the Hub client writes it:
models--owner--name/refs/<branch or tag> holding a commit hash, snapshots/<hash>/<files> (one
snapshot as symlinks into blobs/, one as plain files). Everything runs offline (HF_HUB_OFFLINE=1).
"""
import os
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from helpers import run_minip2p
from minip2p.errors import MinipError
from minip2p.load import load_model

REPO = "minip2p-tests/tiny-sd"
MAIN, FP16 = "a" * 40, "b" * 40                    # two commits: plain files; fp16 files only


def fill_snapshot(src: Path, snap: Path, blobs: Path | None, half: bool):
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = f.relative_to(src)
        if f.suffix == ".safetensors" and half:
            from safetensors.torch import load_file, save_file
            rel = rel.with_name(rel.stem + ".fp16.safetensors")
            tmp = snap.parent / "tmp.safetensors"
            save_file({k: v.half() for k, v in load_file(f).items()}, tmp)
            f = tmp
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        if blobs is None:
            shutil.copy(f, snap / rel)
        else:                                      # the Hub client's layout: links into blobs/
            blob = blobs / f"{abs(hash(str(rel))):x}"
            shutil.copy(f, blob)
            os.symlink(os.path.relpath(blob, (snap / rel).parent), snap / rel)


@pytest.fixture(scope="module")
def cache(small_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-cache")
    repo = root / ("models--" + REPO.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "blobs").mkdir()
    for commit, blobs, half in ((MAIN, repo / "blobs", False), (FP16, None, True)):
        (repo / "snapshots" / commit).mkdir(parents=True)
        fill_snapshot(small_ckpt[1], repo / "snapshots" / commit, blobs, half)
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "half").write_text(FP16)
    return root


@pytest.fixture
def offline(monkeypatch, cache):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_cached_model_is_used_as_it_is(offline):
    model = load_model(REPO)
    assert model.name == REPO and model.dtype == torch.float32
    assert model.unet.conv_in.weight.abs().sum() > 0


@pytest.mark.parametrize("revision,variant,half", [("half", None, True), (FP16, "fp16", True),
                                                   (MAIN, None, False), ("main", None, False)])
def test_revision_and_variant(offline, revision, variant, half):
    """A branch/tag or a commit hash; --variant fp16 picks the *.fp16.safetensors files."""
    model = load_model(REPO, revision=revision, variant=variant)
    w = model.unet.conv_in.weight
    assert torch.equal(w, w.half().float()) == half                    # fp16-rounded weights


def test_offline_not_cached_names_the_fetch_command(offline, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(MinipError) as e:
        load_model(REPO)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 200 and msg.count("offline") == 1
    assert f"hf download {REPO} --include '*.json' --include '*.txt'" in msg
    assert "--include '*model.safetensors'" in msg and "model_index.json" not in msg
    assert list(tmp_path.iterdir()) == []                               # nothing written


def test_missing_revision_and_variant_are_one_line_errors(offline):
    with pytest.raises(MinipError, match=r"revision 'nope' is not in the HF cache "
                                         r"\(refs: half, main\).*hf download minip2p-tests/"
                                         r"tiny-sd --revision nope --include") as e:
        load_model(REPO, revision="nope")
    assert len(str(e.value)) < 200
    with pytest.raises(MinipError, match=r"hf download minip2p-tests/tiny-sd --include .*"
                                         r"'\*model\.fp16\.safetensors'") as e:
        load_model(REPO, variant="fp16")               # main has no fp16 files: fetch them
    assert len(str(e.value)) < 200
    with pytest.raises(MinipError, match=r"unknown variant 'fp 16'"):
        load_model(REPO, variant="fp 16")
    with pytest.raises(MinipError, match=r"revision v1 applies to Hub repo ids only"):
        load_model(None, revision="v1")


def run_cli(cache, *args, tmp):
    return run_minip2p("generate", "a red circle", "--steps", "2", "--quiet", "--height", "32",
                       "--width", "32", *args, env={"HF_HUB_CACHE": str(cache)}, cwd=tmp)


def test_cli_generate_from_the_cache_offline(cache, tmp_path):
    p = run_cli(cache, "--model", REPO, "--out", "a.png", tmp=tmp_path)
    assert p.returncode == 0 and (tmp_path / "a.png").is_file(), p.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    p = run_cli(empty, "--model", REPO, "--out", "b.png", tmp=tmp_path)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    assert p.stderr.startswith("minip2p: ") and f"hf download {REPO}" in p.stderr
    assert not (tmp_path / "b.png").exists() and list(empty.iterdir()) == []


def test_cli_revision_and_variant(cache, tmp_path):
    p = run_cli(cache, "--model", REPO, "--revision", "half", "--variant", "fp16", "--out", "a.png",
                tmp=tmp_path)
    assert p.returncode == 0 and (tmp_path / "a.png").is_file(), p.stderr
    for args, words in ((["--revision", "nope"], "revision 'nope'"),
                        (["--variant", "fp8"], "fp8")):
        p = run_cli(cache, "--model", REPO, *args, "--out", "b.png", tmp=tmp_path)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and words in p.stderr, p.stderr
        assert not (tmp_path / "b.png").exists()


def test_a_tokenizer_json_only_snapshot_is_complete(offline, tmp_path, monkeypatch):
    """transformers >= 5 saves tokenizer/tokenizer.json alone: found by repo id offline, as the
    same folder loads by path; a snapshot with no tokenizer in either layout is not complete."""
    from transformers import CLIPTokenizerFast
    from minip2p.load import hub
    snap = offline / ("models--" + REPO.replace("/", "--")) / "snapshots" / MAIN
    alone = tmp_path / "models--owner--tokenizer-json" / "snapshots" / MAIN
    shutil.copytree(snap, alone)                      # links followed: plain files
    (alone.parent.parent / "refs").mkdir()
    (alone.parent.parent / "refs" / "main").write_text(MAIN)
    for name in ("vocab.json", "merges.txt"):
        (alone / "tokenizer" / name).unlink()
    CLIPTokenizerFast.from_pretrained(snap / "tokenizer").backend_tokenizer.save(
        str(alone / "tokenizer" / "tokenizer.json"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    by_id, by_path = load_model("owner/tokenizer-json"), load_model(alone)
    prompt = ["a red circle, twice!"]
    assert torch.equal(by_id.tokenizer(prompt), by_path.tokenizer(prompt))
    assert torch.equal(by_id.tokenizer(prompt), load_model(snap).tokenizer(prompt))
    (alone / "tokenizer" / "tokenizer.json").unlink()
    assert not hub.complete(alone, None)
    with pytest.raises(MinipError, match="the cached model is incomplete, offline"):
        load_model("owner/tokenizer-json")

"""Bad input ends as one line on stderr, `minip2p: ...`, exit status 2, no traceback, no file.

Every case damages a copy of the tiny "small" checkpoint (conftest) or passes a bad option to
`minip2p generate`; a few go through a real `python -m minip2p` process. The library-level
cases check that `load_model` raises MinipError naming the offending tensor.
"""
import json
import os
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import run_minip2p
from minip2p.cli import main
from minip2p.errors import MinipError
from minip2p.load import WEIGHTS, load_model

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"
OFFLINE_REPO = "minip2p-tests/no-such-model"


@pytest.fixture
def model(small_ckpt, tmp_path):
    """A private copy of the tiny checkpoint, free to damage."""
    return shutil.copytree(small_ckpt[1], tmp_path / "model")


@pytest.fixture
def out_dir(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


def fails(capsys, out_dir, *args, out="img.png", model=None):
    """Run the CLI; check the one-line error and that nothing was written. Returns the line."""
    argv = ["generate", "a cat", "--steps", "2", "--quiet", "--out", str(out_dir / out), *args]
    if model is not None:
        argv += ["--model", str(model)]
    rc = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert rc == 2, captured
    assert len(lines) == 1 and lines[0].startswith("minip2p: "), captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    if out_dir.is_dir():
        assert list(out_dir.iterdir()) == [], "output or temporary file left behind"
    return lines[0]


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# ---- the model: folders, files, configs ------------------------------------------------------

def test_missing_model_folder(capsys, out_dir, tmp_path):
    line = fails(capsys, out_dir, model=tmp_path / "nowhere")
    assert "not found" in line


def test_missing_component(capsys, out_dir, model):
    shutil.rmtree(model / "vae")
    assert "missing component folder 'vae/'" in fails(capsys, out_dir, model=model)


def test_missing_tokenizer_file(capsys, out_dir, model):
    (model / "tokenizer" / "merges.txt").unlink()
    assert "no merges.txt" in fails(capsys, out_dir, model=model)


def test_truncated_safetensors(capsys, out_dir, model):
    f = model / UNET_FILE
    data = f.read_bytes()
    f.write_bytes(data[:len(data) // 2])
    line = fails(capsys, out_dir, model=model)
    assert "not a readable safetensors file" in line and "truncated" in line


def test_garbage_safetensors(capsys, out_dir, model):
    (model / UNET_FILE).write_bytes(os.urandom(50_000))
    assert "not a readable safetensors file" in fails(capsys, out_dir, model=model)


def test_config_disagrees_with_weights(capsys, out_dir, model):
    edit_json(model / "unet" / "config.json", block_out_channels=[32, 64])    # really (32, 48)
    line = fails(capsys, out_dir, model=model)
    assert "wrong shape" in line and "down_blocks.1." in line and "config.json" in line


def test_broken_config_json(capsys, out_dir, model):
    (model / "unet" / "config.json").write_text('{"block_out_channels": [32, 48,')
    assert "broken config file" in fails(capsys, out_dir, model=model)


def test_pickle_only_component(capsys, out_dir, model):
    f = model / UNET_FILE
    torch.save({"conv_in.weight": torch.zeros(1)}, f.with_suffix(".bin"))   # never unpickled
    f.unlink()
    line = fails(capsys, out_dir, model=model)
    assert "diffusion_pytorch_model.bin" in line and "pickle" in line


def test_pickle_single_file(capsys, out_dir, tmp_path):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    line = fails(capsys, out_dir, model=ckpt)
    assert "model.ckpt" in line and "pickle" in line


@pytest.mark.parametrize("part,key,value", [("unet", "addition_embed_type", "text_time"),
                                            ("unet", "resnet_time_scale_shift", "scale_shift"),
                                            ("vae", "shift_factor", 0.1159)])
def test_unsupported_config_feature(capsys, out_dir, model, part, key, value):
    edit_json(model / part / "config.json", **{key: value})
    line = fails(capsys, out_dir, model=model)
    assert f"{key}={value!r} is not supported" in line


def test_unbuildable_config(capsys, out_dir, model):
    edit_json(model / "vae" / "config.json", norm_num_groups=5)      # 16 channels
    assert "num_groups" in fails(capsys, out_dir, model=model)


# ---- options ------------------------------------------------------------------------------

@pytest.mark.parametrize("opt", [["--height", "30"], ["--width", "42"]])
def test_size_not_a_multiple_of_the_vae_factor(capsys, out_dir, small_ckpt, opt):
    line = fails(capsys, out_dir, *opt, model=small_ckpt[1])
    assert f"{opt[0][2:]} must be a positive multiple of 4, got {opt[1]}" in line   # 3-level VAE


@pytest.mark.parametrize("opt,message", [
    (["--steps", "0"], "--steps must be ≥ 1"),
    (["--steps", "5000"], "steps must be ≤ 999 for this scheduler"),
    (["--steps", "1000"], "steps must be ≤ 999 for this scheduler"),
    (["--seed", "abc"], "--seed must be an integer"),
    (["--seed", "-1"], "--seed must be ≥ 0"),
    (["--guidance", "lots"], "--guidance must be a number"),
    (["--guidance", "nan"], "--guidance must be a finite number"),
    (["--dtype", "fp64"], "invalid choice: 'fp64'"),
    (["--device", "nonsense"], "unknown device"),
    (["--frobnicate"], "unrecognized arguments"),
])
def test_bad_option(capsys, out_dir, small_ckpt, opt, message):
    assert message in fails(capsys, out_dir, *opt, model=small_ckpt[1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_without_gpu(capsys, out_dir, small_ckpt):
    line = fails(capsys, out_dir, "--device", "cuda", model=small_ckpt[1])
    assert "no CUDA GPU is available" in line


def test_output_folder_missing(capsys, tmp_path, small_ckpt):
    line = fails(capsys, tmp_path / "missing", model=small_ckpt[1])
    assert "does not exist" in line and not (tmp_path / "missing").exists()


def test_output_bad_extension(capsys, out_dir, small_ckpt):
    assert "must end in .png" in fails(capsys, out_dir, out="img.gif", model=small_ckpt[1])


def test_output_is_a_folder(capsys, tmp_path, small_ckpt):
    (tmp_path / "img.png").mkdir()
    rc = main(["generate", "a cat", "--steps", "2", "--quiet", "--out", str(tmp_path / "img.png"),
               "--model", str(small_ckpt[1])])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("minip2p: ") and "is a folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.png"]


def test_a_good_run_writes_only_the_image(capsys, out_dir, small_ckpt):
    """The control: the same command with good input succeeds and leaves exactly one file."""
    rc = main(["generate", "a cat", "--steps", "2", "--quiet", "--height", "16", "--width", "16",
               "--out", str(out_dir / "img.png"), "--model", str(small_ckpt[1])])
    assert rc == 0 and capsys.readouterr().err == ""
    assert [p.name for p in out_dir.iterdir()] == ["img.png"]
    umask = os.umask(0)
    os.umask(umask)
    assert (out_dir / "img.png").stat().st_mode & 0o777 == 0o666 & ~umask   # not mkstemp's 0600


# ---- a real process: exit status 2 and no traceback ----------------------------------------

def run_process(*args):
    start = time.monotonic()
    p = run_minip2p("generate", "a cat", "--steps", "2", "--quiet", *args, timeout=120)
    return p, time.monotonic() - start


def test_process_missing_model(tmp_path):
    p, _ = run_process("--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "a.png"))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("minip2p: ") and "not found" in p.stderr
    assert list(tmp_path.iterdir()) == []


def test_process_hub_repo_offline(tmp_path):
    p, seconds = run_process("--model", OFFLINE_REPO, "--out", str(tmp_path / "a.png"))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("minip2p: the model is not in")
    assert "offline (HF_HUB_OFFLINE=1)" in p.stderr and seconds < 30 and len(p.stderr) < 200
    assert list(tmp_path.iterdir()) == [] and not (WEIGHTS / OFFLINE_REPO.replace("/", "--")).exists()


# ---- library level: strict loading names the tensor ------------------------------------------

def damage_unet(model, change):
    f = model / UNET_FILE
    state = load_file(f)
    change(state)
    save_file(state, f)


def test_missing_tensor_is_named(model):
    damage_unet(model, lambda s: s.pop("mid_block.attentions.0.proj_in.weight"))
    with pytest.raises(MinipError, match=r"1 missing tensors: mid_block\.attentions\.0\.proj_in\.weight"):
        load_model(model)


def test_unexpected_tensor_is_named(model):
    damage_unet(model, lambda s: s.update({"mid_block.extra.weight": torch.zeros(3)}))
    with pytest.raises(MinipError, match=r"1 unexpected tensors: mid_block\.extra\.weight"):
        load_model(model)


def test_misshaped_tensor_is_named(model):
    damage_unet(model, lambda s: s.update({"conv_in.bias": torch.zeros(33)}))
    with pytest.raises(MinipError, match=r"wrong shape: conv_in\.bias \(33,\) \(expected \(32,\)\)"):
        load_model(model)


def test_single_file_unknown_tensor_is_named(tmp_path):
    f = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.conv.weight": torch.zeros(1), "lora_unet_x.alpha": torch.zeros(1)}, f)
    with pytest.raises(MinipError, match=r"lora_unet_x\.alpha"):
        load_model(f)


def test_hub_repo_offline(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(MinipError, match=r"not in the Hugging Face cache, offline") as e:
        load_model(OFFLINE_REPO)
    assert time.monotonic() - start < 20 and "\n" not in str(e.value)

"""`minip2p edit --method p2p|masactrl|pnp` on a random SD-1.x-structured checkpoint: each method
runs end to end and writes its files; every bad input is one line, exit 2, nothing written."""
import pytest
from PIL import Image, ImageDraw

from minip2p.cli import main
from minip2p.methods import masactrl

SRC, TGT = "a painting of a squirrel eating a burger", "a painting of a lion eating a burger"


@pytest.fixture()
def photo(tmp_path):
    path = tmp_path / "photo.png"
    im = Image.new("RGB", (64, 64), (235, 235, 225))
    ImageDraw.Draw(im).rectangle((14, 18, 46, 50), fill=(30, 60, 200))
    im.save(path)
    return path


def run(capsys, tmp_path, sd_ckpt, *args):
    out = tmp_path / "edit"
    rc = main(["edit", *args, "--model", str(sd_ckpt[1]), "--steps", "4", "--quiet",
               "--out-dir", str(out)])
    return rc, capsys.readouterr(), out


def test_default_masactrl_layer_is_the_papers_on_sd_structure(sd_model):
    assert masactrl.default_layer(sd_model.unet) == 10            # up_blocks[2] and [3]
    assert len(sd_model.unet.transformer_blocks()) == 16


@pytest.mark.parametrize("args", [
    ["--method", "masactrl", "--masa-step", "1", "--maps"],
    ["--method", "masactrl", "--masa-step", "1", "--masa-mask", "squirrel", "lion"],
    ["--method", "masactrl", "--masa-step", "0", "--image", "PHOTO", "--inversion-method", "ddim"],
    ["--method", "p2p", "--image", "PHOTO", "--strength", "0.5", "--blend", "squirrel", "lion"],
    ["--method", "masactrl", "--image", "PHOTO", "--strength", "0.75", "--masa-step", "0"],
    ["--method", "pix2pix-zero", "--image", "PHOTO", "--regularise", "--reg-steps", "1"],
])
def test_methods_write_their_images(capsys, tmp_path, sd_ckpt, photo, args):
    args = [str(photo) if a == "PHOTO" else a for a in args]
    rc, cap, out = run(capsys, tmp_path, sd_ckpt, SRC, TGT, *args)
    assert rc == 0, cap.err
    names = {p.name for p in out.iterdir()}
    assert {"0.png", "1.png", "strip.png"} <= names
    assert ("--maps" not in args) or {"maps-0.png", "maps-1.png"} <= names


def test_plug_and_play_from_an_empty_source_prompt(capsys, tmp_path, sd_ckpt, photo):
    rc, cap, out = run(capsys, tmp_path, sd_ckpt, "", "a blue square", "--method", "pnp",
                       "--image", str(photo), "--pnp-features", "0.5", "--pnp-attention", "0.25")
    assert rc == 0, cap.err
    assert {p.name for p in out.iterdir()} == {".minip2p-run", "0.png", "1.png", "strip.png"}
    with Image.open(out / "1.png") as im:
        assert im.size == (64, 64)


@pytest.mark.parametrize("args,needle", [
    (["--method", "pnp"], "--image"),
    (["--method", "masactrl", "--masa-step", "-1"], "--masa-step"),
    (["--method", "masactrl", "--masa-step", "4"], "--masa-step must be in [0, 4)"),
    (["--method", "masactrl", "--masa-layer", "16"], "this model has 16 transformer layers"),
    (["--method", "masactrl", "--masa-layer", "-2"], "--masa-layer"),
    (["--method", "masactrl", "--masa-mask", "cat", "lion"], "cat"),
    (["--method", "masactrl", "--masa-mask", "squirrel", "tiger"], "tiger"),
    (["--image", "PHOTO", "--strength", "0"], "--strength"),
    (["--image", "PHOTO", "--strength", "1.01"], "--strength"),
    (["--strength", "0.5"], "--image"),
    (["--masa-step", "2"], "--masa-step belongs to another method"),
    (["--method", "masactrl", "--pnp-features", "0.5"], "--pnp-features belongs"),
    (["--method", "pnp", "--image", "PHOTO", "--blend", "squirrel", "lion"], "--blend belongs"),
    (["--method", "masactrl", "--cross-replace", "0.5"], "--cross-replace belongs"),
    (["--method", "pnp", "--image", "PHOTO", "--pnp-attention", "1.5"], "--pnp-attention"),
    (["--method", "pnp", "--image", "PHOTO", "--strength", "0.5"], "--strength"),
    (["--method", "null-text", "--inversion-method", "ddim", "--image", "PHOTO"], "disagree"),
    (["--method", "pix2pix-zero", "--regularise"], "without --image"),
    (["--method", "pix2pix-zero", "--image", "PHOTO", "--lambda-ac", "5"], "add --regularise"),
    (["--method", "pix2pix-zero", "--image", "PHOTO", "--regularise", "--lambda-kl", "-1"],
     "--lambda-kl must be a finite number ≥ 0"),
    (["--image", "PHOTO", "--strength", "0.5", "--regularise"], "SDEdit"),
    (["--method", "pnp", "--image", "PHOTO", "--regularise"], "belongs to another method"),
])
def test_bad_method_input_is_one_line(capsys, tmp_path, sd_ckpt, photo, args, needle):
    args = [str(photo) if a == "PHOTO" else a for a in args]
    rc, cap, out = run(capsys, tmp_path, sd_ckpt, SRC, TGT, *args)
    lines = cap.err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and needle in lines[0], cap.err
    assert lines[0].startswith("minip2p: ") and not out.exists()

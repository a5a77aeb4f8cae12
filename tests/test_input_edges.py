"""Input at the edges, on the shipped toy model: prompts past the text encoder's window (a warning
naming the count, or an error with --strict-length), pictures too small or too far from the
output's aspect (one line, nothing written), MasaCtrl's layer range naming its default, and the
line said before a slow null-text inversion."""
import pytest
from PIL import Image, ImageDraw

from helpers import cli
from minip2p.errors import ParameterError
from minip2p.real import images

pytestmark = pytest.mark.usefixtures("one_thread")
LONG = " ".join(["red"] * 90)                          # 90 tokens: 15 past the 75 of the window
FAST = ["--steps", "2", "--quiet"]


def drawn(tmp_path, name, size):
    im = Image.new("RGB", size, (240, 240, 230))
    ImageDraw.Draw(im).ellipse((size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2), "red")
    im.save(tmp_path / name)
    return str(tmp_path / name)


def test_a_long_prompt_warns_once_with_the_count(capsys, tmp_path):
    rc, _, err = cli(capsys, "edit", LONG, LONG + " blue", *FAST, "--out-dir", tmp_path / "e")
    lines = err.strip().splitlines()
    assert rc == 0 and (tmp_path / "e" / "1.png").is_file()
    assert len(lines) == 2 and all(x.startswith("minip2p: warning: prompt ") for x in lines)
    assert "15 tokens too long; the last 15 were dropped" in lines[0]
    assert "16 tokens too long" in lines[1]


def test_strict_length_refuses_in_one_line_and_writes_nothing(capsys, tmp_path):
    for argv in (["generate", LONG, "--out", tmp_path / "g.png"],
                 ["edit", "a red circle", LONG, "--out-dir", tmp_path / "e"]):
        rc, _, err = cli(capsys, *argv, *FAST, "--strict-length")
        assert rc == 2 and err.count("\n") == 1, err
        assert "is 15 tokens too long: the text encoder reads at most 75" in err
        assert "warning" not in err and "--strict-length" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("size,words", [((1, 1), "1×1 pixels; a picture needs at least 16"),
                                        ((400, 40), "keep less than 1/4 of its width"),
                                        ((20, 200), "keep less than 1/4 of its height")])
def test_a_bad_picture_is_one_line_everywhere_and_writes_nothing(capsys, tmp_path, size, words):
    pic = drawn(tmp_path, "in.png", size)
    out = tmp_path / "out"
    out.mkdir()
    for argv, name in (
            (["invert", pic, "a red circle", "--out", out / "i.safetensors"], "IMAGE"),
            (["reconstruct", pic, "a red circle", "--out", out / "r.png"], "IMAGE"),
            (["edit", "a red circle", "a blue circle", "--image", pic, "--out-dir", out / "e"],
             "--image"),
            (["edit", "", "a blue circle", "--method", "pnp", "--image", pic, "--out-dir",
              out / "p"], "--image"),
            (["generate", "a red circle", "--image", pic, "--out", out / "g.png"], "--image"),
            (["instruct", pic, "make it blue", "--out", out / "x.png"], "IMAGE")):
        if argv[0] == "instruct" and size != (1, 1):
            continue                 # its size follows the picture's aspect; the toy can't run it
        rc, _, err = cli(capsys, *argv, *FAST)
        assert rc == 2 and err.count("\n") == 1 and words in err, (argv, err)
        assert err.startswith(f"minip2p: {name} is {size[0]}×{size[1]} pixels"), err
    assert list(out.iterdir()) == []


def test_the_picture_check_itself():
    images.check_picture(Image.new("RGB", (16, 64)), 64, 16)         # small but usable
    images.check_picture(Image.new("RGB", (256, 64)), 64, 64)        # a quarter of the width kept
    with pytest.raises(ParameterError, match=r"choose height and width closer") as e:
        images.fit(Image.new("RGB", (257, 64)), 64, 64)
    assert e.value.name == "image"
    with pytest.raises(ParameterError, match="leaves 15×64 pixels of a 64×64 image"):
        images.cut_margins(Image.new("RGB", (64, 64)), (0, 0, 49, 0))


def test_masactrl_layer_out_of_range_names_the_range_and_default(capsys, tmp_path):
    rc, _, err = cli(capsys, "edit", "a big red circle", "a small red circle", "--method",
                     "masactrl", "--masa-layer", "10", *FAST, "--out-dir", tmp_path / "m")
    assert rc == 2 and err.count("\n") == 1
    assert "--masa-layer must be in [0, 7)" in err and "this model's default, 3" in err
    assert not (tmp_path / "m").exists()


def test_a_null_text_inversion_is_said_first(capsys, tmp_path):
    pic = drawn(tmp_path, "in.png", (64, 64))
    for argv, flag in ((["edit", "a red circle", "a blue circle", "--image", pic, "--out-dir",
                         tmp_path / "e"], "--inversion-method"),
                       (["reconstruct", pic, "a red circle", "--out", tmp_path / "r.png"],
                        "--inversion-method")):
        rc, _, err = cli(capsys, *argv, *FAST, "--inner-steps", "1")
        assert rc == 0, err
        assert err.splitlines() == [f"minip2p: note: inverting with null-text (up to 1 optimisation "
                                    f"steps per denoising step: slow on a CPU; {flag} "
                                    f"direct is fast)"]
    rc, _, err = cli(capsys, "reconstruct", pic, "a red circle", "--method", "negative-prompt",
                     *FAST, "--out", tmp_path / "n.png")
    assert rc == 0 and err == ""

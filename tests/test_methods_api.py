"""The one method interface: `methods.run` runs every registered method on the toy model (the
InstructPix2Pix one on a tiny random InstructPix2Pix model), `methods.parameters` lists each
method's parameters with their defaults and help, and bad input is one line naming the
parameter -- never a command-line flag."""
import pytest
from PIL import Image

from minip2p import MinipError, load_model, methods

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(steps=3, seed=0)
PICTURE = Image.new("RGB", (64, 64), "white")
PICTURE.paste((220, 30, 30), (16, 16, 48, 48))                    # a red square on white

CASES = {
    "p2p": (["a big red square", "a big blue square"], {}),
    "masactrl": (["a big red square", "a big red circle"], {}),
    "pnp": (["", "a big blue square"], dict(image=PICTURE)),
    "sdedit": (["a big blue square"], dict(image=PICTURE, strength=0.7)),
    "attend-excite": (["a red square and a blue circle"], dict(words=["square", "circle"])),
    "pix2pix-zero": (["a big red square", "a big blue square"], dict(xa_guidance=0.05)),
    "self-guidance": (["a big red square"], dict(move={"square": (0.8, 0.5)})),
}


@pytest.fixture(scope="module")
def toy():
    return load_model()


def test_every_method_is_registered_with_its_parameters():
    assert methods.names() == ["p2p", "masactrl", "pnp", "sdedit", "attend-excite",
                               "pix2pix-zero", "self-guidance", "instruct", "asyrp", "diffuseit"]
    for name in methods.names():
        for p in methods.parameters(name):
            assert p.help and p.help == p.help.strip(), (name, p.name)
    p2p = {p.name: p.default for p in methods.parameters("p2p")}
    assert (p2p["cross_replace"], p2p["self_replace"], p2p["blend_threshold"]) == (0.8, 0.4, 0.3)
    assert {p.name: p.default for p in methods.parameters("pnp")}["features"] == 0.8


@pytest.mark.parametrize("name", list(CASES))
def test_run_every_method_on_the_toy_model(toy, name):
    prompts, kw = CASES[name]
    result = methods.run(toy, name, prompts, **FAST, **kw)
    n = 2 if name in ("self-guidance", "pix2pix-zero") else max(len(prompts), 1)
    assert len(result.images) == n and all(im.size == (64, 64) for im in result.images)
    assert len(result.labels) == len(result.images)
    if kw.get("image") is not None:
        assert len(result.inputs) == 1


def test_real_image_paths_of_an_edit(toy):
    for inversion in ("ddim", "negative-prompt", "null-text"):
        r = methods.run(toy, "p2p", ["a big red square", "a big blue square"], image=PICTURE,
                        inversion=inversion, inner_steps=2, **FAST)
        assert len(r.images) == 2 and r.extra["inversion"].method == inversion
    r = methods.run(toy, "masactrl", ["a big red square", "a big red circle"], image=PICTURE,
                    strength=1.0, **FAST)                                   # SDEdit under MasaCtrl
    assert len(r.images) == 2
    r = methods.run(toy, "p2p", ["a big red square", "a big blue square"], maps=True, **FAST)
    assert r.store is not None and r.maps is r.store


def test_instruct_through_the_registry(ip2p_ckpt):
    model = load_model(ip2p_ckpt[1])
    r = methods.run(model, "instruct", ["make it blue"], image=PICTURE, steps=2, height=32,
                    width=32)
    assert len(r.images) == 1 and r.images[0].size == (32, 32)


@pytest.mark.parametrize("name,prompts,kw,words", [
    ("nope", ["a"], {}, "unknown method 'nope'"),
    ("masactrl", ["a cat", "a dog"], dict(mode="refine"), "mode belongs to another method (p2p)"),
    ("p2p", ["a cat", "a dog"], dict(colour=1), "colour is not a parameter of p2p"),
    ("masactrl", ["a cat", "a dog"], dict(start_step=9, steps=5), "start_step must be in [0, 5)"),
    ("pnp", ["", "a dog"], dict(image=PICTURE, features=2), "features must be a fraction"),
    ("sdedit", ["a dog"], dict(image=PICTURE, strength=0), "strength must be in (0, 1]"),
    ("sdedit", ["a dog"], {}, "image is needed: sdedit edits a picture"),
    ("p2p", ["a cat", "a dog"], dict(blend=["cat"]), "blend needs one word per prompt"),
    ("attend-excite", ["a cat"], dict(words=["dog"]), "words 'dog': the word is not in"),
    ("self-guidance", ["a cat"], {}, "move or resize is needed"),
    ("p2p", ["a cat", "a dog"], dict(steps=0), "steps must be a positive integer"),
    ("p2p", ["a cat", "a dog"], dict(strength=0.5), "strength sets how far SDEdit"),
])
def test_bad_input_is_one_line_naming_the_parameter(name, prompts, kw, words):
    with pytest.raises(MinipError) as e:
        methods.prepare(name, prompts, **kw)
    msg = str(e.value)
    assert words in msg and "\n" not in msg and "--" not in msg, msg


def test_no_flag_names_in_errors_outside_the_cli():
    import re
    from pathlib import Path
    root = Path(methods.__file__).resolve().parent.parent
    hits = []
    for f in root.rglob("*.py"):
        if "cli" in f.relative_to(root).parts:
            continue
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if re.search(r"(raise|Error\(|warn\().*[\"' ]--[a-z]", line):
                hits.append(f"{f.relative_to(root)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)

"""Every input at its edges: property-based tests of the whole CLI.

For each command, hypothesis draws a command line from strategies for every option (numbers at and
beyond each boundary, NaN and inf, empty, huge and unicode strings, words present in and absent
from the prompts, paths that do not exist, are files instead of folders, or lie under a file),
runs the real CLI in-process (`minip2p.cli.main(argv)`) on the toy model at tiny sizes and 1-2
steps, and checks the promise of the CLI:

    success  exit status 0 and exactly the promised files added to the output folder;
    failure  exit status 2 and exactly one line `minip2p: …` on stderr (warnings, each
             `minip2p: warning: …`, may precede it) and nothing added anywhere --
             no output, no temporary file;
    never    a traceback (an exception escaping `main` fails the test).

Commands: generate, edit, attention, invert, reconstruct, guide, instruct (always a one-line
failure on the toy model, whose UNet has 4 input channels, not InstructPix2Pix's 8), pairs
(validation, and --samples 1 --steps 2 for success) and explore (argument and bind failures
only: its success path serves forever).

CI runs a fixed budget (MAX_EXAMPLES per command, a deadline per example); set
MINIP2P_HYPOTHESIS_EXAMPLES=2000 for a large run. Failing examples stay in hypothesis' database
(.hypothesis/ in the working folder, git-ignored) and are replayed first on the next run.

Read-only folders: the tests run as root here, where chmod does not stop writes, so an
unwritable output place is simulated by a path under a regular file (`file/sub`), which fails
for root too; tests/test_outputs.py covers a real read-only folder when not root.
"""
import contextlib
import io
import os
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from minip2p.cli import main

MAX_EXAMPLES = int(os.environ.get("MINIP2P_HYPOTHESIS_EXAMPLES", "12"))
# deadline: an example takes < 1 s alone, but up to 78 s was seen with the full suite beside it
SETTINGS = settings(max_examples=MAX_EXAMPLES, deadline=timedelta(seconds=120),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                    print_blob=True)

WORDS = ["red", "blue", "green", "circle", "square", "triangle", "big", "small"]


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: tiny models, one thread


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Inputs shared by every example (never written to): a photo, a non-image, an empty file,
    a folder, a file to put paths under, and a real inversion file."""
    d = tmp_path_factory.mktemp("assets")
    im = Image.new("RGB", (40, 30), (235, 235, 225))
    ImageDraw.Draw(im).ellipse((10, 5, 30, 25), fill=(200, 30, 30))
    im.save(d / "photo.png")
    (d / "notes.txt").write_text("not an image")
    (d / "empty.png").write_bytes(b"")
    (d / "folder").mkdir()
    (d / "afile").write_text("x")
    (d / "src.txt").write_text("a red circle\na red disc on a wall\n")
    (d / "tgt.txt").write_text("a blue circle\na blue disc on a wall\n")
    (d / "blank.txt").write_text("\n  \n")
    (d / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (d / "caps.jsonl").write_text('{"caption": "a red circle", "edit": "make it blue", '
                                  '"output": "a blue circle"}\n')
    (d / "caps-bad.jsonl").write_text('{"caption": "a red circle", "edit"\n')
    (d / "caps-list.jsonl").write_text('[1, 2]\n')
    (d / "caps-keys.jsonl").write_text('{"caption": "a red circle"}\n')
    (d / "caps-types.jsonl").write_text('{"caption": 1, "edit": null, "output": []}\n')
    (d / "caps-blank.jsonl").write_text("\n\n")
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["invert", str(d / "photo.png"), "a red circle", "--method", "ddim", "--steps",
                   "2", "--height", "32", "--width", "32", "--quiet",
                   "--out", str(d / "inv.safetensors")])
    assert rc == 0
    return d


# ---- strategies: the values each kind of option may take -----------------------------------

def ints(valid, invalid=("0", "-1", "", " ", "abc", "1.5", "nan", "inf", "1e3", "٣",
                         "9" * 40, "-" + "9" * 40)):
    """A count: a valid value (cheap ones only) or one beyond the boundary."""
    return st.sampled_from(list(valid) + list(invalid))


def floats(valid, invalid=("nan", "inf", "-inf", "", "abc", "1e400", "-1e400")):
    return st.one_of(st.sampled_from(list(valid) + list(invalid)),
                     st.floats(allow_nan=True, allow_infinity=True).map(repr))


texts = st.one_of(
    st.sampled_from(["", " ", "a red circle", "a blue square", "a big green triangle"]),
    st.lists(st.sampled_from(WORDS + ["a", "the", "zebra", "<cat-toy>"]), max_size=6).map(" ".join),
    st.text(max_size=30),                                          # unicode, control characters
    st.just("a red circle " * 40),                                 # past CLIP's 77 tokens
    st.just("x" * 3000))
words = st.one_of(st.sampled_from(WORDS + ["zebra", "", "a", "red circle"]), st.text(max_size=8))

SIZES = ints(["32", "32", "64", "4", "8", "36"], ["0", "-32", "30", "31", "3", "65536", "nan", "",
                                                  "1" + "0" * 30, "1e2"])
STEPS = ints(["1", "2", "2"], ["0", "-1", "1000", "5000", "nan", "", "2.0", "9" * 30])
SEEDS = ints(["0", "1", str(2 ** 64 - 1)], ["-1", str(2 ** 64), "nan", "", "1e3", "9" * 30])
GUIDANCE = floats(["7.5", "1", "0", "-2", "1e30"])
PATHS = ["@nowhere/x", "@afile", "@folder", "@afile/sub", "@notes.txt", "", "@empty.png"]


def model_options(out=None):
    """The options every command that runs the model shares (the model itself stays the toy)."""
    opts = {"--steps": STEPS, "--seed": SEEDS, "--guidance": GUIDANCE,
            "--height": SIZES, "--width": SIZES,
            "--dtype": st.sampled_from(["fp32", "bf16", "fp16", "fp64", ""]),
            "--device": st.sampled_from(["cpu", "cpu", "cuda", "meta", "mps", "", "cpu:0", "tpu",
                                         "cuda:x"]),
            "--model": st.sampled_from(PATHS + ["minip2p-tests/no-such-model", "..", "a/b/c"]),
            "--variant": st.sampled_from(["fp16", "", "../x", "v"]),
            "--revision": st.sampled_from(["main", ""]),
            "--embedding": st.sampled_from(PATHS),
            "--sampler": st.sampled_from(["ddim", "euler-a", "dpm++", "dpm++", "", "euler", "DDIM",
                                          "dpm"]),
            "--explicit": st.just(None), "--free-text-encoder": st.just(None)}
    if out:
        opts["--out"] = out
    return opts


def image_out(name):
    return st.sampled_from([f"@out/{name}", f"@out/{name}", "@out/x.gif", "@out/x",
                            "@out/missing/x.png", "@afile/x.png", "@folder", "@out/.png",
                            "@out/x.PNG", "@out/é ü.png"])


def command(name, positional, required, optional, always=("--steps", "--height", "--width"),
            quiet=True):
    """argv for `name`: positional strategies, the required options, then up to four of the
    optional ones (so that one bad value does not hide the next every time). The options
    named in `always` default to cheap values when not drawn (1 step, 32 px)."""
    @st.composite
    def build(draw):
        argv = [name] + [draw(s) for s in positional]
        chosen = draw(st.fixed_dictionaries(required))
        for key in draw(st.lists(st.sampled_from(sorted(optional)), max_size=4, unique=True)):
            chosen[key] = draw(optional[key])                 # a few options at a time
        cheap = {"--steps": "1", "--height": "32", "--width": "32", "--inner-steps": "1"}
        for key in always:
            chosen.setdefault(key, cheap[key])
        for key, value in chosen.items():
            if value is None:
                argv.append(key)
            elif isinstance(value, list):
                argv += [key, *value]
            else:
                argv += [key, value]
        return argv + ["--quiet"] * quiet
    return build()


GENERATE = command("generate", [texts], {"--out": image_out("a.png")}, {
    **model_options(), "--image": st.sampled_from(["@photo.png"] + PATHS),
    "--strength": floats(["0.5", "1", "0.01"], ["0", "-0.5", "1.01", "nan", ""]),
    "--excite": st.lists(words, min_size=1, max_size=2),
    "--excite-steps": ints(["0", "1", "25"], ["-1", "", "x", "1.5", "nan"])})

P2P = {"--mode": st.sampled_from(["auto", "replace", "refine", "swap", ""]),
       "--cross-replace": st.sampled_from(["0.8", "0.2,0.8", "default=1.0,blue=0.4", "1.5", "-0.1",
                                           "nan", "abc", "", "0.8,0.2", "red=0.5", "1,2,3"]),
       "--self-replace": st.sampled_from(["0.4", "0,0.5", "2", "nan", "", "red=0.2"]),
       "--blend": st.lists(words, min_size=1, max_size=3),
       "--blend-threshold": floats(["0.3", "0", "1"], ["nan", "inf", ""]),
       "--reweight": st.lists(st.one_of(st.builds("{}={}".format, words, st.sampled_from(
           ["2", "-0.5", "nan", "inf", "", "x"])), words), min_size=1, max_size=2)}
MASA = {"--masa-step": ints(["0", "1"], ["-1", "2", "5", "", "nan"]),
        "--masa-layer": ints(["0", "3", "6"], ["-1", "7", "100", "", "x"]),
        "--masa-mask": st.lists(words, min_size=2, max_size=2)}
PNP = {"--pnp-features": floats(["0.8", "0", "1"], ["-0.1", "1.5", "nan"]),
       "--pnp-attention": floats(["0.5", "0", "1"], ["-0.1", "1.5", "nan"]),
       "--negative-prompt": texts}
REAL = {"--image": st.sampled_from(["@photo.png", "@photo.png"] + PATHS),
        "--inversion": st.sampled_from(["@inv.safetensors", "@photo.png"] + PATHS),
        "--inversion-method": st.sampled_from(["ddim", "negative-prompt", "null-text", "x"]),
        "--inner-steps": ints(["1"], ["0", "-1", "", "x"]),
        "--crop": st.sampled_from(["0,0,0,0", "1,2,3,4", "0,0,39,0", "100,0,0,0", "1,2,3",
                                   "-1,0,0,0", "", "a,b,c,d"])}

P2PZ = {"--xa-guidance": floats(["0.1", "0", "1e3"], ["nan", "inf", ""]),
        "--source-sentences": st.sampled_from(["@src.txt", "@src.txt", "@blank.txt", "@latin1.txt"]
                                              + PATHS),
        "--target-sentences": st.sampled_from(["@tgt.txt", "@tgt.txt", "@blank.txt"] + PATHS)}

EDIT = command("edit", [texts, texts], {"--out-dir": st.sampled_from(
    ["@out/edit", "@out/edit", "@out", "@afile", "@out/missing/edit", "@afile/sub", "@notes.txt"])}, {
    **model_options(), **P2P, **MASA, **PNP, **REAL,
    "--method": st.sampled_from(["p2p", "p2p", "masactrl", "pnp", "pix2pix-zero", "pix2pix-zero",
                                 "ddim", "null-text", "x"]),
    "--strength": floats(["0.5", "1"], ["0", "1.01", "nan"]),
    "--maps": st.just(None), "--map-res": ints(["8", "4", "16"], ["0", "3", "100", "-1"]),
    "--over-time": words, **P2PZ})

ATTENTION = command("attention", [texts], {"--out": image_out("maps.png")}, {
    **model_options(), "--self": st.just(None),
    "--components": ints(["1", "3", "6"], ["0", "-1", "1000", "x"]),
    "--map-res": ints(["8", "4", "16"], ["0", "3", "100", "-1"]), "--over-time": words})
ATTENTION = st.one_of(ATTENTION, st.tuples(ATTENTION, st.sampled_from(["@out/t.gif", "@out/t.png"]))
                      .map(lambda t: [*t[0][:-1], "--over-time", "red", "--out", t[1], "--quiet"]))

INVERT = command("invert", [st.sampled_from(["@photo.png", "@photo.png"] + PATHS), texts], {
    "--out": st.sampled_from(["@out/inv.safetensors", "@out/inv.safetensors", "@out/inv.png",
                              "@out/missing/i.safetensors", "@afile/i.safetensors", "@folder"])},
    {**model_options(), "--method": st.sampled_from(["ddim", "negative-prompt", "null-text", "x"]),
     "--inner-steps": ints(["1"], ["0", "-1", "x"]),
     "--crop": REAL["--crop"]}, always=("--steps", "--height", "--width", "--inner-steps"))

RECONSTRUCT = command("reconstruct", [], {"--out": image_out("rec.png")}, {
    **model_options(), "--inversion": REAL["--inversion"],
    "--method": st.sampled_from(["ddim", "negative-prompt", "x"]),
    "--crop": REAL["--crop"]}, always=("--steps", "--height", "--width"))
RECONSTRUCT = st.one_of(RECONSTRUCT, st.tuples(
    st.sampled_from(["@photo.png"] + PATHS), texts, RECONSTRUCT).map(
    lambda t: [t[2][0], t[0], t[1], *t[2][1:]]))


GUIDE = command("guide", [texts], {"--out-dir": st.sampled_from(
    ["@out/guide", "@out/guide", "@out", "@afile", "@out/missing/g", "@afile/sub"])}, {
    **model_options(),
    "--move": st.lists(st.one_of(st.sampled_from(
        ["circle=0.8,0.5", "red=0,1", "circle=1.5,0.5", "circle=nan,0", "circle=0.5",
         "=0.5,0.5", "circle=", "circle", "zebra=0.5,0.5", "circle=a,b", "circle=0.2,0.3,0.4"]),
        st.builds("{}={},{}".format, words, *[st.sampled_from(["0.5", "-1", "inf", ""])] * 2)),
        min_size=1, max_size=2),
    "--resize": st.lists(st.one_of(st.sampled_from(
        ["circle=0.5", "red=2", "circle=0", "circle=-1", "circle=inf", "circle=1,2", "=1"]),
        st.builds("{}={}".format, words, st.sampled_from(["0.5", "2", "0", "nan"]))),
        min_size=1, max_size=2),
    "--keep-appearance": st.just(None),
    "--guidance-weight": floats(["3", "0", "1e3"], ["nan", "inf", ""]),
    "--guide-steps": floats(["0.5", "0", "1"], ["-0.1", "1.5", "nan"]),
    "--guide-iterations": ints(["1", "2"], ["0", "51", "x"])})
# the moves need a word of the prompt: half the examples guide "circle" of "a red circle"
GUIDE = st.one_of(GUIDE, st.tuples(GUIDE, st.sampled_from(["--move", "--resize"])).map(
    lambda t: [t[0][0], "a red circle", *t[0][2:-1],
               t[1], "circle=0.7,0.5" if t[1] == "--move" else "circle=0.8", "--quiet"]))

# the toy UNet has 4 input channels, InstructPix2Pix's 8: every run fails in one line
INSTRUCT = command("instruct", [st.sampled_from(["@photo.png", "@photo.png"] + PATHS), texts],
                   {"--out": image_out("i.png")}, {
    **model_options(), "--image-guidance": floats(["1.5", "0", "-1"], ["nan", "inf", ""]),
    "--maps": st.just(None)})

PAIRS_OPTIONS = {
    "--samples": ints(["1"], ["0", "-1", "", "x", "1.5"]),
    "--keep": ints(["1", "4"], ["0", "-1", "x"]),
    "--min-p2p": floats(["0.1", "0", "1"], ["-0.1", "1.1", "nan", "inf"]),
    "--max-p2p": floats(["0.9", "1", "0"], ["-0.1", "1.1", "nan", "inf"]),
    "--clip-threshold": floats(["0.2", "0", "1"], ["nan", "inf", ""]),
    "--clip-dir-threshold": floats(["0.2", "-1"], ["nan", "inf", ""]),
    "--clip-img-threshold": floats(["0.7", "1"], ["nan", "inf", ""]),
    "--partition": st.sampled_from(["0/1", "0/2", "1/2", "2/2", "-1/2", "0/0", "1/0", "a/b", "1",
                                    "", "0/1/2", "1 / 2", "0/" + "9" * 30]),
    "--check": st.sampled_from(["@out", "@out/nothing", "@afile", ""]),
    "--clip": st.sampled_from(PATHS),
    **{k: v for k, v in model_options().items() if k not in ("--free-text-encoder",)},
    "--steps": ints(["2", "2"], ["1", "0", "-1", "", "x"])}
PAIRS = command("pairs", [st.sampled_from(
    ["@caps.jsonl", "@caps.jsonl", "@caps-bad.jsonl", "@caps-list.jsonl", "@caps-keys.jsonl",
     "@caps-types.jsonl", "@caps-blank.jsonl", "@latin1.txt", "@photo.png"] + PATHS)],
    {"--out": st.sampled_from(["@out/pairs", "@out/pairs", "@out", "@afile", "@out/missing/p",
                               "@afile/sub"]),
     "--samples": st.just("1"), "--steps": st.just("2")},
    PAIRS_OPTIONS, always=("--height", "--width"))

# the success path serves forever: every example has a bad --port or a --host it cannot bind
BAD_PORTS = ["-1", "", "x", "1.5", "65536", "70000", "9" * 30, "nan"]
BAD_HOSTS = ["999.1.1.1", "10.255.255.1", "a b", "::1", "0.0.0.0.0"]   # no name to look up
EXPLORE_OPTIONS = {k: v for k, v in model_options().items()
                   if k in ("--model", "--revision", "--variant", "--embedding", "--dtype",
                            "--device")}
EXPLORE_OPTIONS.update({"--out-dir": st.sampled_from(["@out/x", "@afile", "@afile/sub", ""]),
                        "--verbose": st.just(None)})
EXPLORE = st.one_of(
    command("explore", [], {"--port": st.sampled_from(BAD_PORTS)}, EXPLORE_OPTIONS, always=(),
            quiet=False),
    command("explore", [], {"--host": st.sampled_from(BAD_HOSTS),
                            "--port": st.sampled_from(["0"] + BAD_PORTS)},
            EXPLORE_OPTIONS, always=(), quiet=False))


# ---- the property --------------------------------------------------------------------------

def files(root: Path) -> set:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def last(argv, flag):
    """The value of `flag` (argparse keeps the last one given)."""
    return argv[len(argv) - argv[::-1].index(flag)]


def promised(argv, out: Path) -> str:
    """The file a successful generate/attention/invert/reconstruct must write (relative)."""
    return Path(last(argv, "--out")).relative_to(out).as_posix()


def check_cli(argv, assets: Path):
    with tempfile.TemporaryDirectory(prefix="minip2p-prop-") as tmp:
        out = Path(tmp)
        argv = [a.replace("@out", str(out)).replace("@", str(assets) + "/")
                if a.startswith("@") else a for a in argv]
        before_out, before_assets = files(out), files(assets)
        err, std = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
            rc = main(argv)                                # an escaping exception fails the test
        event(f"exit status {rc}")
        err, std = err.getvalue(), std.getvalue()
        lines = err.splitlines()
        added = files(out) - before_out
        assert files(assets) == before_assets, "an input folder was written to"
        assert not [p for p in added if Path(p).name.startswith(".minip2p-")], "temporary file"
        assert "Traceback" not in err
        if argv[0] == "pairs" and rc in (0, 1):
            assert all(line.startswith("minip2p: warning: ") for line in lines), err
            if "--check" in argv:                    # a report on stdout, nothing written
                assert std.count("\n") == 1 and " items: " in std and added == set(), (std, added)
            else:
                assert rc == 0
                folder = Path(last(argv, "--out"))
                assert list(folder.glob("run-*.json")) and added and all(
                    (out / p).resolve().is_relative_to(folder.resolve()) or out / p == folder
                    for p in added), added
        elif rc == 0:
            assert argv[0] not in ("instruct", "explore"), "succeeded where it cannot"
            assert all(line.startswith("minip2p: warning: ") for line in lines), err
            written = {Path(p).relative_to(out).as_posix()
                       for p in std.strip().removeprefix("wrote ").split(" (")[0].split(", ")}
            assert written and added == written | {str(Path(p).parent) for p in written
                                                   if Path(p).parent != Path(".")}, (added, std)
            if argv[0] in ("edit", "guide"):
                assert {"0.png", "1.png", "strip.png"} <= {Path(p).name for p in written}
            else:
                assert written == {promised(argv, out)}
        else:
            errors = [line for line in lines if not line.startswith("minip2p: warning: ")]
            assert rc == 2, (rc, err)
            assert len(errors) == 1 and errors[0].startswith("minip2p: "), err
            assert errors[0] == lines[-1] and std == "", (err, std)
            assert added == set(), f"left behind: {sorted(added)}"
        return rc


@SETTINGS
@given(argv=GENERATE)
def test_generate(assets, argv):
    check_cli(argv, assets)


@SETTINGS
@given(argv=EDIT)
def test_edit(assets, argv):
    check_cli(argv, assets)


@SETTINGS
@given(argv=ATTENTION)
def test_attention(assets, argv):
    check_cli(argv, assets)


@SETTINGS
@given(argv=INVERT)
def test_invert(assets, argv):
    check_cli(argv, assets)


@SETTINGS
@given(argv=RECONSTRUCT)
def test_reconstruct(assets, argv):
    check_cli(argv, assets)


FEW = settings(SETTINGS, max_examples=max(2, MAX_EXAMPLES // 2))   # the slower commands


@SETTINGS
@given(argv=GUIDE)
def test_guide(assets, argv):
    check_cli(argv, assets)


@SETTINGS
@given(argv=INSTRUCT)
def test_instruct(assets, argv):
    assert check_cli(argv, assets) == 2


@FEW
@given(argv=PAIRS)
def test_pairs(assets, argv):
    check_cli(argv, assets)


@SETTINGS
@given(argv=EXPLORE)
def test_explore(assets, argv):
    assert check_cli(argv, assets) == 2

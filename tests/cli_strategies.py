"""The hypothesis strategies of tests/test_properties.py: for each command, the values each kind of
option may take -- valid ones (cheap only) and ones just beyond each boundary -- and whole
command lines built from them. `@name` stands for a file of the test's assets folder, `@out`
for the example's output folder."""
from hypothesis import strategies as st

WORDS = ["red", "blue", "green", "circle", "square", "triangle", "big", "small"]



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
PATHS = ["@nowhere/x", "@afile", "@folder", "@afile/sub", "@notes.txt", "", "@empty.png",
         "@tiny.png", "@thin.png"]                     # 1×1 and 200×10 pictures: refused


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
            "--lora": st.sampled_from(PATHS + ["@afile:0.5", "@nowhere/x:nan", "@afile:x", ":",
                                               "@afile:", "@afile:inf"]),
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
    "--resize-steps": floats(["0.5", "1"], ["0", "1.5", "nan"]),
    "--heal": floats(["0", "0.2"], ["1", "-0.1", "nan"]),
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
    "--out": st.sampled_from(["@out/pairs", "@out/other"]),          # --out-dir's old name
    "--clip": st.sampled_from(PATHS),
    **{k: v for k, v in model_options().items() if k not in ("--free-text-encoder",)},
    "--steps": ints(["2", "2"], ["1", "0", "-1", "", "x"])}
PAIRS = command("pairs", [st.sampled_from(
    ["@caps.jsonl", "@caps.jsonl", "@caps-bad.jsonl", "@caps-list.jsonl", "@caps-keys.jsonl",
     "@caps-types.jsonl", "@caps-blank.jsonl", "@latin1.txt", "@photo.png"] + PATHS)],
    {"--out-dir": st.sampled_from(["@out/pairs", "@out/pairs", "@out", "@afile",
                                   "@out/missing/p", "@afile/sub"]),
     "--samples": st.just("1"), "--steps": st.just("2")},
    PAIRS_OPTIONS, always=("--height", "--width"))

# the success path serves forever: every example has a bad --port or a --host it cannot bind
BAD_PORTS = ["-1", "", "x", "1.5", "65536", "70000", "9" * 30, "nan"]
BAD_HOSTS = ["999.1.1.1", "10.255.255.1", "a b", "::1", "0.0.0.0.0"]   # no name to look up
EXPLORE_OPTIONS = {k: v for k, v in model_options().items()
                   if k in ("--model", "--revision", "--variant", "--embedding", "--lora",
                            "--dtype", "--device")}
EXPLORE_OPTIONS.update({"--out-dir": st.sampled_from(["@out/x", "@afile", "@afile/sub", ""]),
                        "--verbose": st.just(None)})
EXPLORE = st.one_of(
    command("explore", [], {"--port": st.sampled_from(BAD_PORTS)}, EXPLORE_OPTIONS, always=(),
            quiet=False),
    command("explore", [], {"--host": st.sampled_from(BAD_HOSTS),
                            "--port": st.sampled_from(["0"] + BAD_PORTS)},
            EXPLORE_OPTIONS, always=(), quiet=False))


# ---- tests/test_properties_outputs.py: flags spelled out, --out vs --out-dir, reruns ----------

def long_flags() -> dict:
    """{command: its --flags}, from the CLI's own parser."""
    import argparse

    from minip2p.cli import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {name: sorted(o for o in p._option_string_actions if o.startswith("--"))
            for name, p in sub.choices.items()}


FLAGS = long_flags()
LINES = {"generate": GENERATE, "edit": EDIT, "attention": ATTENTION, "invert": INVERT,
         "reconstruct": RECONSTRUCT, "guide": GUIDE, "instruct": INSTRUCT, "pairs": PAIRS,
         "explore": EXPLORE}


@st.composite
def abbreviated(draw):
    """A command line of any command with an abbreviation of one of its flags added (--out of
    --out-dir, --step of --steps, --guid of --guidance …): never a flag itself."""
    name = draw(st.sampled_from(sorted(LINES)))
    flags = FLAGS[name]
    short = draw(st.sampled_from(sorted({f[:n] for f in flags for n in range(3, len(f))}
                                        - set(flags))))
    return [*draw(LINES[name]), short, draw(st.sampled_from(["1", "x", "@out/x.png", "@out/d"]))]


# a command line that would succeed but for its output place, and that place
CHEAP = ["--steps", "1", "--height", "32", "--width", "32", "--quiet"]
MISMATCHED = st.one_of(
    st.tuples(st.sampled_from([["generate", "a red circle"], ["attention", "a red circle"],
                               ["reconstruct", "@photo.png", "a red circle"],
                               ["instruct", "@photo.png", "make it blue"],
                               ["invert", "@photo.png", "a red circle", "--method", "ddim"]]),
              st.just("--out"), st.sampled_from(["@folder", "@out", "@out/x", "@out/x.txt",
                                                  "@out/png", "@out/x.png.d/"])),
    st.tuples(st.sampled_from([["edit", "a red circle", "a blue circle"],
                               ["guide", "a red circle", "--move", "circle=0.7,0.5"],
                               ["pairs", "@caps.jsonl", "--samples", "1"]]),
              st.just("--out-dir"), st.sampled_from(["@afile", "@photo.png", "@notes.txt"])),
).map(lambda t: [*t[0], t[1], t[2], *CHEAP] + ["--steps", "2"] * (t[0][0] == "pairs"))

# two runs into one folder: edits of 2-3 prompts, with or without maps, and guides
RERUN = st.one_of(
    st.tuples(st.just(["edit", "a red circle"]),
              st.lists(st.sampled_from(["a blue circle", "a red square", "a big red circle"]),
                       min_size=1, max_size=2),
              st.sampled_from([[], ["--maps"], ["--method", "masactrl"], ["--seed", "3"]]))
    .map(lambda t: [*t[0], *t[1], *t[2]]),
    st.sampled_from([["guide", "a red circle", "--move", "circle=0.7,0.5"],
                     ["guide", "a red circle", "--resize", "circle=0.8"],
                     ["edit", "a red circle", "a blue circle", "--mode", "swap"]]),   # refused
).map(lambda argv: [*argv, "--out-dir", "@out/run", *CHEAP])

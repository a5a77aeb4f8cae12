"""The README's commands still run: every `minip2p …` line of README.md's code blocks, and the
commands the earlier, longer README documented (kept below as it wrote them), each run in-process
through `minip2p.cli.main` in a fresh folder on the shipped toy model, a few steps, with drawn
pictures for photo.jpg/photo.png. Each must exit 0 and write the files it is documented to write.
InstructPix2Pix and the CLIP judge of `pairs` run on the tiny random checkpoints of conftest.py;
`explore` is started on a free port and stopped."""
import json
import re
import shlex
import threading
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from minip2p.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent
STEPS = "2"                     # every command, few steps (a --masa-step S gets S + 1)

# The earlier README's command lines; optional "[...]" parts written out. A tuple runs in order
# in one folder (an inversion file, then the edit that reads it).
OLD = [
    'minip2p edit "a big red circle on the left" "a big blue circle on the left" --maps --map-res 16',
    'minip2p generate "a photo of a cat riding a bicycle" --model PATH_OR_REPO --seed 0 --out cat.png',
    'minip2p edit "a painting of a squirrel eating a burger" "a painting of a lion eating a burger" '
    '--model PATH_OR_REPO --cross-replace 0.8 --self-replace 0.4 --blend squirrel lion --out-dir edit/',
    'minip2p edit "a cat" "a smiling cat" --mode refine --reweight smiling=2 --maps',
    'minip2p attention "a squirrel eating a burger" --out maps.png',
    'minip2p attention "a squirrel eating a burger" --self',
    ('minip2p invert photo.jpg "a red circle" --method null-text --out inv.safetensors',
     'minip2p edit --inversion inv.safetensors "a blue circle" --blend circle circle'),
    'minip2p reconstruct photo.jpg "a red circle" --method negative-prompt',
    # L = 10 is SD 1.x's (16 transformer layers); the toy model has 7: argv() gives it the tiny
    # SD-1.x-structured model
    'minip2p edit "a big red circle" "a small red circle" --method masactrl --masa-step 4 --masa-layer 10',
    'minip2p edit "a red circle" "a red square" --method masactrl --masa-mask circle square --image photo.png',
    'minip2p edit "" "a blue square on a white background" --method pnp --image photo.png '
    '--pnp-features 0.8 --pnp-attention 0.5',
    'minip2p generate "a blue circle" --image photo.png --strength 0.6',
    'minip2p edit "a red circle" "a blue circle" --image photo.png --strength 0.6',
    'minip2p instruct photo.png "make it blue" --model timbrooks/instruct-pix2pix '
    '--image-guidance 1.5 --guidance 7.5 --steps 100 --out edited.png --maps',
    'minip2p edit "a red circle" "a blue circle" --sampler euler-a',
    'minip2p edit "a red circle" "a blue circle" --sampler dpm++ --steps 20',
    ('minip2p pairs captions.jsonl --out data --samples 100 --keep 4 --clip openai/clip-vit-large-patch14',
     'minip2p pairs captions.jsonl --check data'),
    # torchrun --nnodes M --nproc-per-node G -m minip2p pairs …: several processes; tests/test_pairs.py
    'minip2p pairs captions.jsonl --out data --partition 3/8',
    'minip2p explore',
    'minip2p attention "a big red circle on the left" --over-time circle --map-res 16 --out circle.gif',
    'minip2p edit "a big red circle on the left" "a big blue circle on the left" --maps --over-time circle',
    'minip2p generate "a red circle and a blue square" --excite circle square --excite-steps 25',
    'minip2p guide "a red circle" --move circle=0.8,0.5 --resize circle=1.5 --keep-appearance '
    '--guidance-weight 0.25 --guide-steps 1.0 --guide-iterations N',
    'minip2p edit "a red circle" "a blue circle" --method pix2pix-zero --xa-guidance 0.1 '
    '--source-sentences F --target-sentences F --image P --regularise',
    'minip2p invert photo.jpg "a red circle" --method ddim --regularise --reg-steps 5 '
    '--lambda-ac 20 --lambda-kl 20',
    'python -m minip2p pairs bench4.jsonl --out b1 --samples 2 --keep 2 --steps 10 --quiet',
]


def readme_commands():
    """Lines starting with `minip2p ` inside README.md's ``` blocks (continuations joined)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    found = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()
            if line.startswith("minip2p "):
                found.append(line)
    return found


def argv(line, env):
    """The command as main() takes it: placeholders replaced, few steps, no progress bar."""
    words = shlex.split(line)
    words = words[3:] if words[:3] == ["python", "-m", "minip2p"] else words[1:]
    out, i = [], 0
    while i < len(words):
        w = words[i]
        if w == "--model" and words[i + 1] == "timbrooks/instruct-pix2pix":
            out += ["--model", env["ip2p"]]
        elif w == "--model":
            pass                                                   # the toy model, the default
        elif w == "--clip" and words[0] == "pairs":
            out += ["--clip", env["clip"], "--clip-threshold", "-1", "--clip-dir-threshold", "-1",
                    "--clip-img-threshold", "-1"]
        elif w in ("--steps", "--samples", "--guide-iterations"):
            out += [w, {"--steps": STEPS, "--samples": "2", "--guide-iterations": "1"}[w]]
        else:
            w = str(ROOT / w) if w.startswith("weights/") else w       # shipped files
            out.append({"F": "sentences.txt", "P": "photo.png", "sq.png": "photo.png"}.get(w, w))
            i += 1
            continue
        i += 2
    if "--masa-layer" in out and int(out[out.index("--masa-layer") + 1]) >= 7:
        out += ["--model", env["sd"]]
    if words[0] == "explore":
        return out + ["--port", "0"]
    if words[0] == "eval-edit":                                   # no model, no steps
        return out
    steps = str(int(out[out.index("--masa-step") + 1]) + 1) if "--masa-step" in out else STEPS
    if "--steps" in out:
        out[out.index("--steps") + 1] = steps
    return out + [x for x in ("--quiet",) if x not in out] + \
        (["--steps", steps] if "--steps" not in out else [])


def expected(a):
    """The files a command is documented to write (relative to its folder)."""
    def opt(flag, default):
        return a[a.index(flag) + 1] if flag in a else default
    cmd = a[0]
    if cmd == "edit" or cmd == "guide":
        d = Path(opt("--out-dir", cmd))
        files = [d / "0.png", d / "1.png", d / "strip.png"]
        files += [d / "maps-0.png", d / "maps-1.png"] if "--maps" in a else []
        return files + ([d / "over-time.gif"] if "--over-time" in a else [])
    if cmd == "instruct":
        out = Path(opt("--out", "instruct.png"))
        return [out] + ([out.with_name(out.stem + "-maps.png")] if "--maps" in a else [])
    if cmd in ("learn-word", "learn-instruction"):
        return [Path(opt("--out", ""))]
    if cmd == "pairs":
        return [] if "--check" in a or "--partition" in a else [Path(opt("--out-dir", opt("--out", ""))) / "0000000" / "metadata.jsonl"]
    default = {"generate": "minip2p.png", "attention": "maps.png", "invert": "inversion.safetensors",
               "reconstruct": "reconstruction.png"}.get(cmd)
    return [Path(opt("--out", default))] if default else []


def prepare(folder, ip2p_ckpt, clip_ckpt, sd_ckpt):
    """The inputs the commands name, drawn or written into `folder`."""
    im = Image.new("RGB", (64, 64), (240, 240, 230))
    ImageDraw.Draw(im).ellipse((12, 12, 48, 48), fill=(200, 30, 30))
    for name in ("photo.jpg", "photo.png", "before.png"):
        im.save(folder / name)
    (folder / "pictures").mkdir()
    for i in range(2):                                       # learn-word's pictures
        im.rotate(90 * i).save(folder / "pictures" / f"{i}.png")
    after = Image.new("RGB", (64, 64), (240, 240, 230))
    ImageDraw.Draw(after).ellipse((12, 12, 48, 48), fill=(30, 30, 200))
    after.save(folder / "after.png")
    for sub in ("sources", "edits", "masks"):                 # eval-edit's folders
        (folder / sub).mkdir()
        (im if sub != "masks" else Image.new("L", (64, 64), 255)).save(folder / sub / "a.png")
    (folder / "prompts.json").write_text('{"a": "a blue circle"}')
    from safetensors.torch import save_file
    from minip2p.data.lpips import LPIPS
    save_file({k: v.contiguous() for k, v in LPIPS().state_dict().items()}, folder / "lpips.safetensors")
    (folder / "sentences.txt").write_text("a red circle\na red circle on a white background\n")
    lines = [{"caption": "a red circle", "edit": "make it blue", "output": "a blue circle"},
             {"caption": "a green square", "edit": "make it a triangle", "output": "a green triangle"}]
    for name in ("captions.jsonl", "bench4.jsonl"):
        (folder / name).write_text("".join(json.dumps(x) + "\n" for x in lines))
    return {"ip2p": str(ip2p_ckpt[1]), "clip": str(clip_ckpt[1]), "sd": str(sd_ckpt[1]),
            "dir": folder}


@pytest.fixture()
def env(tmp_path, monkeypatch, ip2p_ckpt, clip_ckpt, sd_ckpt):
    """A fresh folder per command (group)."""
    monkeypatch.chdir(tmp_path)
    return prepare(tmp_path, ip2p_ckpt, clip_ckpt, sd_ckpt)


@pytest.fixture(scope="module")
def readme_env(tmp_path_factory, ip2p_ckpt, clip_ckpt, sd_ckpt):
    """One folder for all of README.md's commands, run in the README's order (an inversion file
    written by one command is read by a later one)."""
    return prepare(tmp_path_factory.mktemp("readme"), ip2p_ckpt, clip_ckpt, sd_ckpt)


def run(a, monkeypatch):
    if a[0] != "explore":
        return main(a)
    import minip2p.explore.server as server_module
    make = server_module.make_server

    def make_and_stop(*args, **kwargs):                # serve, then stop at once from a thread
        server, explorer = make(*args, **kwargs)
        threading.Timer(0.5, server.shutdown).start()
        return server, explorer
    monkeypatch.setattr(server_module, "make_server", make_and_stop)
    return main(a)


def check(lines, env, monkeypatch, capsys):
    for line in (lines if isinstance(lines, tuple) else (lines,)):
        a = argv(line, env)
        assert run(a, monkeypatch) == 0, (line, a, capsys.readouterr().err)
        missing = [str(p) for p in expected(a) if not p.is_file()]
        assert not missing, (line, missing)


@pytest.mark.slow
@pytest.mark.parametrize("lines", OLD, ids=range(len(OLD)))
def test_the_earlier_readme_commands_run(lines, env, monkeypatch, capsys):
    check(lines, env, monkeypatch, capsys)


def test_the_readme_has_commands_for_every_subcommand():
    assert {shlex.split(x)[1] for x in readme_commands()} >= {
        "generate", "edit", "guide", "instruct", "invert", "reconstruct", "explore"}


@pytest.mark.parametrize("line", readme_commands())
def test_the_readme_commands_run(line, readme_env, monkeypatch, capsys):
    monkeypatch.chdir(readme_env["dir"])
    check(line, readme_env, monkeypatch, capsys)

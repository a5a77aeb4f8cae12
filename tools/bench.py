#!/usr/bin/env python
"""Speed and peak memory of minip2p against diffusers, on the same random weights in one run.

Rows (each in a fresh child process, so that its peak memory is its own; every child loads the
model from the same safetensors folder, then runs end to end: text encoding, every denoising
step, decoding both images):
    minip2p-plain            generate() on the two prompts, fast path (SDPA everywhere)
    minip2p-edit             P2P Replace, cross 0.8 / self 0.4, fast path (SDPA wherever no
                             map is read; no AttentionStore unless --store, as `minip2p edit`)
    minip2p-edit-explicit    the same edit without the fast path (every map formed)
    diffusers-plain          StableDiffusionPipeline on the two prompts (SDPA, diffusers' default)
    community-edit           diffusers' community Prompt2PromptPipeline (examples/community/
                             pipeline_prompt2prompt.py, given with --community PATH), same
                             edit: n_cross_replace=0.8, n_self_replace=0.4 (the keys it reads)
    openvino-default, -f32   generate() with its three networks in OpenVINO, default precision
                             and f32 (tools/bench_openvino.py); skipped, with a note, where
                             openvino is not installed (never a minip2p dependency)
Same prompts, initial noise, DDIM (SD 1.x settings), steps, guidance 7.5 and size everywhere.
Reported: load time; run time (wall and CPU) split into setup + text encoding / denoising /
decoding (the UNet's forward hooks mark the steps); s/step and it/s of the denoising loop; peak
memory: the process's peak RSS (getrusage ru_maxrss, load included) on CPU,
torch.cuda.max_memory_allocated on CUDA; max|Δ| of the images against the diffusers row that
should give the same images (community-edit against diffusers-plain: how much the edit changed).
With no --model the full SD 1.5-shape random checkpoint is built as tools/parity.py does.
On the CPU the rows are also set against the compute floor (tools/floor.py): the run's FLOPs ÷
the best GEMM/conv rate measured at the start of the same run with the same threads.
On a shared CPU, --threads 1 gives steadier figures than torch's default. Usage:
  python -m tools.bench --community DIR/pipeline_prompt2prompt.py --size 512 --steps 3 --threads 1
  python -m tools.bench --community DIR/pipeline_prompt2prompt.py --tiny        # seconds
"""
from __future__ import annotations

import argparse, gc, importlib.util, json, os, subprocess, sys, tempfile, time, warnings  # noqa
from pathlib import Path

import torch

from tools.harness import Clock, cpu_model, peak_gib, peak_rss_gib, reset_peak, set_threads
from tools.harness import table as markdown
from tools.bench_openvino import missing as openvino_missing

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local
warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a painting of a squirrel eating a burger", "a painting of a lion eating a burger"]
ROWS = ["minip2p-plain", "minip2p-edit", "minip2p-edit-explicit", "diffusers-plain",
        "community-edit", "openvino-default", "openvino-f32"]
REF = {"minip2p-plain": "diffusers-plain", "minip2p-edit": "community-edit",  # same images
       "minip2p-edit-explicit": "community-edit", "community-edit": "diffusers-plain",  # edited
       "openvino-default": "minip2p-plain", "openvino-f32": "minip2p-plain"}
TAG = "BENCH-RESULT "
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def load_file(path: Path, name: str):
    """Import a .py file by its path (tests/ is not a package; the community pipeline is a file)."""
    spec = importlib.util.spec_from_file_location(name, str(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def build_model(folder: Path, tiny: bool, seed: int):
    """Random-weight SD 1.x checkpoint folder: full SD 1.5 shape (tools/parity.py) or tiny."""
    t0 = time.perf_counter()
    if tiny:
        t = load_file(ROOT / "tests" / "helpers.py", "bench_tiny")
        t.save_pipeline(t.build_pipeline("sd", seed), folder)
    else:
        from tools import parity
        parity.build_and_save(parity.SD15, folder, seed)
    gc.collect()
    print(f"saved random {'tiny' if tiny else 'SD 1.5-shape'} checkpoint to {folder} "
          f"in {time.perf_counter() - t0:.1f} s", flush=True)


# ---------------------------------------------------------------- one row, in a child process

def noise(args, channels=4) -> torch.Tensor:
    """z_T, drawn as minip2p.pipeline.initial_noise draws it, repeated for both prompts."""
    s = args.size // 8
    gen = torch.Generator("cpu").manual_seed(args.seed)
    return torch.randn((1, channels, s, s), generator=gen).expand(len(PROMPTS), -1, -1, -1)


def row_minip2p(name, args, device):
    from minip2p.methods import p2p
    from minip2p.load import load_model
    from minip2p.pipeline import generate
    t0 = time.perf_counter()
    m = load_model(args.model, dtype=args.dtype, device=device,
                   fast=name != "minip2p-edit-explicit")
    load = time.perf_counter() - t0
    control = None
    if name != "minip2p-plain":
        control, _ = p2p.build(m.tokenizer, PROMPTS, args.steps, "replace", cross_replace=0.8,
                               self_replace=0.4, store=args.store)
    clock = Clock(m.unet, device)
    images, t = clock.run(lambda: generate(
        m, PROMPTS, args.seed, args.steps, args.guidance, args.size, args.size, control=control,
        progress=False,
        free_text_encoder=args.free_text_encoder, sampler=args.sampler))
    return images, load, t


def row_diffusers(name, args, device):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline
    dtype = DTYPES[args.dtype]
    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(
        str(args.model), torch_dtype=dtype, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    sched = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False,  # SD 1.x DDIM
                                      set_alpha_to_one=False, steps_offset=1)
    if args.sampler == "dpm++":     # its defaults, as minip2p/dpm_solver.py (tests/test_dpm_solver.py)
        sched = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config,
                                                        timestep_spacing="linspace")
    if name == "community-edit":
        P2P = load_file(Path(args.community), "community_prompt2prompt").Prompt2PromptPipeline
        pipe = P2P(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                   unet=pipe.unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                   requires_safety_checker=False)
    else:
        pipe.scheduler = sched
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    load = time.perf_counter() - t0
    kw = dict(height=args.size, width=args.size, num_inference_steps=args.steps,
              guidance_scale=args.guidance, latents=noise(args).to(device, dtype), output_type="pt")
    if name == "community-edit":  # its keys are n_cross_replace / n_self_replace (see __call__)
        kw["cross_attention_kwargs"] = dict(edit_type="replace", n_cross_replace=0.8,
                                            n_self_replace=0.4)
    clock = Clock(pipe.unet, device)
    images, t = clock.run(lambda: pipe(PROMPTS, **kw).images)
    return images, load, t


def run_row(args) -> dict:
    device = torch.device(args.device)
    set_threads(args.threads)
    reset_peak(device)
    from tools.bench_openvino import whole_run
    fn = row_minip2p if args.row.startswith("minip2p") else \
        (lambda *a: whole_run(args.row, args, PROMPTS)) if "openvino" in args.row else row_diffusers
    images, load, t = fn(args.row, args, device)
    torch.save(images.float().cpu(), args.save)
    rss, peak = peak_rss_gib(), peak_gib(device)
    return dict(row=args.row, load=load, **t, s_step=t["denoise"] / args.steps, peak=peak,
                rss=rss, threads=torch.get_num_threads())


# ---------------------------------------------------------------- the parent: rows and table

def child(name: str, args, folder: Path, save: Path) -> dict | None:
    cmd = [sys.executable, "-m", "tools.bench", "--row", name, "--model", str(folder),
           "--save", str(save), "--device", args.device, "--dtype", args.dtype,
           "--steps", str(args.steps), "--size", str(args.size), "--seed", str(args.seed),
           "--guidance", str(args.guidance), "--threads", str(args.threads),
           "--sampler", args.sampler] + \
          (["--store"] if args.store else []) + \
          (["--free-text-encoder"] if args.free_text_encoder else []) + \
          (["--community", args.community] if args.community else []) + \
          (["--openvino-ir", str(args.openvino_ir)] if args.openvino_ir else [])
    print(f"--- {name}", flush=True)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # stderr goes straight through
    lines = [line for line in p.stdout.splitlines() if line.startswith(TAG)]
    if p.returncode or not lines:
        print(f"    {name} failed (exit status {p.returncode})", flush=True)
        return None
    res = json.loads(lines[-1][len(TAG):])
    print(f"    run {res['run']:.1f} s, {res['s_step']:.2f} s/step, peak {res['peak']:.2f} GiB",
          flush=True)
    return res


def table(res: dict, args, mem: str, build_s: float | None):
    geo = "tiny" if args.tiny else "SD 1.5 shape" if args.model is None else str(args.model)
    threads = "/".join(sorted({str(r["threads"]) for r in res.values()}))
    built = f"; checkpoint built in {build_s:.0f} s" if build_s else ""
    where = f"{args.device}: {cpu_model()}" if args.device == "cpu" else args.device
    print(f"\n{geo}, random weights, {args.dtype} on {where} ({threads} threads), "
          f"{args.size}x{args.size}, {args.steps} {args.sampler} steps, guidance {args.guidance}, "
          f"seed {args.seed}, 2 prompts{built}"
          f"{'; minip2p rows free the text encoder after encoding' if args.free_text_encoder else ''}")
    print()
    markdown(["row", "load s", "run s", "CPU s", "text s", "denoise s", "s/step", "it/s",
              "decode s", f"peak {mem} GiB", "max abs diff vs"],
             [[name, f"{r['load']:.1f}", f"{r['run']:.1f}", f"{r['cpu']:.1f}", f"{r['text']:.2f}",
               f"{r['denoise']:.1f}", f"{r['s_step']:.2f}", f"{1 / r['s_step']:.3f}",
               f"{r['decode']:.1f}", f"{r['peak']:.2f}",
               f"{r['diff']:.1e} ({REF[name]})" if "diff" in r else ""]
              for name, r in res.items()], "l" + "r" * 9 + "l")


def ratios(res: dict):
    def ratio(label, a, b, key, target=None):
        if a in res and b in res:
            v = res[a][key] / res[b][key]
            note = "" if target is None else \
                f"target {target[0]}: {'met' if target[1](v) else 'NOT met'}"
            print(f"| {label} | {v:.2f} | {note} |")

    print("\n| ratio | value | |\n|---|---:|---|")
    ge2, lt1 = ("≥ 2", lambda v: v >= 2), ("< 1", lambda v: v < 1)
    ce, me, mp = "community-edit", "minip2p-edit", "minip2p-plain"
    ratio("time: community-edit / minip2p-edit (run)", ce, me, "run", ge2)
    ratio("time: community-edit / minip2p-edit (s/step)", ce, me, "s_step")
    ratio("CPU time: community-edit / minip2p-edit (run)", ce, me, "cpu")
    ratio("time: minip2p-edit / minip2p-plain (edit overhead)", me, mp, "run")
    ratio("time: minip2p-edit-explicit / minip2p-edit", "minip2p-edit-explicit", me, "run")
    ratio("time: diffusers-plain / minip2p-plain", "diffusers-plain", mp, "run")
    ratio("peak mem: minip2p-edit / community-edit", me, ce, "peak", lt1)
    ratio("peak mem: minip2p-edit / diffusers-plain", me, "diffusers-plain", "peak", lt1)
    ratio("peak mem: minip2p-plain / diffusers-plain", mp, "diffusers-plain", "peak", lt1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, help="diffusers-layout folder (default: build the SD "
                    "1.5-shape random checkpoint into a temporary folder)")
    ap.add_argument("--community", help="path to diffusers' examples/community/"
                    "pipeline_prompt2prompt.py (without it the community-edit row is skipped)")
    ap.add_argument("--tiny", action="store_true",
                    help="tiny geometry (tests/helpers.py): a quick check")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--steps", type=int, help="DDIM steps (default 50 on CUDA, 3 on CPU)")
    ap.add_argument("--size", type=int, help="image side in pixels (default 512, tiny 64)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {ROWS}")
    ap.add_argument("--store", action="store_true", help="minip2p edits also keep an "
                    "AttentionStore (the community pipeline always stores its maps)")
    ap.add_argument("--free-text-encoder", action="store_true", help="minip2p rows free the "
                    "text encoder once the prompts are encoded (generate(free_text_encoder=True))")
    ap.add_argument("--keep", type=Path, help="build the random checkpoint into this folder and "
                    "keep it (pass it as --model next time)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in each row "
                    "(default: torch's own choice; 1 is steadier on a shared machine)")
    ap.add_argument("--seed", type=int, default=8888)
    ap.add_argument("--sampler", choices=["ddim", "dpm++"], default="ddim",
                    help="every row's sampler (dpm++: DPM-Solver++ 2M, diffusers' "
                         "DPMSolverMultistepScheduler in its rows)")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--openvino-ir", type=Path, help="the OpenVINO rows' converted networks: "
                    "made here if absent, kept (default: a temporary folder of the run)")
    ap.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row, print one JSON line
    ap.add_argument("--save", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.row:
        print(TAG + json.dumps(run_row(args)), flush=True)
        return 0
    args.steps = args.steps or (50 if args.device.startswith("cuda") else 3)
    args.size = args.size or (64 if args.tiny else 512)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if unknown := [r for r in rows if r not in ROWS]:
        ap.error(f"unknown rows {unknown}; choose from {ROWS}")
    if "community-edit" in rows and not args.community:
        print("note: no --community PATH given: skipping the community-edit row", flush=True)
        rows.remove("community-edit")
    ov_rows = [r for r in rows if r.startswith("openvino")]
    if ov_rows and openvino_missing():
        print(f"note: {openvino_missing()}", flush=True)
        rows = [r for r in rows if r not in ov_rows]
    mem = "GPU allocated" if args.device.startswith("cuda") else "RSS"
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        build_s = None
        folder = args.model or args.keep or Path(tmp) / "model"
        if args.model is None:
            t0 = time.perf_counter()
            build_model(folder, args.tiny, args.seed)
            build_s = time.perf_counter() - t0
        if any(r.startswith("openvino") for r in rows):                 # once, in its own process
            args.openvino_ir = args.openvino_ir or Path(tmp) / "openvino"
            for part in ("text_encoder", "vae_decoder", "unet"):      # one process each
                subprocess.run([sys.executable, "-m", "tools.bench_openvino", str(folder),
                                str(args.openvino_ir), str(args.size), part], check=True)
        floor = None
        if args.device == "cpu":
            from tools.floor import best_rate
            set_threads(args.threads)
            floor = best_rate()                       # this machine, these threads, this run
        res = {}
        for name in rows:
            r = child(name, args, folder, Path(tmp) / f"{name}.pt")
            if r is not None:
                res[name] = r
        for name, ref in REF.items():
            if name in res and ref in res:
                a, b = torch.load(Path(tmp) / f"{name}.pt"), torch.load(Path(tmp) / f"{ref}.pt")
                res[name]["diff"] = (a - b).abs().max().item()
        table(res, args, mem, build_s)
        if floor and res:
            from tools.floor import bench_table
            bench_table(res, args, folder, *floor)
    ratios(res)
    return 0 if len(res) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())

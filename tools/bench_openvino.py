"""OpenVINO rows for the speed tables: the anchor a CPU user would pick, on the same weights.

A benchmark row only: minip2p never imports OpenVINO (it is not a dependency; install it with
`pip install --no-deps openvino openvino-telemetry` to get these rows). Our UNet, on its plain
reference modules in fp32, is traced by `openvino.convert_model` (the timestep is a constant of
the trace: every row runs at one t), then compiled twice for the CPU: with OpenVINO's default
precision (on a CPU with bf16 it picks bf16) and with INFERENCE_PRECISION_HINT f32. The input
shapes stay dynamic, so batches 2 and 4 run on one compiled model each.

Whole runs (tools/bench.py's openvino-default and openvino-f32 rows): `convert` traces a
folder's text encoder, UNet (the timestep an input) and VAE decoder once, in a process of its
own (`python -m tools.bench_openvino FOLDER OUT SIZE [PART]`), and saves them as OpenVINO IR (weights
stored in fp16, `save_model`'s default). A row reads and compiles the three for the CPU at one
precision and runs minip2p's `generate` -- tokenizer, the same noise, DDIM, guidance, decoding
-- with every network call going to OpenVINO: no torch module in that process holds weights.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

PARTS = ("text_encoder", "unet", "vae_decoder")


class _Call(torch.nn.Module):
    """unet(z, t, c) as a module of three tensors (what the tracer takes)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, z, t, c):
        return self.unet(z, t, c)


def compiled(unet, z, t: int, context, threads: int) -> dict:
    """{label: compiled model} for OpenVINO's default precision and f32; `unet` must be on the
    plain (reference) modules, in fp32."""
    import openvino as ov
    t0 = time.perf_counter()
    with torch.no_grad():
        model = ov.convert_model(_Call(unet).eval(),
                                 example_input=(z.float(), torch.tensor(t), context.float()))
    core = ov.Core()
    out = {}
    for label, cfg in (("default", {}), ("f32", {"INFERENCE_PRECISION_HINT": "f32"})):
        cm = core.compile_model(model, "CPU", {**cfg, "INFERENCE_NUM_THREADS": threads})
        out[f"{label} ({cm.get_property('INFERENCE_PRECISION_HINT').get_type_name()})"] = cm
    print(f"OpenVINO {ov.__version__}: converted and compiled in {time.perf_counter() - t0:.1f} s")
    return out


def rows(unet, batches: dict, t: int, threads: int) -> dict:
    """{row name: run} for each compiled precision and batch; `batches`: {b: (z, context)}."""
    z, c = batches[max(batches)]
    got = {}
    for label, cm in compiled(unet, z, t, c, threads).items():
        for b, (zb, cb) in batches.items():
            inputs = [zb.float().numpy(), torch.tensor(t).numpy(), cb.float().numpy()]
            got[f"OpenVINO {label}, plain, batch {b}"] = \
                (lambda cm=cm, inputs=inputs: torch.from_numpy(cm(inputs)[0]))
    return got


def missing() -> str | None:
    """A one-line note when OpenVINO is not installed, else None."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return ("openvino is not installed (pip install --no-deps openvino openvino-telemetry): "
                "skipping the OpenVINO rows")
    return None


class _Decode(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        return self.vae.decode(z)


def convert(folder, out: Path, size: int, parts=PARTS) -> Path:
    """The networks `parts` of `folder` as out/PART.xml (+ .bin), each unless already there, each
    loaded alone (fp32, plain reference modules), traced, freed, then saved."""
    import gc
    import openvino as ov
    from minip2p.load import load_component
    from minip2p.model.tokenizer import ClipTokenizer
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for part in [p for p in parts if not (out / f"{p}.xml").is_file()]:
        net = load_component(Path(folder), "vae" if part == "vae_decoder" else part)
        if part == "text_encoder":
            module, example = net, (ClipTokenizer.from_dir(Path(folder) / "tokenizer")(["a"]),)
        elif part == "unet":
            s = size // 8
            module, example = _Call(net), (torch.randn(2, net.cfg.in_channels, s, s),
                                           torch.tensor(981),
                                           torch.randn(2, 77, net.cfg.cross_attention_dim))
        else:
            s = size // net.cfg.downscale
            module, example = _Decode(net), (torch.randn(1, net.cfg.latent_channels, s, s),)
        with torch.no_grad():
            model = ov.convert_model(module.eval(), example_input=example)
        del module, net
        gc.collect()
        ov.save_model(model, str(out / f"{part}.xml"))
        del model
        gc.collect()
    return out


class _Net(torch.nn.Module):
    """A compiled OpenVINO network called like the torch module it stands for."""

    def __init__(self, compiled, cfg=None):
        super().__init__()
        self.compiled, self.cfg = compiled, cfg

    def forward(self, *inputs, **_):                 # a plain run: no controller, no residuals
        arrays = [torch.as_tensor(x).float().numpy() if torch.as_tensor(x).is_floating_point()
                  else torch.as_tensor(x).numpy() for x in inputs]
        return torch.from_numpy(self.compiled(arrays)[0])

    def decode(self, z):
        return self(z)


def whole_run(name: str, args, prompts):
    """(images, load seconds, the Clock's times) of `generate` with the networks in OpenVINO at
    its default precision ("openvino-default") or f32."""
    import openvino as ov
    from minip2p.model.config import SchedulerConfig, UNetConfig, VAEConfig, read_json
    from minip2p.model.tokenizer import ClipTokenizer
    from minip2p.pipeline import generate
    from minip2p.samplers.ddim import DDIM
    from tools.harness import Clock
    folder, ir = Path(args.model), Path(args.openvino_ir)
    t0 = time.perf_counter()
    cfg = {"INFERENCE_PRECISION_HINT": "f32"} if name.endswith("f32") else {}
    if args.threads:
        cfg["INFERENCE_NUM_THREADS"] = args.threads
    core = ov.Core()
    nets = {p: core.compile_model(str(ir / f"{p}.xml"), "CPU", cfg) for p in PARTS}
    model = SimpleNamespace(
        tokenizer=ClipTokenizer.from_dir(folder / "tokenizer"), name=name,
        text_encoder=_Net(nets["text_encoder"]),
        unet=_Net(nets["unet"], UNetConfig.from_dict(read_json(folder / "unet/config.json"))),
        vae=_Net(nets["vae_decoder"], VAEConfig.from_dict(read_json(folder / "vae/config.json"))),
        scheduler=DDIM(SchedulerConfig.from_dict(
            read_json(folder / "scheduler/scheduler_config.json"))),
        dtype=torch.float32, device=torch.device("cpu"), fast=False, decode_tile=0,
        free_unet=False, conditioning=None)
    load = time.perf_counter() - t0
    clock = Clock(model.unet, torch.device("cpu"))
    images, t = clock.run(lambda: generate(model, prompts, args.seed, args.steps, args.guidance,
                                           args.size, args.size, progress=False,
                                           sampler=args.sampler))
    return images, load, t


if __name__ == "__main__":          # FOLDER OUT SIZE [PART]: convert, in a process of its own
    convert(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4:] or PARTS)

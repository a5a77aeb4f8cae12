"""OpenVINO rows for the speed tables: the anchor a CPU user would pick, on the same weights.

A benchmark row only: minip2p never imports OpenVINO (it is not a dependency; install it with
`pip install --no-deps openvino openvino-telemetry` to get these rows). Our UNet, on its plain
reference modules in fp32, is traced by `openvino.convert_model` (the timestep is a constant of
the trace: every row runs at one t), then compiled twice for the CPU: with OpenVINO's default
precision (on a CPU with bf16 it picks bf16) and with INFERENCE_PRECISION_HINT f32. The input
shapes stay dynamic, so batches 2 and 4 run on one compiled model each.
"""
from __future__ import annotations

import time

import torch


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

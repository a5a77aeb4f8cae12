"""The project's tools: benchmarks, evaluations, the toy model's data and training. Not part of
the minip2p package; each runs from the repository root as a module, `python -m tools.NAME --help`.

Benchmarks (they share tools/harness.py: threads, interleaved timing, peak memory, tables):
    bench          minip2p against diffusers end to end: time, peak memory, max|Δ|, the floor
    bench_unet     one denoising step's UNet call, with and without each method's controller
    bench_decode   the VAE decode alone, in each memory layout and in diffusers
    bench_kernels  the fast path's kernel candidates side by side at SD 1.5's shapes
    time_edit      one Prompt-to-Prompt edit under each sampler
    floor          (a module) the compute floor: FLOPs ÷ the best GEMM / conv rate measured now
    parity         minip2p against diffusers / transformers at the full SD 1.5 shape
Evaluations on the toy model (weights/toy):
    eval_toy       fidelity to the caption and Prompt-to-Prompt edits
    eval_methods   MasaCtrl beside P2P Replace, and plug-and-play
    eval_guidance  guidance through attention: success rates, size fit, cost
    eval_inversion reconstruction PSNR and time of each inversion method
The toy model:
    toydata        (a module) its domain: shapes on backgrounds, captions, the analyser
    train_toy      train it
And gpu_check.sh: the prepared GPU check (parity, then bench), `bash tools/gpu_check.sh`.
"""

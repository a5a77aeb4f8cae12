#!/usr/bin/env bash
# The prepared GPU check, one command for a lent GPU (a few minutes):
#   1. builds the SD 1.5-shape random checkpoint on that machine and checks parity with diffusers
#      in fp16 (python -m tools.parity: text encoder, UNet, VAE, a 10-step generation);
#   2. the benchmark rows in fp16, 50 DDIM steps, 512², two prompts (python -m tools.bench):
#      minip2p plain, minip2p edit (P2P Replace), diffusers plain -- the targets are an edit
#      <= 0.8 s, edit / minip2p plain <= 1.15, edit peak memory <= diffusers plain;
#   3. the same edit with DPM-Solver++ at 20 steps, when that sampler is there (--sampler dpm++).
# Every table goes to $OUT (the device tool's folder) or ./gpu_check_out: machine.txt, parity.txt,
# bench.txt, bench_dpm.txt. diffusers is not installed on the GPU machine: put its wheel in .whl/
# (tools/README.md, "GPU") and carry .whl; it is installed into /tmp/site first.
#   bash tools/gpu_check.sh            on the GPU
#   bash tools/gpu_check.sh --smoke    the same steps on the CPU with the tiny geometry (a test)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ "${1:-}" = "--smoke" ]; then
    DEV=(--device cpu --dtype fp32); TINY=(--tiny); SIZE=64; STEPS=3; DPM_STEPS=2
else
    DEV=(--device cuda --dtype fp16); TINY=(); SIZE=512; STEPS=50; DPM_STEPS=20
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'error: no CUDA GPU here; run with --smoke on a CPU')"
fi
"$PY" -c "import diffusers" 2>/dev/null || { echo "error: diffusers is missing; put its wheel in .whl/ and carry .whl" >&2; exit 2; }
MODEL="$(mktemp -d)/sd15"
{
    date -u
    "$PY" - <<'EOF'
import platform, torch, diffusers
print("python", platform.python_version(), "torch", torch.__version__, "diffusers", diffusers.__version__)
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
EOF
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv || true
} 2>&1 | tee "$OUT/machine.txt"
set +e
"$PY" -m tools.parity "${DEV[@]}" "${TINY[@]}" --size "$SIZE" --steps 10 --keep "$MODEL" 2>&1 | tee "$OUT/parity.txt"
parity=${PIPESTATUS[0]}
"$PY" -m tools.bench "${DEV[@]}" --model "$MODEL" --size "$SIZE" --steps "$STEPS" \
    --rows minip2p-plain,minip2p-edit,diffusers-plain 2>&1 | tee "$OUT/bench.txt"
bench=${PIPESTATUS[0]}
dpm=0
if "$PY" -m tools.bench --help 2>/dev/null | grep -q -- "--sampler"; then
    "$PY" -m tools.bench "${DEV[@]}" --model "$MODEL" --size "$SIZE" --steps "$DPM_STEPS" \
        --sampler dpm++ --rows minip2p-plain,minip2p-edit,diffusers-plain 2>&1 | tee "$OUT/bench_dpm.txt"
    dpm=${PIPESTATUS[0]}
fi
rm -rf "$(dirname "$MODEL")"
echo "parity exit $parity, bench exit $bench, dpm++ bench exit $dpm; tables in $OUT"
[ "$parity" = 0 ] && [ "$bench" = 0 ] && [ "$dpm" = 0 ]

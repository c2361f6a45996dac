#!/usr/bin/env bash
# The GPU worker path end to end, in one command: ONNX Runtime's CUDA provider (onnxruntime-gpu, no
# TensorFlow) behind `crackq run` (private Redis + a local GPU worker), on 2,000 images; prints img/s per
# precision and the GPU's utilisation (nvidia-smi sampled in the background). Under 5 minutes.
#
#   bash benchmarks/gpu_check.sh [IMAGE_FOLDER]
#
# IMAGE_FOLDER: real images to classify (the first N found); default: N generated 227 px JPEG patches
# (from ../shared/data/concrete when it is there, else synthetic).
#
# Environment (all optional):
#   N=2000                 images
#   PRECISIONS="fp32 fp16" precisions measured on a GPU (CPU fallback: fp32 only)
#   USE_CURRENT_PYTHON=1   use $PYTHON as it is (no venv, no installs) -- what the tests do
#   PYTHON=python3         interpreter (for the venv, or used as is)
#   VENV=/tmp/crackq-gpu-venv   where the venv is made
#   BATCH=128              CRACKQ_BATCH_SIZE of the GPU worker (CPU fallback: 8, the CPU default)
#   OUT=/tmp/crackq-gpu-check   work folder (images, results, logs)
#
# Without an NVIDIA GPU (no working nvidia-smi) it runs the same path with --device gpu, which falls back to
# the CPU provider, and says so. Every step that fails says what failed and where its log is.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
N="${N:-2000}"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-/tmp/crackq-gpu-venv}"
OUT="${OUT:-/tmp/crackq-gpu-check}"
START=$(date +%s)
mkdir -p "$OUT"

say() { printf '[gpu_check %3ds] %s\n' "$(( $(date +%s) - START ))" "$*"; }
fail() { say "FAILED: $*"; exit 1; }

# ---- 1. the GPU --------------------------------------------------------------------------------------
GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >"$OUT/gpus.txt" 2>&1 && grep -q GPU "$OUT/gpus.txt"; then
    GPU=1
    say "GPU(s): $(tr '\n' ';' < "$OUT/gpus.txt")"
    nvidia-smi --query-gpu=driver_version,memory.total --format=csv,noheader | sed 's/^/             driver, memory: /'
else
    say "no NVIDIA GPU found (nvidia-smi missing or failing): running the CPU FALLBACK path (--device gpu on CPU)"
fi
if [ "$GPU" = 1 ]; then PRECISIONS="${PRECISIONS:-fp32 fp16}"; BATCH="${BATCH:-128}"
else PRECISIONS="fp32"; BATCH="${BATCH:-8}"; fi

# ---- 2. Python with crackq and (on a GPU) onnxruntime-gpu -------------------------------------------
if [ "${USE_CURRENT_PYTHON:-0}" = 1 ]; then
    PY="$PYTHON"
    say "using $PY as it is (USE_CURRENT_PYTHON=1)"
else
    say "creating $VENV and installing crackq (pip install -e .) from PyPI ..."
    "$PYTHON" -m venv "$VENV" >"$OUT/venv.log" 2>&1 || fail "python -m venv (see $OUT/venv.log)"
    PY="$VENV/bin/python"
    "$PY" -m pip install -q --upgrade pip >>"$OUT/pip.log" 2>&1
    "$PY" -m pip install -q -e "$REPO" >>"$OUT/pip.log" 2>&1 \
        || fail "pip install -e . (no PyPI access? see $OUT/pip.log: $(tail -1 "$OUT/pip.log"))"
    if [ "$GPU" = 1 ]; then
        say "replacing onnxruntime by onnxruntime-gpu (+ CUDA/cuDNN wheels, onnx for fp16) ..."
        "$PY" -m pip uninstall -q -y onnxruntime >>"$OUT/pip.log" 2>&1
        "$PY" -m pip install -q "onnxruntime-gpu[cuda,cudnn]" onnx >>"$OUT/pip.log" 2>&1 \
            || "$PY" -m pip install -q onnxruntime-gpu onnx >>"$OUT/pip.log" 2>&1 \
            || fail "pip install onnxruntime-gpu (see $OUT/pip.log: $(tail -1 "$OUT/pip.log"))"
    fi
fi
cd "$REPO" || fail "cd $REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'EOF' || fail "importing onnxruntime (see the error above)"
import onnxruntime as ort
print(f"             onnxruntime {ort.__version__}, providers {ort.get_available_providers()}")
EOF

# ---- 3. the images -----------------------------------------------------------------------------------
if [ $# -ge 1 ]; then
    SRC="$1"
    [ -d "$SRC" ] || fail "$SRC is not a folder"
    IMAGES="$OUT/images"; rm -rf "$IMAGES"; mkdir -p "$IMAGES"
    find "$SRC" -type f \( -iname '*.jpg' -o -iname '*.jpeg' -o -iname '*.png' \) | sort | head -n "$N" \
        | while read -r f; do ln -s "$(readlink -f "$f")" "$IMAGES/$(echo "$f" | md5sum | cut -c1-12)_$(basename "$f")"; done
    say "images: $(ls "$IMAGES" | wc -l) from $SRC"
else
    IMAGES="$OUT/images-$N"
    if [ ! -d "$IMAGES" ] || [ "$(ls "$IMAGES" | wc -l)" -lt "$N" ]; then
        rm -rf "$IMAGES"; mkdir -p "$IMAGES"
        "$PY" - "$IMAGES" "$N" "$REPO/../shared/data/concrete" <<'EOF' || fail "generating images"
import os, sys
import numpy as np
from PIL import Image
out, n, concrete = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rng = np.random.default_rng(0)
real = [os.path.join(concrete, c, f) for c in ("Negative", "Positive") if os.path.isdir(os.path.join(concrete, c))
        for f in sorted(os.listdir(os.path.join(concrete, c)))[:n // 2 + 1]]
for i in range(n):
    if real:  # a real patch, flipped/rotated so no two files are identical
        img = Image.open(real[i % len(real)]).convert("RGB").rotate(90 * (i // len(real) % 4))
    else:  # a concrete-grey texture with a dark line on every other image
        arr = np.clip(rng.normal(150, 25, (227, 227, 3)), 0, 255).astype(np.uint8)
        if i % 2:
            arr[:, 100 + i % 20:104 + i % 20] //= 3
        img = Image.fromarray(arr)
    img.save(os.path.join(out, f"img_{i:05d}.jpg"), quality=90)
print(f"             generated {n} images ({'real patches' if real else 'synthetic'}) in {out}")
EOF
    fi
fi

# ---- 4. probe: what the worker will run on ------------------------------------------------------------
for p in $PRECISIONS; do
    CRACKQ_DEVICE=gpu CRACKQ_BACKEND=onnx CRACKQ_PRECISION="$p" CRACKQ_BATCH_SIZE="$BATCH" "$PY" - <<'EOF' \
        || fail "loading the model with CRACKQ_PRECISION=$p (see the error above)"
import time
import numpy as np
from shared.config import Settings
from shared.inference import load_classifier
s = Settings.load()
c = load_classifier(s)
x = np.random.default_rng(0).integers(0, 256, (4 * s.batch_size, c.info.input_size, c.info.input_size, 3), np.uint8)
c.predict(x)
t = time.perf_counter(); c.predict(x); dt = time.perf_counter() - t
print(f"             probe {s.precision}: serves {c.served.describe()}; model only {len(x) / dt:.0f} img/s "
      f"(batch {s.batch_size})")
EOF
done

# ---- 5. crackq run end to end, GPU utilisation sampled ---------------------------------------------------
SMI_PID=""
RESULTS=()
for p in $PRECISIONS; do
    if [ "$GPU" = 1 ]; then
        nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 200 \
            >"$OUT/util-$p.csv" 2>/dev/null &
        SMI_PID=$!
    fi
    say "crackq run $IMAGES (--device gpu worker, onnx, $p, batch $BATCH) ..."
    CRACKQ_REDIS_URL="" CRACKQ_DEVICE=gpu CRACKQ_BACKEND=onnx CRACKQ_PRECISION="$p" CRACKQ_BATCH_SIZE="$BATCH" \
        CRACKQ_DECODE_THREADS="${DECODE_THREADS:-$(nproc)}" \
        timeout 240 "$PY" -m producer.cli run "$IMAGES" --out "$OUT/results-$p.csv" >"$OUT/run-$p.log" 2>&1
    rc=$?
    if [ -n "$SMI_PID" ]; then kill "$SMI_PID" 2>/dev/null; wait "$SMI_PID" 2>/dev/null; SMI_PID=""; fi
    [ $rc -eq 0 ] || fail "crackq run ($p) exited $rc (see $OUT/run-$p.log: $(tail -2 "$OUT/run-$p.log" | tr '\n' ' '))"
    line=$(grep -Eo '[0-9]+ image\(s\) in [0-9.]+s' "$OUT/run-$p.log" | tail -1)
    [ -n "$line" ] || fail "no timing in $OUT/run-$p.log"
    n=$(echo "$line" | awk '{print $1}'); secs=$(echo "$line" | awk '{print $4}' | tr -d s)
    rate=$(awk -v n="$n" -v s="$secs" 'BEGIN { printf "%.1f", n / s }')
    errors=$(awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) if ($i == "error") c = i; next } c && $c != "" { e++ } END { print e + 0 }' "$OUT/results-$p.csv")
    util="n/a (no GPU)"
    if [ "$GPU" = 1 ] && [ -s "$OUT/util-$p.csv" ]; then
        util=$(awk -F', *' '{ s += $1; if ($1 > m) m = $1; if ($2 > mem) mem = $2; k++ } END {
            printf "mean %.0f %%, max %.0f %%, peak memory %d MiB (%d samples)", s / k, m, mem, k }' "$OUT/util-$p.csv")
    fi
    RESULTS+=("$p: $rate img/s end to end ($n images in ${secs}s, $errors error records); GPU utilisation $util")
done

# ---- 6. summary ----------------------------------------------------------------------------------------
echo
if [ "$GPU" = 1 ]; then echo "crackq GPU check (ONNX Runtime CUDA provider):"; else
    echo "crackq GPU check: CPU FALLBACK (no NVIDIA GPU; the --device gpu worker ran on the CPU provider):"; fi
for r in "${RESULTS[@]}"; do echo "  $r"; done
echo "  total time $(( $(date +%s) - START )) s; logs and results in $OUT"

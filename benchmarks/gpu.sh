#!/usr/bin/env bash
# Plain TRL vs this pipeline on one CUDA GPU, in one call of under 8 minutes (see benchmarks/gpu.py).
#
#   bash benchmarks/gpu.sh [OUT_DIR] [gpu.py options...]      # default OUT_DIR: $OUT or benchmarks/results/gpu
#
# The GPU machines have torch, transformers, peft and accelerate but not trl, datasets or bitsandbytes, and no
# network: put their wheels in wheels/ beforehand (pip download --no-deps trl datasets dill xxhash multiprocess
# bitsandbytes -d wheels/), and they are installed from there without an index. Without bitsandbytes the QLoRA
# case is reported as failed and the others still run.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/results/gpu}}"
shift || true
if compgen -G "wheels/*.whl" >/dev/null; then
    python -m pip install --quiet --no-index --no-deps wheels/*.whl
fi
python - <<'PY'
import importlib.util
missing = [m for m in ("torch", "transformers", "peft", "accelerate", "trl", "datasets") if not importlib.util.find_spec(m)]
if missing:
    raise SystemExit(f"gpu.sh: missing {', '.join(missing)}: put their wheels in wheels/ (see the header of gpu.sh)")
if not importlib.util.find_spec("bitsandbytes"):
    print("gpu.sh: bitsandbytes is not installed: the QLoRA case will fail, the others run", flush=True)
PY
PYTHONPATH=src timeout 470 python benchmarks/gpu.py --out "$out" "$@"

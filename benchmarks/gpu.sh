#!/usr/bin/env bash
# Plain TRL (defaults and expert) vs this pipeline on one CUDA GPU, in one call of under 8 minutes (benchmarks/gpu.py).
#
#   bash benchmarks/gpu.sh [OUT_DIR] [gpu.py options...]   # on the GPU machine; OUT_DIR defaults to $OUT
#   bash benchmarks/gpu.sh --check                          # here, on a CPU: the same steps end to end at tiny shapes
#
# The GPU machines have no network and lack trl, datasets, bitsandbytes, pydantic and liger-kernel: their wheels (and
# transformers, peft, accelerate at the versions tested here) come in .whl/, made by benchmarks/gpu_wheels.sh and
# carried with the call. They are installed into a fresh --target folder that goes first on PYTHONPATH.
#  - If the carried transformers stack does not import there, the run falls back to the machine's own transformers,
#    peft and accelerate (with the carried trl, datasets, pydantic...), and says so in preflight.txt and gpu.md.
#  - If bitsandbytes does not import, the QLoRA case runs as LoRA (gpu.py says so in its note); the LoRA cases are
#    unaffected.
# Writes to OUT_DIR: gpu.json and gpu.md (after every case), preflight.txt, gpu.log.
#
# --check (CPU, ~2-4 min): installs the wheels into a temporary --target with a CPython 3.12 (exactly as the GPU
# machine does) and imports the packages that need no torch there; installs them again for this venv's Python (the
# py312-only wheels, pydantic-core, regex and multiprocess, are in the venv at the same versions) and runs gpu.py
# --dry-run through every case on them, then checks that gpu.json has every case, none failed, and gpu.md is there.
set -uo pipefail

main() {  # all of it in one function: bash reads the whole script before running it (an edit mid-run is harmless)
cd "$(dirname "$0")/.."
started=$SECONDS
check=0
if [ "${1:-}" = "--check" ]; then
    check=1
    shift
fi
if [ "$check" = 1 ]; then
    out="${1:-$(mktemp -d /tmp/gpu-check.XXXXXX)}"
    python="${PYTHON:-.venv/bin/python}"
else
    out="${1:-${OUT:-benchmarks/results/gpu}}"
    python="${PYTHON:-python3}"
fi
shift || true
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec > >(tee -a "$out/gpu.log") 2>&1
say() { echo "[gpu.sh $((SECONDS - started))s] $*"; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

site=$(mktemp -d /tmp/sft-site.XXXXXX)
wheels=(.whl/*.whl)
if [ ! -e "${wheels[0]}" ]; then
    say "no wheels in .whl/ (bash benchmarks/gpu_wheels.sh makes them): using what is installed"
    wheels=()
fi
install() {  # install() PYTHON TARGET WHEEL...: as on the GPU machine, no index, no dependencies
    local py=$1 target=$2
    shift 2
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" "$@" \
        2>&1 | grep -v -e "is ignored" -e "Running pip as the 'root' user" -e "^$" -e "pip version"
    return "${PIPESTATUS[0]}"
}

if [ "$check" = 1 ] && [ ${#wheels[@]} -gt 0 ]; then
    py312=""
    for candidate in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
        if "$candidate" -c "" 2>/dev/null; then
            py312=$candidate
            break
        fi
    done
    if [ -n "$py312" ]; then
        site312=$(mktemp -d /tmp/sft-site312.XXXXXX)
        install "$py312" "$site312" "${wheels[@]}" || { say "FAILED: the wheels do not install on CPython 3.12"; exit 1; }
        PYTHONPATH="$site312" "$py312" -c "
import annotated_types, anyio, click, dill, fsspec, httpx2, huggingface_hub, idna, multiprocess, pydantic, regex
import typing_extensions, typing_inspection
print('CPython 3.12 imports the carried pure and cp312 packages: pydantic', pydantic.VERSION, 'huggingface_hub',
      huggingface_hub.__version__)" || { say "FAILED: the carried packages do not import on CPython 3.12"; exit 1; }
        say "installed on CPython 3.12 as on the GPU machine: $(ls "$site312" | grep -c dist-info) packages"
    else
        say "no CPython 3.12 here: the cp312 install is not checked"
    fi
    # this venv's Python: the py312-only wheels are skipped (the venv has the same versions)
    mapfile -t wheels < <(printf '%s\n' "${wheels[@]}" | grep -v -e '-cp312-' -e '-py312-')
fi
stack="carried: $(printf '%s\n' "${wheels[@]}" | sed -E 's#.*/##; s/-py3.*|-cp3.*//' | tr '\n' ' ')"
if [ ${#wheels[@]} -gt 0 ]; then
    install "$python" "$site" "${wheels[@]}" || { say "FAILED: pip could not install the wheels"; exit 1; }
    say "installed ${#wheels[@]} wheels into $site"
fi

preflight() {
    PYTHONPATH="$site:src${PYTHONPATH:+:$PYTHONPATH}" "$python" - <<'PY'
import importlib, sys
rows = []
for name in ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "pydantic", "huggingface_hub",
             "liger_kernel", "bitsandbytes", "sft.train"):
    try:
        module = importlib.import_module(name)
        rows.append(f"{name} {getattr(module, '__version__', '')} {getattr(module, '__file__', '')}")
    except Exception as err:  # report every failure, decide below
        rows.append(f"{name} FAILED: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
import torch
rows.append(f"python {sys.version.split()[0]}; cuda {torch.version.cuda}; "
            f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
print("\n".join(rows))
core = ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "pydantic", "sft.train")
sys.exit(1 if any(r.split()[0] in core and "FAILED" in r for r in rows) else 0)
PY
}
if ! preflight >"$out/preflight.txt"; then
    cat "$out/preflight.txt"
    say "the carried transformers stack does not import: falling back to this machine's transformers/peft/accelerate"
    rm -rf "$site" && site=$(mktemp -d /tmp/sft-site.XXXXXX)
    mapfile -t wheels < <(printf '%s\n' "${wheels[@]}" | grep -v -E '/(transformers|peft|accelerate|huggingface_hub|httpx2|httpcore2|truststore|idna|anyio|click|fsspec|regex|typing_extensions)-')
    stack="machine's own transformers/peft/accelerate (the carried ones did not import); carried: $(printf '%s\n' \
        "${wheels[@]}" | sed -E 's#.*/##; s/-py3.*|-cp3.*//' | tr '\n' ' ')"
    [ ${#wheels[@]} -gt 0 ] && install "$python" "$site" "${wheels[@]}"
    if ! preflight >"$out/preflight.txt"; then
        cat "$out/preflight.txt"
        say "FAILED: the packages gpu.py needs do not import (see preflight.txt)"
        exit 1
    fi
fi
cat "$out/preflight.txt"
grep -q "^bitsandbytes FAILED" "$out/preflight.txt" && stack="$stack; bitsandbytes does not import: QLoRA runs as LoRA"
say "preflight done"

args=(--out "$out" --stack "$stack")
[ "$check" = 1 ] && args+=(--dry-run)
# the whole call must end within 8 minutes: what is left after the installs, less 20 s for the summary (--check on
# a shared 2-core CPU: 7 processes that each import torch and trl, ~30-60 s apiece, so up to 30 minutes)
budget=$((460 - (SECONDS - started)))
[ "$check" = 1 ] && budget=1800
PYTHONPATH="$site:src${PYTHONPATH:+:$PYTHONPATH}" timeout $((budget + 15)) "$python" benchmarks/gpu.py \
    --budget "$budget" "${args[@]}" "$@"
status=$?
say "gpu.py exited with $status"

if [ "$check" = 1 ]; then
    "$python" - "$out" <<'PY' || return 1
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
report = json.loads((out / "gpu.json").read_text())
results = {(r["case"], r["variant"]): r for r in report["results"]}
wanted = {(c, v) for c in ("1b-lora", "8b-lora") for v in ("trl_default", "trl_expert", "sft")} | {("8b-qlora", "sft_qlora")}
failed = {k: r["error"] for k, r in results.items() if "error" in r}
assert set(results) == wanted and not failed, (sorted(results), failed)
assert all(r["real_tokens_per_s"] > 0 for r in results.values())
assert set(report["speedup_vs_trl_expert"]) == set(report["speedup_vs_trl_default"]) == {"1b-lora", "8b-lora"}
assert results[("8b-qlora", "sft_qlora")]["note"], "the QLoRA fallback must say so"
assert "| 8b-lora | trl_expert |" in (out / "gpu.md").read_text() and (out / "preflight.txt").is_file()
print(f"--check: all {len(results)} cases ran and {out}/gpu.json, gpu.md, preflight.txt, gpu.log are complete")
PY
fi
say "done"
return $status
}

main "$@"
exit $?

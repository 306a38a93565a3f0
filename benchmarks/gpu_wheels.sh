#!/usr/bin/env bash
# The wheels benchmarks/gpu.sh installs on a GPU machine that has no network, into .whl/ (ignored through
# .git/info/exclude: add the line `/.whl/` there once), for CPython 3.12 on x86-64, one version of each.
#
#   bash benchmarks/gpu_wheels.sh        # ~32 MiB; then name .whl in the device call's carry list
#
# The GPU machines have torch 2.11 (CUDA 13.0), tokenizers, safetensors, numpy, pyarrow, pandas, xxhash, triton...,
# but not trl, datasets, dill, multiprocess, bitsandbytes, pydantic or liger-kernel. transformers, peft and accelerate
# travel too, at this venv's versions, so the GPU runs the code tested here; transformers 5.25 checks at import for
# huggingface-hub >= 2.4 (the machines have 1.33), which brings httpx2 and its few dependencies.
# bitsandbytes ships one library per CUDA version (~41 MiB): only the CUDA 13.0 one (what torch 2.11+cu130 asks for)
# and the CPU one (imports without a GPU) are kept, with the licence.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.whl
mkdir -p "$dest"
wheels=(
    transformers==5.25.0 trl==1.16.0 peft==0.21.2 accelerate==1.16.0
    datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
    huggingface-hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 idna==3.20 anyio==4.16.0 click==8.5.1
    regex==2026.11.19
    liger-kernel==0.8.5
    bitsandbytes==0.50.2
)
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dest" "${wheels[@]}" 2>&1 | grep -v "is ignored" || true
python3 - "$dest" <<'PY'
"""Keep only libbitsandbytes_cuda130.so and libbitsandbytes_cpu.so in the bitsandbytes wheel (RECORD rewritten)."""
import sys
import zipfile
from pathlib import Path

dest = Path(sys.argv[1])
for wheel in dest.glob("bitsandbytes-*.whl"):
    keep = ("libbitsandbytes_cuda130.so", "libbitsandbytes_cpu.so")
    with zipfile.ZipFile(wheel) as src:
        names = src.namelist()
        drop = {n for n in names if n.endswith(".so") and not n.endswith(keep)}
        if not drop:
            continue
        trimmed = wheel.with_suffix(".tmp")
        with zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as out:
            for name in names:
                if name in drop:
                    continue
                data = src.read(name)
                if name.endswith(".dist-info/RECORD"):
                    lines = data.decode().splitlines(keepends=True)
                    data = "".join(line for line in lines if line.split(",", 1)[0] not in drop).encode()
                out.writestr(src.getinfo(name), data)
    trimmed.replace(wheel)
    print(f"{wheel.name}: dropped {len(drop)} libraries, kept {', '.join(keep)}")
PY
names=$(ls "$dest"/*.whl | sed -E 's#.*/##; s/-[0-9].*//' | tr '[:upper:]_' '[:lower:]-' | sort)
dupes=$(echo "$names" | uniq -d)
[ -z "$dupes" ] || { echo "gpu_wheels.sh: two versions of: $dupes (keep one)" >&2; exit 1; }
du -sh "$dest"

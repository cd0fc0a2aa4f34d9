#!/usr/bin/env bash
# Download the wheels that scripts/gpu_check.py installs on the GPU machine, into .whl/ (git-ignored).
#
# The GPU machine (see the device notes) runs Python 3.12 on x86-64 with torch, transformers, peft,
# accelerate, numpy, pandas, pyarrow, xxhash, fsspec and huggingface-hub, but no network and none of:
#
#   bitsandbytes  every 4-bit check (QLoRA, paged 8-bit AdamW, the NF4 kernels)      ~41 MiB
#   datasets      only the exported train.py (it imports datasets); gpu_check itself
#                 does without it                                                     ~0.5 MiB
#   dill, multiprocess   what `import datasets` needs beside the packages above        ~0.3 MiB
#
# plotly, ipywidgets and anywidget are not fetched: no check needs them (lora_lab's training,
# planning, merging and switching import none of them).
#
#   bash scripts/fetch_gpu_wheels.sh            # into .whl/
#   bash scripts/fetch_gpu_wheels.sh DIR        # elsewhere
#   PY_VERSION=3.11 bash scripts/fetch_gpu_wheels.sh   # another Python on the GPU machine
#
# Versions are pinned to what lora_lab is tested with here.  Keep one version of each package in
# the folder: pip refuses an install with two.
set -euo pipefail

cd "$(dirname "$0")/.."
DEST="${1:-.whl}"
PY_VERSION="${PY_VERSION:-3.12}"
MAX_MIB="${MAX_MIB:-50}"
if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi

WHEELS=(
  "bitsandbytes==0.50.2"
  "datasets==5.2.0"
  "dill==0.4.1"
  "multiprocess==0.70.19"
)

mkdir -p "$DEST"
# drop other versions of the same packages left from an earlier fetch
for spec in "${WHEELS[@]}"; do
  name="${spec%%==*}"
  version="${spec##*==}"
  for old in "$DEST"/"${name}"-*.whl; do
    [[ -e "$old" ]] || continue
    [[ "$(basename "$old")" == "${name}-${version}-"* ]] || rm -v "$old"
  done
done

PLATFORMS=()
for n in 17 24 27 28 31 34 35 39; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)

"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
  --implementation cp "${PLATFORMS[@]}" -d "$DEST" "${WHEELS[@]}"

echo "wheels in $DEST (Python $PY_VERSION, x86-64):"
ls -l "$DEST"/*.whl | awk '{printf "  %8.1f MiB  %s\n", $5 / 1048576, $NF}'
total_kib=$(du -sk "$DEST" | cut -f1)
printf "  total %.1f MiB (limit %s MiB; everything that travels must stay under 64 MiB)\n" \
  "$(echo "$total_kib / 1024" | bc -l)" "$MAX_MIB"
if (( total_kib > MAX_MIB * 1024 )); then
  echo "error: $DEST holds more than $MAX_MIB MiB" >&2
  exit 1
fi

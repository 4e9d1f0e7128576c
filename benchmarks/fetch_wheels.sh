#!/usr/bin/env bash
# Wheels for the GPU image's `x2_hf` stage (benchmarks/gpu_run.sh): transformers==5.24.0
# and its runtime dependencies, for CPython 3.11 and 3.12 on x86_64 Linux (5.24 requires
# Python >= 3.11; GPU_FACTS.md says the image has 3.12), into
# benchmarks/wheels/ (gitignored); and for its `linear` stage fla-core==0.6.0
# (flash-linear-attention) with einops and packaging, all pure Python. The GPU image has
# no network and may lack transformers and fla; the stages install from here with
# `pip install --no-index --find-links benchmarks/wheels`.
#
#   bash benchmarks/fetch_wheels.sh        # here, with network; then carry benchmarks/wheels
#
# numpy is left out (the GPU image has it: the bench's matplotlib plots run there), and
# torch of course; everything else transformers imports or pip needs to resolve it is
# fetched per Python version (pip resolves the dependencies for the target interpreter;
# pure-Python and abi3 wheels are shared between versions). The device tool carries at
# most 64 MiB of ignored paths: the script prints the total.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=benchmarks/wheels
mkdir -p "$DEST"
PLATFORMS=(--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux_2_28_x86_64 --platform any)
for py in 3.11 3.12; do  # transformers 5.24 needs Python >= 3.11 (no 3.10 build)
  abi=cp${py/./}
  echo "--- CPython $py"
  # transformers' whole closure for this interpreter (pip resolves it for the target).
  pip download --quiet --dest "$DEST" --only-binary=:all: --implementation cp \
    --python-version "$py" --abi "$abi" --abi abi3 --abi none "${PLATFORMS[@]}" \
    "transformers==5.24.0"
done
# fla-core is pure Python (py3-none-any); it declares only einops (torch and triton are
# extras the image already has) and imports packaging without declaring it.
pip download --quiet --dest "$DEST" --no-deps --only-binary=:all: \
  "fla-core==0.6.0" einops packaging
rm -f "$DEST"/numpy-*.whl  # the GPU image has numpy
ls -1 "$DEST"
du -sh "$DEST"
echo "total: $(du -sb "$DEST" | cut -f1) bytes ($(ls "$DEST" | wc -l) files)"

#!/usr/bin/env bash
# Download (on a machine WITH package-registry access) the wheels the GPU suite needs but a bare
# GPU machine may lack, into .whl/ (git-ignored): diffusers, open_clip_torch (it also carries the
# CLIP BPE vocabulary the tiny models' tokenizer is built from), nudenet, their small pure-Python
# dependencies, and optionally xformers for the GPU's torch.
#
#   bash benchmarks/fetch_gpu_wheels.sh                 # Python 3.12 wheels (default)
#   PYVER=3.11 XFORMERS=0.0.33 bash benchmarks/fetch_gpu_wheels.sh
#
# Then copy .whl/ next to the repository on the GPU machine; benchmarks/gpu_suite.sh installs it
# with `pip install --no-index --no-deps --target /tmp/site .whl/*.whl` before anything else.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PLATS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
       --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
dl() { python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp "${PLATS[@]}" -d .whl "$@"; }
dl "diffusers==0.42.1" "open_clip_torch>=3.0,<4" ftfy wcwidth importlib_metadata "nudenet>=3.4,<4"
if [[ -n "${XFORMERS:-}" ]]; then dl "xformers==${XFORMERS}" || echo "xformers==${XFORMERS} has no wheel for this torch/Python; the suite will skip it"; fi
ls -la .whl

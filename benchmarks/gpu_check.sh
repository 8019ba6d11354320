#!/usr/bin/env bash
# The device-side command of benchmarks/gpu_check.py (benchmarks/README.md, "gpu_check.py"): installs
# diffusers and what it needs that the machine lacks from the wheels carried in benchmarks/wheels (no
# index, no network), then runs the check with a hard time limit, writing into $OUT.
#
#   bash benchmarks/gpu_check.sh [gpu_check.py options]
#
# Environment: OUT (default benchmarks/gpu_check_out), PYTHON (default python3), GPU_CHECK_TIMEOUT_S (default 480).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/benchmarks/gpu_check_out}"
python="${PYTHON:-python3}"
mkdir -p "$out"
echo "[$(date +%H:%M:%S)] gpu_check.sh: $("$python" --version 2>&1), wheels: $(ls benchmarks/wheels 2>/dev/null | wc -l)"
if ! "$python" -c "import diffusers" 2>/dev/null; then
  # diffusers without its declared dependencies (transformers brings huggingface_hub, safetensors, regex,
  # filelock, numpy; importlib_metadata is not imported on Python >= 3.8), then the two it imports that a
  # machine with transformers may lack, resolved against what is installed and the folder.
  export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1
  { "$python" -m pip install --no-index --find-links benchmarks/wheels --no-deps diffusers \
      && "$python" -m pip install --no-index --find-links benchmarks/wheels requests pillow; } > "$out/pip.log" 2>&1 \
    || echo "pip could not install everything (see pip.log): what fails to import becomes error rows"
  tail -n 2 "$out/pip.log"
fi
timeout -k 10 "${GPU_CHECK_TIMEOUT_S:-480}" "$python" benchmarks/gpu_check.py --out "$out" "$@" 2>&1 | tee "$out/log.txt"

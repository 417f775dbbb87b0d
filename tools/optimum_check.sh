#!/usr/bin/env bash
# optimum's exporter and runtime around sq-onnx (tools/optimum_check.py says what each step does). optimum-onnx
# pins transformers < 4.58, so it gets its own virtual environment (OPTIMUM_VENV, made once, with the CPU torch
# 2.13.0 from local disk); sq-onnx's steps run in the project's .venv (tools/dev.sh makes it).
#
#   tools/optimum_check.sh [ROOT] [FAMILY...]     # default: /tmp/sq-optimum, llama qwen2 phi3 gemma2 opt gpt2
set -euo pipefail
cd "$(dirname "$0")/.."
root=${1:-/tmp/sq-optimum}
shift || true
families=("$@")
[ ${#families[@]} -gt 0 ] || families=(llama qwen2 phi3 gemma2 opt gpt2)
venv=${OPTIMUM_VENV:-/tmp/sq-optimum-venv}
ours=.venv/bin/python
[ -x "$ours" ] || { echo "no .venv here: run tools/dev.sh test --collect-only -q first" >&2; exit 2; }
if [ ! -x "$venv/bin/optimum-cli" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "torch==2.13.0"
  "$venv/bin/pip" install -q "optimum-onnx[onnxruntime]" "transformers<4.58"
fi
mkdir -p "$root"
for family in "${families[@]}"; do
  [ -f "$root/onnx_$family/model.onnx" ] && continue
  "$venv/bin/python" tools/optimum_check.py build "$family" "$root/hf_$family"
  "$venv/bin/optimum-cli" export onnx --model "$root/hf_$family" --task text-generation-with-past \
    "$root/onnx_$family" >"$root/export_$family.log" 2>&1 || { echo "$family: optimum's export failed" >&2; exit 1; }
done
"$ours" tools/optimum_check.py convert "$root" "${families[@]}"
"$ours" tools/optimum_check.py agree "$root" "${families[@]}"
"$venv/bin/python" tools/optimum_check.py generate "$root" "${families[@]}" 2>/dev/null

#!/usr/bin/env bash
# Issue 27's GPU half in one device call: the conversion on `--device cuda` (calibration and GPTQ's segments on
# ORT's CUDA provider, GPTQ's maths on the GPU through torch), timed on random weights of real shapes, so a
# session that draws a GPU machine spends its minutes on the reading. Writes its logs under $OUT (the device
# tool brings them back) or ./gpu_convert_out, and prints one summary line per step:
#
#   1. GPTQ through torch on the GPU against numpy (tests/unit/calibration/test_gptq_device.py's cuda cases),
#   2. the default W4 of the Llama-3.2-1B shape on `--device cuda` (tools/bench_scale.py: export, convert, table),
#   3. with SQ_GPU_8B=1, the Llama-3.1-8B shape too (the target: at most 15 minutes on one H100; its export
#      alone takes minutes, so give it a call of its own).
#
# onnxruntime-gpu is not in the machine's image: stage it first with tools/gpu_ort_wheel.sh (its calls must
# follow each other within the machine's 30 s idle time), then, on the same warm machine:
#   run(command="tools/gpu_convert.sh", timeout_s=600)
# Without the staged wheel, step 2 stops at convert's one-sentence refusal of --device cuda (exit 2).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_convert_out}
# shellcheck source=tools/gpu_steps.sh
. tools/gpu_steps.sh
models=${SQ_SCALE_MODELS:-/tmp/sq_scale_models}
device_info nproc

step gptq_tests "$py" -m pytest -p no:cacheprovider -rs tests/unit/calibration/test_gptq_device.py
step convert_1b "$py" tools/bench_scale.py --shapes llama-3.2-1b --schemes w4 --device cuda --keep "$models"
if [ "${SQ_GPU_8B:-0}" = 1 ]; then
  step convert_8b "$py" tools/bench_scale.py --shapes llama-3.1-8b --schemes w4 --device cuda --keep "$models"
fi
exit "$status"

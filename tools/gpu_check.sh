#!/usr/bin/env bash
# What the CUDA kernels still need a GPU for, in one run on a lent H100/H200 (device tool), so a session that
# draws one spends its device time on results, not on assembling commands. Writes its logs under $OUT (the
# device tool brings them back) or ./gpu_check_out, and prints a one-line summary per step.
#
#   1. the CUDA tests (every GEMM path, bit for bit against numpy; which kernel served each call),
#   2. tools/bench_cuda_kernels.py (a column per GEMM path, against fp16 cuBLAS and the floor),
#   3. the kernels' register and shared-memory use (cuobjdump),
#   4. compute-sanitizer memcheck on the GEMM and row-op tests, Hopper and few-rows paths included (odd M, N,
#      K; rows too long for shared memory).
#
# Build the library here first (tools/dev.sh test does), then, through the device tool:
#   run(command="tools/gpu_check.sh build/cp311-cp311-linux_x86_64/custom_ops/libsq_onnx_ops.so",
#       carry=["build/cp311-cp311-linux_x86_64/custom_ops/libsq_onnx_ops.so"], timeout_s=600)
# It runs with the image's python3 (torch, onnx, onnxruntime, rich, pytest are there); the repo is put on the
# path instead of installed. The ORT CUDA-session tests skip without onnxruntime-gpu (not in the image; bring
# it with tools/gpu_ort_wheel.sh first).
# (Without a GPU, tests/kernels/test_cuda_kernels_emulated.py runs the same cases on a CPU emulation of the kernels;
# this script is what only the GPU can add: the real hardware, the CUTLASS Hopper kernel, and the timings.)
set -uo pipefail
cd "$(dirname "$0")/.."
lib=${1:?usage: tools/gpu_check.sh path/to/libsq_onnx_ops.so [bench iterations]}
iters=${2:-20}
[ -f "$lib" ] || { echo "no library at $lib" >&2; exit 2; }
out=${OUT:-gpu_check_out}
# shellcheck source=tools/gpu_steps.sh
. tools/gpu_steps.sh
SQ_ONNX_OPS_LIB=$(realpath "$lib")
export SQ_ONNX_OPS_LIB
device_info sh -c 'nvcc --version | tail -n 2'

step tests "$py" -m pytest -p no:cacheprovider -rs tests/kernels/test_cuda_kernels.py tests/kernels/test_library_build.py \
  tests/kernels/test_ort_cuda_session.py
step bench "$py" tools/bench_cuda_kernels.py --iters "$iters"
step resources cuobjdump --dump-resource-usage "$SQ_ONNX_OPS_LIB"
# Last: the slowest step, so a run cut short by the device tool's limit still has the tests and the table.
step memcheck compute-sanitizer --tool memcheck --error-exitcode 3 "$py" -m pytest -p no:cacheprovider \
  tests/kernels/test_cuda_kernels.py -k "matmul_dequant or norm_quant or few_rows"
exit "$status"

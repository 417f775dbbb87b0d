#!/usr/bin/env bash
# onnxruntime-gpu for the lent GPU machine, so tests/kernels/test_ort_cuda_session.py (the ops inside a real ORT CUDA
# session) can run there. That machine fetches nothing and takes at most 64 MiB per device-tool call, and the
# wheel is 256 MB; a warm machine keeps /tmp between calls (it goes back after 30 s idle: make the calls one
# after another without pause). The image's CUDA 13 libraries (nvidia-*-cu13 wheels) suit onnxruntime-gpu
# 1.31.1, the first CUDA 13 build on PyPI, for its Python 3.12.
#
#   here:       tools/gpu_ort_wheel.sh split              -> .gpu_ort/part1 .. partN, and the calls to make
#   on device:  tools/gpu_ort_wheel.sh stage .gpu_ort/partI  (one call per part, carrying that folder)
#   on device:  tools/gpu_ort_wheel.sh install            (joins, checks the sha256, installs into /tmp/sq_ort_site)
# The last part is small: its call also installs and runs tools/gpu_check.sh (split prints the calls).
# tools/gpu_check.sh puts /tmp/sq_ort_site first on the path when it is there.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${SQ_ORT_GPU_VERSION:-1.31.1}
dir=.gpu_ort
staged=/tmp/sq_ort_parts
site=/tmp/sq_ort_site
part_mib=${SQ_ORT_PART_MIB:-56}  # + the working tree and the library: under the 64 MiB per call

case ${1:-} in
  split)
    rm -rf "$dir" && mkdir -p "$dir/wheel"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      -d "$dir/wheel" "onnxruntime-gpu==$version"
    whl=$(ls "$dir"/wheel/*.whl)
    (cd "$dir/wheel" && sha256sum "$(basename "$whl")" >SHA256SUMS && split -b "${part_mib}M" -d -a 2 \
      "$(basename "$whl")" chunk.)
    n=0
    for chunk in "$dir"/wheel/chunk.*; do
      n=$((n + 1))
      mkdir -p "$dir/part$n" && mv "$chunk" "$dir/part$n/" && cp "$dir/wheel/SHA256SUMS" "$dir/part$n/"
    done
    rm -rf "$dir/wheel"
    echo "$n parts of at most $part_mib MiB under $dir/. Device calls, back to back:"
    for i in $(seq 1 $((n - 1))); do
      echo "  run(command=\"tools/gpu_ort_wheel.sh stage $dir/part$i\", carry=[\"$dir/part$i\"])"
    done
    lib=build/cp311-cp311-linux_x86_64/custom_ops/libsq_onnx_ops.so
    echo "  run(command=\"tools/gpu_ort_wheel.sh stage $dir/part$n && tools/gpu_ort_wheel.sh install &&" \
      "tools/gpu_check.sh $lib\", carry=[\"$dir/part$n\", \"$lib\"], timeout_s=600)"
    ;;
  stage)
    part=${2:?usage: tools/gpu_ort_wheel.sh stage .gpu_ort/partI}
    mkdir -p "$staged"
    cp "$part"/chunk.* "$part/SHA256SUMS" "$staged/"
    echo "staged: $(ls "$staged" | tr '\n' ' ')"
    ;;
  install)
    [ -f "$staged/SHA256SUMS" ] || { echo "nothing staged in $staged (the machine went back? stage again)" >&2; exit 2; }
    whl=$staged/$(awk '{print $2}' "$staged/SHA256SUMS")
    cat "$staged"/chunk.* >"$whl"
    (cd "$staged" && sha256sum -c --quiet SHA256SUMS) || { echo "parts missing or damaged: stage them again" >&2; exit 3; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$whl"
    PYTHONPATH=$site python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
    ;;
  *)
    echo "usage: tools/gpu_ort_wheel.sh split | stage DIR | install" >&2
    exit 2
    ;;
esac

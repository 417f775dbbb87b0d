# Sourced by tools/gpu_check.sh and tools/gpu_convert.sh (the device scripts): the repo on the path, the staged
# onnxruntime-gpu ahead of the image's CPU build, $py, and `step`, which logs one command under $out. The caller
# sets `out` first and exits with $status.
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# onnxruntime-gpu staged by tools/gpu_ort_wheel.sh, ahead of the image's CPU onnxruntime
[ -d /tmp/sq_ort_site ] && PYTHONPATH=/tmp/sq_ort_site:$PYTHONPATH
py=${PYTHON:-python3}
status=0

step() {  # step NAME COMMAND...: run, log to $out/NAME.log, one summary line
  local name=$1 rc
  shift
  local t0=$SECONDS
  "$@" >"$out/$name.log" 2>&1
  rc=$?
  echo "$name: rc $rc in $((SECONDS - t0)) s; last line: $(tail -n 1 "$out/$name.log")"
  [ "$rc" -eq 0 ] || status=1
}

device_info() {  # what ran: the date, the GPU, the versions (to $out/device.txt and stdout); extra lines from "$@"
  {
    date -u +%FT%TZ
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$@"
    "$py" -c "import torch, onnxruntime as o; print('torch', torch.__version__, torch.cuda.is_available(), '| onnxruntime', o.__version__, o.get_available_providers())"
  } >"$out/device.txt" 2>&1
  cat "$out/device.txt"
}

# The user's cache folder for what the build fetches (ONNX Runtime and CUTLASS headers): $XDG_CACHE_HOME/sq-onnx,
# else ~/.cache/sq-onnx.
function(sq_user_cache_dir out)
  if(DEFINED ENV{XDG_CACHE_HOME} AND NOT "$ENV{XDG_CACHE_HOME}" STREQUAL "")
    set(${out} "$ENV{XDG_CACHE_HOME}/sq-onnx" PARENT_SCOPE)
  else()
    set(${out} "$ENV{HOME}/.cache/sq-onnx" PARENT_SCOPE)
  endif()
endfunction()

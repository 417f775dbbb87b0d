# Find CUTLASS's C++ headers (the Hopper int8 GEMM, src/cuda_gemm_sm90.cu) without copying them in.
#
# Order: -DCUTLASS_DIR, then $SQ_ONNX_CUTLASS_DIR (a CUTLASS source tree, or the nvidia-cutlass wheel's
# cutlass_library/source), then a cache under the user's cache folder, filled once from the nvidia-cutlass
# wheel on PyPI (`pip download --no-deps`, through the user's own pip configuration and mirrors; only the
# headers are kept, about 28 MB). The version is pinned: it is the one the kernel was compiled against.
# Sets CUTLASS_FOUND and CUTLASS_INCLUDE_DIRS; when nothing can be had, the Hopper GEMM is left out and the
# rest of the CUDA kernels still build.

include("${CMAKE_CURRENT_LIST_DIR}/UserCache.cmake")
set(SQ_CUTLASS_VERSION "4.2.0.0" CACHE STRING "nvidia-cutlass wheel to take CUTLASS's headers from")

function(_sq_cutlass_includes root out)
  if(root AND EXISTS "${root}/include/cutlass/cutlass.h" AND EXISTS "${root}/tools/util/include/cutlass/util")
    set(${out} "${root}/include;${root}/tools/util/include" PARENT_SCOPE)
  else()
    set(${out} "" PARENT_SCOPE)
  endif()
endfunction()

function(sq_find_cutlass_headers)
  set(CUTLASS_FOUND FALSE PARENT_SCOPE)
  if(NOT CUTLASS_DIR AND DEFINED ENV{SQ_ONNX_CUTLASS_DIR})
    set(CUTLASS_DIR "$ENV{SQ_ONNX_CUTLASS_DIR}")
  endif()
  if(CUTLASS_DIR)
    _sq_cutlass_includes("${CUTLASS_DIR}" incs)
    if(NOT incs)
      message(WARNING "sq-onnx: CUTLASS_DIR=${CUTLASS_DIR} holds no include/cutlass/cutlass.h and "
                      "tools/util/include; the Hopper int8 GEMM is left out")
      return()
    endif()
    set(CUTLASS_INCLUDE_DIRS "${incs}" PARENT_SCOPE)
    set(CUTLASS_FOUND TRUE PARENT_SCOPE)
    return()
  endif()

  sq_user_cache_dir(cache)
  set(root "${cache}/cutlass-${SQ_CUTLASS_VERSION}")
  set(src "${root}/cutlass_library/source")
  _sq_cutlass_includes("${src}" incs)
  if(NOT incs)
    # Run pip isolated (-I): inside pip's build isolation, PYTHONPATH hides the interpreter's own pip.
    find_package(Python3 COMPONENTS Interpreter QUIET)
    set(download "${cache}/cutlass-download")
    file(REMOVE_RECURSE "${download}")
    file(MAKE_DIRECTORY "${download}")
    message(STATUS "sq-onnx: fetching CUTLASS ${SQ_CUTLASS_VERSION} headers (nvidia-cutlass wheel) into ${root}")
    set(rc 1)
    set(err "no Python interpreter found")
    if(Python3_EXECUTABLE)
      # Few retries: offline, the build should say so within a minute or two, not hang.
      execute_process(COMMAND "${Python3_EXECUTABLE}" -I -m pip download -q --no-deps --only-binary=:all:
                              --retries 2 --timeout 60 "nvidia-cutlass==${SQ_CUTLASS_VERSION}" -d "${download}"
                      RESULT_VARIABLE rc OUTPUT_QUIET ERROR_VARIABLE err TIMEOUT 600)
    endif()
    file(GLOB wheels "${download}/nvidia_cutlass-*.whl")
    if(NOT rc EQUAL 0 OR NOT wheels)
      file(REMOVE_RECURSE "${download}")
      string(STRIP "${err}" err)
      string(REGEX REPLACE ".*\n" "" err "${err}")  # pip's last line says why
      message(WARNING "sq-onnx: could not fetch nvidia-cutlass==${SQ_CUTLASS_VERSION} (${err}); the Hopper "
                      "int8 GEMM is left out (set CUTLASS_DIR to build it)")
      return()
    endif()
    list(GET wheels 0 wheel)
    file(REMOVE_RECURSE "${root}")
    file(MAKE_DIRECTORY "${root}")
    execute_process(COMMAND "${CMAKE_COMMAND}" -E tar xf "${wheel}" -- cutlass_library/source/include
                            cutlass_library/source/tools/util/include
                    WORKING_DIRECTORY "${root}" RESULT_VARIABLE rc)
    file(REMOVE_RECURSE "${download}")
    _sq_cutlass_includes("${src}" incs)
    if(NOT incs)
      message(WARNING "sq-onnx: ${wheel} held no CUTLASS headers; the Hopper int8 GEMM is left out")
      return()
    endif()
  endif()
  set(CUTLASS_INCLUDE_DIRS "${incs}" PARENT_SCOPE)
  set(CUTLASS_FOUND TRUE PARENT_SCOPE)
endfunction()

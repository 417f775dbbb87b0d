# Find ONNX Runtime's C/C++ headers without copying them into the project.
#
# Order: -DORT_INCLUDE_DIR, then $SQ_ONNX_ORT_INCLUDE_DIR, then a cached download of Debian's
# libonnxruntime-dev (headers only, ~90 KB) fetched with `apt-get download` into a private apt state
# folder, so the system's own apt state is never touched. Headers are 1.21: build against headers no
# newer than the oldest onnxruntime we support (pyproject asks for >= 1.21), because newer headers'
# inline wrappers call C API entries older runtimes lack.
# Sets ORT_HEADERS_FOUND and ORT_INCLUDE_DIR.

include("${CMAKE_CURRENT_LIST_DIR}/UserCache.cmake")
set(SQ_ORT_DEB_SUITE "trixie" CACHE STRING "Debian suite to take libonnxruntime-dev from")
set(SQ_ORT_DEB_VERSION "1.21" CACHE STRING "Expected onnxruntime header version")

function(_sq_has_headers dir out)
  if(dir AND EXISTS "${dir}/onnxruntime_cxx_api.h" AND EXISTS "${dir}/onnxruntime_c_api.h")
    set(${out} TRUE PARENT_SCOPE)
  else()
    set(${out} FALSE PARENT_SCOPE)
  endif()
endfunction()

function(sq_find_ort_headers)
  set(ORT_HEADERS_FOUND FALSE PARENT_SCOPE)
  if(NOT ORT_INCLUDE_DIR AND DEFINED ENV{SQ_ONNX_ORT_INCLUDE_DIR})
    set(ORT_INCLUDE_DIR "$ENV{SQ_ONNX_ORT_INCLUDE_DIR}")
  endif()
  if(ORT_INCLUDE_DIR)
    _sq_has_headers("${ORT_INCLUDE_DIR}" ok)
    if(NOT ok)
      message(WARNING "sq-onnx: ORT_INCLUDE_DIR=${ORT_INCLUDE_DIR} holds no onnxruntime_cxx_api.h")
      return()
    endif()
    set(ORT_INCLUDE_DIR "${ORT_INCLUDE_DIR}" PARENT_SCOPE)
    set(ORT_HEADERS_FOUND TRUE PARENT_SCOPE)
    return()
  endif()

  sq_user_cache_dir(cache)
  set(root "${cache}/ort-headers-${SQ_ORT_DEB_VERSION}")
  set(inc "${root}/usr/include/onnxruntime")
  _sq_has_headers("${inc}" ok)
  if(ok)
    set(ORT_INCLUDE_DIR "${inc}" PARENT_SCOPE)
    set(ORT_HEADERS_FOUND TRUE PARENT_SCOPE)
    return()
  endif()

  find_program(APT_GET apt-get)
  if(NOT APT_GET)
    message(WARNING "sq-onnx: no ONNX Runtime headers (no apt-get to fetch Debian's libonnxruntime-dev; "
                    "set ORT_INCLUDE_DIR); the custom-op library is skipped")
    return()
  endif()
  set(state "${cache}/apt-state")
  file(MAKE_DIRECTORY "${state}/lists/partial" "${state}/cache/archives/partial" "${state}/download")
  file(WRITE "${state}/sources.list"
       "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian ${SQ_ORT_DEB_SUITE} main\n")
  set(opts -o "Dir::Etc::SourceList=${state}/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
           -o "Dir::State::Lists=${state}/lists" -o "Dir::Cache=${state}/cache"
           -o "Dir::State::status=/dev/null" -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root")
  message(STATUS "sq-onnx: fetching libonnxruntime-dev (${SQ_ORT_DEB_SUITE}) headers into ${root}")
  execute_process(COMMAND "${APT_GET}" ${opts} -qq update
                  RESULT_VARIABLE rc OUTPUT_QUIET ERROR_VARIABLE err)
  if(rc EQUAL 0)
    file(GLOB old "${state}/download/*.deb")
    if(old)
      file(REMOVE ${old})
    endif()
    execute_process(COMMAND "${APT_GET}" ${opts} -qq download libonnxruntime-dev
                    WORKING_DIRECTORY "${state}/download" RESULT_VARIABLE rc OUTPUT_QUIET ERROR_VARIABLE err)
  endif()
  file(GLOB debs "${state}/download/libonnxruntime-dev_*.deb")
  if(NOT rc EQUAL 0 OR NOT debs)
    string(STRIP "${err}" err)
    message(WARNING "sq-onnx: could not fetch Debian's libonnxruntime-dev (${err}); "
                    "the custom-op library is skipped (set ORT_INCLUDE_DIR to build it)")
    return()
  endif()
  list(GET debs 0 deb)
  set(unpack "${state}/unpack")
  file(REMOVE_RECURSE "${unpack}")
  file(MAKE_DIRECTORY "${unpack}" "${root}")
  execute_process(COMMAND "${CMAKE_COMMAND}" -E tar xf "${deb}" WORKING_DIRECTORY "${unpack}")
  file(GLOB data "${unpack}/data.tar.*")
  if(data)
    execute_process(COMMAND "${CMAKE_COMMAND}" -E tar xf "${data}" WORKING_DIRECTORY "${root}")
  endif()
  file(REMOVE_RECURSE "${unpack}" "${state}/lists")
  _sq_has_headers("${inc}" ok)
  if(NOT ok)
    message(WARNING "sq-onnx: ${deb} held no onnxruntime headers; the custom-op library is skipped")
    return()
  endif()
  set(ORT_INCLUDE_DIR "${inc}" PARENT_SCOPE)
  set(ORT_HEADERS_FOUND TRUE PARENT_SCOPE)
endfunction()

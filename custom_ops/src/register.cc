// The library's one ORT entry point: RegisterCustomOps adds domain "sq_onnx" with the CPU ops and, when
// built with CUDA, the CUDA ops (used only by sessions that run the CUDA execution provider).

#include "ops_cpu.h"
#include "onnxruntime_cxx_api.h"

#ifndef SQ_ONNX_WITH_CUDA
std::vector<const OrtCustomOp*> sq::cuda_ops() { return {}; }
#endif

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {  // a runtime older than our headers
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, "the sq_onnx custom ops need onnxruntime >= 1.21");
  }
  Ort::InitApi(api);
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* st = api->CreateCustomOpDomain("sq_onnx", &domain)) return st;
  for (const OrtCustomOp* op : sq::cpu_ops())
    if (OrtStatus* st = api->CustomOpDomain_Add(domain, op)) return st;
  for (const OrtCustomOp* op : sq::cuda_ops())
    if (OrtStatus* st = api->CustomOpDomain_Add(domain, op)) return st;
  // The domain must outlive every session that uses it: keep it for the life of the process.
  return api->AddCustomOpDomain(options, domain);
}

// Whether this build exports the test and benchmark entry points (CMake option SQ_ONNX_TEST_HOOKS).
extern "C" __attribute__((visibility("default"))) int sq_onnx_has_test_hooks() {
#ifdef SQ_ONNX_TEST_HOOKS
  return 1;
#else
  return 0;
#endif
}

// Whether this build carries CUDA kernels (for sq_onnx.custom_ops.built_with_cuda()).
extern "C" __attribute__((visibility("default"))) int sq_onnx_built_with_cuda() {
#ifdef SQ_ONNX_WITH_CUDA
  return 1;
#else
  return 0;
#endif
}

// Whether this build carries the CUTLASS Hopper int8 GEMM (for sq_onnx.custom_ops.built_with_sm90_gemm()).
extern "C" __attribute__((visibility("default"))) int sq_onnx_built_with_sm90_gemm() {
#ifdef SQ_ONNX_WITH_SM90_GEMM
  return 1;
#else
  return 0;
#endif
}

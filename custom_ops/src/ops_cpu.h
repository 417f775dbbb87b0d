#pragma once
#include <vector>

#include "onnxruntime_c_api.h"

namespace sq {
// The CPU custom ops (float32 and float16 of each), for RegisterCustomOps.
std::vector<const OrtCustomOp*> cpu_ops();
// The CUDA custom ops; empty when the library was built without CUDA.
std::vector<const OrtCustomOp*> cuda_ops();
}  // namespace sq

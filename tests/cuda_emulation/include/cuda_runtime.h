// Stand-in for CUDA's runtime header when the kernels are compiled as C++ for the CPU emulation: the runtime
// API, the device built-ins and the emulated PTX helpers.
#pragma once
#include "cuda_runtime_api_emu.h"
#include "device_builtins_emu.h"
#include "ptx_emu.h"

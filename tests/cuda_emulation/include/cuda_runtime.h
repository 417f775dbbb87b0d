// Stand-in for CUDA's runtime header when the kernels are compiled as C++ for the CPU emulation.
#pragma once
#include "sq_cuda_emu.h"

// Stand-in for cuda_fp16.h on the CPU: __half holds IEEE binary16 bits; conversions go through the
// compiler's _Float16 (round to nearest even, as __float2half_rn).
#pragma once
#include <cstdint>
#include <cstring>

struct __half {
  uint16_t bits;
};
inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h, sizeof f);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float v) {
  const _Float16 f = static_cast<_Float16>(v);
  __half h;
  std::memcpy(&h, &f, sizeof h);
  return h;
}

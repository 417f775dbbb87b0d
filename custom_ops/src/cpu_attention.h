// softmax(scale * Q K^T + mask) V for one layer's heads, skipping the keys that the mask removes at the end of
// each query's row (the future, under a causal mask): the attention of an exported decoder (MatMul, Mul by the
// scale, Add of the mask, Softmax, MatMul) in one pass, with half of a causal prefill's work left out.
//
// Exactness of the skip: a key whose mask value is at most kMaskedBelow (transformers' finfo.min or -inf) has
// exp(score + mask - row max) == 0 in float32 whenever the row has an unmasked key, so leaving it out changes
// nothing. Only the masked keys after a row's last unmasked one are skipped; a row with no unmasked key is
// computed over all keys, as Softmax does.
#pragma once
#include <cstdint>

#include "cpu_kernels.h"

namespace sq {

constexpr float kMaskedBelow = -1e30f;

struct AttentionShape {
  int64_t batch = 1, heads = 1, kv_heads = 1, q_len = 1, kv_len = 1, head_size = 1;
  // The mask's first three dimensions: 1 or batch, 1 or heads, 1 or q_len (its last is kv_len).
  int64_t mask_batch = 1, mask_heads = 1, mask_rows = 1;
};

// out [B, H, S, D] from q [B, H, S, D], k and v [B, Hk, T, D] (head h reads kv head h / (H / Hk)) and the
// additive mask [mask_batch, mask_heads, mask_rows, T] (broadcast where those are 1) or nullptr.
void masked_attention(const float* q, const float* k, const float* v, const float* mask, const AttentionShape& s,
                      float scale, float* out, const ParallelFor& pf);

}  // namespace sq

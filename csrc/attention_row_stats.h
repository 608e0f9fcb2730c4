// Row statistics of attention scores for the partial-softmax path, in plain CUDA (no torch headers).
//
//   S = scale * q k^T + mask          (per batch b and head h: N x Nk, never stored)
//   stats[b*H + h, i] = (L_i, sum_j exp(S_ij - L_i)),  L_i = max_j S_ij      (fp32)
//
// q is (B, H, N, D) and k is (B, H, Nk, D), both through element strides (any layout, e.g. diffusers' (B, N, H*D)
// read in place); mask is null or additive with q's dtype, seen as (B, H, N, Nk) through strides (0 where it
// broadcasts). The key range of every row is split into `splits` parts, each reduced by its own blocks into
// partials[split, b*H + h, i] so that short N still fills the GPU; a second kernel merges the parts into stats.
// fp16 and bf16 on sm_80+ compute the scores on tensor cores (64 query rows per block), fp32 on CUDA cores (8).
// A row whose scores are all -inf gets (-inf, 0), like the max and sum of its scores.
#pragma once

#include <cuda_runtime.h>

#include "group_norm_nhwc.h"  // SdkDtype

struct SdkAttentionRowStatsArgs {
  const void* q;            // SDK_FLOAT32, SDK_FLOAT16 or SDK_BFLOAT16
  const void* k;            // q's dtype
  const void* mask;         // q's dtype, or null
  float* partials;          // (splits, B*H, N, 2), contiguous; no init needed
  float* stats;             // (B*H, N, 2), contiguous
  long long q_strides[4];   // (b, h, token, d), in elements
  long long k_strides[4];
  long long mask_strides[4];
  int B, H, N, Nk, D, splits;
  int dtype;
  float scale;
};

// nullptr when the kernels take these sizes and this dtype, else a short reason (a static string).
const char* sdk_attention_row_stats_why_not(int B, int H, int N, int Nk, int D, int splits, int dtype);

// Enqueues the two kernels on `stream` (current device); returns the launch error, if any. No host sync, no
// allocation: safe to capture in a CUDA graph.
cudaError_t sdk_attention_row_stats(const SdkAttentionRowStatsArgs& args, cudaStream_t stream);

// 3x3 convolution (stride 1, zero padding 1, one group) by Winograd F(2x2, 3x3) over channels_last tensors, with
// its epilogue fused, in plain CUDA (no torch headers):
//
//   out[n, h, w, k] = (sum_{c, i, j} x[n, h + i - 1, w + j - 1, c] * g[k, c, i, j] + bias[k] + residual[n, h, w, k])
//                     * scale
//
// The filters come transformed: u = G g G^T per (k, c) as (16, C, K) (sdkernels/ops/winograd.py: filter_transform,
// rounded to x's dtype). fp16/bf16 multiply on tensor cores (V and U in x's dtype, fp32 accumulation); fp32 runs on
// the FMA units, all in fp32. Two kernels: winograd_conv3x3.cu (WMMA, V through shared memory; fp32 too) and
// winograd_conv3x3_mma.cu (mma.sync, V built in registers; fp16/bf16), each file with its plan.
//
// Requirements (sdk_winograd_conv3x3_why_not checks the shape ones; the caller checks the pointers):
//   * C and K multiples of 8; N * ceil(H / 2) * ceil(W / 2) < 2^31;
//   * x, residual and out: channel stride 1, (n, h, w) strides in elements; x 16-byte aligned with strides that
//     are multiples of 8 elements (the kernel reads 4-byte words of channels);
//   * u contiguous (16, C, K), 16-byte aligned; bias contiguous (K,) or null; all of x's dtype;
//   * a device of compute capability 8.0 or newer (bf16 tensor cores).
#pragma once

#include <cuda_runtime.h>

#include "group_norm_nhwc.h"  // SdkDtype

struct SdkWinogradConv3x3Args {
  const void* x;         // (N, H, W, C) through x_strides
  const void* u;         // (16, C, K), contiguous: the transformed filters
  const void* bias;      // (K,), or null
  const void* residual;  // (N, H, W, K) through residual_strides, or null
  void* out;             // (N, H, W, K) through out_strides
  long long x_strides[3], residual_strides[3], out_strides[3];  // (n, h, w), in elements; channel stride 1
  int N, H, W, C, K;
  int dtype;             // SDK_FLOAT16, SDK_BFLOAT16 or SDK_FLOAT32, for every tensor
  float scale;
  int kernel;            // SDK_WINOGRAD_AUTO, SDK_WINOGRAD_WMMA or SDK_WINOGRAD_MMA
  int ablate;            // 0; for the bench's stage split only (mma kernel, fp16): 1-5 skip a stage, see
                         // winograd_conv3x3_mma.cu (the output is then not the convolution)
};

// Which kernel runs: auto takes the mma.sync one (winograd_conv3x3_mma.cu) for fp16/bf16 and the WMMA one
// (winograd_conv3x3.cu, also fp32) otherwise.
enum SdkWinogradKernel : int { SDK_WINOGRAD_AUTO = 0, SDK_WINOGRAD_WMMA = 1, SDK_WINOGRAD_MMA = 2 };

// nullptr when the kernel takes these sizes and this dtype, else a short reason (a static string).
const char* sdk_winograd_conv3x3_why_not(int N, int H, int W, int C, int K, int dtype);

// Enqueues the kernel on `stream` (current device); returns the launch error, if any. No host sync, no allocation:
// safe to capture in a CUDA graph.
cudaError_t sdk_winograd_conv3x3(const SdkWinogradConv3x3Args& args, cudaStream_t stream);

// The mma.sync kernel alone (fp16/bf16; sdk_winograd_conv3x3 checks the rest first).
const char* sdk_winograd_conv3x3_mma_why_not(int N, int H, int W, int C, int K, int dtype);
cudaError_t sdk_winograd_conv3x3_mma(const SdkWinogradConv3x3Args& args, cudaStream_t stream);

// Winograd F(2x2, 3x3) convolution over channels_last tensors with a fused epilogue: see winograd_conv3x3.h for the
// contract and sdkernels/ops/winograd.py for the math (the PyTorch reference there computes what this kernel does).
//
// The plan. The output is cut into 2x2 tiles, numbered (n, tile row, tile column); each tile needs the 4x4 input
// patch around it. With V[e] = B^T d B and U[e] = G g G^T at the 16 positions e, the convolution is 16 GEMMs
// M[e] (tiles x K) = V[e] (tiles x C) @ U[e] (C x K), then Y = A^T M A per tile and output channel.
// A block owns kTiles tiles x kBlockK output channels, all 16 GEMMs, and walks C one chunk (32 bytes of channels)
// at a time:
//   1. each thread loads one 4-byte word of channels of its tile's 4x4 patch (16 loads; a warp reads 4 pixels x
//      32 contiguous bytes per load; zeros outside the image), computes B^T d B in fp32 registers and stores the
//      16 results, rounded to x's dtype, as V[e][tile][channel] in shared memory: the transformed input never
//      reaches global memory;
//   2. the block copies U's chunk, U[e][channel][k], into one of two shared buffers with cp.async (16 bytes a
//      copy, straight to shared memory);
//   3. each warp runs the GEMM steps of two positions e: WMMA 16x16x16 with fp32 accumulators (fp16/bf16), or fp32
//      FMAs from shared memory (fp32).
// The next chunk's loads (U's copies, the patch words into registers) are issued before step 3, so they are in
// flight while the GEMMs run. After the last
// chunk the accumulators go through shared memory kPassK output channels at a time; each thread gathers the 16 M
// values of a (tile, k), applies A^T M A, adds bias and residual, multiplies by scale and stores the (up to) 4
// pixels that lie inside the image.
#include "winograd_conv3x3.h"

#include <mma.h>

#include "winograd_device.cuh"

namespace {

using namespace sdk_winograd;
namespace wmma = nvcuda::wmma;

constexpr int kThreads = 256;               // 8 warps
constexpr int kTiles = 32;                  // 2x2 output tiles per block: the GEMM rows
constexpr int kBlockK = 32;                 // output channels per block: the GEMM columns
constexpr int kPassK = 16;                  // output channels per pass of the output transform
constexpr int kPasses = kBlockK / kPassK;
constexpr int kChunkBytes = 32;             // input channels per step of the C loop: 16 fp16/bf16 or 8 fp32
constexpr int kWords = kChunkBytes / 4;     // 4-byte words of one pixel's chunk; thread = (tile, word)
constexpr int kPositions = 16;              // e = 4 * xi + nu
constexpr int kWarps = kThreads / 32;
constexpr int kPositionsPerWarp = kPositions / kWarps;
constexpr int kGemmBytes = 3 * kPositions * kTiles * kChunkBytes;      // V and two U buffers (each V's size)
constexpr int kStageBytes = kPositions * kTiles * kPassK * (int)sizeof(float);
constexpr int kSmemBytes = kGemmBytes > kStageBytes ? kGemmBytes : kStageBytes;
static_assert(kThreads == kTiles * kWords, "one thread per (tile, word) of the input chunk");
static_assert(kPositions % kWarps == 0 && kTiles % 16 == 0 && kBlockK % kPassK == 0 && kPassK == 16,
              "the WMMA tiling assumes these");

template <typename T>
constexpr int kChunkChannels = kChunkBytes / (int)sizeof(T);  // input channels per chunk

// ---- step 1: one word of channels of one tile's 4x4 input patch --------------------------------------------------

template <typename T>
struct InputPatch {
  static constexpr int kLanes = Elem<T>::kLanes;
  const T* x;
  int origin;  // element offset of patch pixel (0, 0) = image pixel (2 th - 1, 2 tw - 1), this word's channels
  int sh, sw;  // offsets fit in 32 bits (the launcher checks)
  unsigned rows, cols;  // bit a: patch row / column a lies inside the image
  bool tile_ok;
  int channel;          // the word's first channel within a chunk
  uint32_t w[16];

  __device__ InputPatch(const SdkWinogradConv3x3Args& a, int tile, int word, int tiles, int tiles_w,
                        int tiles_per_image)
      : x(static_cast<const T*>(a.x)), sh((int)a.x_strides[1]), sw((int)a.x_strides[2]), rows(0), cols(0),
        tile_ok(tile < tiles), channel(word * kLanes) {
    const TileCoords t = tile_coords(tile_ok ? tile : 0, tiles_w, tiles_per_image);
    const int h0 = 2 * t.th - 1, w0 = 2 * t.tw - 1;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      rows |= (unsigned)(h0 + i >= 0 && h0 + i < a.H) << i;
      cols |= (unsigned)(w0 + i >= 0 && w0 + i < a.W) << i;
    }
    origin = t.n * (int)a.x_strides[0] + h0 * sh + w0 * sw + channel;
  }

  // The raw words of chunk c0 (zeros outside the image, past C and past the last tile).
  __device__ __forceinline__ void load(int c0, int C) {
    const bool ok = tile_ok && c0 + channel < C;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const bool inside = ok && ((rows >> i) & 1u) && ((cols >> j) & 1u);
        w[4 * i + j] = inside ? __ldg(reinterpret_cast<const unsigned int*>(x + (origin + i * sh + j * sw + c0))) : 0u;
      }
    }
  }

  // B^T d B of each channel of the word, rounded to T, into V[e][tile][word] (as 4-byte words). One lane at a time,
  // written back into the raw words in place, to keep registers low.
  __device__ __forceinline__ void transform_into(uint32_t* v_words, int tile_in_block, int word) {
#pragma unroll
    for (int lane = 0; lane < kLanes; ++lane) {
      float d[16];
#pragma unroll
      for (int i = 0; i < 16; ++i) d[i] = Elem<T>::get(w[i], lane);
      input_transform(d);
#pragma unroll
      for (int i = 0; i < 16; ++i) w[i] = Elem<T>::set(w[i], lane, d[i]);
    }
#pragma unroll
    for (int e = 0; e < kPositions; ++e) v_words[(e * kTiles + tile_in_block) * kWords + word] = w[e];
  }
};

// ---- step 2: U's chunk, U[e][channel][k] for the block's kBlockK channels, copied with cp.async ----------------

template <typename T>
struct FilterChunk {
  static constexpr int kPerVec = 16 / (int)sizeof(T);              // elements per 16-byte vector
  static constexpr int kRowVecs = kBlockK / kPerVec;               // vectors per (e, channel) row
  static constexpr int kVecs = kPositions * kChunkChannels<T> * kRowVecs / kThreads;  // per thread
  static_assert(kVecs * kThreads == kPositions * kChunkChannels<T> * kRowVecs, "whole vectors per thread");

  // Shared memory U[e][channel][k] is the row-major order of the vectors, so vector i goes to slot i.
  __device__ __forceinline__ static void copy(uint4* u_vecs, const T* u, int c0, int k0, int C, int K) {
#pragma unroll
    for (int j = 0; j < kVecs; ++j) {
      const int i = threadIdx.x + j * kThreads;
      const int row = i / kRowVecs;
      const int c = c0 + row % kChunkChannels<T>, e = row / kChunkChannels<T>;
      const int k = k0 + (i % kRowVecs) * kPerVec;  // K % 8 == 0: a vector is wholly inside K or wholly past it
      const bool valid = c < C && k < K;
      copy16_async(u_vecs + i, valid ? u + (e * C + c) * K + k : u, valid);
    }
    copies_issued();
  }
};

// ---- step 3: the 16 GEMMs --------------------------------------------------------------------------------------

// fp16/bf16: warp w owns positions e = kPositionsPerWarp * w + p; per position, kTiles x kBlockK of accumulators as
// 16x16 fragments. One chunk (16 channels) is one k-step of 16.
template <typename T>
struct TensorCoreGemm {
  static constexpr int kRowFrags = kTiles / 16, kColFrags = kBlockK / 16;
  static_assert(kChunkChannels<T> == 16, "one WMMA k-step per chunk");
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kPositionsPerWarp][kRowFrags][kColFrags];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int p = 0; p < kPositionsPerWarp; ++p)
#pragma unroll
      for (int r = 0; r < kRowFrags; ++r)
#pragma unroll
        for (int c = 0; c < kColFrags; ++c) wmma::fill_fragment(acc[p][r][c], 0.f);
  }

  __device__ __forceinline__ void step(const T* v, const T* u) {
    const int warp = threadIdx.x / 32;
#pragma unroll
    for (int p = 0; p < kPositionsPerWarp; ++p) {
      const int e = warp * kPositionsPerWarp + p;
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[kRowFrags];
#pragma unroll
      for (int r = 0; r < kRowFrags; ++r) wmma::load_matrix_sync(a[r], v + (e * kTiles + r * 16) * 16, 16);
#pragma unroll
      for (int c = 0; c < kColFrags; ++c) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
        wmma::load_matrix_sync(b, u + e * 16 * kBlockK + c * 16, kBlockK);
#pragma unroll
        for (int r = 0; r < kRowFrags; ++r) wmma::mma_sync(acc[p][r][c], a[r], b, acc[p][r][c]);
      }
    }
  }

  // M of output channels [kPass * 16, kPass * 16 + 16) of the block into stage[e][tile][16].
  template <int kPass>
  __device__ __forceinline__ void stage(float* st) const {
    const int warp = threadIdx.x / 32;
#pragma unroll
    for (int p = 0; p < kPositionsPerWarp; ++p) {
      const int e = warp * kPositionsPerWarp + p;
#pragma unroll
      for (int r = 0; r < kRowFrags; ++r)
        wmma::store_matrix_sync(st + (e * kTiles + r * 16) * kPassK, acc[p][r][kPass], kPassK, wmma::mem_row_major);
    }
  }
};

// fp32: 16 threads per position e; thread (e, tile group tg, channel group kg) accumulates tiles tg + 4 i (i < 8)
// times output channels 8 kg + j (j < 8), reading V and U from shared memory.
struct FmaGemm {
  static constexpr int kTileGroups = 4, kChannelGroups = kBlockK / 8;
  static constexpr int kTilesPerThread = kTiles / kTileGroups;
  static_assert(kPositions * kTileGroups * kChannelGroups == kThreads, "one thread per (e, tile group, channels)");
  float acc[kTilesPerThread][8];

  __device__ __forceinline__ int position() const { return threadIdx.x / (kTileGroups * kChannelGroups); }
  __device__ __forceinline__ int tile_group() const { return (threadIdx.x / kChannelGroups) % kTileGroups; }
  __device__ __forceinline__ int channel_group() const { return threadIdx.x % kChannelGroups; }

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < kTilesPerThread; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
  }

  __device__ __forceinline__ void step(const float* v, const float* u) {
    constexpr int kChunk = kChunkChannels<float>;
    const int e = position(), tg = tile_group(), kg = channel_group();
#pragma unroll
    for (int c = 0; c < kChunk; ++c) {
      float a[kTilesPerThread];
#pragma unroll
      for (int i = 0; i < kTilesPerThread; ++i) a[i] = v[(e * kTiles + tg + kTileGroups * i) * kChunk + c];
      const float4* row = reinterpret_cast<const float4*>(u + (e * kChunk + c) * kBlockK + 8 * kg);
      const float4 b0 = row[0], b1 = row[1];
      const float b[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
      for (int i = 0; i < kTilesPerThread; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
  }

  template <int kPass>
  __device__ __forceinline__ void stage(float* st) const {
    const int e = position(), tg = tile_group(), kg = channel_group();
    if (kg * 8 / kPassK != kPass) return;
#pragma unroll
    for (int i = 0; i < kTilesPerThread; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) st[(e * kTiles + tg + kTileGroups * i) * kPassK + (kg * 8) % kPassK + j] = acc[i][j];
  }
};

template <typename T>
struct GemmFor {
  using type = TensorCoreGemm<T>;
};
template <>
struct GemmFor<float> {
  using type = FmaGemm;
};

// ---- output transform and epilogue ------------------------------------------------------------------------------

// Threads take (tile, k) pairs of the staged pass, k fastest: a warp reads 32 consecutive floats per position and
// writes 16 consecutive channels of a pixel.
template <typename T>
__device__ __forceinline__ void store_outputs(const SdkWinogradConv3x3Args& a, const float* st, int tile0, int kbase,
                                              int tiles, int tiles_w, int tiles_per_image) {
#pragma unroll
  for (int j = 0; j < kTiles * kPassK / kThreads; ++j) {
    const int pair = threadIdx.x + j * kThreads;
    const int t = pair / kPassK, kk = pair % kPassK;
    const int tile = tile0 + t, k = kbase + kk;
    if (tile >= tiles || k >= a.K) continue;
    float m[kPositions];
#pragma unroll
    for (int e = 0; e < kPositions; ++e) m[e] = st[(e * kTiles + t) * kPassK + kk];
    const TileCoords c = tile_coords(tile, tiles_w, tiles_per_image);
    store_tile<T>(a, m, c.n, c.th, c.tw, k);
  }
}

template <typename T, typename Gemm, int kPass>
__device__ __forceinline__ void output_passes(const SdkWinogradConv3x3Args& a, const Gemm& gemm, float* st, int tile0,
                                              int k0, int tiles, int tiles_w, int tiles_per_image) {
  if constexpr (kPass < kPasses) {
    __syncthreads();  // shared memory is free: the GEMMs (first pass) or the previous pass's reads are done
    gemm.template stage<kPass>(st);
    __syncthreads();
    store_outputs<T>(a, st, tile0, k0 + kPass * kPassK, tiles, tiles_w, tiles_per_image);
    output_passes<T, Gemm, kPass + 1>(a, gemm, st, tile0, k0, tiles, tiles_w, tiles_per_image);
  }
}

// ---- the kernel -------------------------------------------------------------------------------------------------

// Two blocks per SM (<= 128 registers) let one block's GEMMs hide the other's loads and barriers; the fp32 path's
// 64 FMA accumulators plus its operands do not fit in 128 registers without spilling, so it runs one.
template <typename T>
constexpr int kBlocksPerSm = 2;
template <>
constexpr int kBlocksPerSm<float> = 1;

template <typename T>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm<T>) winograd_conv3x3_kernel(const SdkWinogradConv3x3Args a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // the launcher refuses devices older than sm_80
#else
  using Gemm = typename GemmFor<T>::type;
  constexpr int kChunk = kChunkChannels<T>;
  constexpr int kUElems = kPositions * kChunk * kBlockK;
  __shared__ __align__(128) uint4 smem[kSmemBytes / 16];
  T* v = reinterpret_cast<T*>(smem);                             // V[16][kTiles][kChunk]
  T* u = v + kPositions * kTiles * kChunk;                        // two buffers U[16][kChunk][kBlockK]
  float* st = reinterpret_cast<float*>(smem);                    // stage[16][kTiles][kPassK], after the C loop

  const int tiles_h = (a.H + 1) / 2, tiles_w = (a.W + 1) / 2;
  const int tiles_per_image = tiles_h * tiles_w, tiles = a.N * tiles_per_image;
  const int tile0 = blockIdx.x * kTiles, k0 = blockIdx.y * kBlockK;
  const int tile_in_block = threadIdx.x / kWords, word = threadIdx.x % kWords;

  InputPatch<T> patch(a, tile0 + tile_in_block, word, tiles, tiles_w, tiles_per_image);
  Gemm gemm;
  gemm.zero();
  const T* u_global = static_cast<const T*>(a.u);
  const int chunks = (a.C + kChunk - 1) / kChunk;
  FilterChunk<T>::copy(reinterpret_cast<uint4*>(u), u_global, 0, k0, a.C, a.K);
  patch.load(0, a.C);
  for (int i = 0; i < chunks; ++i) {
    T* u_now = u + (i % 2) * kUElems;
    __syncthreads();  // the previous chunk's GEMMs are done with V and with the other U buffer
    patch.transform_into(reinterpret_cast<uint32_t*>(v), tile_in_block, word);
    copies_landed();  // this thread's copies of U's chunk i
    __syncthreads();  // everyone's
    if (i + 1 < chunks) {  // the next chunk's loads fly while this chunk's GEMMs run
      FilterChunk<T>::copy(reinterpret_cast<uint4*>(u + ((i + 1) % 2) * kUElems), u_global, (i + 1) * kChunk, k0,
                           a.C, a.K);
      patch.load((i + 1) * kChunk, a.C);
    }
    gemm.step(v, u_now);
  }
  output_passes<T, Gemm, 0>(a, gemm, st, tile0, k0, tiles, tiles_w, tiles_per_image);
#endif
}

template <typename T>
cudaError_t launch(const SdkWinogradConv3x3Args& a, cudaStream_t stream) {
  const long long tiles = (long long)a.N * ((a.H + 1) / 2) * ((a.W + 1) / 2);
  const dim3 grid((unsigned)((tiles + kTiles - 1) / kTiles), (unsigned)((a.K + kBlockK - 1) / kBlockK));
  winograd_conv3x3_kernel<T><<<grid, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

const char* sdk_winograd_conv3x3_why_not(int N, int H, int W, int C, int K, int dtype) {
  if (dtype != SDK_FLOAT16 && dtype != SDK_BFLOAT16 && dtype != SDK_FLOAT32) return "dtype is not fp16, bf16 or fp32";
  if (N < 1 || H < 1 || W < 1 || C < 1 || K < 1) return "empty tensor";
  if (C % 8 || K % 8) return "input or output channels not a multiple of 8 (the kernel moves 8-channel vectors)";
  if ((long long)N * ((H + 1) / 2) * ((W + 1) / 2) > INT_MAX - kTiles) return "more than 2^31 output tiles";
  if ((K + kBlockK - 1) / kBlockK > 65535) return "more than 65535 * 32 output channels";
  if ((long long)N * H * W * (C > K ? C : K) > INT_MAX || 16LL * C * K > INT_MAX) {
    return "a tensor of 2^31 elements or more (the kernel's offsets are 32-bit)";
  }
  return nullptr;
}

cudaError_t sdk_winograd_conv3x3(const SdkWinogradConv3x3Args& a, cudaStream_t stream) {
  if (sdk_winograd_conv3x3_why_not(a.N, a.H, a.W, a.C, a.K, a.dtype) != nullptr) return cudaErrorInvalidValue;
  if (!args_offsets_fit(a)) return cudaErrorInvalidValue;
  if (sdk_device_major() < 8) return cudaErrorNotSupported;
  const bool mma_ok = sdk_winograd_conv3x3_mma_why_not(a.N, a.H, a.W, a.C, a.K, a.dtype) == nullptr;
  if (a.kernel == SDK_WINOGRAD_MMA || (a.kernel == SDK_WINOGRAD_AUTO && mma_ok)) {
    return mma_ok ? sdk_winograd_conv3x3_mma(a, stream) : cudaErrorInvalidValue;
  }
  switch (a.dtype) {
    case SDK_FLOAT16: return launch<__half>(a, stream);
    case SDK_BFLOAT16: return launch<__nv_bfloat16>(a, stream);
    default: return launch<float>(a, stream);
  }
}

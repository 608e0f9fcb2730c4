// The one torch binding of the extension (sdkernels._C): a thin list of checked wrappers around the plain-CUDA
// launchers of csrc/*.cu. Each wrapper checks what its kernel assumes (device, dtype, layout, alignment), returning
// the message of an error that names the function (sdkernels/_ext.py raises it), else launches on the current CUDA
// stream of the input's device and returns an empty string.
// Only c10/cuda headers (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE headers): it then compiles
// with nothing more than the CUDA runtime headers.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <climits>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>

#include "attention_row_stats.h"
#include "group_norm_nhwc.h"
#include "winograd_conv3x3.h"

namespace {

// A failed check returns its message (empty: launched) and the Python side raises it (sdkernels/_ext.py). The
// message is built with std::to_string and c10::toString (a C string), never through c10's stream operators: on the
// GPU machine (torch 2.11+cu130) every failed check crashed the process with TORCH_CHECK and with c10::str alike;
// built this way each raises its message there (scripts/probe_binding.py).
void put(std::string& s, const char* v) { s += v; }
void put(std::string& s, at::IntArrayRef v) {
  s += "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  s += "]";
}
void put(std::string& s, const c10::Device& d) {
  s += d.is_cuda() ? "cuda" : d.is_cpu() ? "cpu" : "another device";
  if (d.has_index()) s += ":" + std::to_string(d.index());
}
void put(std::string& s, at::ScalarType t) { s += c10::toString(t); }
template <typename T>
std::enable_if_t<std::is_arithmetic_v<T>> put(std::string& s, T v) { s += std::to_string(v); }

template <typename... Parts>
std::string sdk_message(const Parts&... parts) {
  std::string s;
  (put(s, parts), ...);
  return s;
}

#define SDK_CHECK(cond, ...)                                     \
  do {                                                           \
    if (!(cond)) return sdk_message(__VA_ARGS__);                \
  } while (0)
#define SDK_TRY(call)                                            \
  do {                                                           \
    std::string sdk_error_ = (call);                             \
    if (!sdk_error_.empty()) return sdk_error_;                  \
  } while (0)

int sdk_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return SDK_FLOAT32;
    case at::kHalf: return SDK_FLOAT16;
    case at::kBFloat16: return SDK_BFLOAT16;
    case at::kDouble: return SDK_FLOAT64;
    default: return -1;
  }
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0; }

// t seen as (N, S, C): the batch stride when channels have stride 1 and the spatial dims (size-1 dims aside) form
// one dense run of stride C, else -1.
int64_t nhwc_batch_stride(const at::Tensor& t) {
  if (t.stride(1) != 1) return -1;
  int64_t expected = t.size(1);
  for (int64_t d = t.dim() - 1; d >= 2; --d) {
    if (t.size(d) == 1) continue;
    if (t.stride(d) != expected) return -1;
    expected *= t.size(d);
  }
  return t.stride(0);
}

// ---- sdkernels::group_norm, channels_last (csrc/group_norm_nhwc.cu) --------------------------------------------

std::string group_norm_nhwc(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                     const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual, at::Tensor out,
                     int64_t num_groups, double eps, bool silu, const std::optional<at::Tensor>& shift) {
  constexpr const char* fn = "sdkernels._C.group_norm_nhwc";
  SDK_CHECK(x.is_cuda(), fn, ": x must be a CUDA tensor, got one on ", x.device());
  SDK_CHECK(x.dim() >= 3 && x.dim() <= 5, fn, ": x must be (N, C, *spatial) with 1 to 3 spatial dims, got shape ",
              x.sizes());
  const int dtype = sdk_dtype(x.scalar_type());
  SDK_CHECK(dtype == SDK_FLOAT32 || dtype == SDK_FLOAT16 || dtype == SDK_BFLOAT16, fn,
              ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  if (x.numel() == 0) return {};
  const int64_t N = x.size(0), C = x.size(1), S = x.numel() / (N * C);
  SDK_CHECK(N <= INT_MAX && C <= INT_MAX && S <= INT_MAX, fn, ": x of shape ", x.sizes(), " is too large");
  SDK_CHECK(num_groups >= 1 && num_groups <= C && C % num_groups == 0, fn, ": num_groups=", num_groups,
              " must divide the ", C, " channels");
  const int64_t vec = 16 / x.element_size();

  // x, residual and out: channels_last, 16-byte aligned vectors; returns the batch stride.
  auto layout = [&](const at::Tensor& t, const char* name, int64_t* batch_stride) -> std::string {
    SDK_CHECK(t.device() == x.device(), fn, ": ", name, " is on ", t.device(), " but x is on ", x.device());
    SDK_CHECK(t.sizes() == x.sizes() && t.scalar_type() == x.scalar_type(), fn, ": ", name, " must have x's shape ",
                x.sizes(), " and dtype ", x.scalar_type(), ", got ", t.sizes(), " ", t.scalar_type());
    const int64_t sn = nhwc_batch_stride(t);
    SDK_CHECK(sn >= 0, fn, ": ", name, " must be channels_last with dense spatial dims (channel stride 1, "
                "spatial stride C), got strides ", t.strides());
    SDK_CHECK(aligned16(t) && sn % vec == 0, fn, ": ", name, " must be 16-byte aligned in every sample");
    *batch_stride = sn;
    return {};
  };
  int64_t x_sn = 0, out_sn = 0, res_sn = 0;
  SDK_TRY(layout(x, "x", &x_sn));
  SDK_TRY(layout(out, "out", &out_sn));
  SDK_CHECK(N == 1 || out_sn >= S * C, fn, ": out's samples overlap (batch stride ", out_sn, ")");
  // A residual of another dtype is rounded to x's first (SD never mixes them; the result stays within tolerance).
  at::Tensor res;
  if (residual.has_value() && residual->defined()) {
    SDK_CHECK(residual->is_floating_point(), fn, ": residual must be floating point");
    res = residual->scalar_type() == x.scalar_type() ? *residual : residual->to(x.scalar_type());
  }
  if (res.defined()) SDK_TRY(layout(res, "residual", &res_sn));

  auto param = [&](const std::optional<at::Tensor>& t, const char* name, int* param_dtype,
                   const void** ptr) -> std::string {
    *ptr = nullptr;
    if (!t.has_value() || !t->defined()) return {};
    SDK_CHECK(t->device() == x.device(), fn, ": ", name, " is on ", t->device(), " but x is on ", x.device());
    SDK_CHECK(t->dim() == 1 && t->size(0) == C && t->is_contiguous(), fn, ": ", name,
                " must be a contiguous (", C, ",) tensor, got shape ", t->sizes(), " strides ", t->strides());
    *param_dtype = sdk_dtype(t->scalar_type());
    SDK_CHECK(*param_dtype >= 0, fn, ": ", name, " must be float32, float16, bfloat16 or float64, got ",
                t->scalar_type());
    *ptr = t->data_ptr();
    return {};
  };

  const char* why = sdk_group_norm_nhwc_why_not((int)N, (int)S, (int)C, (int)num_groups, dtype);
  SDK_CHECK(why == nullptr, fn, ": ", why, " (x of shape ", x.sizes(), ", num_groups=", num_groups, ")");

  const c10::cuda::CUDAGuard guard(x.device());
  SdkGroupNormArgs a{};
  a.x = x.data_ptr();
  SDK_TRY(param(weight, "weight", &a.weight_dtype, &a.weight));
  SDK_TRY(param(bias, "bias", &a.bias_dtype, &a.bias));
  a.residual = res.defined() ? res.data_ptr() : nullptr;
  if (shift.has_value() && shift->defined()) {
    const at::Tensor& sh = *shift;
    SDK_CHECK(sh.device() == x.device(), fn, ": shift is on ", sh.device(), " but x is on ", x.device());
    SDK_CHECK(sh.dim() == 2 && sh.size(0) == N && sh.size(1) == C && (C == 1 || sh.stride(1) == 1), fn,
              ": shift must be (", N, ", ", C, ") with channel stride 1, got shape ", sh.sizes(), " strides ",
              sh.strides());
    a.shift_dtype = sdk_dtype(sh.scalar_type());
    SDK_CHECK(a.shift_dtype >= 0, fn, ": shift must be float32, float16, bfloat16 or float64, got ", sh.scalar_type());
    SDK_CHECK(N * sh.stride(0) + C <= INT_MAX, fn, ": shift is too large");
    a.shift = sh.data_ptr();
    a.shift_batch_stride = sh.stride(0);
  }
  a.out = out.data_ptr();
  a.x_batch_stride = x_sn;
  a.residual_batch_stride = res_sn;
  a.out_batch_stride = out_sn;
  a.N = (int)N; a.S = (int)S; a.C = (int)C; a.G = (int)num_groups;
  a.dtype = dtype;
  a.eps = (float)eps;
  a.silu = silu;
  const size_t bytes = sdk_group_norm_nhwc_workspace_bytes(a.N, a.S, a.C, a.G, dtype);
  const at::Tensor workspace = at::empty({(int64_t)bytes}, x.options().dtype(at::kByte));
  a.workspace = workspace.data_ptr();
  const cudaError_t err = sdk_group_norm_nhwc(a, c10::cuda::getCurrentCUDAStream().stream());
  SDK_CHECK(err == cudaSuccess, fn, ": kernel launch failed: ", cudaGetErrorString(err));
  return {};
}

// Which plan group_norm_nhwc takes for x on its device: '' for the one-kernel (cluster) plan, else why not.
std::string group_norm_nhwc_cluster_why_not(const at::Tensor& x, int64_t num_groups) {
  const int dtype = sdk_dtype(x.scalar_type());
  if (!x.is_cuda() || x.dim() < 3 || x.numel() == 0 || num_groups < 1 || x.size(1) % num_groups)
    return "not a non-empty CUDA input of 3 to 5 dims whose channels num_groups divides";
  const int64_t N = x.size(0), C = x.size(1), S = x.numel() / (N * C);
  if (N > INT_MAX || C > INT_MAX || S > INT_MAX) return "too large";
  const char* why = sdk_group_norm_nhwc_why_not((int)N, (int)S, (int)C, (int)num_groups, dtype);
  if (why) return why;
  const c10::cuda::CUDAGuard guard(x.device());
  why = sdk_group_norm_nhwc_cluster_why_not((int)N, (int)S, (int)C, (int)num_groups, dtype);
  return why ? why : "";
}

// ---- sdkernels::flash_attention, partial-softmax row statistics (csrc/attention_row_stats.cu) -------------------

std::string attention_row_stats(const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& mask,
                         at::Tensor partials, at::Tensor stats, double scale) {
  constexpr const char* fn = "sdkernels._C.attention_row_stats";
  SDK_CHECK(q.is_cuda() && k.device() == q.device(), fn, ": q and k must be CUDA tensors on one device, got ",
              q.device(), " and ", k.device());
  SDK_CHECK(q.dim() == 4 && k.dim() == 4, fn, ": q and k must be (B, H, tokens, D), got shapes ", q.sizes(),
              " and ", k.sizes());
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3), Nk = k.size(2);
  SDK_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == D, fn, ": k of shape ", k.sizes(),
              " does not match q of shape ", q.sizes());
  SDK_CHECK(k.scalar_type() == q.scalar_type(), fn, ": q and k must share a dtype, got ", q.scalar_type(), " and ",
              k.scalar_type());
  const int dtype = sdk_dtype(q.scalar_type());
  SDK_CHECK(N <= INT_MAX && Nk <= INT_MAX && B * H <= INT_MAX, fn, ": q of shape ", q.sizes(), " is too large");
  SDK_CHECK(partials.dim() == 4 && partials.is_contiguous() && partials.scalar_type() == at::kFloat &&
                  partials.size(1) == B * H && partials.size(2) == N && partials.size(3) == 2 &&
                  partials.device() == q.device(),
              fn, ": partials must be a contiguous float32 (splits, B*H, N, 2) tensor on q's device, got ",
              partials.sizes());
  SDK_CHECK(stats.dim() == 3 && stats.is_contiguous() && stats.scalar_type() == at::kFloat &&
                  stats.size(0) == B * H && stats.size(1) == N && stats.size(2) == 2 && stats.device() == q.device(),
              fn, ": stats must be a contiguous float32 (B*H, N, 2) tensor on q's device, got ", stats.sizes());
  const int splits = (int)partials.size(0);
  const char* why = sdk_attention_row_stats_why_not((int)B, (int)H, (int)N, (int)Nk, (int)D, splits, dtype);
  SDK_CHECK(why == nullptr, fn, ": ", why, " (q of shape ", q.sizes(), ", k of shape ", k.sizes(), ", ", splits,
              " splits)");

  SdkAttentionRowStatsArgs a{};
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.mask = nullptr;
  if (mask.has_value() && mask->defined()) {
    SDK_CHECK(mask->device() == q.device() && mask->scalar_type() == q.scalar_type(), fn,
                ": mask must have q's device and dtype, got ", mask->device(), " ", mask->scalar_type());
    SDK_CHECK(mask->dim() == 4 && mask->size(0) == B && mask->size(1) == H && mask->size(2) == N &&
                    mask->size(3) == Nk,
                fn, ": mask must be a (B, H, N, Nk) view (broadcast with zero strides), got ", mask->sizes());
    a.mask = mask->data_ptr();
    for (int i = 0; i < 4; ++i) a.mask_strides[i] = mask->stride(i);
  }
  for (int i = 0; i < 4; ++i) {
    a.q_strides[i] = q.stride(i);
    a.k_strides[i] = k.stride(i);
  }
  a.partials = partials.data_ptr<float>();
  a.stats = stats.data_ptr<float>();
  a.B = (int)B; a.H = (int)H; a.N = (int)N; a.Nk = (int)Nk; a.D = (int)D; a.splits = splits;
  a.dtype = dtype;
  a.scale = (float)scale;
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaError_t err = sdk_attention_row_stats(a, c10::cuda::getCurrentCUDAStream().stream());
  SDK_CHECK(err == cudaSuccess, fn, ": kernel launch failed: ", cudaGetErrorString(err));
  return {};
}

// ---- sdkernels::conv3x3, Winograd F(2x2, 3x3) (csrc/winograd_conv3x3.cu) ----------------------------------------

std::string winograd_conv3x3(const at::Tensor& x, const at::Tensor& u, const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& residual, at::Tensor out, double scale, int64_t kernel,
                      int64_t ablate) {
  constexpr const char* fn = "sdkernels._C.winograd_conv3x3";
  SDK_CHECK(kernel == SDK_WINOGRAD_AUTO || kernel == SDK_WINOGRAD_WMMA || kernel == SDK_WINOGRAD_MMA, fn,
            ": kernel must be 0 (auto), 1 (wmma) or 2 (mma), got ", kernel);
  SDK_CHECK(ablate == 0 || (ablate >= 1 && ablate <= 5 && kernel == SDK_WINOGRAD_MMA &&
                            x.scalar_type() == at::kHalf), fn,
            ": ablate (bench only) must be 0, or 1-5 with kernel 2 and fp16, got ", ablate);
  SDK_CHECK(x.is_cuda(), fn, ": x must be a CUDA tensor, got one on ", x.device());
  SDK_CHECK(x.dim() == 4, fn, ": x must be (N, C, H, W), got shape ", x.sizes());
  const int dtype = sdk_dtype(x.scalar_type());
  SDK_CHECK(dtype == SDK_FLOAT32 || dtype == SDK_FLOAT16 || dtype == SDK_BFLOAT16, fn,
              ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  SDK_CHECK(u.dim() == 3 && u.size(0) == 16 && u.size(1) == C && u.is_contiguous() && aligned16(u), fn,
              ": u must be the contiguous, 16-byte aligned (16, C, K) transformed filters for x's ", C,
              " channels, got shape ", u.sizes(), " strides ", u.strides());
  const int64_t K = u.size(2);
  SDK_CHECK(N <= INT_MAX && C <= INT_MAX && H <= INT_MAX && W <= INT_MAX && K <= INT_MAX, fn, ": x of shape ",
              x.sizes(), " is too large");
  const char* why = sdk_winograd_conv3x3_why_not((int)N, (int)H, (int)W, (int)C, (int)K, dtype);
  SDK_CHECK(why == nullptr, fn, ": ", why, " (x of shape ", x.sizes(), ", ", K, " output channels)");

  // x, residual and out: (N, *, H, W) with channel stride 1 and x's dtype; returns their (n, h, w) strides.
  auto nhwc = [&](const at::Tensor& t, const char* name, int64_t channels, long long* strides) -> std::string {
    SDK_CHECK(t.device() == x.device() && t.scalar_type() == x.scalar_type(), fn, ": ", name,
                " must have x's device and dtype, got ", t.device(), " ", t.scalar_type());
    SDK_CHECK(t.dim() == 4 && t.size(0) == N && t.size(1) == channels && t.size(2) == H && t.size(3) == W, fn,
                ": ", name, " must have shape (", N, ", ", channels, ", ", H, ", ", W, "), got ", t.sizes());
    SDK_CHECK(t.stride(1) == 1, fn, ": ", name, " must be channels_last (channel stride 1), got strides ",
                t.strides());
    const int dims[3] = {0, 2, 3};
    for (int i = 0; i < 3; ++i) strides[i] = t.size(dims[i]) == 1 ? 0 : t.stride(dims[i]);  // never stepped
    return {};
  };
  SdkWinogradConv3x3Args a{};
  SDK_TRY(nhwc(x, "x", C, a.x_strides));
  SDK_CHECK(aligned16(x) && a.x_strides[0] % 8 == 0 && a.x_strides[1] % 8 == 0 && a.x_strides[2] % 8 == 0, fn,
              ": x must be 16-byte aligned with strides that are multiples of 8 elements, got strides ", x.strides());
  SDK_TRY(nhwc(out, "out", K, a.out_strides));
  SDK_CHECK(u.device() == x.device() && u.scalar_type() == x.scalar_type(), fn,
              ": u must have x's device and dtype, got ", u.device(), " ", u.scalar_type());
  a.bias = nullptr;
  if (bias.has_value() && bias->defined()) {
    SDK_CHECK(bias->device() == x.device() && bias->scalar_type() == x.scalar_type() && bias->dim() == 1 &&
                    bias->size(0) == K && bias->is_contiguous(),
                fn, ": bias must be a contiguous (", K, ",) tensor of x's device and dtype, got ", bias->sizes(), " ",
                bias->scalar_type(), " on ", bias->device());
    a.bias = bias->data_ptr();
  }
  a.residual = nullptr;
  if (residual.has_value() && residual->defined()) {
    SDK_TRY(nhwc(*residual, "residual", K, a.residual_strides));
    a.residual = residual->data_ptr();
  }
  a.x = x.data_ptr();
  a.u = u.data_ptr();
  a.out = out.data_ptr();
  a.N = (int)N; a.H = (int)H; a.W = (int)W; a.C = (int)C; a.K = (int)K;
  a.dtype = dtype;
  a.scale = (float)scale;
  a.kernel = (int)kernel;
  a.ablate = (int)ablate;
  if (kernel == SDK_WINOGRAD_MMA) {
    const char* why_mma = sdk_winograd_conv3x3_mma_why_not(a.N, a.H, a.W, a.C, a.K, dtype);
    SDK_CHECK(why_mma == nullptr, fn, ": the mma kernel: ", why_mma);
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaError_t err = sdk_winograd_conv3x3(a, c10::cuda::getCurrentCUDAStream().stream());
  SDK_CHECK(err == cudaSuccess, fn, ": kernel launch failed: ", cudaGetErrorString(err),
              " (needs compute capability 8.0 or newer and element offsets below 2^31)");
  return {};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("group_norm_nhwc", &group_norm_nhwc,
        "out = [silu](group_norm(x + shift[:, :, None], num_groups, weight, bias, eps)) [+ residual], x and out "
        "channels_last; writes out; returns '' or why it did not",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("residual"), py::arg("out"), py::arg("num_groups"),
        py::arg("eps"), py::arg("silu"), py::arg("shift") = py::none());
  m.def("group_norm_nhwc_cluster_why_not", &group_norm_nhwc_cluster_why_not,
        "'' where group_norm_nhwc runs x in one kernel (a thread block cluster per channel slice, sm_90+), else "
        "why not",
        py::arg("x"), py::arg("num_groups"));
  m.def("attention_row_stats", &attention_row_stats,
        "stats[bh, i] = (max_j S_ij, sum_j exp(S_ij - max)) of S = scale * q k^T + mask, keys split over "
        "partials.size(0) parts; writes partials and stats; returns '' or why it did not",
        py::arg("q"), py::arg("k"), py::arg("mask"), py::arg("partials"), py::arg("stats"), py::arg("scale"));
  m.def("winograd_conv3x3", &winograd_conv3x3,
        "out = (conv3x3(x) + bias + residual) * scale by Winograd F(2x2, 3x3) from the transformed filters u "
        "(16, C, K); x, residual and out channels_last; kernel 0 auto, 1 the WMMA kernel, 2 the mma.sync one "
        "(fp16/bf16); ablate 1-5 (bench only, kernel 2, fp16: the output is then not the convolution) skips the "
        "filter copies, the input copies, the input transform, the MMAs or the output transform with the epilogue; "
        "writes out; returns '' or why it did not",
        py::arg("x"), py::arg("u"), py::arg("bias"), py::arg("residual"), py::arg("out"), py::arg("scale"),
        py::arg("kernel") = 0, py::arg("ablate") = 0);
}

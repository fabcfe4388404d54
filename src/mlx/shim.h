// Forwarding shim between the cxx bridge (ffi.rs) and MLX's C++ API. No statics, no environment
// reads: each function converts argument types and calls MLX; the only logic is a walk of the
// pending graph (pending_ops), the lambda through which MLX's compile traces a Rust function, the
// choice of the fused CPU kernels (cpu_kernels.h) or CUDA kernels (gpu_kernels.h) where they
// apply, and the same functions as MLX operations where they do not (gated activations, fused
// q/k/v heads, residual add with the next norm).
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "mlx/mlx.h"
#include "rust/cxx.h"

namespace mlx_embed {

enum class Dtype : uint8_t;
enum class Activation : uint8_t;
using mlx::core::array;
using ArrayPtr = std::unique_ptr<array>;

struct TensorFile {
  std::unordered_map<std::string, array> tensors;
};

struct ArrayList {
  std::vector<array> items;
};

struct CompiledFn {
  std::function<std::vector<array>(const std::vector<array>&)> fn;
};

struct TraceFn;

ArrayPtr from_f32(rust::Slice<const float> data, rust::Slice<const int32_t> shape);
ArrayPtr from_i32(rust::Slice<const int32_t> data, rust::Slice<const int32_t> shape);
ArrayPtr scalar(float value, Dtype dtype);
ArrayPtr arange(int32_t start, int32_t stop);
ArrayPtr clone_ref(const array& a);
rust::Vec<int32_t> shape(const array& a);
Dtype dtype(const array& a);
rust::Vec<float> to_f32_vec(const array& a);
rust::Vec<int32_t> to_i32_vec(const array& a);
void eval(const array& a);
void async_eval(const array& a);
bool is_available(const array& a);
ArrayPtr for_host(const array& a);
rust::Vec<rust::String> pending_ops(const array& a);

ArrayPtr astype(const array& a, Dtype dtype);
ArrayPtr reshape(const array& a, rust::Slice<const int32_t> shape);
ArrayPtr transpose(const array& a, rust::Slice<const int32_t> axes);
ArrayPtr expand_dims(const array& a, int32_t axis);
ArrayPtr slice(const array& a, rust::Slice<const int32_t> start, rust::Slice<const int32_t> stop);
ArrayPtr take(const array& a, const array& indices, int32_t axis);
ArrayPtr concatenate(const array& a, const array& b, int32_t axis);
ArrayPtr take_along_axis(const array& a, const array& indices, int32_t axis);

ArrayPtr add(const array& a, const array& b);
ArrayPtr subtract(const array& a, const array& b);
ArrayPtr multiply(const array& a, const array& b);
ArrayPtr divide(const array& a, const array& b);
ArrayPtr maximum(const array& a, const array& b);
ArrayPtr matmul(const array& a, const array& b);
ArrayPtr less(const array& a, const array& b);
ArrayPtr less_equal(const array& a, const array& b);
ArrayPtr equal(const array& a, const array& b);
ArrayPtr logical_and(const array& a, const array& b);
ArrayPtr logical_or(const array& a, const array& b);
ArrayPtr where_(const array& cond, const array& x, const array& y);

ArrayPtr abs(const array& a);
ArrayPtr sqrt(const array& a);
ArrayPtr rsqrt(const array& a);
ArrayPtr square(const array& a);
ArrayPtr tanh(const array& a);
ArrayPtr sigmoid(const array& a);
ArrayPtr sum_axis(const array& a, int32_t axis, bool keepdims);

ArrayPtr rms_norm(const array& x, const array& weight, float eps);
ArrayPtr rope(const array& x, int32_t dims, bool traditional, float base, float scale, int32_t offset);
ArrayPtr head_norm_rope(const array& x, const array& weight, float eps, int32_t dims, float base,
                        float scale);
ArrayPtr gated_activation(const array& gate, const array& up, Activation act);
std::unique_ptr<ArrayList> qkv_heads(const array& qkv, const array& qw, const array& kw, float eps,
                                     int32_t b, int32_t l, int32_t heads, int32_t kv_heads,
                                     int32_t head_dim, int32_t dims, float base, float scale);
ArrayPtr gated_halves(const array& gu, Activation act);
std::unique_ptr<ArrayList> residual_rms_norm(const array& x, const array& y, const ArrayList& post,
                                             float post_eps, const array& w, float eps, Dtype out);
// gated_halves(x · wt), wt a [K, 2·I] view of the rows `w` [2·I, K]: one kernel for a few rows
// on a CUDA device.
ArrayPtr gated_matmul(const array& x, const array& w, const array& wt, Activation act);
// residual_rms_norm(x, y, post, post_eps, w, eps, out) (x and the norm of x when `y` is empty),
// then the norm times `rows_t` ([E, N], a view of the rows `rows`), and gated_halves of that when
// `gated`: [stream, product]. One kernel for a few rows on a CUDA device.
std::unique_ptr<ArrayList> norm_matmul(const array& x, const ArrayList& y, const ArrayList& post,
                                       float post_eps, const array& w, float eps, Dtype out,
                                       const array& rows, const array& rows_t, bool gated,
                                       Activation act);
// qkv_heads, then attention with `mask` (additive, [B, 1, L, L]), heads merged: [B·L, H·D].
// `causal`: the mask is causal over right-padded rows (a padding token sees at least itself);
// then where cuDNN attends, its causal mode replaces the mask, and the values differ from the
// mask's at padding tokens only.
ArrayPtr qkv_attention(const array& qkv, const array& qw, const array& kw, float eps, int32_t b,
                       int32_t l, int32_t heads, int32_t kv_heads, int32_t head_dim, int32_t dims,
                       float base, float rope_scale, float attn_scale, const array& mask,
                       bool causal);
ArrayPtr scaled_dot_product_attention(const array& q, const array& k, const array& v, float scale,
                                      const array& mask);
ArrayPtr quantized_matmul(const array& x, const array& w, const array& scales, const array& biases,
                          bool transpose, int32_t group_size, int32_t bits);
ArrayPtr dequantize(const array& w, const array& scales, const array& biases, int32_t group_size,
                    int32_t bits);

std::unique_ptr<ArrayList> array_list_new();
void array_list_push(ArrayList& list, const array& a);
size_t array_list_len(const ArrayList& list);
ArrayPtr array_list_get(const ArrayList& list, size_t i);
std::unique_ptr<CompiledFn> compile(rust::Box<TraceFn> f);
std::unique_ptr<ArrayList> call_compiled(const CompiledFn& f, const ArrayList& inputs);

std::unique_ptr<TensorFile> load_safetensors(rust::Str path);
rust::Vec<rust::String> tensor_names(const TensorFile& file);
ArrayPtr take_tensor(TensorFile& file, rust::Str name);

bool gpu_is_available();
void set_default_device(bool gpu);
rust::String version();
size_t active_memory();
size_t peak_memory();
size_t cache_memory();
size_t set_memory_limit(size_t limit);
size_t memory_limit();
size_t set_cache_limit(size_t limit);
void clear_cache();
size_t gpu_info_size(rust::Str key);

struct StoredKernel;
StoredKernel nvrtc_store(rust::Str library, rust::Str dir, rust::Str name, rust::Str source, rust::Str arch);
rust::String cuda_kernel_cache();

}  // namespace mlx_embed

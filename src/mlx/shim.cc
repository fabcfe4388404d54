// Forwarding shim: see shim.h. Exceptions propagate to cxx, which turns them into Rust errors.
#include "mlx-embed/src/mlx/shim.h"

#include <cmath>
#include <stdexcept>
#include <unordered_set>
#include <vector>

#include "mlx-embed/src/mlx/cpu_kernels.h"
#include "mlx-embed/src/mlx/gpu_kernels.h"
#include "mlx-embed/src/mlx/nvrtc.h"
#include "mlx-embed/src/mlx/ffi.rs.h"
#include "mlx/primitives.h"

namespace mlx_embed {

namespace mx = mlx::core;

namespace {

mx::Dtype to_mlx(Dtype d) {
  switch (d) {
    case Dtype::Bool: return mx::bool_;
    case Dtype::Uint8: return mx::uint8;
    case Dtype::Uint16: return mx::uint16;
    case Dtype::Uint32: return mx::uint32;
    case Dtype::Uint64: return mx::uint64;
    case Dtype::Int8: return mx::int8;
    case Dtype::Int16: return mx::int16;
    case Dtype::Int32: return mx::int32;
    case Dtype::Int64: return mx::int64;
    case Dtype::Float16: return mx::float16;
    case Dtype::Float32: return mx::float32;
    case Dtype::Float64: return mx::float64;
    case Dtype::Bfloat16: return mx::bfloat16;
    case Dtype::Complex64: return mx::complex64;
  }
  throw std::invalid_argument("unknown dtype code " + std::to_string(static_cast<int>(d)));
}

Dtype from_mlx(mx::Dtype d) {
  switch (d.val()) {
    case mx::Dtype::Val::bool_: return Dtype::Bool;
    case mx::Dtype::Val::uint8: return Dtype::Uint8;
    case mx::Dtype::Val::uint16: return Dtype::Uint16;
    case mx::Dtype::Val::uint32: return Dtype::Uint32;
    case mx::Dtype::Val::uint64: return Dtype::Uint64;
    case mx::Dtype::Val::int8: return Dtype::Int8;
    case mx::Dtype::Val::int16: return Dtype::Int16;
    case mx::Dtype::Val::int32: return Dtype::Int32;
    case mx::Dtype::Val::int64: return Dtype::Int64;
    case mx::Dtype::Val::float16: return Dtype::Float16;
    case mx::Dtype::Val::float32: return Dtype::Float32;
    case mx::Dtype::Val::float64: return Dtype::Float64;
    case mx::Dtype::Val::bfloat16: return Dtype::Bfloat16;
    case mx::Dtype::Val::complex64: return Dtype::Complex64;
  }
  throw std::invalid_argument("MLX dtype without a bridge equivalent");
}

mx::Shape to_shape(rust::Slice<const int32_t> s) { return mx::Shape(s.begin(), s.end()); }

ArrayPtr own(mx::array a) { return std::make_unique<mx::array>(std::move(a)); }

// `a` in `dtype`, row-major: the form copy_out reads directly (for_host builds it ahead).
array host_form(const array& a, mx::Dtype dtype) { return mx::contiguous(mx::astype(a, dtype)); }

template <typename T>
rust::Vec<T> copy_out(const array& a, mx::Dtype as) {
  array c = a;
  // An array already submitted is waited for alone: a conversion added now would queue behind
  // everything submitted to its stream since (e.g. the next batch).
  if (c.status() != array::Status::unscheduled) c.wait();
  if (c.status() != array::Status::available || c.dtype() != as || !c.flags().row_contiguous) {
    c = host_form(a, as);
    c.eval();
  }
  rust::Vec<T> out;
  out.reserve(c.size());
  const T* p = c.data<T>();
  for (size_t i = 0; i < c.size(); ++i) out.push_back(p[i]);
  return out;
}

// The GPU kernels' name for `act`.
gpu_kernels::Act gpu_act(Activation act) {
  return act == Activation::Silu ? gpu_kernels::Act::Silu : gpu_kernels::Act::GeluTanh;
}

}  // namespace

ArrayPtr from_f32(rust::Slice<const float> data, rust::Slice<const int32_t> shape) {
  return own(mx::array(data.begin(), to_shape(shape), mx::float32));
}
ArrayPtr from_i32(rust::Slice<const int32_t> data, rust::Slice<const int32_t> shape) {
  return own(mx::array(data.begin(), to_shape(shape), mx::int32));
}
ArrayPtr scalar(float value, Dtype dtype) { return own(mx::array(value, to_mlx(dtype))); }
ArrayPtr arange(int32_t start, int32_t stop) { return own(mx::arange(start, stop)); }
ArrayPtr clone_ref(const array& a) { return std::make_unique<mx::array>(a); }
rust::Vec<int32_t> shape(const array& a) {
  rust::Vec<int32_t> out;
  for (auto d : a.shape()) out.push_back(d);
  return out;
}
Dtype dtype(const array& a) { return from_mlx(a.dtype()); }
rust::Vec<float> to_f32_vec(const array& a) { return copy_out<float>(a, mx::float32); }
rust::Vec<int32_t> to_i32_vec(const array& a) { return copy_out<int32_t>(a, mx::int32); }
void eval(const array& a) { mx::eval(a); }
void async_eval(const array& a) { mx::async_eval(a); }
bool is_available(const array& a) { return a.is_available(); }
ArrayPtr for_host(const array& a) { return own(host_form(a, mx::float32)); }
rust::Vec<rust::String> pending_ops(const array& a) {
  rust::Vec<rust::String> out;
  std::unordered_set<std::uintptr_t> seen;
  std::vector<array> stack{a};
  while (!stack.empty()) {
    array x = stack.back();
    stack.pop_back();
    if (!seen.insert(x.id()).second || !x.has_primitive()) continue;
    for (const auto& s : x.siblings()) seen.insert(s.id());
    out.push_back(rust::String(x.primitive().name()));
    for (const auto& in : x.inputs()) stack.push_back(in);
  }
  return out;
}

ArrayPtr astype(const array& a, Dtype dtype) { return own(mx::astype(a, to_mlx(dtype))); }
ArrayPtr reshape(const array& a, rust::Slice<const int32_t> shape) {
  return own(mx::reshape(a, to_shape(shape)));
}
ArrayPtr transpose(const array& a, rust::Slice<const int32_t> axes) {
  return own(mx::transpose(a, std::vector<int>(axes.begin(), axes.end())));
}
ArrayPtr expand_dims(const array& a, int32_t axis) { return own(mx::expand_dims(a, axis)); }
ArrayPtr slice(const array& a, rust::Slice<const int32_t> start, rust::Slice<const int32_t> stop) {
  return own(mx::slice(a, to_shape(start), to_shape(stop)));
}
ArrayPtr take(const array& a, const array& indices, int32_t axis) {
  return own(mx::take(a, indices, axis));
}
ArrayPtr concatenate(const array& a, const array& b, int32_t axis) {
  return own(mx::concatenate({a, b}, axis));
}
ArrayPtr take_along_axis(const array& a, const array& indices, int32_t axis) {
  return own(mx::take_along_axis(a, indices, axis));
}

ArrayPtr add(const array& a, const array& b) { return own(mx::add(a, b)); }
ArrayPtr subtract(const array& a, const array& b) { return own(mx::subtract(a, b)); }
ArrayPtr multiply(const array& a, const array& b) { return own(mx::multiply(a, b)); }
ArrayPtr divide(const array& a, const array& b) { return own(mx::divide(a, b)); }
ArrayPtr maximum(const array& a, const array& b) { return own(mx::maximum(a, b)); }
ArrayPtr matmul(const array& a, const array& b) { return own(mx::matmul(a, b)); }
ArrayPtr less(const array& a, const array& b) { return own(mx::less(a, b)); }
ArrayPtr less_equal(const array& a, const array& b) { return own(mx::less_equal(a, b)); }
ArrayPtr equal(const array& a, const array& b) { return own(mx::equal(a, b)); }
ArrayPtr logical_and(const array& a, const array& b) { return own(mx::logical_and(a, b)); }
ArrayPtr logical_or(const array& a, const array& b) { return own(mx::logical_or(a, b)); }
ArrayPtr where_(const array& cond, const array& x, const array& y) {
  return own(mx::where(cond, x, y));
}

ArrayPtr abs(const array& a) { return own(mx::abs(a)); }
ArrayPtr sqrt(const array& a) { return own(mx::sqrt(a)); }
ArrayPtr rsqrt(const array& a) { return own(mx::rsqrt(a)); }
ArrayPtr square(const array& a) { return own(mx::square(a)); }
ArrayPtr tanh(const array& a) { return own(mx::tanh(a)); }
ArrayPtr sigmoid(const array& a) { return own(mx::sigmoid(a)); }
ArrayPtr sum_axis(const array& a, int32_t axis, bool keepdims) {
  return own(mx::sum(a, axis, keepdims));
}

ArrayPtr rms_norm(const array& x, const array& weight, float eps) {
  if (cpu_kernels::applies({&x, &weight})) return own(cpu_kernels::rms_norm(x, weight, eps));
  return own(mx::fast::rms_norm(x, weight, eps));
}
ArrayPtr head_norm_rope(const array& x, const array& weight, float eps, int32_t dims, float base,
                        float scale) {
  if (cpu_kernels::applies({&x, &weight})) {
    return own(cpu_kernels::head_norm_rope(x, weight, eps, dims, base, scale));
  }
  auto normed = mx::transpose(mx::fast::rms_norm(x, weight, eps), {0, 2, 1, 3});
  return own(mx::fast::rope(normed, dims, false, base, scale, 0));
}
ArrayPtr gated_activation(const array& gate, const array& up, Activation act) {
  const bool silu = act == Activation::Silu;
  if (!silu && act != Activation::GeluTanh) throw std::invalid_argument("unknown activation");
  if (cpu_kernels::applies({&gate, &up}) && gate.shape() == up.shape()) {
    return own(cpu_kernels::gated(gate, up, silu ? cpu_kernels::Act::Silu
                                                 : cpu_kernels::Act::GeluTanh));
  }
  if (silu) return own(mx::multiply(mx::multiply(gate, mx::sigmoid(gate)), up));
  // 0.5 · x · (1 + tanh(√(2/π) · (x + 0.044715 · x³))), in the gate's dtype.
  const auto dt = gate.dtype();
  const auto scalar = [&](float v) { return mx::array(v, dt); };
  auto x3 = mx::multiply(gate, mx::square(gate));
  auto inner = mx::multiply(mx::add(gate, mx::multiply(x3, scalar(0.044715f))),
                            scalar(std::sqrt(2.0f / 3.14159265358979323846f)));
  auto g = mx::multiply(mx::multiply(scalar(0.5f), gate),
                        mx::add(scalar(1.0f), mx::tanh(inner)));
  return own(mx::multiply(g, up));
}
std::unique_ptr<ArrayList> qkv_heads(const array& qkv, const array& qw, const array& kw, float eps,
                                     int32_t b, int32_t l, int32_t heads, int32_t kv_heads,
                                     int32_t head_dim, int32_t dims, float base, float scale) {
  if (auto fused = gpu_kernels::qkv_heads(qkv, qw, kw, eps, b, l, heads, kv_heads, head_dim, dims,
                                          base, scale)) {
    return std::make_unique<ArrayList>(ArrayList{std::move(*fused)});
  }
  auto split = mx::reshape(qkv, {b, l, heads + 2 * kv_heads, head_dim});
  auto part = [&](int from, int n) { return mx::slice(split, {0, 0, from, 0}, {b, l, from + n, head_dim}); };
  auto q = head_norm_rope(part(0, heads), qw, eps, dims, base, scale);
  auto k = head_norm_rope(part(heads, kv_heads), kw, eps, dims, base, scale);
  auto v = mx::transpose(part(heads + kv_heads, kv_heads), {0, 2, 1, 3});
  return std::make_unique<ArrayList>(ArrayList{{*q, *k, v}});
}
ArrayPtr qkv_attention(const array& qkv, const array& qw, const array& kw, float eps, int32_t b,
                       int32_t l, int32_t heads, int32_t kv_heads, int32_t head_dim, int32_t dims,
                       float base, float rope_scale, float attn_scale, const array& mask,
                       bool causal) {
  if (auto fused = gpu_kernels::qkv_attention(qkv, qw, kw, eps, b, l, heads, kv_heads, head_dim,
                                              dims, base, rope_scale, attn_scale, mask)) {
    return own(std::move(*fused));
  }
  auto parts = qkv_heads(qkv, qw, kw, eps, b, l, heads, kv_heads, head_dim, dims, base, rope_scale);
  const auto& [q, k, v] = std::tie(parts->items[0], parts->items[1], parts->items[2]);
  // Right-padded rows under a causal mask: a real token's keys are the tokens up to it, all real,
  // so cuDNN's causal mode (which skips the blocked keys rather than reading a mask) gives the
  // same values there; padding tokens see other padding too, and are never pooled.
  auto a = causal && gpu_kernels::cudnn_attends(qkv.dtype(), b, l, heads, head_dim)
               ? mx::fast::scaled_dot_product_attention(q, k, v, attn_scale, "causal")
               : *scaled_dot_product_attention(q, k, v, attn_scale, mask);
  return own(mx::reshape(mx::transpose(a, {0, 2, 1, 3}), {b * l, heads * head_dim}));
}
ArrayPtr gated_halves(const array& gu, Activation act) {
  if (auto fused = gpu_kernels::gated_halves(gu, gpu_act(act))) {
    return own(std::move(*fused));
  }
  if (gu.ndim() != 2 || gu.shape(1) % 2 != 0) throw std::invalid_argument("gated_halves takes [N, 2·I]");
  const int n = gu.shape(0), inter = gu.shape(1) / 2;
  // In f32 whatever the dtype, rounded once: as precise as the kernel's two roundings.
  auto wide = gu.dtype() == mx::float32 ? gu : mx::astype(gu, mx::float32);
  auto out = *gated_activation(mx::slice(wide, {0, 0}, {n, inter}),
                               mx::slice(wide, {0, inter}, {n, 2 * inter}), act);
  return own(gu.dtype() == mx::float32 ? out : mx::astype(out, gu.dtype()));
}
std::unique_ptr<ArrayList> residual_rms_norm(const array& x, const array& y, const ArrayList& post,
                                             float post_eps, const array& w, float eps, Dtype out) {
  if (post.items.size() > 1) throw std::invalid_argument("at most one post-norm weight");
  const array* pw = post.items.empty() ? nullptr : &post.items[0];
  if (auto fused = gpu_kernels::residual_rms_norm(x, y, pw, post_eps, w, eps, to_mlx(out))) {
    return std::make_unique<ArrayList>(ArrayList{std::move(*fused)});
  }
  auto added = mx::add(x, pw ? *rms_norm(y, *pw, post_eps) : y);
  auto normed = *rms_norm(added, w, eps);
  if (normed.dtype() != to_mlx(out)) normed = mx::astype(normed, to_mlx(out));
  return std::make_unique<ArrayList>(ArrayList{{added, normed}});
}
ArrayPtr gated_matmul(const array& x, const array& w, const array& wt, Activation act) {
  if (auto fused = gpu_kernels::gated_matmul(x, w, gpu_act(act))) return own(std::move(*fused));
  return gated_halves(mx::matmul(x, wt), act);
}
std::unique_ptr<ArrayList> norm_matmul(const array& x, const ArrayList& y, const ArrayList& post,
                                       float post_eps, const array& w, float eps, Dtype out,
                                       const array& rows, const array& rows_t, bool gated,
                                       Activation act) {
  if (y.items.size() > 1 || post.items.size() > y.items.size()) {
    throw std::invalid_argument("norm_matmul takes at most one output to add, normed first only if given");
  }
  const array* ya = y.items.empty() ? nullptr : &y.items[0];
  const array* pw = post.items.empty() ? nullptr : &post.items[0];
  if (rows.dtype() == to_mlx(out)) {
    auto fused = gpu_kernels::norm_matmul(x, ya, pw, post_eps, w, eps, rows,
                                          gated ? std::optional(gpu_act(act)) : std::nullopt);
    if (fused) return std::make_unique<ArrayList>(ArrayList{std::move(*fused)});
  }
  std::vector<array> parts;
  if (ya) {
    parts = residual_rms_norm(x, *ya, post, post_eps, w, eps, out)->items;
  } else {
    auto normed = *rms_norm(x, w, eps);
    parts = {x, normed.dtype() == to_mlx(out) ? normed : mx::astype(normed, to_mlx(out))};
  }
  parts[1] = gated ? *gated_matmul(parts[1], rows, rows_t, act) : mx::matmul(parts[1], rows_t);
  return std::make_unique<ArrayList>(ArrayList{std::move(parts)});
}
ArrayPtr rope(const array& x, int32_t dims, bool traditional, float base, float scale,
              int32_t offset) {
  return own(mx::fast::rope(x, dims, traditional, base, scale, offset));
}
ArrayPtr scaled_dot_product_attention(const array& q, const array& k, const array& v, float scale,
                                      const array& mask) {
  if (cpu_kernels::applies({&q, &k, &v, &mask}) && cpu_kernels::attention_applies(q, k, v, mask)) {
    return own(cpu_kernels::attention(q, k, v, scale, mask));
  }
  if (auto fused = gpu_kernels::attention(q, k, v, scale, mask)) return own(std::move(*fused));
  return own(mx::fast::scaled_dot_product_attention(q, k, v, scale, "", mask));
}
ArrayPtr quantized_matmul(const array& x, const array& w, const array& scales, const array& biases,
                          bool transpose, int32_t group_size, int32_t bits) {
  return own(mx::quantized_matmul(x, w, scales, biases, transpose, group_size, bits, "affine"));
}
ArrayPtr dequantize(const array& w, const array& scales, const array& biases, int32_t group_size,
                    int32_t bits) {
  return own(mx::dequantize(w, scales, biases, group_size, bits, "affine"));
}

std::unique_ptr<ArrayList> array_list_new() { return std::make_unique<ArrayList>(); }
void array_list_push(ArrayList& list, const array& a) { list.items.push_back(a); }
size_t array_list_len(const ArrayList& list) { return list.items.size(); }
ArrayPtr array_list_get(const ArrayList& list, size_t i) {
  if (i >= list.items.size()) throw std::out_of_range("array list index out of range");
  return std::make_unique<mx::array>(list.items[i]);
}
std::unique_ptr<CompiledFn> compile(rust::Box<TraceFn> f) {
  // std::function needs a copyable target: the Rust function is shared, and freed with the
  // last copy (which also drops MLX's traces of it).
  auto shared = std::make_shared<rust::Box<TraceFn>>(std::move(f));
  auto traced = [shared](const std::vector<array>& in) {
    ArrayList inputs{in};
    ArrayList outputs;
    trace_call(**shared, inputs, outputs);
    return std::move(outputs.items);
  };
  return std::make_unique<CompiledFn>(CompiledFn{mx::compile(std::move(traced))});
}
std::unique_ptr<ArrayList> call_compiled(const CompiledFn& f, const ArrayList& inputs) {
  return std::make_unique<ArrayList>(ArrayList{f.fn(inputs.items)});
}

std::unique_ptr<TensorFile> load_safetensors(rust::Str path) {
  auto loaded = mx::load_safetensors(std::string(path), mx::Device::cpu);
  auto file = std::make_unique<TensorFile>();
  file->tensors = std::move(loaded.first);
  return file;
}
rust::Vec<rust::String> tensor_names(const TensorFile& file) {
  rust::Vec<rust::String> out;
  for (const auto& kv : file.tensors) out.push_back(rust::String(kv.first));
  return out;
}
ArrayPtr take_tensor(TensorFile& file, rust::Str name) {
  auto it = file.tensors.find(std::string(name));
  if (it == file.tensors.end()) throw std::out_of_range("no tensor named " + std::string(name));
  auto out = own(std::move(it->second));
  file.tensors.erase(it);
  return out;
}

bool gpu_is_available() { return mx::is_available(mx::Device::gpu); }
void set_default_device(bool gpu) {
  mx::set_default_device(gpu ? mx::Device::gpu : mx::Device::cpu);
}
rust::String version() { return rust::String(mx::version()); }
size_t active_memory() { return mx::get_active_memory(); }
size_t peak_memory() { return mx::get_peak_memory(); }
size_t cache_memory() { return mx::get_cache_memory(); }
size_t set_memory_limit(size_t limit) { return mx::set_memory_limit(limit); }
size_t memory_limit() { return mx::get_memory_limit(); }
size_t set_cache_limit(size_t limit) { return mx::set_cache_limit(limit); }
void clear_cache() { mx::clear_cache(); }
size_t gpu_info_size(rust::Str key) {
  return std::get<size_t>(mx::gpu::device_info(0).at(std::string(key)));
}

StoredKernel nvrtc_store(rust::Str library, rust::Str dir, rust::Str name, rust::Str source, rust::Str arch) {
  const auto stored = nvrtc::store(*nvrtc::open(std::string(library)), std::string(dir), std::string(name),
                                   std::string(source), std::string(arch));
  return StoredKernel{stored.compiled, stored.image.string()};
}
rust::String cuda_kernel_cache() { return gpu_kernels::cache(); }

}  // namespace mlx_embed

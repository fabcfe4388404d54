// Fused CUDA kernels: see gpu_kernels.h. Each kernel's source is put together here (the storage
// types, its helpers, an `extern "C"` entry point taking the inputs, the outputs and the
// per-batch sizes, the sizes and dtypes fixed per model as constants, the body), compiled once
// per machine with NVRTC into MLX's kernel cache folder (nvrtc.h) and run through
// `fast::precompiled_cuda_kernel`. Floats fixed per model (epsilons, RoPE base and scale) are
// written into the source as exact bit patterns.
#include "mlx-embed/src/mlx/gpu_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <string>
#include <unordered_map>
#include <variant>

#include "mlx-embed/src/mlx/nvrtc.h"
#include "mlx/backend/cuda/cuda.h"
#include "mlx/device.h"
#include "mlx/fast.h"
#include "mlx/ops.h"
#include "mlx/transforms.h"

namespace mlx_embed::gpu_kernels {

namespace mx = mlx::core;

namespace {

// The compute dtypes as the kernels store them, with the conversions the kernels use: to f32
// exactly, from f32 rounded to nearest even (the instructions CUDA's own bf16 and f16 types use).
constexpr const char* kTypes = R"(
struct bf16_t {
  unsigned short bits;
  bf16_t() = default;
  __device__ explicit bf16_t(float f) {
#if __CUDA_ARCH__ >= 800
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(bits) : "f"(f));
#else
    const unsigned u = __float_as_uint(f);
    bits = (u & 0x7fffffffu) > 0x7f800000u ? (unsigned short)0x7fffu
                                           : (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
#endif
  }
  __device__ explicit operator float() const { return __uint_as_float((unsigned)bits << 16); }
};
struct f16_t {
  unsigned short bits;
  f16_t() = default;
  __device__ explicit f16_t(float f) { asm("cvt.rn.f16.f32 %0, %1;" : "=h"(bits) : "f"(f)); }
  __device__ explicit operator float() const {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(bits));
    return f;
  }
};
)";

// Helpers shared by the kernels' sources.
constexpr const char* kHeader = R"(
__device__ inline float warp_sum(float v) {
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
// The sum of v over the block (blockDim.x a multiple of 32); every thread gets it.
__device__ inline float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int i = 0; i < (int)(blockDim.x / 32); ++i) total += scratch[i];
  return total;
}
)";

// `v` as a CUDA expression with exactly its bits (also what kernel keys hold of a float).
std::string literal(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  char buf[48];
  std::snprintf(buf, sizeof buf, "__int_as_float((int)0x%08xu)", bits);
  return buf;
}

bool is_float(mx::Dtype d) { return d == mx::float32 || d == mx::bfloat16 || d == mx::float16; }

// Features per 16-byte load for rows of `k` features of `x`'s dtype, or 1 where rows do not split.
int chunk(const mx::array& x, int k) {
  const int v = 16 / (int)x.itemsize();
  return k % v == 0 ? v : 1;
}

// Whether x [n, K] times the rows of w [N, K] takes the fused matmul kernel: n ≤ kMaxMatmulRows.
bool matmul_fits(const mx::array& x, const mx::array& w) {
  return available() && is_float(x.dtype()) && w.dtype() == x.dtype() && x.ndim() == 2 &&
         w.ndim() == 2 && x.shape(1) == w.shape(1) && x.shape(1) > 0 && x.shape(0) > 0 &&
         x.shape(0) <= kMaxMatmulRows && (long)w.shape(0) * 32 <= 0x7fffffffL;
}

// A compile-time value of a kernel: a size, a switch, or a dtype.
using Const = std::variant<int, bool, mx::Dtype>;
using Consts = std::vector<std::pair<std::string, Const>>;

// One kernel as compiled: its entry point's name and parameters (the inputs, the outputs, then
// the int scalars, in the order MLX passes them), its constants, its helpers and its body.
struct Spec {
  std::string name;
  std::vector<std::pair<std::string, mx::Dtype>> inputs, outputs;
  std::vector<std::string> scalars;
  Consts consts;
  std::string helpers, body;
};

const char* type_name(mx::Dtype d) {
  if (d == mx::float32) return "float";
  if (d == mx::bfloat16) return "bf16_t";
  if (d == mx::float16) return "f16_t";
  throw std::invalid_argument("no CUDA kernel takes this dtype");
}

std::string key_part(int v) { return std::to_string(v); }
std::string key_part(bool v) { return v ? "t" : "f"; }
std::string key_part(mx::Dtype d) { return type_name(d); }
std::string key_part(const std::string& s) { return s; }

// A kernel's key: its name and every value written into its source.
template <typename... V>
std::string key_of(const char* name, const V&... values) {
  std::string key = name;
  ((key += ' ', key += key_part(values)), ...);
  return key;
}

// The source NVRTC compiles for `k` (scripts/check-cuda-kernels.py puts them together the same
// way).
std::string assemble(const Spec& k) {
  std::string s = kTypes + k.helpers + "\nextern \"C\" __global__ void " + k.name + "(";
  const char* sep = "";
  for (const auto& [n, t] : k.inputs) s += sep + std::string("const ") + type_name(t) + "* " + n, sep = ", ";
  for (const auto& [n, t] : k.outputs) s += sep + std::string(type_name(t)) + "* " + n, sep = ", ";
  for (const auto& n : k.scalars) s += sep + std::string("int ") + n, sep = ", ";
  s += ") {\n";
  for (const auto& [n, v] : k.consts) {
    if (const int* i = std::get_if<int>(&v)) {
      s += "  constexpr int " + n + " = " + std::to_string(*i) + ";\n";
    } else if (const bool* b = std::get_if<bool>(&v)) {
      s += "  constexpr bool " + n + " = " + (*b ? "true" : "false") + ";\n";
    } else {
      s += "  using " + n + " = " + type_name(std::get<mx::Dtype>(v)) + ";\n";
    }
  }
  return s + k.body + "}\n";
}

// NVRTC, the device's architecture, and MLX's kernel cache folder (empty where MLX is handed the
// images themselves: the folder cannot be written, or MLX did not find a kernel stored there).
struct Compiler {
  const nvrtc::Library* nvrtc = nullptr;
  std::string arch;
  int major = 0;
  std::filesystem::path dir;
};

const Spec kProbe{"mlx_embed_probe", {{"x", mx::float32}}, {{"out", mx::float32}}, {"n"}, {}, "",
                  "  out[0] = x[0] + (float)n;\n"};

// Whether MLX finds a kernel stored in `dir` (a folder MLX could not create when it first looked
// for one is never read).
bool mlx_reads(const Compiler& c, const std::filesystem::path& dir) {
  const auto source = assemble(kProbe);
  const auto stored = nvrtc::store(*c.nvrtc, dir, kProbe.name, source, c.arch);
  auto out = mx::fast::precompiled_cuda_kernel(kProbe.name, stored.handle,
                                               {mx::array(1.5f)}, {{1}}, {mx::float32}, {2}, {1, 1, 1},
                                               {1, 1, 1}, 0, std::nullopt, true, mx::Device::gpu)[0];
  mx::eval(out);
  return out.item<float>() == 3.5f;
}

// Set up on the first kernel: no NVRTC in the process, or none that compiles for this device,
// leaves the kernels unused (`available()` is false, MLX's operations run instead).
const Compiler& compiler() {
  static const Compiler c = [] {
    Compiler c;
    try {
      const auto& info = mx::device_info(mx::Device::gpu);
      auto number = [&](const char* key) {
        auto it = info.find(key);
        const size_t* v = it == info.end() ? nullptr : std::get_if<size_t>(&it->second);
        return v ? (int)*v : 0;
      };
      const int major = number("compute_capability_major"), minor = number("compute_capability_minor");
      c.major = major;
      c.arch = "sm_" + std::to_string(major) + std::to_string(minor) + (major >= 9 ? "a" : "");
      c.nvrtc = major > 0 ? nvrtc::loaded() : nullptr;
      if (c.nvrtc) nvrtc::compile(*c.nvrtc, assemble(kProbe), c.arch);
    } catch (const std::exception&) {
      c.nvrtc = nullptr;
    }
    if (!c.nvrtc) return c;
    try {
      const auto dir = nvrtc::mlx_cache_dir();
      if (mlx_reads(c, dir)) c.dir = dir;
    } catch (const std::exception&) {
      // The images are handed over instead.
    }
    return c;
  }();
  return c;
}

// The text MLX is handed for the kernel `key` stands for (its name and every value written into
// its source), compiled from `make()` on first use: putting a source together costs host time,
// so it is done once per kernel, and compiling once per machine.
template <typename Make>
const std::string& prepared(const std::string& key, Make make) {
  static std::mutex mutex;
  static std::unordered_map<std::string, std::string> texts;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = texts.find(key);
  if (it == texts.end()) {
    const Compiler& c = compiler();
    const Spec spec = make();
    const auto source = assemble(spec);
    std::string text;
    if (!c.dir.empty()) {
      try {
        text = nvrtc::store(*c.nvrtc, c.dir, spec.name, source, c.arch).handle;
      } catch (const std::filesystem::filesystem_error&) {
        // The folder cannot be written now: this kernel's image is handed over.
      }
    }
    if (text.empty()) text = nvrtc::compile(*c.nvrtc, source, c.arch);
    it = texts.emplace(key, std::move(text)).first;
  }
  return it->second;  // entries are never removed, and unordered_map nodes do not move
}

// Runs kernel `name` prepared as `text` (inputs copied to row-contiguous first where they are not).
std::vector<mx::array> run(const std::string& name, const std::string& text, const std::vector<mx::array>& inputs,
                           const std::vector<mx::Shape>& shapes, const std::vector<mx::Dtype>& dtypes,
                           const std::vector<mx::fast::ScalarArg>& scalars, long threads, int block) {
  return mx::fast::precompiled_cuda_kernel(name, text, inputs, shapes, dtypes, scalars, {(int)threads, 1, 1},
                                           {block, 1, 1}, 0, std::nullopt, true);
}

std::string replace_all(std::string s, const std::string& from, const std::string& to) {
  for (size_t at = s.find(from); at != std::string::npos; at = s.find(from, at + to.size())) {
    s.replace(at, from.size(), to);
  }
  return s;
}

// The heads of q and k as the kernels hold them: lane j of a warp holds features j, j + 32, … of
// a head of D features (`head_load`). `head_norm` RMS-norms it by `w` (epsilon `eps`), rounded to
// T as the unfused norm rounds it; `rotate` turns it as a position whose angles `rope_angles`
// gives (rotate-half over the first 2·HALF features, angle pos / base^(e / HALF), `log2base` =
// log2(base)): RoPE pairs feature e with e + HALF, in the same lane since HALF is a multiple of 32.
constexpr const char* kHeadNormRope = R"(
template <typename T, int D>
__device__ inline void head_load(const T* src, float (&x)[D / 32]) {
  const int lane = threadIdx.x % 32;
  for (int j = 0; j < D / 32; ++j) x[j] = static_cast<float>(src[lane + 32 * j]);
}
template <typename T, int D>
__device__ inline void head_norm(const T* w, float eps, float (&x)[D / 32]) {
  constexpr int PER = D / 32;
  const int lane = threadIdx.x % 32;
  float ss = 0.f;
  for (int j = 0; j < PER; ++j) ss += x[j] * x[j];
  ss = warp_sum(ss);
  const float r = rsqrtf(ss / D + eps);
  for (int j = 0; j < PER; ++j) {
    const T n = static_cast<T>(x[j] * r);
    x[j] = static_cast<float>(static_cast<T>(static_cast<float>(w[lane + 32 * j]) * static_cast<float>(n)));
  }
}
// Features e and e + HALF turn by the same angle: one sincosf per pair.
template <int HALF>
__device__ inline void rope_angles(float pos, float log2base, float (&cs)[HALF / 32], float (&sn)[HALF / 32]) {
  const int lane = threadIdx.x % 32;
  for (int j = 0; j < HALF / 32; ++j) {
    const int e = lane + 32 * j;
    const float inv = exp2f(-(static_cast<float>(e) / static_cast<float>(HALF)) * log2base);
    sincosf(pos * inv, &sn[j], &cs[j]);
  }
}
template <int D, int HALF>
__device__ inline void rotate(const float (&cs)[HALF / 32], const float (&sn)[HALF / 32], float (&x)[D / 32]) {
  for (int j = 0; j < HALF / 32; ++j) {
    const float lo = x[j], hi = x[j + HALF / 32];
    x[j] = lo * cs[j] - hi * sn[j];
    x[j + HALF / 32] = lo * sn[j] + hi * cs[j];
  }
}
template <typename T, int D, int HALF>
__device__ inline void head_norm_rope(const T* src, const T* w, float eps, float pos, float log2base,
                                      float (&x)[D / 32]) {
  head_load<T, D>(src, x);
  head_norm<T, D>(w, eps, x);
  float cs[HALF / 32], sn[HALF / 32];
  rope_angles<HALF>(pos, log2base, cs, sn);
  rotate<D, HALF>(cs, sn, x);
}
)";

// One warp per (token, head slot).
constexpr const char* kQkvHeads = R"(
  constexpr int S = H + 2 * HKV;
  constexpr int PER = D / 32;
  const long slots = (long)B * L * S;
  const long warp = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= slots) return;
  const int s = (int)(warp % S);
  const long t = warp / S;
  const int p = (int)(t % L);
  const long b = t / L;
  const T* src = qkv + t * (long)(S * D) + (long)s * D;
  if (s >= H + HKV) {
    T* dst = v + ((b * HKV + (s - H - HKV)) * L + p) * D;
    for (int j = 0; j < PER; ++j) dst[lane + 32 * j] = src[lane + 32 * j];
    return;
  }
  T* dst = s < H ? q + ((b * H + s) * L + p) * D : k + ((b * HKV + (s - H)) * L + p) * D;
  float x[PER];
  head_norm_rope<T, D, HALF>(src, s < H ? qw : kw, EPS, SCALE * static_cast<float>(p), LOG2BASE, x);
  for (int j = 0; j < PER; ++j) dst[lane + 32 * j] = static_cast<T>(x[j]);
)";

// The q and k heads of one token per warp, written as token rows qk [B·L, (H + HKV)·D] (heads
// side by side, as the projection holds them), the angles of its position worked out once for
// all of its heads; v is left where the projection wrote it.
constexpr const char* kQkRows = R"(
  constexpr int S = H + 2 * HKV;
  constexpr int R = H + HKV;
  constexpr int PER = D / 32;
  // Heads loaded together, so that their loads are in flight at once.
  constexpr int G = 4;
  const long t = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (t >= (long)B * L) return;
  float cs[HALF / 32], sn[HALF / 32];
  rope_angles<HALF>(SCALE * static_cast<float>((int)(t % L)), LOG2BASE, cs, sn);
  const T* src = qkv + t * (long)(S * D);
  T* dst = qk + t * (long)(R * D);
  for (int h0 = 0; h0 < R; h0 += G) {
    float x[G][PER];
#pragma unroll
    for (int g = 0; g < G; ++g) {
      if (h0 + g < R) head_load<T, D>(src + (h0 + g) * D, x[g]);
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      if (h0 + g < R) {
        head_norm<T, D>(h0 + g < H ? qw : kw, EPS, x[g]);
        rotate<D, HALF>(cs, sn, x[g]);
        for (int j = 0; j < PER; ++j) dst[(h0 + g) * D + lane + 32 * j] = static_cast<T>(x[g][j]);
      }
    }
  }
)";

// act(g) · u for a gate and an up value in the compute dtype: the activation in f32, rounded to T
// before the product (as the reference's activation function returns it), the product rounded.
constexpr const char* kGateAct = R"(
template <typename T, bool GELU>
__device__ inline T gate_act(T g, T u) {
  const float x = static_cast<float>(g);
  float a;
  if (GELU) {
    a = 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
  } else {
    a = x / (1.0f + expf(-x));
  }
  return static_cast<T>(static_cast<float>(static_cast<T>(a)) * static_cast<float>(u));
}
)";

// Each thread takes V consecutive features of one token (V · sizeof(T) is 16 bytes, or V is 1),
// with 16-byte loads and stores where the buffers are aligned for them.
constexpr const char* kGated = R"(
  constexpr long PER_ROW = I / V;
  const long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= (long)N * PER_ROW) return;
  const long t = idx / PER_ROW;
  const long i = (idx % PER_ROW) * V;
  const T* gr = gu + t * 2 * I + i;
  T* o = out + t * I + i;
  constexpr bool VEC = V * sizeof(T) == 16;
  const bool aligned = VEC && ((reinterpret_cast<unsigned long>(gu) | reinterpret_cast<unsigned long>(out)) & 15) == 0;
  alignas(16) T g[V];
  alignas(16) T u[V];
  alignas(16) T r[V];
  if (aligned) {
    *reinterpret_cast<uint4*>(g) = *reinterpret_cast<const uint4*>(gr);
    *reinterpret_cast<uint4*>(u) = *reinterpret_cast<const uint4*>(gr + I);
  } else {
    for (int j = 0; j < V; ++j) {
      g[j] = gr[j];
      u[j] = gr[I + j];
    }
  }
  for (int j = 0; j < V; ++j) r[j] = gate_act<T, GELU>(g[j], u[j]);
  if (aligned) {
    *reinterpret_cast<uint4*>(o) = *reinterpret_cast<const uint4*>(r);
  } else {
    for (int j = 0; j < V; ++j) o[j] = r[j];
  }
)";

// One block of 256 threads per row; thread i holds features i, i + 256, ….
constexpr const char* kResidualNorm = R"(
  __shared__ float scratch[32];
  constexpr int PER = (E + 255) / 256;
  const long row = blockIdx.x;
  const int tid = threadIdx.x;
  const float* xr = x + row * E;
  const T* yr = y + row * E;
  float add[PER];
  float ss = 0.f;
  for (int j = 0; j < PER; ++j) {
    const int e = tid + 256 * j;
    add[j] = e < E ? static_cast<float>(yr[e]) : 0.f;
    ss += add[j] * add[j];
  }
  if (POST) {
    ss = block_sum(ss, scratch);
    const float r = rsqrtf(ss / E + POST_EPS);
    for (int j = 0; j < PER; ++j) {
      const int e = tid + 256 * j;
      if (e < E) {
        const T n = static_cast<T>(add[j] * r);
        add[j] = static_cast<float>(static_cast<T>(static_cast<float>(POST_W[e]) * static_cast<float>(n)));
      }
    }
  }
  float s[PER];
  float ss2 = 0.f;
  for (int j = 0; j < PER; ++j) {
    const int e = tid + 256 * j;
    s[j] = e < E ? xr[e] + add[j] : 0.f;
    ss2 += s[j] * s[j];
  }
  ss2 = block_sum(ss2, scratch);
  const float r2 = rsqrtf(ss2 / E + EPS);
  for (int j = 0; j < PER; ++j) {
    const int e = tid + 256 * j;
    if (e < E) {
      xo[row * E + e] = s[j];
      h[row * E + e] = static_cast<U>(w[e] * (s[j] * r2));
    }
  }
)";

// x·wᵀ for the n ≤ NMAX rows of x [n, K] and R rows of w (`wr`, K features each), summed in f32
// as a matmul in the compute dtype accumulates: lane j of a warp takes the V-wide chunks j,
// j + 32, … of each row (16-byte loads when V > 1); every lane gets every sum.
constexpr const char* kRowDots = R"(
template <typename T, int V>
__device__ inline void load_chunk(const T* p, float (&out)[V]) {
  if constexpr (V > 1) {
    alignas(16) T v[V];
    *reinterpret_cast<uint4*>(v) = *reinterpret_cast<const uint4*>(p);
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = static_cast<float>(v[j]);
  } else {
    out[0] = static_cast<float>(*p);
  }
}

template <typename T, int NMAX, int R, int V>
__device__ inline void row_dots(const T* x, int n, int K, const T* const (&wr)[R], float (&acc)[R][NMAX]) {
  // TILE chunks of each weight row are loaded before they are used, so that a warp has that many
  // loads in flight rather than one.
  constexpr int TILE = 4;
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < NMAX; ++m) acc[r][m] = 0.f;
  for (int k0 = lane * V; k0 < K; k0 += 32 * V * TILE) {
    float w[TILE][R][V];
#pragma unroll
    for (int t = 0; t < TILE; ++t) {
      const int k = k0 + t * 32 * V;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (k < K) {
          load_chunk<T, V>(wr[r] + k, w[t][r]);
        } else {
#pragma unroll
          for (int j = 0; j < V; ++j) w[t][r][j] = 0.f;
        }
      }
    }
#pragma unroll
    for (int m = 0; m < NMAX; ++m) {
      if (m < n) {
#pragma unroll
        for (int t = 0; t < TILE; ++t) {
          const int k = k0 + t * 32 * V;
          if (k < K) {
            float xv[V];
            load_chunk<T, V>(x + (long)m * K + k, xv);
#pragma unroll
            for (int r = 0; r < R; ++r)
#pragma unroll
              for (int j = 0; j < V; ++j) acc[r][m] = fmaf(w[t][r][j], xv[j], acc[r][m]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int m = 0; m < NMAX; ++m) acc[r][m] = warp_sum(acc[r][m]);
}

// row_dots with 16-byte loads where x and w allow them (K a multiple of V is the caller's).
template <typename T, int NMAX, int R, int V>
__device__ inline void row_dots_any(const T* x, const T* w, int n, int K, const T* const (&wr)[R],
                                    float (&acc)[R][NMAX]) {
  const bool wide = V > 1 && ((reinterpret_cast<unsigned long>(x) | reinterpret_cast<unsigned long>(w)) & 15) == 0;
  if (wide) {
    row_dots<T, NMAX, R, V>(x, n, K, wr, acc);
  } else {
    row_dots<T, NMAX, R, 1>(x, n, K, wr, acc);
  }
}
)";

// A fused gate/up projection `w` [2·I, K] (gate rows first) of the n ≤ NMAX rows of x [n, K], then
// act(gate) · up: [n, I]. One warp per output feature c (weight rows c and I + c); lane m
// writes row m. The projections are rounded to T as a matmul's output is.
constexpr const char* kGatedMatmul = R"(
  const long c = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (c >= I) return;
  const T* const wr[2] = {w + c * K, w + (I + c) * K};
  float acc[2][NMAX];
  row_dots_any<T, NMAX, 2, V>(x, w, n, K, wr, acc);
#pragma unroll
  for (int m = 0; m < NMAX; ++m) {
    if (m < n && lane == m) {
      out[(long)m * I + c] = gate_act<T, GELU>(static_cast<T>(acc[0][m]), static_cast<T>(acc[1][m]));
    }
  }
)";

// The rows of the residual stream x [n, E] (f32) plus a block's output y (compute dtype T, first
// RMS-normed by `pw` when POST), or x alone when !ADD, each RMS-normed by `nw` (f32) and rounded
// to T into `xs` [n, E], with kResidualNorm's arithmetic: a warp per row, lane j holding features
// j, j + 32, …. Block 0 also writes the sums (the new stream) to `xo`.
constexpr const char* kStageRows = R"(
template <typename T, int E, bool ADD, bool POST>
__device__ inline void stage_rows(const float* x, const T* y, const T* pw, const float* nw, float* xo,
                                  float eps, float post_eps, int n, T* xs) {
  constexpr int PER = (E + 31) / 32;
  const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
  for (int m = threadIdx.x / 32; m < n; m += warps) {
    const float* xr = x + (long)m * E;
    float s[PER];
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < PER; ++j) {
      const int e = lane + 32 * j;
      s[j] = ADD && e < E ? static_cast<float>(y[(long)m * E + e]) : 0.f;
      ss += s[j] * s[j];
    }
    if (POST) {
      const float r = rsqrtf(warp_sum(ss) / E + post_eps);
#pragma unroll
      for (int j = 0; j < PER; ++j) {
        const int e = lane + 32 * j;
        if (e < E) {
          const T h = static_cast<T>(s[j] * r);
          s[j] = static_cast<float>(static_cast<T>(static_cast<float>(pw[e]) * static_cast<float>(h)));
        }
      }
    }
    ss = 0.f;
#pragma unroll
    for (int j = 0; j < PER; ++j) {
      const int e = lane + 32 * j;
      s[j] = e < E ? xr[e] + s[j] : 0.f;
      ss += s[j] * s[j];
    }
    const float r = rsqrtf(warp_sum(ss) / E + eps);
#pragma unroll
    for (int j = 0; j < PER; ++j) {
      const int e = lane + 32 * j;
      if (e < E) {
        if (ADD && blockIdx.x == 0) xo[(long)m * E + e] = s[j];
        xs[m * E + e] = static_cast<T>(nw[e] * (s[j] * r));
      }
    }
  }
}
)";

// kStageRows into shared memory, then those n ≤ NMAX normed rows times the rows of w [·, E]: a
// warp per pair of weight rows at a time (GATE: gate row f and up row O + f, act(gate) · up to
// output feature f; else output features 2f and 2f + 1), lane m writing row m of out [n, O].
// The projections are rounded to T as a matmul's output is. STAGE is the inputs kStageRows takes.
constexpr const char* kNormMatmul = R"(
  __shared__ alignas(16) T xs[NMAX * E];
  stage_rows<T, E, ADD, POST>(STAGE, EPS, POST_EPS, n, xs);
  __syncthreads();
  const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const long pairs = GATE ? O : (O + 1) / 2;
  for (long f = (long)blockIdx.x * warps + threadIdx.x / 32; f < pairs; f += (long)gridDim.x * warps) {
    const long c0 = GATE ? f : 2 * f;
    const long c1 = GATE ? O + f : (2 * f + 1 < O ? 2 * f + 1 : 2 * f);
    const T* const wr[2] = {w + c0 * E, w + c1 * E};
    float acc[2][NMAX];
    row_dots_any<T, NMAX, 2, V>(xs, w, n, E, wr, acc);
#pragma unroll
    for (int m = 0; m < NMAX; ++m) {
      if (m < n && lane == m) {
        if (GATE) {
          out[(long)m * O + f] = gate_act<T, GELU>(static_cast<T>(acc[0][m]), static_cast<T>(acc[1][m]));
        } else {
          out[(long)m * O + c0] = static_cast<T>(acc[0][m]);
          if (c1 != c0) out[(long)m * O + c1] = static_cast<T>(acc[1][m]);
        }
      }
    }
  }
)";

// Attention of one query row `qv` (rounded to T; lane j holds features j, j + 32, …) over L keys
// and values (rows `kstride` / `vstride` apart) and an additive mask row: its keys in order with a
// running (online) softmax in f32; the result, rounded once, goes to `o`.
constexpr const char* kAttendRow = R"(
template <typename T, typename M, int D>
__device__ inline void attend_row(const float (&qv)[D / 32], const T* kb, long kstride, const T* vb,
                                  long vstride, const M* mr, int L, float scale, T* o) {
  constexpr int PER = D / 32;
  const int lane = threadIdx.x % 32;
  float acc[PER];
  for (int j = 0; j < PER; ++j) acc[j] = 0.f;
  const float blocked = -__int_as_float(0x7f800000);
  float m = blocked, total = 0.f;
  for (int key = 0; key < L; ++key) {
    const T* kr = kb + key * kstride;
    float dot = 0.f;
    for (int j = 0; j < PER; ++j) dot += qv[j] * static_cast<float>(kr[lane + 32 * j]);
    const float score = warp_sum(dot) * scale + static_cast<float>(mr[key]);
    if (score == blocked) continue;
    const float top = fmaxf(m, score);
    const float shrink = expf(m - top);
    const float p = expf(score - top);
    total = total * shrink + p;
    const T* vr = vb + key * vstride;
    for (int j = 0; j < PER; ++j) acc[j] = acc[j] * shrink + p * static_cast<float>(vr[lane + 32 * j]);
    m = top;
  }
  for (int j = 0; j < PER; ++j) o[lane + 32 * j] = static_cast<T>(acc[j] / total);
}
)";

// One warp per query row. The output is laid out [B, L, H, D].
constexpr const char* kAttention = R"(
  constexpr int PER = D / 32;
  const long rows = (long)B * H * L;
  const long warp = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= rows) return;
  const int i = (int)(warp % L);
  const long bh = warp / L;
  const long b = bh / H;
  const long g = b * HKV + (bh % H) / (H / HKV);
  float qv[PER];
  for (int j = 0; j < PER; ++j) qv[j] = static_cast<float>(q[warp * D + lane + 32 * j]);
  attend_row<T, M, D>(qv, k + g * L * D, D, v + g * L * D, D, mask + (b * L + i) * L, L, SCALE,
                      out + ((b * L + i) * H + bh % H) * D);
)";

// `kQkvHeads` and `kAttention` in one kernel for short sequences: a block per (batch row, q head,
// QROWS query rows). Its warps norm and rotate the keys of the head's kv group into shared memory,
// then each takes query rows: norm, rotation, attention (values read from the projection as
// they are). The projection comes as [B·L, (H + 2·HKV)·D] token rows, L read from the mask's
// shape (no reshape for MLX to issue); the output is [B·L, H·D] token rows.
constexpr const char* kQkvAttention = R"(
  constexpr int S = H + 2 * HKV;
  constexpr int PER = D / 32;
  __shared__ alignas(16) unsigned char key_bytes[KCAP * D * sizeof(T)];
  T* keys = reinterpret_cast<T*>(key_bytes);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const int chunks = (L + QROWS - 1) / QROWS;
  const int chunk = blockIdx.x % chunks;
  const int h = (blockIdx.x / chunks) % H;
  const long b = blockIdx.x / chunks / H;
  const int g = h / (H / HKV);
  const T* rows = qkv + b * L * (long)(S * D);
  float x[PER];
  for (int p = warp; p < L; p += warps) {
    head_norm_rope<T, D, HALF>(rows + (long)p * S * D + (H + g) * D, kw, EPS, ROPE_SCALE * static_cast<float>(p),
                               LOG2BASE, x);
    for (int j = 0; j < PER; ++j) keys[p * D + lane + 32 * j] = static_cast<T>(x[j]);
  }
  __syncthreads();
  const int i = chunk * QROWS + warp;
  if (warp >= QROWS || i >= L) return;
  head_norm_rope<T, D, HALF>(rows + (long)i * S * D + h * D, qw, EPS, ROPE_SCALE * static_cast<float>(i),
                             LOG2BASE, x);
  for (int j = 0; j < PER; ++j) x[j] = static_cast<float>(static_cast<T>(x[j]));
  attend_row<T, M, D>(x, keys, D, rows + (H + HKV + g) * D, S * D, mask + (b * L + i) * L, L, ATTN_SCALE,
                      out + ((b * L + i) * H + h) * D);
)";

// Whether the kernels taking a fused q/k/v projection apply (see qkv_heads).
bool heads_fit(const mx::array& qkv, const mx::array& qw, const mx::array& kw, int b, int l, int heads,
               int kv_heads, int head_dim, int dims) {
  const auto dt = qkv.dtype();
  return available() && is_float(dt) && qw.dtype() == dt && kw.dtype() == dt && heads > 0 &&
         kv_heads > 0 && heads % kv_heads == 0 && qkv.ndim() == 2 && qkv.shape(0) == b * l &&
         qkv.shape(1) == (heads + 2 * kv_heads) * head_dim && qw.size() == (size_t)head_dim &&
         kw.size() == (size_t)head_dim && head_dim % 32 == 0 && head_dim <= 512 && dims % 2 == 0 &&
         dims <= head_dim && (dims / 2) % 32 == 0 && b > 0 && l > 0;
}

}  // namespace

bool available() {
  return mx::default_device() == mx::Device::gpu && mx::cu::is_available() && compiler().nvrtc;
}

bool cudnn_attends(mx::Dtype dt, int b, int l, int heads, int head_dim) {
  return available() && (dt == mx::bfloat16 || dt == mx::float16) && head_dim % 8 == 0 && head_dim <= 128 &&
         l > 1 && compiler().major >= 8 && (long)b * heads * l * l > kMaxAttentionPairs;
}

std::string cache() {
  if (!mx::cu::is_available() || !compiler().nvrtc) return "unused";
  return compiler().dir.empty() ? "memory" : "folder:" + compiler().dir.string();
}

std::optional<std::vector<mx::array>> qkv_heads(const mx::array& qkv, const mx::array& qw,
                                                const mx::array& kw, float eps, int b, int l,
                                                int heads, int kv_heads, int head_dim, int dims,
                                                float base, float scale) {
  const int slots = heads + 2 * kv_heads;
  const int half = dims / 2;
  const auto dt = qkv.dtype();
  const long threads = (long)b * l * slots * 32;
  if (!heads_fit(qkv, qw, kw, b, l, heads, kv_heads, head_dim, dims) || threads > 0x7fffffffL) {
    return std::nullopt;
  }
  const auto constants = [&](std::string src) {
    src = replace_all(src, "EPS", literal(eps));
    src = replace_all(src, "LOG2BASE", literal(std::log2(base)));
    return replace_all(src, "SCALE", literal(scale));
  };
  const Consts consts{{"T", dt}, {"H", heads}, {"HKV", kv_heads}, {"D", head_dim}, {"HALF", half}};
  if (cudnn_attends(dt, b, l, heads, head_dim)) {
    const char* name = "mlx_embed_qk_rows";
    const auto& text = prepared(key_of(name, dt, heads, kv_heads, head_dim, half, literal(eps), literal(base),
                                       literal(scale)), [&] {
      return Spec{name, {{"qkv", dt}, {"qw", dt}, {"kw", dt}}, {{"qk", dt}}, {"B", "L"}, consts,
                  std::string(kHeader) + kHeadNormRope, constants(kQkRows)};
    });
    const int rows = heads + kv_heads;
    auto qk = run(name, text, {qkv, qw, kw}, {{b * l, rows * head_dim}}, {dt}, {b, l}, (long)b * l * 32, 128)[0];
    // [B, n, L, D] views of token rows of `row` features, from feature `from` on.
    const auto heads_of = [&](const mx::array& a, int n, long row, long from) {
      return mx::as_strided(a, {b, n, l, head_dim}, {l * row, head_dim, row, 1}, from);
    };
    return std::vector<mx::array>{heads_of(qk, heads, (long)rows * head_dim, 0),
                                  heads_of(qk, kv_heads, (long)rows * head_dim, (long)heads * head_dim),
                                  heads_of(qkv, kv_heads, (long)slots * head_dim, (long)rows * head_dim)};
  }
  const char* name = "mlx_embed_qkv_heads";
  const auto& text = prepared(key_of(name, dt, heads, kv_heads, head_dim, half, literal(eps), literal(base),
                                     literal(scale)), [&] {
    return Spec{name, {{"qkv", dt}, {"qw", dt}, {"kw", dt}}, {{"q", dt}, {"k", dt}, {"v", dt}}, {"B", "L"},
                consts, std::string(kHeader) + kHeadNormRope, constants(kQkvHeads)};
  });
  return run(name, text, {qkv, qw, kw},
             {{b, heads, l, head_dim}, {b, kv_heads, l, head_dim}, {b, kv_heads, l, head_dim}}, {dt, dt, dt},
             {b, l}, threads, 128);
}

std::optional<mx::array> gated_halves(const mx::array& gu, Act act) {
  const auto dt = gu.dtype();
  if (!available() || !is_float(dt) || gu.ndim() != 2 || gu.shape(1) % 2 != 0) return std::nullopt;
  const int n = gu.shape(0), inter = gu.shape(1) / 2;
  const int vec = chunk(gu, inter);
  const bool gelu = act == Act::GeluTanh;
  const long threads = (long)n * (inter / vec);
  if (threads == 0 || threads > 0x7fffffffL) return std::nullopt;
  const char* name = "mlx_embed_gated";
  const auto& text = prepared(key_of(name, dt, inter, vec, gelu), [&] {
    return Spec{name, {{"gu", dt}}, {{"out", dt}}, {"N"}, {{"T", dt}, {"I", inter}, {"V", vec}, {"GELU", gelu}},
                std::string(kHeader) + kGateAct, kGated};
  });
  return run(name, text, {gu}, {{n, inter}}, {dt}, {n}, threads, 256)[0];
}

std::optional<std::vector<mx::array>> residual_rms_norm(const mx::array& x, const mx::array& y,
                                                        const mx::array* post, float post_eps,
                                                        const mx::array& w, float eps,
                                                        mx::Dtype out) {
  const auto dt = y.dtype();
  const bool fits = available() && x.dtype() == mx::float32 && is_float(dt) && is_float(out) &&
                    w.dtype() == mx::float32 && x.ndim() == 2 && x.shape() == y.shape() &&
                    w.size() == (size_t)x.shape(1) && x.shape(1) <= 16384 &&
                    (!post || (post->dtype() == dt && post->size() == w.size()));
  if (!fits || x.shape(0) == 0 || (long)x.shape(0) * 256 > 0x7fffffffL) return std::nullopt;
  const int n = x.shape(0), e = x.shape(1);
  const char* name = post ? "mlx_embed_residual_post_norm" : "mlx_embed_residual_norm";
  const auto& text = prepared(key_of(name, dt, out, e, literal(post_eps), literal(eps)), [&] {
    std::string src = replace_all(kResidualNorm, "POST_EPS", literal(post_eps));
    src = replace_all(src, "EPS", literal(eps));
    src = replace_all(src, "POST_W", post ? "pw" : "w");
    Spec spec{name, {{"x", mx::float32}, {"y", dt}, {"w", mx::float32}}, {{"xo", mx::float32}, {"h", out}}, {},
              {{"T", dt}, {"U", out}, {"E", e}, {"POST", post != nullptr}}, kHeader, src};
    if (post) spec.inputs.push_back({"pw", dt});
    return spec;
  });
  std::vector<mx::array> inputs{x, y, w};
  if (post) inputs.push_back(*post);
  return run(name, text, inputs, {{n, e}, {n, e}}, {mx::float32, out}, {}, n * 256L, 256);
}

std::optional<mx::array> gated_matmul(const mx::array& x, const mx::array& w, Act act) {
  if (!matmul_fits(x, w) || w.shape(0) % 2 != 0) return std::nullopt;
  const auto dt = x.dtype();
  const int n = x.shape(0), k = x.shape(1), inter = w.shape(0) / 2;
  const int vec = chunk(x, k);
  const bool gelu = act == Act::GeluTanh;
  const char* name = "mlx_embed_gated_matmul";
  const auto& text = prepared(key_of(name, dt, k, inter, vec, gelu), [&] {
    return Spec{name, {{"x", dt}, {"w", dt}}, {{"out", dt}}, {"n"},
                {{"T", dt}, {"NMAX", kMaxMatmulRows}, {"K", k}, {"I", inter}, {"V", vec}, {"GELU", gelu}},
                std::string(kHeader) + kGateAct + kRowDots, kGatedMatmul};
  });
  return run(name, text, {x, w}, {{n, inter}}, {dt}, {n}, inter * 32L, 256)[0];
}

std::optional<std::vector<mx::array>> norm_matmul(const mx::array& x, const mx::array* y,
                                                  const mx::array* post, float post_eps,
                                                  const mx::array& w, float eps,
                                                  const mx::array& rows, std::optional<Act> gate) {
  const auto dt = rows.dtype();
  if (!available() || !is_float(dt) || x.dtype() != mx::float32 || w.dtype() != mx::float32 ||
      x.ndim() != 2 || rows.ndim() != 2 || x.shape(1) != rows.shape(1) || x.shape(0) == 0 ||
      w.size() != (size_t)x.shape(1) || (y && (y->dtype() != dt || y->shape() != x.shape())) ||
      (post && (!y || post->dtype() != dt || post->size() != w.size())) ||
      (gate && rows.shape(0) % 2 != 0) || rows.shape(0) == 0 || x.shape(1) > kMaxNormWidth) {
    return std::nullopt;
  }
  const int n = x.shape(0), e = x.shape(1);
  const int cap = std::min(kMaxMatmulRows, kNormShared / (e * (int)rows.itemsize()));
  const int o = gate ? rows.shape(0) / 2 : rows.shape(0);
  const long pairs = gate ? o : (o + 1L) / 2;
  if (n > cap || (long)rows.shape(0) * e > 0x7fffffffL) return std::nullopt;
  const bool add = y != nullptr;
  const int vec = chunk(rows, e);
  const bool gelu = gate == Act::GeluTanh;
  const char* name = add ? "mlx_embed_residual_norm_matmul" : "mlx_embed_norm_matmul";
  const auto& text = prepared(key_of(name, dt, cap, e, o, vec, post != nullptr, gate.has_value(), gelu,
                                     literal(post_eps), literal(eps)), [&] {
    std::string src = replace_all(kNormMatmul, "STAGE",
                                  add ? std::string("x, y, ") + (post ? "pw" : "(const T*)nullptr") + ", nw, xo"
                                      : "x, (const T*)nullptr, (const T*)nullptr, nw, (float*)nullptr");
    src = replace_all(src, "POST_EPS", literal(post_eps));
    src = replace_all(src, "EPS", literal(eps));
    Spec spec{name, {{"x", mx::float32}}, {{"out", dt}}, {"n"},
              {{"T", dt}, {"NMAX", cap}, {"E", e}, {"O", o}, {"V", vec}, {"ADD", add}, {"POST", post != nullptr},
               {"GATE", gate.has_value()}, {"GELU", gelu}},
              std::string(kHeader) + kGateAct + kRowDots + kStageRows, src};
    if (add) spec.inputs.push_back({"y", dt});
    if (post) spec.inputs.push_back({"pw", dt});
    spec.inputs.insert(spec.inputs.end(), {{"nw", mx::float32}, {"w", dt}});
    if (add) spec.outputs.insert(spec.outputs.begin(), {"xo", mx::float32});
    return spec;
  });
  std::vector<mx::array> inputs{x};
  if (add) inputs.push_back(*y);
  if (post) inputs.push_back(*post);
  inputs.insert(inputs.end(), {w, rows});
  std::vector<mx::Shape> shapes{{n, o}};
  std::vector<mx::Dtype> dtypes{dt};
  if (add) {
    shapes.insert(shapes.begin(), {n, e});
    dtypes.insert(dtypes.begin(), mx::float32);
  }
  constexpr int warps = 8;
  const long blocks = std::min<long>((pairs + warps - 1) / warps, kNormBlocks);
  auto out = run(name, text, inputs, shapes, dtypes, {n}, blocks * warps * 32, warps * 32);
  if (!add) out.insert(out.begin(), x);
  return out;
}

std::optional<mx::array> attention(const mx::array& q, const mx::array& k, const mx::array& v,
                                   float scale, const mx::array& mask) {
  const auto dt = q.dtype();
  if (!available() || !is_float(dt) || k.dtype() != dt || v.dtype() != dt || !is_float(mask.dtype()) ||
      q.ndim() != 4 || k.ndim() != 4 || v.shape() != k.shape()) {
    return std::nullopt;
  }
  const int b = q.shape(0), heads = q.shape(1), l = q.shape(2), d = q.shape(3);
  const int kv_heads = k.shape(1);
  const bool fits = l > 0 && (long)b * heads * l * l <= kMaxAttentionPairs && d % 32 == 0 && d <= 512 && kv_heads > 0 &&
                    heads % kv_heads == 0 && k.shape(0) == b && k.shape(2) == l && k.shape(3) == d &&
                    mask.shape() == mx::Shape{b, 1, l, l};
  const long threads = (long)b * heads * l * 32;
  if (!fits || threads > 0x7fffffffL) return std::nullopt;
  const auto m = mask.dtype();
  const char* name = "mlx_embed_attention";
  const auto& text = prepared(key_of(name, dt, m, d, heads, kv_heads, literal(scale)), [&] {
    return Spec{name, {{"q", dt}, {"k", dt}, {"v", dt}, {"mask", m}}, {{"out", dt}}, {"B", "L"},
                {{"T", dt}, {"M", m}, {"D", d}, {"H", heads}, {"HKV", kv_heads}},
                std::string(kHeader) + kAttendRow, replace_all(kAttention, "SCALE", literal(scale))};
  });
  // Written as [B, L, H, D] and returned as a [B, H, L, D] view of it: merging the heads of
  // each token afterwards needs no copy.
  auto out = run(name, text, {q, k, v, mask}, {{b, l, heads, d}}, {dt}, {b, l}, threads, 128)[0];
  return mx::transpose(out, {0, 2, 1, 3});
}

std::optional<mx::array> qkv_attention(const mx::array& qkv, const mx::array& qw, const mx::array& kw,
                                       float eps, int b, int l, int heads, int kv_heads, int head_dim,
                                       int dims, float base, float rope_scale, float attn_scale,
                                       const mx::array& mask) {
  const auto dt = qkv.dtype();
  // Keys of one kv head in shared memory: at most 40 KB of the 48 KB a block may hold.
  const int key_cap = 40960 / (head_dim > 0 ? head_dim * (int)qkv.itemsize() : 1);
  if (!heads_fit(qkv, qw, kw, b, l, heads, kv_heads, head_dim, dims) || !is_float(mask.dtype()) ||
      mask.shape() != mx::Shape{b, 1, l, l} || l > key_cap ||
      (long)b * heads * l * l > kMaxAttentionPairs) {
    return std::nullopt;
  }
  constexpr int rows_per_block = 16;
  const long blocks = (long)b * heads * ((l + rows_per_block - 1) / rows_per_block);
  if (blocks * rows_per_block * 32 > 0x7fffffffL) return std::nullopt;
  const auto m = mask.dtype();
  const char* name = "mlx_embed_qkv_attention";
  const auto& text = prepared(key_of(name, dt, m, heads, kv_heads, head_dim, dims, literal(eps), literal(base),
                                     literal(rope_scale), literal(attn_scale)), [&] {
    std::string src = replace_all(kQkvAttention, "ATTN_SCALE", literal(attn_scale));
    src = replace_all(src, "ROPE_SCALE", literal(rope_scale));
    src = replace_all(src, "EPS", literal(eps));
    src = replace_all(src, "LOG2BASE", literal(std::log2(base)));
    return Spec{name, {{"qkv", dt}, {"qw", dt}, {"kw", dt}, {"mask", m}}, {{"out", dt}}, {"L"},
                {{"T", dt}, {"M", m}, {"H", heads}, {"HKV", kv_heads}, {"D", head_dim}, {"HALF", dims / 2},
                 {"KCAP", key_cap}, {"QROWS", rows_per_block}},
                std::string(kHeader) + kHeadNormRope + kAttendRow, src};
  });
  return run(name, text, {qkv, qw, kw, mask}, {{b * l, heads * head_dim}}, {dt}, {l},
             blocks * rows_per_block * 32, rows_per_block * 32)[0];
}

}  // namespace mlx_embed::gpu_kernels

// Fused CPU kernels: see cpu_kernels.h.
#include "mlx-embed/src/mlx/cpu_kernels.h"

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <condition_variable>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <tuple>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MLX_EMBED_X86 1
#endif

#if defined(__GNUC__) || defined(__clang__)
#define MLX_EMBED_INLINE inline __attribute__((always_inline))
#else
#define MLX_EMBED_INLINE inline
#endif

namespace mlx_embed::cpu_kernels {

namespace mx = mlx::core;

namespace {

// ---- threads

// The CPU quota of the cgroup a container runs in (cgroup v2, then v1), in whole CPUs rounded
// up; 0 when none is set or readable.
int cgroup_cpu_quota() {
  try {
    std::ifstream v2("/sys/fs/cgroup/cpu.max");
    std::string quota;
    long long period = 0;
    if (v2 >> quota >> period) {
      if (quota == "max" || period <= 0) return 0;
      return static_cast<int>((std::stoll(quota) + period - 1) / period);
    }
    std::ifstream q1("/sys/fs/cgroup/cpu/cpu.cfs_quota_us");
    std::ifstream p1("/sys/fs/cgroup/cpu/cpu.cfs_period_us");
    long long q = 0, p = 0;
    if (q1 >> q && p1 >> p && q > 0 && p > 0) return static_cast<int>((q + p - 1) / p);
  } catch (const std::exception&) {
  }
  return 0;
}

// How many CPUs this process may use: the CPUs it may run on, at most its container's quota
// (more threads than the quota would only be throttled).
int cpu_count() {
  int n = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) n = std::max(1, CPU_COUNT(&set));
  if (const int quota = cgroup_cpu_quota(); quota > 0) n = std::min(n, quota);
#endif
  return n;
}

// A fixed set of worker threads that run the chunks of one job at a time with the calling
// thread. Workers sleep between jobs; a worker that wakes after the other threads took every
// chunk finds nothing left and goes back to sleep, so a job never waits for a slow wake-up.
class Pool {
 public:
  // Starts up to `threads − 1` workers (fewer if the system refuses more threads).
  explicit Pool(int threads) {
    for (int i = 1; i < threads; ++i) {
      try {
        std::thread([this] { work(); }).detach();
      } catch (const std::system_error&) {
        break;
      }
      ++size_;
    }
  }

  int size() const { return size_; }

  // Calls f(i) for i in [0, n), spread over the pool and the calling thread; returns when all
  // calls have returned.
  void run(int64_t n, const std::function<void(int64_t)>& f) {
    if (n <= 0) return;
    if (size_ == 1 || n == 1) {
      for (int64_t i = 0; i < n; ++i) f(i);
      return;
    }
    std::lock_guard<std::mutex> one_job(run_mu_);
    auto job = std::make_shared<Job>(f, n);
    {
      std::lock_guard<std::mutex> lk(mu_);
      job_ = job;
      ++generation_;
    }
    wake_.notify_all();
    job->drain();
    std::unique_lock<std::mutex> lk(mu_);
    finished_.wait(lk, [&] { return job->done.load() == n; });
    job_.reset();
  }

 private:
  struct Job {
    Job(const std::function<void(int64_t)>& f, int64_t n) : f(f), n(n) {}
    const std::function<void(int64_t)>& f;
    const int64_t n;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    // Runs chunks until none is left; true when this call finished the job's last chunk.
    bool drain() {
      bool last = false;
      for (int64_t i; (i = next.fetch_add(1)) < n;) {
        f(i);
        last = done.fetch_add(1) + 1 == n;
      }
      return last;
    }
  };

  void work() {
    uint64_t seen = 0;
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lk(mu_);
        wake_.wait(lk, [&] { return generation_ != seen; });
        seen = generation_;
        job = job_;
      }
      if (job && job->drain()) {
        std::lock_guard<std::mutex> lk(mu_);
        finished_.notify_all();
      }
    }
  }

  int size_ = 1;
  std::mutex run_mu_;             // one job at a time
  std::mutex mu_;                 // guards job_ and generation_
  std::condition_variable wake_;  // a new job
  std::condition_variable finished_;
  std::shared_ptr<Job> job_;
  uint64_t generation_ = 0;
};

Pool& pool() {
  // Never destroyed: MLX's stream threads may still run kernels while the process exits.
  static Pool* p = new Pool(std::min(cpu_count(), 64));
  return *p;
}

// Splits [0, items) into chunks of at least `grain` items (about 4 per thread) and runs
// f(begin, end) for each over the pool.
void parallel_for(int64_t items, int64_t grain, const std::function<void(int64_t, int64_t)>& f) {
  const int64_t threads = pool().size();
  const int64_t chunks = std::clamp<int64_t>(items / std::max<int64_t>(grain, 1), 1, threads * 4);
  const int64_t step = (items + chunks - 1) / chunks;
  pool().run(chunks, [&](int64_t c) {
    const int64_t begin = c * step;
    const int64_t end = std::min(items, begin + step);
    if (begin < end) f(begin, end);
  });
}

// Elements per chunk: enough work to be worth a thread's wake-up.
constexpr int64_t kGrainElements = 1 << 15;

// ---- math, written so that the compiler vectorizes the loops that use it

template <bool Fma>
MLX_EMBED_INLINE float mad(float a, float b, float c) {
  if constexpr (Fma) {
    return __builtin_fmaf(a, b, c);
  } else {
    return a * b + c;
  }
}

// e^x for x in [−87, 88] (clamped outside), within 2 ulp: 2^n · e^r with r in [−ln2/2, ln2/2]
// and a degree-6 polynomial for e^r (the Cephes coefficients).
template <bool Fma>
MLX_EMBED_INLINE float exp_f32(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  // Round x·log2(e) to the nearest integer by adding and removing 1.5·2^23.
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = mad<Fma>(n, -0.693359375f, x);
  r = mad<Fma>(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = mad<Fma>(p, r, 1.3981999507e-3f);
  p = mad<Fma>(p, r, 8.3334519073e-3f);
  p = mad<Fma>(p, r, 4.1665795894e-2f);
  p = mad<Fma>(p, r, 1.6666665459e-1f);
  p = mad<Fma>(p, r, 5.0000001201e-1f);
  const float e_r = mad<Fma>(p, r * r, r) + 1.0f;
  const float two_n = std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
  return e_r * two_n;
}

// 1 / √(mean(x²) + eps) of one row, summed in 8 lanes.
template <bool Fma>
MLX_EMBED_INLINE float inv_rms(const float* x, int64_t d, float eps) {
  float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) {
    for (int j = 0; j < 8; ++j) lanes[j] = mad<Fma>(x[i + j], x[i + j], lanes[j]);
  }
  float sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
              ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  for (; i < d; ++i) sum = mad<Fma>(x[i], x[i], sum);
  return 1.0f / std::sqrt(sum / static_cast<float>(d) + eps);
}

// ---- kernels over a range of rows or elements

struct RmsNormRows {
  const float* x;
  const float* w;
  float* y;
  int64_t d;
  float eps;

  template <bool Fma>
  MLX_EMBED_INLINE void run(int64_t begin, int64_t end) const {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = x + r * d;
      float* yr = y + r * d;
      const float s = inv_rms<Fma>(xr, d, eps);
      for (int64_t i = 0; i < d; ++i) yr[i] = (xr[i] * s) * w[i];
    }
  }
};

struct GatedElements {
  const float* gate;
  const float* up;
  float* y;
  Act act;

  template <bool Fma>
  MLX_EMBED_INLINE void run(int64_t begin, int64_t end) const {
    if (act == Act::Silu) {
      for (int64_t i = begin; i < end; ++i) {
        const float g = gate[i];
        y[i] = g / (1.0f + exp_f32<Fma>(-g)) * up[i];
      }
    } else {
      constexpr float kSqrt2OverPi = 0.7978845608028654f;
      for (int64_t i = begin; i < end; ++i) {
        const float g = gate[i];
        const float u = kSqrt2OverPi * mad<Fma>(0.044715f * g, g * g, g);
        y[i] = g / (1.0f + exp_f32<Fma>(-2.0f * u)) * up[i];
      }
    }
  }
};

// softmax(s · scale + mask) over rows of scores [B, G, R·L, L] (grouped query heads stacked),
// with the additive mask [B, 1, L, L] of each row's batch and query position; blocked (−∞)
// entries give exactly 0.
struct MaskedSoftmaxRows {
  const float* s;
  const float* mask;
  float* y;
  int64_t l, rows_per_batch;
  float scale;

  template <bool Fma>
  MLX_EMBED_INLINE void run(int64_t begin, int64_t end) const {
    constexpr float kNegInf = -std::numeric_limits<float>::infinity();
    for (int64_t r = begin; r < end; ++r) {
      const float* sr = s + r * l;
      const float* mr = mask + ((r / rows_per_batch) * l + r % l) * l;
      float* yr = y + r * l;
      float lanes[8] = {kNegInf, kNegInf, kNegInf, kNegInf, kNegInf, kNegInf, kNegInf, kNegInf};
      int64_t j = 0;
      for (; j + 8 <= l; j += 8) {
        for (int k = 0; k < 8; ++k) {
          const float x = mad<Fma>(sr[j + k], scale, mr[j + k]);
          yr[j + k] = x;
          lanes[k] = x > lanes[k] ? x : lanes[k];
        }
      }
      float m = kNegInf;
      for (float v : lanes) m = v > m ? v : m;
      for (; j < l; ++j) {
        yr[j] = mad<Fma>(sr[j], scale, mr[j]);
        m = yr[j] > m ? yr[j] : m;
      }
      float sums[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      j = 0;
      for (; j + 8 <= l; j += 8) {
        for (int k = 0; k < 8; ++k) {
          const float x = yr[j + k];
          const float e = x == kNegInf ? 0.0f : exp_f32<Fma>(x - m);
          yr[j + k] = e;
          sums[k] += e;
        }
      }
      float sum = ((sums[0] + sums[1]) + (sums[2] + sums[3])) +
                  ((sums[4] + sums[5]) + (sums[6] + sums[7]));
      for (; j < l; ++j) {
        const float e = yr[j] == kNegInf ? 0.0f : exp_f32<Fma>(yr[j] - m);
        yr[j] = e;
        sum += e;
      }
      const float inv = 1.0f / sum;
      for (j = 0; j < l; ++j) yr[j] *= inv;
    }
  }
};

// Rows of x [B, L, H, D] → y [B, H, L, D]: norm, then rotate the first `dims` features by the
// angles of the row's position (cos/sin tables [L, dims/2]).
struct HeadNormRopeRows {
  const float* x;
  const float* w;
  const float* cos;
  const float* sin;
  float* y;
  int64_t l, h, d, dims;
  float eps;

  template <bool Fma>
  MLX_EMBED_INLINE void run(int64_t begin, int64_t end) const {
    const int64_t half = dims / 2;
    std::vector<float> t(d);
    for (int64_t r = begin; r < end; ++r) {
      // r = (b·L + p)·H + head
      const int64_t head = r % h;
      const int64_t p = (r / h) % l;
      const int64_t b = r / (h * l);
      const float* xr = x + r * d;
      float* yr = y + ((b * h + head) * l + p) * d;
      const float s = inv_rms<Fma>(xr, d, eps);
      for (int64_t i = 0; i < d; ++i) t[i] = (xr[i] * s) * w[i];
      const float* c = cos + p * half;
      const float* sn = sin + p * half;
      for (int64_t i = 0; i < half; ++i) {
        yr[i] = t[i] * c[i] - t[i + half] * sn[i];
        yr[i + half] = t[i + half] * c[i] + t[i] * sn[i];
      }
      for (int64_t i = dims; i < d; ++i) yr[i] = t[i];
    }
  }
};

// Runs a kernel's range with the best code this CPU can run.
#ifdef MLX_EMBED_X86
template <class K>
__attribute__((target("avx2,fma"))) void run_avx2(const K& k, int64_t begin, int64_t end) {
  k.template run<true>(begin, end);
}
template <class K>
void run_base(const K& k, int64_t begin, int64_t end) {
  k.template run<false>(begin, end);
}
bool has_avx2_fma() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
template <class K>
void run_range(const K& k, int64_t begin, int64_t end) {
  if (has_avx2_fma()) {
    run_avx2(k, begin, end);
  } else {
    run_base(k, begin, end);
  }
}
#else
template <class K>
void run_range(const K& k, int64_t begin, int64_t end) {
  k.template run<true>(begin, end);
}
#endif

// Runs kernel `k` over `items` rows of `item_size` elements each, spread over the pool.
template <class K>
void run_parallel(const K& k, int64_t items, int64_t item_size) {
  parallel_for(items, kGrainElements / item_size,
               [&](int64_t b, int64_t e) { run_range(k, b, e); });
}

// ---- rotary tables

// cos/sin of position · frequency for positions [0, rows) and dims/2 frequencies, computed the
// way the reference does in f32 (frequency 1 / base^(2i/dims), angle rounded to f32), the
// cosine and sine of that angle then taken in double precision.
struct RopeTable {
  int64_t rows = 0;
  std::vector<float> cos, sin;
};

std::shared_ptr<const RopeTable> rope_table(int64_t rows, int dims, float base, float scale) {
  static std::mutex mu;
  static std::map<std::tuple<int, float, float>, std::shared_ptr<const RopeTable>> tables;
  std::lock_guard<std::mutex> lk(mu);
  auto& slot = tables[{dims, base, scale}];
  if (slot && slot->rows >= rows) return slot;
  // Grow to at least twice the old size, so a run of growing lengths rebuilds few times.
  const int64_t n = std::max(rows, slot ? slot->rows * 2 : int64_t{0});
  const int64_t half = dims / 2;
  auto table = std::make_shared<RopeTable>();
  table->rows = n;
  table->cos.resize(n * half);
  table->sin.resize(n * half);
  for (int64_t i = 0; i < half; ++i) {
    float freq = 1.0f / std::pow(base, static_cast<float>(2 * i) / static_cast<float>(dims));
    if (scale != 1.0f) freq *= scale;
    for (int64_t p = 0; p < n; ++p) {
      const double angle = static_cast<float>(p) * freq;
      table->cos[p * half + i] = static_cast<float>(std::cos(angle));
      table->sin[p * half + i] = static_cast<float>(std::sin(angle));
    }
  }
  slot = table;
  return slot;
}

// ---- primitives

// Allocates `out` and returns the encoder of the primitive's CPU stream, on which the kernel is
// queued as MLX's own CPU operations are (MLX keeps the inputs' buffers alive until the queued
// work is done); null when `out` is empty.
mx::cpu::CommandEncoder* prepare(const mx::Stream& stream, const std::vector<mx::array>& inputs,
                                 mx::array& out) {
  for (const auto& a : inputs) {
    if (!a.flags().row_contiguous) throw std::logic_error("fused CPU kernel given a strided input");
  }
  out.set_data(mx::allocator::malloc(out.nbytes()));
  if (out.size() == 0) return nullptr;
  auto& encoder = mx::cpu::get_command_encoder(stream);
  for (const auto& a : inputs) encoder.set_input_array(a);
  encoder.set_output_array(out);
  return &encoder;
}

// One fused kernel as a CPU-only MLX primitive of two f32 inputs (data, weight or second
// operand). `Spec` gives its name, parameters, output shape and the kernel run on the buffers.
template <class Spec>
class Fused : public mx::UnaryPrimitive {
 public:
  using Params = typename Spec::Params;
  Fused(mx::Stream s, Params p) : mx::UnaryPrimitive(s), p_(p) {}
  const char* name() const override { return Spec::kName; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const Fused*>(&other);
    return o && o->p_ == p_;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& in) override {
    return {Spec::out_shape(in[0].shape())};
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::logic_error(std::string(Spec::kName) + " runs on the CPU only");
  }
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    auto* encoder = prepare(stream(), in, out);
    if (!encoder) return;
    encoder->dispatch([a = mx::array::unsafe_weak_copy(in[0]),
                       b = mx::array::unsafe_weak_copy(in[1]),
                       out = mx::array::unsafe_weak_copy(out), p = p_]() mutable {
      Spec::run(p, a, b, out);
    });
  }

 private:
  Params p_;
};

struct RmsNormSpec {
  static constexpr const char* kName = "FusedRmsNormCpu";
  struct Params {
    float eps;
    bool operator==(const Params&) const = default;
  };
  static mx::Shape out_shape(const mx::Shape& x) { return x; }
  static void run(const Params& p, mx::array& x, mx::array& w, mx::array& out) {
    const int64_t d = x.shape(-1);
    const RmsNormRows k{x.data<float>(), w.data<float>(), out.data<float>(), d, p.eps};
    run_parallel(k, x.size() / d, d);
  }
};

struct GatedSpec {
  static constexpr const char* kName = "FusedGatedActivationCpu";
  struct Params {
    Act act;
    bool operator==(const Params&) const = default;
  };
  static mx::Shape out_shape(const mx::Shape& gate) { return gate; }
  static void run(const Params& p, mx::array& gate, mx::array& up, mx::array& out) {
    const GatedElements k{gate.data<float>(), up.data<float>(), out.data<float>(), p.act};
    run_parallel(k, gate.size(), 1);
  }
};

struct HeadNormRopeSpec {
  static constexpr const char* kName = "FusedHeadNormRopeCpu";
  struct Params {
    float eps;
    int dims;
    float base, scale;
    bool operator==(const Params&) const = default;
  };
  // [B, L, H, D] → [B, H, L, D]
  static mx::Shape out_shape(const mx::Shape& x) { return {x[0], x[2], x[1], x[3]}; }
  static void run(const Params& p, mx::array& x, mx::array& w, mx::array& out) {
    const auto& s = x.shape();
    const auto table = rope_table(s[1], p.dims, p.base, p.scale);
    const HeadNormRopeRows k{x.data<float>(), w.data<float>(), table->cos.data(),
                             table->sin.data(), out.data<float>(), s[1], s[2], s[3], p.dims,
                             p.eps};
    run_parallel(k, x.size() / s[3], s[3]);
  }
};

struct MaskedSoftmaxSpec {
  static constexpr const char* kName = "FusedMaskedSoftmaxCpu";
  struct Params {
    float scale;
    bool operator==(const Params&) const = default;
  };
  static mx::Shape out_shape(const mx::Shape& scores) { return scores; }
  static void run(const Params& p, mx::array& scores, mx::array& mask, mx::array& out) {
    const auto& s = scores.shape();
    const MaskedSoftmaxRows k{scores.data<float>(), mask.data<float>(), out.data<float>(), s[3],
                              static_cast<int64_t>(s[1]) * s[2], p.scale};
    run_parallel(k, scores.size() / s[3], s[3]);
  }
};

// The array `Spec` computes from `a` and `b` on the CPU stream (inputs made row-contiguous
// first: a no-op for the contiguous arrays of the forward pass).
template <class Spec>
mx::array fused(const mx::array& a, const mx::array& b, typename Spec::Params p) {
  auto s = mx::default_stream(mx::Device::cpu);
  return mx::array(Spec::out_shape(a.shape()), mx::float32, std::make_shared<Fused<Spec>>(s, p),
                   {mx::contiguous(a, false, s), mx::contiguous(b, false, s)});
}

}  // namespace

bool applies(std::initializer_list<const mx::array*> arrays) {
  if (mx::default_device() != mx::Device::cpu) return false;
  for (const auto* a : arrays) {
    if (a->dtype() != mx::float32) return false;
  }
  return true;
}

mx::array rms_norm(const mx::array& x, const mx::array& w, float eps) {
  if (x.ndim() < 1 || w.ndim() != 1 || w.shape(0) != x.shape(-1)) {
    throw std::invalid_argument("rms_norm: the weight must be [D] for an input [..., D]");
  }
  return fused<RmsNormSpec>(x, w, {eps});
}

mx::array gated(const mx::array& gate, const mx::array& up, Act act) {
  if (gate.shape() != up.shape()) throw std::invalid_argument("gated: gate and up differ in shape");
  return fused<GatedSpec>(gate, up, {act});
}

mx::array head_norm_rope(const mx::array& x, const mx::array& w, float eps, int dims, float base,
                         float scale) {
  if (x.ndim() != 4 || w.ndim() != 1 || w.shape(0) != x.shape(3)) {
    throw std::invalid_argument("head_norm_rope: x must be [B, L, H, D] and the weight [D]");
  }
  if (dims <= 0 || dims % 2 != 0 || dims > x.shape(3)) {
    throw std::invalid_argument("head_norm_rope: rotary dims must be even and at most D");
  }
  return fused<HeadNormRopeSpec>(x, w, {eps, dims, base, scale});
}

bool attention_applies(const mx::array& q, const mx::array& k, const mx::array& v,
                       const mx::array& mask) {
  if (q.ndim() != 4 || k.ndim() != 4 || v.ndim() != 4 || mask.ndim() != 4) return false;
  const auto b = q.shape(0), h = q.shape(1), l = q.shape(2), hkv = k.shape(1);
  return k.shape() == v.shape() && k.shape(0) == b && k.shape(2) == l && k.shape(3) == q.shape(3) &&
         hkv > 0 && h % hkv == 0 && mask.shape() == mx::Shape{b, 1, l, l};
}

mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                    const mx::array& mask) {
  if (!attention_applies(q, k, v, mask)) {
    throw std::invalid_argument("attention: q [B, H, L, D], k and v [B, Hkv, L, D], mask [B, 1, L, L]");
  }
  const auto b = q.shape(0), h = q.shape(1), l = q.shape(2), d = q.shape(3), hkv = k.shape(1);
  auto s = mx::default_stream(mx::Device::cpu);
  // The query heads that share a key head, stacked: [B, Hkv, (H/Hkv)·L, D].
  auto grouped = mx::reshape(q, {b, hkv, (h / hkv) * l, d}, s);
  auto scores = mx::matmul(grouped, mx::swapaxes(k, -1, -2, s), s);
  auto weights = fused<MaskedSoftmaxSpec>(scores, mask, {scale});
  return mx::reshape(mx::matmul(weights, v, s), {b, h, l, d}, s);
}

}  // namespace mlx_embed::cpu_kernels

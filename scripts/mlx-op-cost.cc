// Host cost per MLX operation on the default device (BENCHMARKS.md): chains of N operations of
// one kind on small arrays, timed while built, while MLX encodes them (async_eval), and until
// done; microseconds per operation, medians of 20 runs.
//
//   g++ -O2 -std=c++20 -I.mlx/mlx/include scripts/mlx-op-cost.cc -L.mlx/mlx/lib -lmlx \
//     -Wl,--enable-new-dtags -Wl,-rpath,$PWD/.mlx/mlx/lib -o target/mlx-op-cost
//   target/mlx-op-cost [N=300] [ROWS=16]     # on a GPU: . scripts/mlx-cuda-env.sh first
#include <mlx/mlx.h>
#include <chrono>
#include <cstdio>
#include <algorithm>
#include <functional>
#include <string>
#include <vector>
namespace mx = mlx::core;
using clk = std::chrono::steady_clock;
static double ms(clk::time_point a, clk::time_point b) { return std::chrono::duration<double, std::milli>(b - a).count(); }

int main(int argc, char** argv) {
  bool gpu = mx::is_available(mx::Device::gpu);
  mx::set_default_device(gpu ? mx::Device::gpu : mx::Device::cpu);
  printf("device %s\n", gpu ? "gpu" : "cpu");
  int N = argc > 1 ? atoi(argv[1]) : 300;
  int rows = argc > 2 ? atoi(argv[2]) : 16;
  auto bf = mx::bfloat16;
  auto x0 = mx::astype(mx::random::normal({rows, 1024}), bf);
  auto w = mx::astype(mx::multiply(mx::random::normal({1024, 1024}), mx::array(0.03f)), bf);
  auto wt = mx::transpose(w);
  auto y = mx::astype(mx::random::normal({rows, 1024}), bf);
  auto g = mx::astype(mx::ones({1024}), bf);
  auto gf = mx::ones({1024});
  auto x4 = mx::astype(mx::random::normal({1, 16, rows, 64}), bf);
  auto q = mx::astype(mx::random::normal({1, 16, rows, 128}), bf);
  auto k = mx::astype(mx::random::normal({1, 8, rows, 128}), bf);
  auto v = mx::astype(mx::random::normal({1, 8, rows, 128}), bf);
  auto mask = mx::zeros({1, 1, rows, rows}, bf);
  auto xf = mx::random::normal({rows, 1024});
  mx::eval({x0, w, wt, y, g, gf, x4, q, k, v, mask, xf});
  std::vector<std::pair<std::string, std::function<mx::array(int)>>> kinds;
  kinds.push_back({"matmul", [&](int n) { auto x = x0; for (int i = 0; i < n; i++) x = mx::matmul(x, w); return x; }});
  kinds.push_back({"matmul_wT_view", [&](int n) { auto x = x0; for (int i = 0; i < n; i++) x = mx::matmul(x, mx::transpose(w)); return x; }});
  kinds.push_back({"matmul_wT_pre", [&](int n) { auto x = x0; for (int i = 0; i < n; i++) x = mx::matmul(x, wt); return x; }});
  kinds.push_back({"add", [&](int n) { auto x = x0; for (int i = 0; i < n; i++) x = mx::add(x, y); return x; }});
  kinds.push_back({"add_f32_bf16", [&](int n) { auto x = xf; for (int i = 0; i < n; i++) x = mx::add(x, y); return x; }});
  kinds.push_back({"astype", [&](int n) { auto x = x0; for (int i = 0; i < n; i++) x = mx::astype(x, i % 2 ? bf : mx::float32); return x; }});
  kinds.push_back({"sigmoid", [&](int n) { auto x = x0; for (int i = 0; i < n; i++) x = mx::sigmoid(x); return x; }});
  kinds.push_back({"reshape_view", [&](int n) { auto x = x0; for (int i = 0; i < n; i++) x = mx::reshape(x, i % 2 ? mx::Shape{rows, 1024} : mx::Shape{rows, 8, 128}); return x; }});
  kinds.push_back({"transpose_view", [&](int n) { auto x = x0; for (int i = 0; i < n; i++) x = mx::transpose(x); return x; }});
  kinds.push_back({"rms_norm", [&](int n) { auto x = x0; for (int i = 0; i < n; i++) x = mx::fast::rms_norm(x, g, 1e-6f); return x; }});
  kinds.push_back({"rms_norm_f32", [&](int n) { auto x = xf; for (int i = 0; i < n; i++) x = mx::fast::rms_norm(x, gf, 1e-6f); return x; }});
  kinds.push_back({"rope", [&](int n) { auto x = x4; for (int i = 0; i < n; i++) x = mx::fast::rope(x, 64, false, 10000.0f, 1.0f, 0); return x; }});
  kinds.push_back({"sdpa_mask", [&](int n) { auto x = q; for (int i = 0; i < n; i++) x = mx::fast::scaled_dot_product_attention(x, k, v, 0.088f, "", mask); return x; }});
  kinds.push_back({"sdpa_causal", [&](int n) { auto x = q; for (int i = 0; i < n; i++) x = mx::fast::scaled_dot_product_attention(x, k, v, 0.088f, "causal"); return x; }});
  kinds.push_back({"contiguous_T", [&](int n) { auto x = x4; for (int i = 0; i < n; i++) x = mx::contiguous(mx::transpose(x, {0, 2, 1, 3})); return x; }});
  if (gpu) {
    auto kern = mx::fast::cuda_kernel("copyk", {"inp"}, {"out"},
        "uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; if (i < N) out[i] = inp[i];", "", true, 0);
    kinds.push_back({"cuda_kernel", [&, kern](int n) { auto x = x0; for (int i = 0; i < n; i++) {
      auto size = (int)x.size();
      x = kern({x}, {x.shape()}, {x.dtype()}, {size, 1, 1}, {256, 1, 1}, {{"N", size}}, std::nullopt, false, {})[0]; } return x; }});
  }
  printf("%-16s %9s %9s %9s %9s  (us per op; N=%d rows=%d)\n", "kind", "build", "submit", "wait", "total", N, rows);
  for (auto& [name, f] : kinds) {
    std::vector<double> b, s, wv, t;
    for (int it = 0; it < 25; it++) {
      auto t0 = clk::now();
      auto out = f(N);
      auto t1 = clk::now();
      mx::async_eval(out);
      auto t2 = clk::now();
      mx::eval(out);
      auto t3 = clk::now();
      if (it >= 5) { b.push_back(ms(t0, t1)); s.push_back(ms(t1, t2)); wv.push_back(ms(t2, t3)); t.push_back(ms(t0, t3)); }
    }
    auto med = [](std::vector<double> v) { std::sort(v.begin(), v.end()); return v[v.size() / 2]; };
    printf("%-16s %9.2f %9.2f %9.2f %9.2f\n", name.c_str(), med(b) * 1e3 / N, med(s) * 1e3 / N, med(wv) * 1e3 / N, med(t) * 1e3 / N);
  }
}

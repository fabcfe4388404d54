// Fused CUDA kernels for the small-batch forward pass, run as MLX custom kernels (compiled by
// NVRTC at first use on a machine, and kept in MLX's kernel cache folder: nvrtc.h).
//
// A short query's forward pass on a GPU is bound by MLX's host work per operation (≈ 4–5 µs for
// an elementwise operation, ≈ 10 µs for a matmul, ≈ 25 µs for attention, measured on an H100),
// not by the device. These kernels each replace several MLX operations of a layer (the per-head
// norms, rotary embedding and head split of a fused q/k/v projection; the activation of a fused
// gate/up projection, for a few token rows with that matmul too; the residual add with the next
// norm, for a few token rows inside the projection that takes that norm), or one costly to issue
// (attention over short sequences). Where they do not apply (no CUDA device, an unsupported shape
// or dtype) the shim builds the same function from MLX operations.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "mlx/array.h"

namespace mlx_embed::gpu_kernels {

enum class Act : uint8_t { Silu, GeluTanh };

// Whether arrays built now run on a CUDA device (the default device is a GPU and MLX's backend
// is CUDA) and the kernels compile for it.
bool available();

// Where the kernels' compiled images are kept, once a kernel has been asked for on a CUDA
// device: "folder:{path}" (MLX's kernel cache folder, see nvrtc.h), "memory" (that folder cannot
// be used: each process compiles them again), "unused" (no CUDA device, or NVRTC cannot compile
// for it: MLX's operations run instead).
std::string cache();

// Whether attention over [B, H, L, D] heads in `dt` (not more kv heads than q heads) is MLX's
// fused attention on this CUDA device, cuDNN's (bf16 or f16, a head size of a multiple of 8 up to
// 128, Ampere on, more than one query), and not `attention` (more pairs than
// kMaxAttentionPairs). cuDNN reads heads with any stride between tokens, writes its output in
// q's layout, and skips the keys a causal mask blocks instead of reading a mask.
bool cudnn_attends(mlx::core::Dtype dt, int b, int l, int heads, int head_dim);

// The q, k and v heads of a fused projection `qkv` [B·L, (H + 2·Hkv)·D] (q heads, then k, then v),
// as [B, H, L, D], [B, Hkv, L, D], [B, Hkv, L, D]: q and k heads RMS-normed (weights `qw`, `kw`
// of [D]) then rotated (rotate-half, the first `dims` features, positions 0..L times `scale`,
// frequencies 1 / base^(2i/dims)); v as it is. Rounding follows the unfused operations: the
// norm's output is rounded to the compute dtype before the rotation. Where cuDNN's attention
// comes next (bf16 or f16, more (query, key) pairs than `attention` takes) the three are views:
// q and k of token rows written by the kernel (heads side by side), v of `qkv` itself; then the
// attention's output is token rows too, and merging its heads needs no copy. `std::nullopt`
// where the kernels do not apply.
std::optional<std::vector<mlx::core::array>> qkv_heads(const mlx::core::array& qkv,
                                                       const mlx::core::array& qw,
                                                       const mlx::core::array& kw, float eps,
                                                       int b, int l, int heads, int kv_heads,
                                                       int head_dim, int dims, float base,
                                                       float scale);

// act(gate) · up for a fused projection `gu` [N, 2·I] (gate columns first): [N, I]. The
// activation is computed in f32 and rounded to the compute dtype before the product, as the
// reference implementation's activation function returns it.
std::optional<mlx::core::array> gated_halves(const mlx::core::array& gu, Act act);

// The residual stream `x` (f32, [N, E]) plus a block's output `y` ([N, E], compute dtype), the
// latter first RMS-normed by `post` (weight [E] in y's dtype, epsilon `post_eps`) when given;
// returns the new stream (f32) and its RMSNorm by `w` (f32 [E], epsilon `eps`) rounded to
// `out`.
std::optional<std::vector<mlx::core::array>> residual_rms_norm(
    const mlx::core::array& x, const mlx::core::array& y, const mlx::core::array* post,
    float post_eps, const mlx::core::array& w, float eps, mlx::core::Dtype out);

// Token rows up to which `gated_matmul` applies: it does a matmul in the kernel that uses its
// output, saving MLX one operation (≈ 10 µs of host time on an H100); its warps sum on CUDA
// cores, which costs less device time than that only for a few rows.
constexpr int kMaxMatmulRows = 16;

// x [n, K] times the rows of a fused gate/up projection `w` [2·I, K] (gate rows first), then
// `gated_halves` of that: [n, I], the projections rounded to x's dtype in between as a matmul
// rounds them. For n ≤ kMaxMatmulRows; `std::nullopt` where the kernel does not apply.
std::optional<mlx::core::array> gated_matmul(const mlx::core::array& x, const mlx::core::array& w,
                                             Act act);

// `residual_rms_norm(x, y, post, post_eps, w, eps, rows' dtype)` (without `y`, x and the RMSNorm
// of x), then the norm times `rows`ᵀ ([N, E], stored as the weight's rows), and with `gate`
// `gated_halves` of that: the stream and the product, the norm and the product rounded to rows'
// dtype as the operations apart round them. One kernel for n ≤ kMaxMatmulRows token rows whose
// norms fit in a block's shared memory (kNormShared bytes) and E ≤ kMaxNormWidth: each block norms
// every row itself, so MLX issues one operation in place of the norm and the matmul.
constexpr int kNormShared = 48 * 1024;
constexpr int kMaxNormWidth = 8192;
// Blocks (of eight warps) the kernel runs at most, each staging the norms: two per SM of an H100.
constexpr long kNormBlocks = 264;
std::optional<std::vector<mlx::core::array>> norm_matmul(const mlx::core::array& x,
                                                         const mlx::core::array* y,
                                                         const mlx::core::array* post,
                                                         float post_eps, const mlx::core::array& w,
                                                         float eps, const mlx::core::array& rows,
                                                         std::optional<Act> gate);

// Batches with at most this many (query, key) pairs over all heads take `attention`, whose warps
// walk their keys one after the other; larger ones MLX's (cuDNN's) fused attention, faster once
// the device, not the host, bounds the time (on an H100, Qwen3 shapes: 8×32 tokens, 2^17 pairs,
// cost 0.2 ms more device time per forward, 16×64 cost 2.6 ms more).
constexpr long kMaxAttentionPairs = 1L << 17;

// softmax(q·kᵀ·scale + mask)·v for q [B, H, L, D], k and v [B, Hkv, L, D] (H a multiple of Hkv),
// an additive mask [B, 1, L, L] that leaves every row at least one key; in f32, rounded once.
// The result is a [B, H, L, D] view of a [B, L, H, D] buffer (token rows, heads side by side).
std::optional<mlx::core::array> attention(const mlx::core::array& q, const mlx::core::array& k,
                                          const mlx::core::array& v, float scale,
                                          const mlx::core::array& mask);

// `qkv_heads` then `attention` in one kernel, for the batches `attention` takes whose keys of one
// kv head fit in a block's shared memory: the attention output as [B·L, H·D] token rows (heads
// side by side), the same values the two kernels give. `attn_scale` multiplies q·kᵀ;
// `rope_scale` is qkv_heads' `scale`.
std::optional<mlx::core::array> qkv_attention(const mlx::core::array& qkv, const mlx::core::array& qw,
                                              const mlx::core::array& kw, float eps, int b, int l,
                                              int heads, int kv_heads, int head_dim, int dims,
                                              float base, float rope_scale, float attn_scale,
                                              const mlx::core::array& mask);

}  // namespace mlx_embed::gpu_kernels

// Fused CPU kernels for the f32 forward pass, as MLX primitives.
//
// MLX's CPU backend runs its fused operations (RMSNorm, RoPE) as graphs of elementwise
// operations, and every elementwise operation as one scalar pass on one thread: an f32 forward
// spent as long there as in the matmuls. These primitives do each step in one pass over memory,
// vectorized (AVX2 + FMA where the CPU has them, chosen at run time), split over the CPU's cores.
// They run on MLX's CPU stream like its own operations, so the graph, its scheduling and its
// buffers stay MLX's. Where they do not apply (another device, another dtype) the shim builds
// MLX's own operations instead.
#pragma once

#include <cstdint>

#include "mlx/array.h"

namespace mlx_embed::cpu_kernels {

enum class Act : uint8_t { Silu, GeluTanh };

// Whether the fused kernels serve arrays built now: the default device is the CPU and every
// array is f32.
bool applies(std::initializer_list<const mlx::core::array*> arrays);

// RMSNorm over the last axis: x · 1/√(mean(x²) + eps) · w, w of shape [D].
mlx::core::array rms_norm(const mlx::core::array& x, const mlx::core::array& w, float eps);

// act(gate) · up, elementwise, gate and up of one shape. GELU is the tanh approximation
// (`gelu_pytorch_tanh`), computed as x / (1 + e^(−2u)), which is 0.5·x·(1 + tanh(u)).
mlx::core::array gated(const mlx::core::array& gate, const mlx::core::array& up, Act act);

// Per-head RMSNorm then rotary embedding (rotate-half convention, positions 0..L): x is
// [B, L, H, D] (heads split from token rows); the result is [B, H, L, D], ready for attention.
// The first `dims` features of each head rotate, with frequencies 1 / base^(2i/dims) and
// positions multiplied by `scale`.
mlx::core::array head_norm_rope(const mlx::core::array& x, const mlx::core::array& w, float eps,
                                int dims, float base, float scale);

// Whether `attention` takes these shapes: q [B, H, L, D], k and v [B, Hkv, L, D] with H a
// multiple of Hkv, an additive mask [B, 1, L, L].
bool attention_applies(const mlx::core::array& q, const mlx::core::array& k,
                       const mlx::core::array& v, const mlx::core::array& mask);

// softmax(q·kᵀ·scale + mask)·v: the two products on MLX's matmul (BLAS), the scaled, masked
// softmax between them one fused pass.
mlx::core::array attention(const mlx::core::array& q, const mlx::core::array& k,
                           const mlx::core::array& v, float scale, const mlx::core::array& mask);

}  // namespace mlx_embed::cpu_kernels

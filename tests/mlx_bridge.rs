//! The MLX bridge turns C++ exceptions into Rust errors (a bad shape must not abort the process),
//! round-trips data and dtypes, and computes what the fused kernels (MLX's, and ours on the CPU)
//! promise.

mod common;

use common::mlx_lock;
use mlx_embed::mlx::{Activation, Array, Dtype};

#[test]
fn a_shape_mismatch_is_an_error_not_an_abort() {
    let _g = mlx_lock();
    let a = Array::from_f32(&[1.0; 6], &[2, 3]).unwrap();
    let err = a.matmul(&a).and_then(|p| p.eval()).unwrap_err();
    assert!(err.to_string().starts_with("MLX: "), "{err}");
    assert!(a.reshape(&[4, 2]).is_err());
    // The process and MLX still work afterwards.
    let ok = a.matmul(&a.transpose(&[1, 0]).unwrap()).unwrap().to_f32_vec().unwrap();
    assert_eq!(ok, vec![3.0, 3.0, 3.0, 3.0]);
}

#[test]
fn data_that_does_not_fill_the_shape_is_refused_before_mlx() {
    let err = Array::from_f32(&[1.0, 2.0], &[3]).unwrap_err();
    assert!(err.to_string().contains("do not fill shape"), "{err}");
}

#[test]
fn dtypes_round_trip_through_the_shared_enum() {
    let _g = mlx_lock();
    let a = Array::from_f32(&[1.5, -2.25], &[2]).unwrap();
    for dt in [Dtype::Float32, Dtype::Bfloat16, Dtype::Float16, Dtype::Int32] {
        let b = a.astype(dt).unwrap();
        assert_eq!(b.dtype().unwrap(), dt);
    }
    assert_eq!(a.astype(Dtype::Bfloat16).unwrap().to_f32_vec().unwrap(), vec![1.5, -2.25]);
}

#[test]
fn rms_norm_matches_its_definition() {
    let _g = mlx_lock();
    let x = [1.0f32, -2.0, 3.0, 0.5];
    let w = [0.5f32, 1.0, 2.0, -1.0];
    let got = Array::from_f32(&x, &[1, 4]).unwrap()
        .rms_norm(&Array::from_f32(&w, &[4]).unwrap(), 1e-6).unwrap()
        .to_f32_vec().unwrap();
    let rms = (x.iter().map(|v| v * v).sum::<f32>() / 4.0 + 1e-6).sqrt();
    for i in 0..4 {
        assert!((got[i] - x[i] / rms * w[i]).abs() < 1e-6, "{got:?}");
    }
}

#[test]
fn attention_masks_keys_out() {
    let _g = mlx_lock();
    // One head, two positions; query 0 may only see key 0, so it must return v[0].
    let q = Array::from_f32(&[1.0, 0.0, 0.0, 1.0], &[1, 1, 2, 2]).unwrap();
    let v = Array::from_f32(&[10.0, 20.0, 30.0, 40.0], &[1, 1, 2, 2]).unwrap();
    let i = Array::arange(0, 2).unwrap();
    let causal = i.reshape(&[1, 2]).unwrap().less_equal(&i.reshape(&[2, 1]).unwrap()).unwrap();
    let out = Array::attention(&q, &q, &v, 1.0, &causal).unwrap().to_f32_vec().unwrap();
    assert_eq!(&out[..2], &[10.0, 20.0]);
}

/// Deterministic values in [lo, hi).
fn values(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            lo + (hi - lo) * ((s >> 40) as f32 / (1u64 << 24) as f32)
        })
        .collect()
}

/// Largest |got − want| / (|want| + floor) over the elements.
fn worst(got: &[f32], want: &[f64], floor: f64) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter().zip(want).map(|(g, w)| (*g as f64 - w).abs() / (w.abs() + floor)).fold(0.0, f64::max)
}

fn rms_norm_rows(x: &[f32], w: &[f32], eps: f64) -> Vec<f64> {
    let d = w.len();
    x.chunks(d)
        .flat_map(|row| {
            let ms = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / d as f64;
            let s = 1.0 / (ms + eps).sqrt();
            row.iter().zip(w).map(move |(v, w)| *v as f64 * s * *w as f64)
        })
        .collect()
}

#[test]
fn rms_norm_of_many_rows_matches_its_definition_contiguous_or_not() {
    let _g = mlx_lock();
    // 600 rows of 203 (not a multiple of the vector width): split over threads, with a tail.
    let (rows, d) = (600, 203);
    let x = values(rows * d, 1, -4.0, 4.0);
    let w = values(d, 2, -2.0, 2.0);
    let wa = Array::from_f32(&w, &[d as i32]).unwrap();
    let want = rms_norm_rows(&x, &w, 1e-6);
    let got = Array::from_f32(&x, &[rows as i32, d as i32]).unwrap().rms_norm(&wa, 1e-6).unwrap();
    assert!(worst(&got.to_f32_vec().unwrap(), &want, 1e-3) < 1e-5);
    // A transposed (strided) input gives the norm of its rows too.
    let xt = Array::from_f32(&x, &[d as i32, rows as i32]).unwrap().transpose(&[1, 0]).unwrap();
    let mut host_t = vec![0.0; rows * d];
    for r in 0..rows {
        for c in 0..d {
            host_t[r * d + c] = x[c * rows + r];
        }
    }
    let got_t = xt.rms_norm(&wa, 1e-6).unwrap().to_f32_vec().unwrap();
    assert!(worst(&got_t, &rms_norm_rows(&host_t, &w, 1e-6), 1e-3) < 1e-5);
}

#[test]
fn gated_activations_match_their_definitions_over_the_whole_range() {
    let _g = mlx_lock();
    // 100,003 elements: several threads' chunks and a tail; gates from −100 to 100, where e^x
    // overflows f32 in a naive formula.
    let n = 100_003;
    let mut gate = values(n, 3, -12.0, 12.0);
    gate[..6].copy_from_slice(&[-100.0, -30.0, 0.0, 1e-20, 30.0, 100.0]);
    let up = values(n, 4, -3.0, 3.0);
    let ga = Array::from_f32(&gate, &[n as i32]).unwrap();
    let ua = Array::from_f32(&up, &[n as i32]).unwrap();
    let silu: Vec<f64> = gate.iter().zip(&up).map(|(g, u)| *g as f64 / (1.0 + (-*g as f64).exp()) * *u as f64).collect();
    let gelu: Vec<f64> = gate.iter().zip(&up).map(|(g, u)| {
        let g = *g as f64;
        let inner = (2.0 / std::f64::consts::PI).sqrt() * (g + 0.044715 * g * g * g);
        0.5 * g * (1.0 + inner.tanh()) * *u as f64
    }).collect();
    for (act, want) in [(Activation::Silu, &silu), (Activation::GeluTanh, &gelu)] {
        let got = ga.gated(&ua, act).unwrap().to_f32_vec().unwrap();
        assert!(got.iter().all(|v| v.is_finite()), "{act:?}");
        // Relative to the value, or to 1e-2 for small ones: computed as 0.5·x·(1 + tanh(u)) (MLX's
        // own operations, on a GPU), GELU loses digits where tanh(u) nears −1.
        let err = worst(&got, want, 1e-2);
        assert!(err < 1e-4, "{act:?}: {err}");
    }
    // An `up` that broadcasts (not the gate's shape) takes MLX's own operations: same values.
    let one = Array::from_f32(&[1.0], &[1]).unwrap();
    let got = ga.gated(&one, Activation::Silu).unwrap().to_f32_vec().unwrap();
    let want: Vec<f64> = gate.iter().map(|g| *g as f64 / (1.0 + (-*g as f64).exp())).collect();
    assert!(worst(&got, &want, 1e-6) < 2e-5);
}

/// Per-head RMSNorm then rotate-half RoPE of `x` `[B, L, H, D]`, as `[B, H, L, D]`, in f64.
fn head_norm_rope_host(x: &[f32], (b, l, h, d): (usize, usize, usize, usize), w: &[f32], dims: usize, base: f64, scale: f64) -> Vec<f64> {
    let normed = rms_norm_rows(x, w, 1e-6);
    let mut out = vec![0.0; x.len()];
    let half = dims / 2;
    for bi in 0..b {
        for p in 0..l {
            for hi in 0..h {
                let src = &normed[((bi * l + p) * h + hi) * d..][..d];
                let dst = &mut out[((bi * h + hi) * l + p) * d..][..d];
                dst.copy_from_slice(src);
                for i in 0..half {
                    let angle = p as f64 * scale / base.powf(2.0 * i as f64 / dims as f64);
                    let (s, c) = angle.sin_cos();
                    dst[i] = src[i] * c - src[i + half] * s;
                    dst[i + half] = src[i + half] * c + src[i] * s;
                }
            }
        }
    }
    out
}

#[test]
fn head_norm_rope_matches_norm_then_rotary_embedding() {
    let _g = mlx_lock();
    let (b, l, h, d) = (3, 41, 4, 24);
    let x = values(b * l * h * d, 5, -3.0, 3.0);
    let w = values(d, 6, 0.5, 1.5);
    let xa = Array::from_f32(&x, &[b as i32, l as i32, h as i32, d as i32]).unwrap();
    let wa = Array::from_f32(&w, &[d as i32]).unwrap();
    // All features rotating; a partial rotation with linear position scaling.
    for (dims, base, scale) in [(24, 10000.0, 1.0), (16, 500.0, 0.25)] {
        let want = head_norm_rope_host(&x, (b, l, h, d), &w, dims, base, scale);
        let got = xa.head_norm_rope(&wa, 1e-6, dims as i32, base as f32, scale as f32).unwrap();
        assert_eq!(got.shape(), vec![b as i32, h as i32, l as i32, d as i32]);
        // Angles are rounded to f32 as the reference implementation does: ≈ 1e-5 off f64.
        let err = worst(&got.to_f32_vec().unwrap(), &want, 1.0);
        assert!(err < 5e-5, "dims {dims}: {err}");
        // bf16 takes MLX's own norm and rope: the same function, at bf16 precision.
        let got16 = xa.astype(Dtype::Bfloat16).unwrap()
            .head_norm_rope(&wa.astype(Dtype::Bfloat16).unwrap(), 1e-6, dims as i32, base as f32, scale as f32).unwrap()
            .astype(Dtype::Float32).unwrap().to_f32_vec().unwrap();
        let err16 = worst(&got16, &want, 1.0);
        assert!(err16 < 3e-2, "bf16, dims {dims}: {err16}");
    }
}

#[test]
fn grouped_attention_with_an_additive_mask_matches_its_definition() {
    let _g = mlx_lock();
    // 6 query heads over 2 key heads, rows of 13 and 9 real tokens padded to 13, causal.
    let (b, h, hkv, l, d) = (2usize, 6usize, 2usize, 13usize, 16usize);
    let lengths = [13usize, 9];
    let q = values(b * h * l * d, 7, -2.0, 2.0);
    let k = values(b * hkv * l * d, 8, -2.0, 2.0);
    let v = values(b * hkv * l * d, 9, -2.0, 2.0);
    let allowed = |bi: usize, i: usize, j: usize| (j <= i && j < lengths[bi]) || i == j;
    let mut mask = vec![0.0f32; b * l * l];
    for bi in 0..b {
        for i in 0..l {
            for j in 0..l {
                if !allowed(bi, i, j) {
                    mask[(bi * l + i) * l + j] = f32::NEG_INFINITY;
                }
            }
        }
    }
    let scale = 0.25f64;
    let mut want = vec![0.0f64; b * h * l * d];
    for bi in 0..b {
        for hi in 0..h {
            let g = hi / (h / hkv);
            for i in 0..l {
                let qi = &q[((bi * h + hi) * l + i) * d..][..d];
                let logits: Vec<f64> = (0..l)
                    .map(|j| {
                        let kj = &k[((bi * hkv + g) * l + j) * d..][..d];
                        let dot: f64 = qi.iter().zip(kj).map(|(a, c)| *a as f64 * *c as f64).sum();
                        if allowed(bi, i, j) { dot * scale } else { f64::NEG_INFINITY }
                    })
                    .collect();
                let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = logits.iter().map(|x| (x - m).exp()).collect();
                let sum: f64 = e.iter().sum();
                for (j, ej) in e.iter().enumerate() {
                    for c in 0..d {
                        want[((bi * h + hi) * l + i) * d + c] += ej / sum * v[((bi * hkv + g) * l + j) * d + c] as f64;
                    }
                }
            }
        }
    }
    let arr = |x: &[f32], s: &[usize]| Array::from_f32(x, &s.iter().map(|&n| n as i32).collect::<Vec<_>>()).unwrap();
    let got = Array::attention(
        &arr(&q, &[b, h, l, d]), &arr(&k, &[b, hkv, l, d]), &arr(&v, &[b, hkv, l, d]), scale as f32, &arr(&mask, &[b, 1, l, l]),
    ).unwrap();
    assert_eq!(got.shape(), vec![b as i32, h as i32, l as i32, d as i32]);
    let err = worst(&got.to_f32_vec().unwrap(), &want, 1.0);
    assert!(err < 1e-5, "{err}");
}

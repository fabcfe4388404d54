//! Compares MLX's `quantized_matmul` with dequantize + matmul on the default device, over bits,
//! group sizes, row counts and dtypes: a quick check of a backend's quantized kernels.
//! `cargo run --release --example qmm_check`

use mlx_embed::mlx::{Array, Dtype};

fn main() -> anyhow::Result<()> {
    println!("{:>4} {:>5} {:>5} {:>5} {:>9} {:>10}", "bits", "group", "rows", "k", "dtype", "rel.err");
    let (n, k) = (96, 256);
    let w: Vec<f32> = (0..n * k).map(|i| (((i * 7919) % 1000) as f32 / 1000.0 - 0.5) * 0.3).collect();
    let w = Array::from_f32(&w, &[n, k])?;
    for bits in [4, 8] {
        for group in [32, 64, 128] {
            for rows in [1, 8, 64, 300, 1000] {
                for dtype in [Dtype::Float32, Dtype::Bfloat16] {
                    let x: Vec<f32> = (0..rows * k).map(|i| ((i * 104729) % 997) as f32 / 997.0 - 0.5).collect();
                    let x = Array::from_f32(&x, &[rows, k])?.astype(dtype)?;
                    let (q, s, b) = mlx_quantize(&w, group, bits)?;
                    let (s, b) = (s.astype(dtype)?, b.astype(dtype)?);
                    let got = x.quantized_matmul(&q, &s, &b, group, bits)?.to_f32_vec()?;
                    let deq = Array::dequantize(&q, &s, &b, group, bits)?.astype(Dtype::Float32)?;
                    let want = x.astype(Dtype::Float32)?.matmul(&deq.transpose(&[1, 0])?)?.to_f32_vec()?;
                    let num: f64 = got.iter().zip(&want).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
                    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
                    println!("{bits:>4} {group:>5} {rows:>5} {k:>5} {:>9} {:>10.2e}", dtype.name(), (num / den).sqrt());
                }
            }
        }
    }
    Ok(())
}

/// Affine quantization done here (not by MLX) so the kernel is checked against independent packing.
fn mlx_quantize(w: &Array, group: i32, bits: i32) -> anyhow::Result<(Array, Array, Array)> {
    let shape = w.shape();
    let (n, k) = (shape[0] as usize, shape[1] as usize);
    let vals = w.to_f32_vec()?;
    let levels = ((1u32 << bits) - 1) as f32;
    let per_word = 32 / bits as usize;
    let groups = k / group as usize;
    let (mut packed, mut scales, mut biases) = (vec![0u32; n * k / per_word], vec![0f32; n * groups], vec![0f32; n * groups]);
    for r in 0..n {
        for g in 0..groups {
            let row = &vals[r * k + g * group as usize..r * k + (g + 1) * group as usize];
            let (lo, hi) = row.iter().fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
            let scale = ((hi - lo) / levels).max(1e-8);
            scales[r * groups + g] = scale;
            biases[r * groups + g] = lo;
            for (j, &v) in row.iter().enumerate() {
                let q = ((v - lo) / scale).round().clamp(0.0, levels) as u32;
                let col = g * group as usize + j;
                packed[(r * k + col) / per_word] |= q << (bits as usize * (col % per_word));
            }
        }
    }
    let packed_i32: Vec<i32> = packed.iter().map(|&u| u as i32).collect();
    let q = Array::from_i32(&packed_i32, &[n as i32, (k / per_word) as i32])?.astype(Dtype::Uint32)?;
    let s = Array::from_f32(&scales, &[n as i32, groups as i32])?;
    let b = Array::from_f32(&biases, &[n as i32, groups as i32])?;
    Ok((q, s, b))
}

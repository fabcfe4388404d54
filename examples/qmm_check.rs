//! Checks MLX's quantized kernels on the default device against the CPU: `quantized_matmul` and
//! `dequantize` over bits, group sizes, input sizes, row counts and dtypes. Prints one line per
//! case with the relative error (or the error MLX raised).
//! `cargo run --release --example qmm_check`

use mlx_embed::mlx::{self, Array, Dtype};
use mlx_embed::models::kernel_check::rel_err;

fn main() -> anyhow::Result<()> {
    let gpu = mlx::gpu_is_available();
    println!("device: {}", if gpu { "gpu" } else { "cpu" });
    println!("{:>4} {:>5} {:>5} {:>5} {:>9} {:>10} {:>10}", "bits", "group", "k", "rows", "dtype", "qmm", "dequant");
    let n = 96;
    for bits in [4, 8] {
        for group in [32, 64, 128] {
            for k in [64, 256, 1024] {
                if k % group != 0 {
                    continue;
                }
                for rows in [1, 300] {
                    for dtype in [Dtype::Float32, Dtype::Bfloat16] {
                        let line = match case(gpu, bits, group, k, rows, n, dtype) {
                            Ok((a, b)) => format!("{a:>10.2e} {b:>10.2e}"),
                            Err(e) => format!("error: {}", e.to_string().lines().next().unwrap_or("")),
                        };
                        println!("{bits:>4} {group:>5} {k:>5} {rows:>5} {:>9} {line}", dtype.name());
                    }
                }
            }
        }
    }
    Ok(())
}

/// (qmm error, dequantize error) of the default device against the CPU in f32.
fn case(gpu: bool, bits: i32, group: i32, k: i32, rows: i32, n: i32, dtype: Dtype) -> anyhow::Result<(f64, f64)> {
    let (q, s, b) = quantize(n, k, group, bits)?;
    let xs: Vec<f32> = (0..rows * k).map(|i| ((i * 104729) % 997) as f32 / 997.0 - 0.5).collect();
    let x = Array::from_f32(&xs, &[rows, k])?;
    let run = |dt: Dtype| -> anyhow::Result<(Vec<f32>, Vec<f32>)> {
        let (s, b) = (s.astype(dt)?, b.astype(dt)?);
        let y = x.astype(dt)?.quantized_matmul(&q, &s, &b, group, bits)?.to_f32_vec()?;
        let d = Array::dequantize(&q, &s, &b, group, bits)?.to_f32_vec()?;
        Ok((y, d))
    };
    let (y, d) = run(dtype)?;
    mlx::set_default_device(false)?;
    let reference = run(Dtype::Float32);
    mlx::set_default_device(gpu)?;
    let (y_ref, d_ref) = reference?;
    Ok((rel_err(&y, &y_ref), rel_err(&d, &d_ref)))
}

/// Affine quantization done here (not by MLX): random values, independent packing.
fn quantize(n: i32, k: i32, group: i32, bits: i32) -> anyhow::Result<(Array, Array, Array)> {
    let (n, k, group) = (n as usize, k as usize, group as usize);
    let per_word = 32 / bits as usize;
    let groups = k / group;
    let levels = (1u32 << bits) - 1;
    let mut packed = vec![0u32; n * k / per_word];
    for i in 0..n * k {
        let q = ((i as u64 * 2654435761) >> 7) as u32 % (levels + 1);
        packed[i / per_word] |= q << (bits as usize * (i % per_word));
    }
    let scales: Vec<f32> = (0..n * groups).map(|i| 0.01 + (i % 13) as f32 * 0.002).collect();
    let biases: Vec<f32> = (0..n * groups).map(|i| -0.1 + (i % 7) as f32 * 0.01).collect();
    let words: Vec<i32> = packed.iter().map(|&u| u as i32).collect();
    let q = Array::from_i32(&words, &[n as i32, (k / per_word) as i32])?.astype(Dtype::Uint32)?;
    Ok((q, Array::from_f32(&scales, &[n as i32, groups as i32])?, Array::from_f32(&biases, &[n as i32, groups as i32])?))
}

//! A load-time check of the backend's quantized kernels against the CPU.
//!
//! MLX's CUDA backend (0.32.4) returns wrong results for some quantized shapes (seen: 8-bit,
//! group 64, small inputs), and a wrong kernel gives plausible-looking vectors. Before a quantized
//! layer of a new shape is used on a GPU, its `quantized_matmul` and `dequantize` are compared with
//! the CPU's f32 result on a probe input; a shape that disagrees runs on weights dequantized by
//! the CPU instead (correct, but without the memory saving), and the log says so.

use crate::error::Result;
use crate::mlx::{self, Array, Dtype};
use crate::models::layers::QuantizedWeight;

/// Largest relative L2 error accepted: bf16 rounding and TF32 stay below 1e-2; the broken
/// kernels seen are off by more than 0.3.
const TOLERANCE: f64 = 2e-2;

/// Relative errors of the default device's quantized matmul and dequantization against the CPU.
#[derive(Debug, Clone, Copy)]
pub struct KernelErrors {
    pub matmul: f64,
    pub dequantize: f64,
}

impl KernelErrors {
    pub fn ok(&self) -> bool {
        self.matmul <= TOLERANCE && self.dequantize <= TOLERANCE
    }
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    let num: f64 = got.iter().zip(want).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    if got.len() != want.len() || !num.is_finite() {
        return f64::INFINITY;
    }
    (num / den.max(1e-30)).sqrt()
}

/// Runs `q` (`[out, in]`) on a probe input on the current default device (`gpu`) and on the CPU.
pub fn check(q: &QuantizedWeight, in_dim: i32, gpu: bool) -> Result<KernelErrors> {
    let rows = 4;
    let probe: Vec<f32> = (0..rows * in_dim).map(|i| ((i as i64 * 7919) % 1009) as f32 / 1009.0 - 0.5).collect();
    let x = Array::from_f32(&probe, &[rows, in_dim])?.astype(q.out)?;
    let sample = 8.min(q.w.shape()[0]);
    let first_rows = |a: &Array| -> Result<Array> {
        let cols = a.shape()[1];
        Ok(a.slice(&[0, 0], &[sample, cols])?)
    };
    let y = q.matmul_t(&x)?.to_f32_vec()?;
    let d = Array::dequantize(&first_rows(&q.w)?, &first_rows(&q.scales)?, &first_rows(&q.biases)?, q.group_size, q.bits)?
        .to_f32_vec()?;
    mlx::set_default_device(false)?;
    let reference = (|| -> Result<(Vec<f32>, Vec<f32>)> {
        let w = dequantize_f32(q)?;
        let y = x.astype(Dtype::Float32)?.matmul(&w.transpose(&[1, 0])?)?.to_f32_vec()?;
        let d = first_rows(&w)?.to_f32_vec()?;
        Ok((y, d))
    })();
    mlx::set_default_device(gpu)?;
    let (y_ref, d_ref) = reference?;
    Ok(KernelErrors { matmul: rel_err(&y, &y_ref), dequantize: rel_err(&d, &d_ref) })
}

/// The whole matrix dequantized in f32 on the current device.
pub fn dequantize_f32(q: &QuantizedWeight) -> Result<Array> {
    let s = q.scales.astype(Dtype::Float32)?;
    let b = q.biases.astype(Dtype::Float32)?;
    Ok(Array::dequantize(&q.w, &s, &b, q.group_size, q.bits)?)
}

/// `q` dequantized by the CPU into `dtype`, evaluated, for use on any device.
pub fn dequantize_on_cpu(q: &QuantizedWeight, dtype: Dtype, gpu: bool) -> Result<Array> {
    mlx::set_default_device(false)?;
    let w = dequantize_f32(q).and_then(|w| Ok(w.astype(dtype)?)).and_then(|w| {
        w.eval()?;
        Ok(w)
    });
    mlx::set_default_device(gpu)?;
    w
}

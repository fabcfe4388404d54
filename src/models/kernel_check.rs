//! A load-time check of the backend's quantized kernels against the CPU.
//!
//! MLX's CUDA backend (0.32.4, H100) returns wrong results for some quantized shapes (seen: group
//! size 64 with a 64-wide input and many rows, 4 and 8 bits) and raises for others (group 128,
//! f32, many rows); a wrong kernel gives plausible-looking vectors. Before a quantized
//! layer of a new shape is used on a GPU, its `quantized_matmul` and `dequantize` are compared with
//! the CPU's f32 result on a probe input; a shape that disagrees runs on weights dequantized by
//! the CPU instead (correct, but without the memory saving), and the log says so.

use crate::error::Result;
use crate::mlx::{self, Array, Dtype};
use crate::models::layers::QuantizedWeight;

/// Largest relative L2 error accepted: bf16 rounding and TF32 stay below 1e-2; the broken
/// kernels seen are off by more than 0.3.
const TOLERANCE: f64 = 2e-2;

/// How the default device's quantized kernels compare with the CPU for one weight shape.
#[derive(Debug, Clone)]
pub struct KernelErrors {
    /// Worst relative L2 error of `quantized_matmul` over the probe sizes.
    pub matmul: f64,
    pub dequantize: f64,
    /// The error MLX raised, if a kernel failed outright.
    pub failure: Option<String>,
}

impl KernelErrors {
    pub fn ok(&self) -> bool {
        self.failure.is_none() && self.matmul <= TOLERANCE && self.dequantize <= TOLERANCE
    }
}

/// Relative L2 error ‖got − want‖ / ‖want‖ (infinite for NaN or mismatched lengths).
pub fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    let num: f64 = got.iter().zip(want).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    if got.len() != want.len() || !num.is_finite() {
        return f64::INFINITY;
    }
    (num / den.max(1e-30)).sqrt()
}

/// Probe row counts: MLX picks different kernels for a few rows (vector) and many (matrix).
const PROBE_ROWS: [i32; 2] = [1, 256];

/// Runs `q` (`[out, in]`) on probe inputs on the current default device (`gpu`) and on the CPU.
pub fn check(q: &QuantizedWeight, in_dim: i32, gpu: bool) -> Result<KernelErrors> {
    match measure(q, in_dim, gpu) {
        Ok((matmul, dequantize)) => Ok(KernelErrors { matmul, dequantize, failure: None }),
        // A kernel that throws counts as broken; the device must be restored either way.
        Err(e) => {
            mlx::set_default_device(gpu)?;
            Ok(KernelErrors { matmul: f64::INFINITY, dequantize: f64::INFINITY, failure: Some(e.to_string()) })
        }
    }
}

fn measure(q: &QuantizedWeight, in_dim: i32, gpu: bool) -> Result<(f64, f64)> {
    let sample = 8.min(q.w.shape()[0]);
    let first_rows = |a: &Array| -> Result<Array> {
        let cols = a.shape()[1];
        Ok(a.slice(&[0, 0], &[sample, cols])?)
    };
    let probes = PROBE_ROWS
        .iter()
        .map(|&rows| {
            let v: Vec<f32> = (0..rows * in_dim).map(|i| ((i as i64 * 7919) % 1009) as f32 / 1009.0 - 0.5).collect();
            Ok(Array::from_f32(&v, &[rows, in_dim])?.astype(q.out)?)
        })
        .collect::<Result<Vec<_>>>()?;
    let got = probes.iter().map(|x| Ok(q.matmul_t(x)?.to_f32_vec()?)).collect::<Result<Vec<_>>>()?;
    let d = Array::dequantize(&first_rows(&q.w)?, &first_rows(&q.scales)?, &first_rows(&q.biases)?, q.group_size, q.bits)?
        .to_f32_vec()?;
    mlx::set_default_device(false)?;
    let reference = (|| -> Result<(Vec<Vec<f32>>, Vec<f32>)> {
        let w = dequantize_f32(q)?;
        let wt = w.transpose(&[1, 0])?;
        let ys = probes.iter().map(|x| Ok(x.astype(Dtype::Float32)?.matmul(&wt)?.to_f32_vec()?)).collect::<Result<Vec<_>>>()?;
        Ok((ys, first_rows(&w)?.to_f32_vec()?))
    })();
    mlx::set_default_device(gpu)?;
    let (want, d_ref) = reference?;
    let matmul = got.iter().zip(&want).map(|(g, w)| rel_err(g, w)).fold(0.0, f64::max);
    Ok((matmul, rel_err(&d, &d_ref)))
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

//! MLX-quantized layers: the kernel check used on GPUs runs and accepts correct kernels, and the
//! CPU-dequantized fallback computes the same function as the quantized kernel.

mod common;

use common::*;
use mlx_embed::mlx::{Array, Dtype};
use mlx_embed::models::kernel_check;
use mlx_embed::models::layers::{Linear, QuantizedWeight};
use mlx_embed::models::weights::Weights;

fn quantized_layer(fixture: &str, module: &str, in_dim: i32, out_dim: i32) -> QuantizedWeight {
    let dir = fixtures_dir().join(fixture);
    let mut w = Weights::open(&dir, Dtype::Float32, false).unwrap();
    let raw: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    w.set_quantization(&dir.join("config.json"), raw.get("quantization")).unwrap();
    match w.linear(module, in_dim, out_dim, false).unwrap() {
        Linear::Quantized { q, .. } => q,
        Linear::Dense { .. } => panic!("{fixture}/{module} should be quantized"),
    }
}

#[test]
fn the_kernel_check_accepts_the_cpu_kernels() {
    let _g = mlx_lock();
    for (fixture, in_dim) in [("qwen3-tiny-q4", 64), ("qwen3-tiny-q8", 64)] {
        let q = quantized_layer(fixture, "layers.0.mlp.gate_proj", in_dim, if fixture.ends_with("q4") { 96 } else { 128 });
        let e = kernel_check::check(&q, in_dim, false).unwrap();
        assert!(e.ok() && e.matmul < 1e-6 && e.dequantize < 1e-6, "{fixture}: {e:?}");
    }
}

#[test]
fn the_dequantized_fallback_computes_the_same_products() {
    let _g = mlx_lock();
    let q = quantized_layer("qwen3-tiny-q4", "layers.1.self_attn.q_proj", 64, 96);
    let x: Vec<f32> = (0..3 * 64).map(|i| ((i * 31) % 17) as f32 / 17.0 - 0.5).collect();
    let x = Array::from_f32(&x, &[3, 64]).unwrap();
    let quantized = q.matmul_t(&x).unwrap().to_f32_vec().unwrap();
    let w = kernel_check::dequantize_on_cpu(&q, Dtype::Float32, false).unwrap();
    let dense = x.matmul(&w.transpose(&[1, 0]).unwrap()).unwrap().to_f32_vec().unwrap();
    assert!(max_abs_diff(&quantized, &dense) < 1e-5);
}

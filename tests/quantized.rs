//! MLX-quantized layers: the kernel check used on GPUs runs and accepts correct kernels, and the
//! CPU-dequantized fallback computes the same function as the quantized kernel, and projections
//! fused into one matmul (as on GPUs) compute their parts side by side.

mod common;

use common::*;
use mlx_embed::mlx::{Array, Dtype};
use mlx_embed::models::kernel_check;
use mlx_embed::models::layers::{Linear, QuantizedWeight};
use mlx_embed::models::weights::Weights;

fn quantized_layer(fixture: &str, module: &str, in_dim: i32, out_dim: i32) -> QuantizedWeight {
    match layer_weights(fixture).linear(module, in_dim, out_dim, false).unwrap() {
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

fn layer_weights(fixture: &str) -> Weights {
    let dir = fixtures_dir().join(fixture);
    let mut w = Weights::open(&dir, Dtype::Float32, false).unwrap();
    let raw: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    w.set_quantization(&dir.join("config.json"), raw.get("quantization")).unwrap();
    w
}

#[test]
fn fused_projections_compute_their_parts_side_by_side() {
    let _g = mlx_lock();
    let x: Vec<f32> = (0..3 * 64).map(|i| ((i * 37) % 23) as f32 / 23.0 - 0.5).collect();
    let x = Array::from_f32(&x, &[3, 64]).unwrap();
    let parts_of = |fixture: &str| {
        let mut w = layer_weights(fixture);
        ["q_proj", "k_proj", "v_proj"]
            .iter()
            .zip([96, 48, 48])
            .map(|(m, out)| w.linear(&format!("layers.1.self_attn.{m}"), 64, out, false).unwrap())
            .collect::<Vec<_>>()
    };
    for fixture in ["qwen3-tiny", "qwen3-tiny-q4"] {
        let parts = parts_of(fixture);
        let fused = Linear::fuse(&parts.iter().collect::<Vec<_>>()).unwrap().expect("same kind: fusable");
        assert_eq!(matches!(fused, Linear::Quantized { .. }), fixture.ends_with("q4"), "{fixture}");
        let got = fused.forward(&x).unwrap();
        assert_eq!(got.shape(), vec![3, 192]);
        let outs: Vec<Vec<f32>> = parts.iter().map(|p| p.forward(&x).unwrap().to_f32_vec().unwrap()).collect();
        let mut want = Vec::new();
        for row in 0..3 {
            for (o, width) in outs.iter().zip([96, 48, 48]) {
                want.extend_from_slice(&o[row * width..(row + 1) * width]);
            }
        }
        assert!(max_abs_diff(&got.to_f32_vec().unwrap(), &want) < 1e-6, "{fixture}");
    }
    // A dense and a quantized projection stay apart.
    let (dense, quant) = (parts_of("qwen3-tiny"), parts_of("qwen3-tiny-q4"));
    assert!(Linear::fuse(&[&dense[0], &quant[1]]).unwrap().is_none());
}

//! The MLX bridge turns C++ exceptions into Rust errors (a bad shape must not abort the process),
//! round-trips data and dtypes, and computes what MLX's fused kernels promise.

mod common;

use common::mlx_lock;
use mlx_embed::mlx::{Array, Dtype};

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

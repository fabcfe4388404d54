//! Measures f32 matmul throughput through MLX on the default device (GFLOP/s), to check which
//! BLAS the CPU backend uses. `cargo run --release --example matmul_gflops [N] [REPEATS]`.

use std::time::Instant;

use mlx_embed::mlx::{self, Array};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: i32 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1024);
    let repeats: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(20);
    let data: Vec<f32> = (0..n * n).map(|i| ((i % 97) as f32 - 48.0) / 97.0).collect();
    let a = Array::from_f32(&data, &[n, n])?;
    let b = a.transpose(&[1, 0])?;
    a.matmul(&b)?.eval()?; // warm-up
    let mut best = f64::MAX;
    for _ in 0..repeats {
        let t = Instant::now();
        a.matmul(&b)?.eval()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    let flops = 2.0 * (n as f64).powi(3);
    println!(
        "MLX {} matmul {n}x{n} f32: best {:.2} ms, {:.1} GFLOP/s (OPENBLAS_CORETYPE={})",
        mlx::version(),
        best * 1e3,
        flops / best / 1e9,
        std::env::var("OPENBLAS_CORETYPE").unwrap_or_default()
    );
    Ok(())
}

//! `mlx-embed profile`: the forward pass of a model folder timed at fixed batch shapes, in process
//! (no server, no tokenizer): where a batch's time goes between building the graph on the host,
//! handing it to MLX, and waiting for the device, and how many operations one forward issues.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::bench::{Latency, Rng};
use crate::error::{Error, Result};
use crate::mlx::Array;
use crate::models::EmbeddingModel;

/// `batch` rows of `tokens` token ids each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Shape {
    pub batch: usize,
    pub tokens: usize,
}

/// Parses `1x16,8x32,…`.
pub fn parse_shapes(s: &str) -> Result<Vec<Shape>> {
    s.split(',')
        .map(|part| {
            let part = part.trim();
            let parsed = part.split_once(['x', 'X']).and_then(|(b, t)| Some(Shape { batch: b.parse().ok()?, tokens: t.parse().ok()? }));
            match parsed {
                Some(shape) if shape.batch > 0 && shape.tokens > 0 => Ok(shape),
                _ => Err(Error::invalid("shapes", format!("`{part}` is not BATCHxTOKENS with both positive (e.g. 8x32)"))),
            }
        })
        .collect()
}

/// One shape's timings, in milliseconds per forward.
#[derive(Debug, Serialize)]
pub struct ShapeReport {
    #[serde(flatten)]
    pub shape: Shape,
    pub iterations: usize,
    /// The first forward of this shape (a compiled encoder traces it then), untimed otherwise.
    pub first_ms: Option<f64>,
    /// Building the graph (the model code on the host).
    pub build_ms: Latency,
    /// Handing it to MLX (`async_eval`: MLX encodes every operation for the device).
    pub submit_ms: Latency,
    /// Waiting for the result and copying it to the host.
    pub wait_ms: Latency,
    /// All three.
    pub total_ms: Latency,
    pub tokens_per_second: f64,
    /// Process CPU time over wall time during the timed iterations (Linux), e.g. 1.0 = one
    /// core busy throughout.
    pub cpu_per_wall: Option<f64>,
    /// Operations in one forward's graph, and the count of each.
    pub ops: usize,
    pub op_counts: BTreeMap<String, usize>,
}

/// Idle time between timed forwards: a server's engine thread sleeps between lone queries, and a
/// forward right after a sleep can cost more host time than one right after another.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pause {
    pub time: Duration,
    /// Busy-wait instead of sleeping.
    pub spin: bool,
}

impl Pause {
    fn take(self) {
        if self.time.is_zero() {
            return;
        }
        if !self.spin {
            return std::thread::sleep(self.time);
        }
        let until = Instant::now() + self.time;
        while Instant::now() < until {
            std::hint::spin_loop();
        }
    }
}

/// Times `iterations` forwards of each shape after `warmup` untimed ones, with `pause` before
/// each timed one (not counted). Token ids are drawn from the model's vocabulary with `seed`;
/// every row is full length.
///
/// With `overlap`, each forward is handed to MLX before the one before it is collected, as the
/// server runs large batches: a forward's `wait` is its collection after the next one's hand-over,
/// its `total` runs from its build to its collection, and tokens/s comes from the wall time.
pub fn run(model: &EmbeddingModel, shapes: &[Shape], warmup: usize, iterations: usize, seed: u64, pause: Pause, overlap: bool) -> Result<Vec<ShapeReport>> {
    let vocab = model.vocab_size().max(1);
    let mut rng = Rng::new(seed);
    let mut reports = Vec::with_capacity(shapes.len());
    for &shape in shapes {
        let rows: Vec<Vec<u32>> = (0..shape.batch)
            .map(|_| (0..shape.tokens).map(|_| (rng.next() % vocab as u64) as u32).collect())
            .collect();
        let batch: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
        let mut op_counts = BTreeMap::new();
        let graph = model.graph(&batch)?.expect("a batch of at least one row");
        for name in graph.pending_ops() {
            *op_counts.entry(name).or_insert(0) += 1;
        }
        drop(graph);
        let mut first_ms = None;
        for _ in 0..warmup {
            let t = Instant::now();
            model.embed_ids(&batch)?;
            first_ms.get_or_insert(t.elapsed().as_secs_f64() * 1e3);
        }
        let (mut build, mut submit, mut wait, mut total) = (vec![], vec![], vec![], vec![]);
        let cpu_start = process_cpu_seconds();
        let started = Instant::now();
        let mut paused = Duration::ZERO;
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
        // Waits for a forward handed over at `t0` and copies it out: (wait, total).
        let collect = |out: Array, t0: Instant| -> Result<(f64, f64)> {
            let w = Instant::now();
            std::hint::black_box(out.to_f32_vec()?);
            let done = Instant::now();
            Ok((ms(w, done), ms(t0, done)))
        };
        let mut handed_over: Option<(Array, Instant)> = None;
        for _ in 0..iterations {
            let p = Instant::now();
            pause.take();
            paused += p.elapsed();
            let t0 = Instant::now();
            let out = model.graph(&batch)?.expect("a batch of at least one row");
            let t1 = Instant::now();
            out.async_eval()?;
            let t2 = Instant::now();
            build.push(ms(t0, t1));
            submit.push(ms(t1, t2));
            let ready = if overlap { handed_over.replace((out, t0)) } else { Some((out, t0)) };
            if let Some((out, t0)) = ready {
                let (w, t) = collect(out, t0)?;
                wait.push(w);
                total.push(t);
            }
        }
        if let Some((out, t0)) = handed_over {
            let (w, t) = collect(out, t0)?;
            wait.push(w);
            total.push(t);
        }
        // Over the forwards: the pauses' wall time left out (a spinning pause's CPU time stays in).
        let wall = (started.elapsed() - paused).as_secs_f64();
        let cpu_per_wall = match (cpu_start, process_cpu_seconds()) {
            (Some(a), Some(b)) if wall > 0.0 => Some((b - a) / wall),
            _ => None,
        };
        let tokens = (shape.batch * shape.tokens * iterations) as f64;
        reports.push(ShapeReport {
            shape,
            iterations,
            first_ms,
            build_ms: Latency::of(build),
            submit_ms: Latency::of(submit),
            wait_ms: Latency::of(wait),
            total_ms: Latency::of(total),
            tokens_per_second: if wall > 0.0 { tokens / wall } else { 0.0 },
            cpu_per_wall,
            ops: op_counts.values().sum(),
            op_counts,
        });
    }
    Ok(reports)
}

/// The reports as a table: medians, the total's P95, throughput and operation counts.
pub fn table(reports: &[ShapeReport]) -> String {
    let mut out = format!(
        "{:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>11} {:>8} {:>6}\n",
        "shape", "build", "submit", "wait", "total", "p95", "tokens/s", "cpu", "ops"
    );
    for r in reports {
        out += &format!(
            "{:>10} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>11.0} {:>8} {:>6}\n",
            format!("{}x{}", r.shape.batch, r.shape.tokens),
            r.build_ms.p50, r.submit_ms.p50, r.wait_ms.p50, r.total_ms.p50, r.total_ms.p95,
            r.tokens_per_second,
            r.cpu_per_wall.map_or("-".into(), |c| format!("{c:.2}")),
            r.ops,
        );
    }
    out += "(milliseconds per forward, medians; p95 of the total; cpu = process CPU time / wall time)\n";
    out
}

/// User plus system CPU time of this process, from /proc (Linux only).
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start at state: utime and stime
    // are the 12th and 13th of them.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_parse_and_bad_ones_name_the_part() {
        assert_eq!(parse_shapes("1x16, 8X32").unwrap(), vec![Shape { batch: 1, tokens: 16 }, Shape { batch: 8, tokens: 32 }]);
        for bad in ["8", "0x16", "4x", "ax3", "1x16,,2x2"] {
            let e = parse_shapes(bad).unwrap_err().to_string();
            assert!(e.contains("BATCHxTOKENS"), "{bad}: {e}");
        }
    }

    #[test]
    fn this_process_cpu_time_is_read_and_grows() {
        let Some(a) = process_cpu_seconds() else { return };
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed().as_millis() < 120 {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let b = process_cpu_seconds().unwrap();
        assert!(b - a >= 0.05, "{a} → {b}");
    }
}

//! A soak run against a running server: for a while, several clients at once send unary `Embed`
//! calls, `EmbedStream`s (some abandoned half-way), bad requests and calls they give up on, and
//! every answer is checked against the vector the same text got alone at the start. At the end it
//! prints what was sent, what came back wrong or not at all, and the server's resident memory
//! (sampled from /proc while it ran).
//!
//! ```text
//! cargo run --release --example soak -- http://127.0.0.1:50051 MODEL SERVER_PID [SECONDS]
//! ```
//! Exits non-zero when an answer was wrong or lost.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mlx_embed::grpc::pb::{self, embedding_service_client::EmbeddingServiceClient};
use tonic::transport::Channel;
use tonic::Code;

const TEXTS: usize = 64;
const WORKERS: usize = 8;
/// Two runs of a text may differ this much when batched with different company (f32 sums).
const TOLERANCE: f32 = 1e-5;

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    wrong: AtomicU64,
    lost: AtomicU64,
    refused_as_expected: AtomicU64,
    abandoned: AtomicU64,
}

fn text(i: usize) -> String {
    let words = ["vector", "search", "index", "query", "document", "embedding", "latency", "shard", "recall", "cosine"];
    (0..3 + i % 29).map(|k| words[(i * 7 + k * 3) % words.len()]).collect::<Vec<_>>().join(" ") + &format!(" #{i}")
}

fn request(model: &str, texts: &[usize]) -> pb::EmbedRequest {
    let items = texts.iter().map(|&i| pb::Item { input: Some(pb::item::Input::Text(text(i))) }).collect();
    pb::EmbedRequest { model: model.into(), items, ..Default::default() }
}

fn close(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= TOLERANCE)
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 as usize
    }
}

fn check(resp: &pb::EmbedResponse, texts: &[usize], want: &HashMap<usize, Vec<f32>>, counts: &Counts) {
    let good = resp.embeddings.len() == texts.len() && resp.embeddings.iter().zip(texts).all(|(e, i)| close(&e.values, &want[i]));
    if good {
        counts.ok.fetch_add(texts.len() as u64, Ordering::Relaxed);
    } else {
        counts.wrong.fetch_add(1, Ordering::Relaxed);
        eprintln!("wrong answer for texts {texts:?}");
    }
}

async fn worker(id: usize, channel: Channel, model: String, want: Arc<HashMap<usize, Vec<f32>>>, counts: Arc<Counts>, until: Instant) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ id as u64);
    let mut c = EmbeddingServiceClient::new(channel);
    while Instant::now() < until {
        match rng.next() % 10 {
            // Unary calls of 1 to 32 texts.
            0..=3 => {
                let texts: Vec<usize> = (0..1 + rng.next() % 32).map(|_| rng.next() % TEXTS).collect();
                match c.embed(request(&model, &texts)).await {
                    Ok(r) => check(r.get_ref(), &texts, &want, &counts),
                    Err(s) => {
                        counts.lost.fetch_add(1, Ordering::Relaxed);
                        eprintln!("unary call lost: {s:?}");
                    }
                }
            }
            // A stream of 1 to 400 one-text messages, all answered in order.
            4..=5 => {
                let texts: Vec<usize> = (0..1 + rng.next() % 400).map(|_| rng.next() % TEXTS).collect();
                let reqs: Vec<_> = texts.iter().map(|&i| request(&model, &[i])).collect();
                match c.embed_stream(futures_util::stream::iter(reqs)).await {
                    Ok(answers) => {
                        let mut answers = answers.into_inner();
                        for &i in &texts {
                            match answers.message().await {
                                Ok(Some(r)) => check(&r, &[i], &want, &counts),
                                other => {
                                    counts.lost.fetch_add(1, Ordering::Relaxed);
                                    eprintln!("stream answer lost: {other:?}");
                                    break;
                                }
                            }
                        }
                    }
                    Err(s) => {
                        counts.lost.fetch_add(1, Ordering::Relaxed);
                        eprintln!("stream refused: {s:?}");
                    }
                }
            }
            // A stream its client abandons after a few answers.
            6 => {
                let reqs: Vec<_> = (0..200).map(|k| request(&model, &[k % TEXTS])).collect();
                if let Ok(answers) = c.embed_stream(futures_util::stream::iter(reqs)).await {
                    let mut answers = answers.into_inner();
                    for _ in 0..rng.next() % 5 {
                        let _ = answers.message().await;
                    }
                }
                counts.abandoned.fetch_add(1, Ordering::Relaxed);
            }
            // A call given up on before its answer.
            7 => {
                let texts: Vec<usize> = (0..16).map(|_| rng.next() % TEXTS).collect();
                let _ = tokio::time::timeout(Duration::from_micros(200 + (rng.next() % 2000) as u64), c.embed(request(&model, &texts))).await;
                counts.abandoned.fetch_add(1, Ordering::Relaxed);
            }
            // Bad requests: each must get its code.
            _ => {
                let (req, code) = match rng.next() % 4 {
                    0 => (request(&model, &[]), Code::InvalidArgument),
                    1 => (pb::EmbedRequest { dimensions: Some(7), ..request(&model, &[1]) }, Code::InvalidArgument),
                    2 => (request("no-such-model", &[1]), Code::NotFound),
                    _ => (pb::EmbedRequest { prompt_name: "x".repeat(100_000), ..request(&model, &[1]) }, Code::InvalidArgument),
                };
                match c.embed(req).await {
                    Err(s) if s.code() == code => {
                        counts.refused_as_expected.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        counts.wrong.fetch_add(1, Ordering::Relaxed);
                        eprintln!("bad request answered {:?}, expected {code:?}", other.map(|_| "OK").map_err(|s| s.code()));
                    }
                }
            }
        }
    }
}

fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches(" kB").trim().parse().ok()?;
    Some(kb * 1024)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: soak ENDPOINT MODEL SERVER_PID [SECONDS]");
        std::process::exit(2);
    }
    let (endpoint, model, pid) = (args[1].clone(), args[2].clone(), args[3].parse::<u32>()?);
    let seconds: u64 = args.get(4).map(|s| s.parse()).transpose()?.unwrap_or(600);
    let channel = Channel::from_shared(endpoint)?.connect().await?;
    let mut c = EmbeddingServiceClient::new(channel.clone());
    let mut want = HashMap::new();
    for i in 0..TEXTS {
        let r = c.embed(request(&model, &[i])).await?.into_inner();
        want.insert(i, r.embeddings[0].values.clone());
    }
    let (want, counts) = (Arc::new(want), Arc::new(Counts::default()));
    let start_rss = rss_bytes(pid).unwrap_or(0);
    let until = Instant::now() + Duration::from_secs(seconds);
    let workers: Vec<_> = (0..WORKERS).map(|id| {
        // Half the workers share the first connection, the others have their own.
        let ch = if id % 2 == 0 { channel.clone() } else { Channel::from_shared(args[1].clone()).expect("checked above").connect_lazy() };
        tokio::spawn(worker(id, ch, model.clone(), Arc::clone(&want), Arc::clone(&counts), until))
    }).collect();
    let mut max_rss = start_rss;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_secs(5)).await;
        max_rss = max_rss.max(rss_bytes(pid).unwrap_or(0));
    }
    for w in workers {
        w.await?;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let end_rss = rss_bytes(pid).unwrap_or(0);
    // After it all, each text still gets the vector it got at the start.
    for i in 0..TEXTS {
        let r = c.embed(request(&model, &[i])).await?.into_inner();
        check(&r, &[i], &want, &counts);
    }
    let mb = |b: u64| b as f64 / 1e6;
    println!("{seconds} s, {WORKERS} clients: {} vectors right, {} wrong, {} lost, {} bad requests refused as expected, {} calls abandoned",
        counts.ok.load(Ordering::Relaxed), counts.wrong.load(Ordering::Relaxed), counts.lost.load(Ordering::Relaxed),
        counts.refused_as_expected.load(Ordering::Relaxed), counts.abandoned.load(Ordering::Relaxed));
    println!("server RSS: start {:.0} MB, end {:.0} MB, max {:.0} MB", mb(start_rss), mb(end_rss), mb(max_rss));
    if counts.wrong.load(Ordering::Relaxed) + counts.lost.load(Ordering::Relaxed) > 0 {
        std::process::exit(1);
    }
    Ok(())
}

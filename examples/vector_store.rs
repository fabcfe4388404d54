//! How a vector store uses the client: stream a corpus in (bounded requests spread over the
//! endpoints, retried on their own), keep the vectors in an index, answer queries by cosine
//! similarity.
//!
//! ```text
//! cargo run --example vector_store -- demo http://127.0.0.1:50051 [more endpoints...]
//! ```
//! `MLX_EMBED_API_KEY` is sent as the API key when set. With the repository's demo model (random
//! weights) the ranking means nothing, but every step runs.

use std::time::Instant;

use futures_util::stream::{self, StreamExt};
use mlx_embed::client::{Client, EmbedOptions};

/// A document as the store keeps it: its id and text travel through the ingest together.
#[derive(Debug)]
struct Document {
    id: u64,
    text: String,
}

impl AsRef<str> for Document {
    fn as_ref(&self) -> &str {
        &self.text
    }
}

const TOPICS: [&str; 8] = [
    "vector databases index embeddings for nearest-neighbour search",
    "a transformer turns each token into a vector and mixes them with attention",
    "Rust's ownership rules prevent data races at compile time",
    "gRPC streams messages over HTTP/2 with protobuf encoding",
    "Kubernetes restarts pods that fail their liveness probe",
    "Apple silicon shares one memory pool between CPU and GPU",
    "Prometheus scrapes metrics and evaluates alerting rules",
    "sourdough bread needs a long, cold fermentation",
];

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: vector_store MODEL ENDPOINT [ENDPOINT...]";
    let model = args.next().ok_or(usage)?;
    let endpoints: Vec<String> = args.collect();
    if endpoints.is_empty() {
        return Err(usage.into());
    }
    let mut builder = Client::builder().endpoints(endpoints).batch_items(16);
    if let Ok(key) = std::env::var("MLX_EMBED_API_KEY") {
        builder = builder.api_key(key);
    }
    let client = builder.build().await?;

    // 1. Ingest: 200 documents as a stream; batches come back in order, ids attached.
    let corpus = (0..200u64).map(|id| Document {
        id,
        text: format!("{} (note {id})", TOPICS[id as usize % TOPICS.len()]),
    });
    let started = Instant::now();
    let mut index: Vec<(u64, Vec<f32>)> = Vec::new();
    let mut batches = Box::pin(client.ingest(&model, &EmbedOptions::document(), stream::iter(corpus)));
    while let Some(batch) = batches.next().await {
        match batch {
            Ok(batch) => index.extend(batch.into_iter().map(|(doc, e)| (doc.id, e.vector))),
            // A failed request hands its documents back; a store would queue them again.
            Err(e) => eprintln!("{} documents not embedded: {}", e.items.len(), e.error),
        }
    }
    println!("ingested {} documents in {:.2?}", index.len(), started.elapsed());
    for endpoint in client.endpoints() {
        println!("  {} ({}): {} calls, {} failures", endpoint.address, endpoint.target, endpoint.calls, endpoint.failures);
    }

    // 2. Query: embed with the query prompt, rank by cosine similarity.
    for query in ["how do I search embeddings?", "baking bread at home"] {
        let q = client.embed_query(&model, query).await?;
        let mut scored: Vec<(f32, u64)> = index.iter().map(|(id, v)| (cosine(&q, v), *id)).collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0));
        let top: Vec<String> = scored.iter().take(3).map(|(s, id)| format!("#{id} ({s:.3})")).collect();
        println!("query {query:?}: {}", top.join(", "));
    }
    Ok(())
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b)).max(f32::MIN_POSITIVE)
}

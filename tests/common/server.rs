//! A shared gRPC server for the tests of one test binary: started once on a thread of its own
//! (one MLX engine per process) on 127.0.0.1 port 0, with the fixture models.

use std::net::SocketAddr;
use std::sync::OnceLock;

use mlx_embed::config::Config;
use mlx_embed::engine::EngineHandle;
use mlx_embed::grpc::pb::{self, embedding_service_client::EmbeddingServiceClient};
use tonic::transport::Channel;

use super::fixtures_dir;

/// The test server's config; the models run on the GPU when `MLX_EMBED_TEST_DEVICE=gpu`.
pub fn config_text() -> String {
    let device = if super::gpu() { "gpu" } else { "cpu" };
    "
limits:
  max_items_per_request: 16
  max_message_bytes: 65536
  max_concurrent_requests: 256
batching:
  max_batch_tokens: 8192
  max_batch_size: 32
  max_wait: 5ms
models:
  - {name: qwen, source: qwen3-tiny, dtype: f32, device: DEVICE}
  - {name: gemma, source: gemma-tiny, dtype: f32, device: DEVICE, allowed_dimensions: [48, 32]}
  - {name: short, source: qwen3-tiny, dtype: f32, device: DEVICE, max_tokens: 16, truncation: none}
  - {name: absent, source: does-not-exist}
  - {name: hubbed, source: 'hf://org/not-cached'}
".replace("DEVICE", device)
}

pub fn config() -> Config {
    Config::parse(std::path::Path::new("test.yaml"), &config_text()).unwrap()
}

pub struct TestServer {
    pub addr: SocketAddr,
    /// Where `GET /metrics` answers.
    pub metrics_addr: SocketAddr,
    pub engine: EngineHandle,
}

/// The shared server, started on first use on a thread of its own.
pub fn server() -> &'static TestServer {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async move {
                let config = config();
                // No hub models here: the settings point at an empty cache, offline.
                let hub = mlx_embed::registry::HubSettings {
                    endpoint: "http://127.0.0.1:9".into(),
                    cache_dir: std::env::temp_dir().join("mlx-embed-test-no-hub"),
                    token: None,
                    offline: true,
                };
                let (engine, origins) = mlx_embed::grpc::server::start_engine(&config, &fixtures_dir(), &hub);
                // Tests start once the fixture models are loaded.
                for i in 0..3 {
                    let mut st = engine.subscribe(i);
                    st.wait_for(|s| !matches!(s, mlx_embed::engine::ModelStatus::Loading)).await.unwrap();
                }
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let (addr, metrics_addr) = (listener.local_addr().unwrap(), metrics.local_addr().unwrap());
                tx.send(TestServer { addr, metrics_addr, engine: engine.clone() }).unwrap();
                mlx_embed::grpc::server::serve_engine(config, engine, origins, listener, Some(metrics), None, std::future::pending()).await.unwrap();
            });
        });
        rx.recv().unwrap()
    })
}

pub async fn client() -> EmbeddingServiceClient<Channel> {
    EmbeddingServiceClient::connect(format!("http://{}", server().addr)).await.unwrap()
}

pub fn text(t: &str) -> pb::Item {
    pb::Item { input: Some(pb::item::Input::Text(t.into())) }
}

pub fn vector(v: Vec<f32>) -> pb::Item {
    pb::Item { input: Some(pb::item::Input::Vector(pb::Vector { values: v })) }
}

pub fn request(model: &str, items: Vec<pb::Item>) -> pb::EmbedRequest {
    pb::EmbedRequest { model: model.into(), items, ..Default::default() }
}


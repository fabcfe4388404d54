//! API keys, against `mlx-embed serve` as a process: keys from a file and from an environment
//! variable open the service; a missing or wrong key gets UNAUTHENTICATED and nothing else
//! (same message either way); health stays open while reflection (closed by this config) needs
//! a key; no key ever reaches the log; a key source with no keys stops the server at start; a `#`
//! inside a key file's key is part of the key.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{fixtures_dir, spawn_serve};
use common::server::{request, text};
use mlx_embed::grpc::pb::embedding_service_client::EmbeddingServiceClient;
use tonic::Code;
use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};

fn with_key<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.metadata_mut().insert("authorization", format!("Bearer {key}").parse().unwrap());
    req
}

fn grpcurl(addr: &str, flags: &[&str], verb: &[&str]) -> (bool, String) {
    let bin = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/bin/grpcurl");
    let out = Command::new(bin).arg("-plaintext").args(flags).arg(addr).args(verb).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_configured_keys_open_the_service_and_none_is_logged() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keys.txt"), "# operators\nkey-from-file-1\n\n  key-from-file-2  # ci\n").unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, format!(
        "auth:\n  api_keys_file: keys.txt\n  api_keys_env: TEST_EMBED_KEYS\n  exempt_reflection: false\n\
         models:\n  - {{name: q, source: {}, device: cpu}}\n",
        fixtures_dir().join("qwen3-tiny").display()
    )).unwrap();
    let (mut child, addr, log) = spawn_serve(&config, |c| {
        c.env("TEST_EMBED_KEYS", "key-from-env , other-env-key").env("RUST_LOG", "debug");
    });

    let url = format!("http://{addr}");
    let mut c = EmbeddingServiceClient::connect(url.clone()).await.unwrap();
    let t0 = Instant::now();
    while c.embed(with_key(request("q", vec![text("warm")]), "key-from-file-1")).await.is_err() {
        assert!(t0.elapsed() < Duration::from_secs(30), "the model never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for key in ["key-from-file-2", "key-from-env", "other-env-key"] {
        let resp = c.embed(with_key(request("q", vec![text("hello")]), key)).await;
        assert!(resp.is_ok(), "{key}: {resp:?}");
    }
    let missing = c.embed(request("q", vec![text("hello")])).await.unwrap_err();
    let wrong = c.embed(with_key(request("q", vec![text("hello")]), "key-from-file")).await.unwrap_err();
    let listed = c.list_models(with_key(mlx_embed::grpc::pb::ListModelsRequest {}, "nope")).await.unwrap_err();
    for s in [&missing, &wrong, &listed] {
        assert_eq!(s.code(), Code::Unauthenticated);
        assert_eq!(s.message(), missing.message(), "refusals must not differ");
        assert!(!s.message().contains("key-from"), "{}", s.message());
    }

    // Health stays open for probes; reflection was closed by the config.
    let channel = tonic::transport::Channel::from_shared(url).unwrap().connect().await.unwrap();
    let status = HealthClient::new(channel).check(HealthCheckRequest { service: "q".into() }).await.unwrap().into_inner().status;
    assert_eq!(status, ServingStatus::Serving as i32);
    let (ok, out) = grpcurl(&addr, &[], &["list"]);
    assert!(!ok && out.contains("Unauthenticated"), "{out}");
    let (ok, out) = grpcurl(&addr, &["-H", "authorization: Bearer key-from-env"], &["list"]);
    assert!(ok && out.contains("embedding.v1.EmbeddingService"), "{out}");

    let _ = child.kill();
    let _ = child.wait();
    std::thread::sleep(Duration::from_millis(200));
    let log = log.lock().unwrap().clone();
    assert!(log.contains("API keys required"), "{log}");
    for key in ["key-from-file-1", "key-from-file-2", "key-from-env", "other-env-key"] {
        assert!(!log.contains(key), "the log shows a key:\n{log}");
    }
}

/// A `#` inside a key is part of the key: the line `k2#notacomment` makes that whole key valid
/// and `k2` not. `#` starts a comment only at the start of a line or after a blank, so whole-line
/// and trailing comments still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hash_inside_a_key_is_part_of_the_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keys.txt"), "k2#notacomment\n#k5\n  # k6\nk3 # laptop\n\tk4\t#ci\n").unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, "auth:\n  api_keys_file: keys.txt\nmodels:\n  - {name: q, source: nowhere}\n").unwrap();
    let (mut child, addr, _log) = spawn_serve(&config, |_| {});
    let mut c = EmbeddingServiceClient::connect(format!("http://{addr}")).await.unwrap();
    let mut answers = Vec::new();
    for key in ["k2#notacomment", "k3", "k4", "k2", "k5", "k6", "#k5", "k3 # laptop"] {
        let got = c.list_models(with_key(mlx_embed::grpc::pb::ListModelsRequest {}, key)).await;
        answers.push((key, got.map_or_else(|s| s.code(), |_| Code::Ok)));
    }
    let _ = child.kill();
    let _ = child.wait();
    let opened: Vec<&str> = answers.iter().filter(|(_, code)| *code == Code::Ok).map(|(k, _)| *k).collect();
    assert_eq!(opened, ["k2#notacomment", "k3", "k4"], "{answers:?}");
    assert!(answers.iter().all(|(_, code)| matches!(code, Code::Ok | Code::Unauthenticated)), "{answers:?}");
}

#[test]
fn a_key_source_without_keys_stops_the_server_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(dir.path().join("keys.txt"), "# nobody yet\n").unwrap();
    std::fs::write(&config, "auth:\n  api_keys_file: keys.txt\nmodels:\n  - {name: q, source: nowhere}\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mlx-embed"))
        .args(["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--config"]).arg(&config)
        .output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no keys"), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(&config, "auth:\n  api_keys_env: TEST_EMBED_UNSET_VAR\nmodels:\n  - {name: q, source: nowhere}\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mlx-embed"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"]).arg(&config).env_remove("TEST_EMBED_UNSET_VAR")
        .output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("TEST_EMBED_UNSET_VAR"), "{}", String::from_utf8_lossy(&out.stderr));
}

//! The gRPC service end to end: a real server on 127.0.0.1 (port 0) with the fixture models,
//! called with the generated tonic client and with the real `grpcurl` binary (through reflection,
//! no proto files). One server serves every test of this file (one MLX engine per process).

mod common;

use common::server::*;
use common::*;
use mlx_embed::grpc::pb;
use tonic::transport::Channel;

#[tokio::test]
async fn vectors_over_grpc_equal_the_reference() {
    let mut c = client().await;
    for (model, fixture) in [("qwen", "qwen3-tiny"), ("gemma", "gemma-tiny")] {
        for case in reference(&fixtures_dir().join(fixture)).cases {
            let mut req = request(model, case.texts.iter().map(|t| text(t)).collect());
            req.prompt_name = case.prompt_name.clone().unwrap_or_default();
            req.instruction = case.instruction.clone().unwrap_or_default();
            req.dimensions = case.dimensions.map(|d| d as u32);
            if case.prompt_name.is_none() && case.instruction.is_none() {
                // "No prompt" must be explicit only where the model has a default prompt.
                assert!(case.prompt.is_empty());
            }
            let resp = c.embed(req.clone()).await.unwrap().into_inner();
            assert_eq!(resp.embeddings.len(), case.texts.len());
            for (e, want) in resp.embeddings.iter().zip(&case.embeddings) {
                let d = max_abs_diff(&e.values, want);
                assert!(d <= 1e-5, "{model} / {}: {d:e}", case.name);
            }
            // The packed encoding carries the same vectors (another request: it may be batched
            // with other work, hence a tolerance).
            req.encoding = pb::Encoding::PackedF32Le as i32;
            let packed = c.embed(req).await.unwrap().into_inner();
            for (p, e) in packed.embeddings.iter().zip(&resp.embeddings) {
                let v: Vec<f32> = p.packed.chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
                assert!(max_abs_diff(&v, &e.values) <= 1e-6);
            }
        }
    }
}

#[tokio::test]
async fn texts_and_user_vectors_mix_and_keep_item_order() {
    let mut c = client().await;
    let alone = c.embed(request("qwen", vec![text("alpha")])).await.unwrap().into_inner().embeddings.remove(0);
    let mine: Vec<f32> = (0..64).map(|i| i as f32 - 20.0).collect();
    let mut req = request("qwen", vec![vector(mine.clone()), text("alpha"), vector(mine[..40].to_vec())]);
    req.dimensions = Some(40);
    let resp = c.embed(req).await.unwrap().into_inner();
    assert_eq!(resp.dimensions, 40);
    let e = &resp.embeddings;
    assert_eq!(e[0].values, mlx_embed::models::finish(mine.clone(), 40, true));
    assert_eq!(e[2].values, e[0].values, "a vector at the requested size is only normalized");
    assert!(max_abs_diff(&e[1].values, &mlx_embed::models::finish(alone.values, 40, true)) <= 1e-6);
    assert_eq!((e[0].token_count, e[1].token_count > 0), (0, true));
}

#[tokio::test]
async fn embed_stream_answers_in_request_order() {
    let mut c = client().await;
    let texts = ["one", "two two", "three three three", "four", "five five"];
    let reqs: Vec<pb::EmbedRequest> = texts.iter().enumerate()
        .map(|(i, t)| pb::EmbedRequest { request_id: format!("r{i}"), ..request(if i % 2 == 0 { "qwen" } else { "gemma" }, vec![text(t)]) })
        .collect();
    let mut answers = c.embed_stream(tokio_stream::iter(reqs.clone())).await.unwrap().into_inner();
    let mut i = 0;
    while let Some(resp) = answers.message().await.unwrap() {
        assert_eq!(resp.request_id, format!("r{i}"));
        let unary = c.embed(reqs[i].clone()).await.unwrap().into_inner();
        assert!(max_abs_diff(&resp.embeddings[0].values, &unary.embeddings[0].values) <= 1e-6);
        i += 1;
    }
    assert_eq!(i, texts.len());
}

#[tokio::test]
async fn models_are_listed_with_their_state() {
    let mut c = client().await;
    let models = c.list_models(pb::ListModelsRequest {}).await.unwrap().into_inner().models;
    let names: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["qwen", "gemma", "short", "absent", "hubbed"]);
    let gemma = c.get_model(pb::GetModelRequest { model: "gemma".into() }).await.unwrap().into_inner();
    assert_eq!((gemma.state, gemma.dimensions, gemma.pooling.as_str(), gemma.loaded), (pb::ModelState::Ready as i32, 48, "mean", true));
    assert!(gemma.prompts.contains_key("query"));
    let absent = &models[3];
    assert_eq!(absent.state, pb::ModelState::Failed as i32);
    assert!(absent.error.contains("does-not-exist"), "{}", absent.error);
    // A hub model the (offline, empty) cache lacks waits, saying why.
    let hubbed = &models[4];
    assert_eq!(hubbed.state, pb::ModelState::Downloading as i32);
}

#[tokio::test]
async fn tokenize_shows_the_ids_the_model_reads() {
    let mut c = client().await;
    let case = reference(&fixtures_dir().join("qwen3-tiny")).cases.into_iter().find(|c| c.prompt_name.as_deref() == Some("query")).unwrap();
    let resp = c.tokenize(pb::TokenizeRequest { model: "qwen".into(), text: case.texts[1].clone(), prompt_name: "query".into(), ..Default::default() })
        .await.unwrap().into_inner();
    assert_eq!(resp.ids, case.token_ids[1]);
    assert_eq!(resp.count as usize, resp.ids.len());
    assert_eq!(resp.prompt, case.prompt);
}

#[tokio::test]
async fn health_covers_the_server_and_each_model() {
    use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};
    let channel = Channel::from_shared(format!("http://{}", server().addr)).unwrap().connect().await.unwrap();
    let mut h = HealthClient::new(channel);
    for (service, want) in [("", ServingStatus::Serving), ("qwen", ServingStatus::Serving), ("absent", ServingStatus::NotServing)] {
        let got = h.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner().status;
        assert_eq!(got, want as i32, "health of `{service}`");
    }
}

/// The health protocol's Watch: for a name the server does not know it sends SERVICE_UNKNOWN and
/// keeps the stream open (the name could appear later); for a model it sends the model's status.
/// Check of an unknown name stays NOT_FOUND.
#[tokio::test]
async fn health_watch_of_an_unknown_name_says_service_unknown_and_stays_open() {
    use std::time::Duration;
    use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};
    let channel = Channel::from_shared(format!("http://{}", server().addr)).unwrap().connect().await.unwrap();
    let mut h = HealthClient::new(channel);
    let mut unknown = h.watch(HealthCheckRequest { service: "nope".into() }).await.expect("Watch accepted").into_inner();
    let first = unknown.message().await.expect("a status, not an error").expect("a first message");
    assert_eq!(first.status, ServingStatus::ServiceUnknown as i32);
    let next = tokio::time::timeout(Duration::from_millis(300), unknown.message()).await;
    assert!(next.is_err(), "the stream should stay open, got {next:?}");
    let mut known = h.watch(HealthCheckRequest { service: "qwen".into() }).await.unwrap().into_inner();
    assert_eq!(known.message().await.unwrap().unwrap().status, ServingStatus::Serving as i32);
    let check = h.check(HealthCheckRequest { service: "nope".into() }).await.unwrap_err();
    assert_eq!(check.code(), tonic::Code::NotFound);
}

/// grpcurl (grpc-go) sees the same: SERVICE_UNKNOWN, then nothing until its own deadline ends the
/// call.
#[test]
fn grpcurl_watching_an_unknown_name_gets_service_unknown_until_its_deadline() {
    let (ok, out) = grpcurl(&["-max-time", "1", "-d", r#"{"service":"nope"}"#], &["grpc.health.v1.Health/Watch"]);
    assert!(!ok && out.contains("\"SERVICE_UNKNOWN\"") && out.contains("DeadlineExceeded"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_concurrent_clients_get_their_own_vectors_and_batches_form() {
    let inputs: Vec<(&str, String)> = ["qwen", "gemma"].iter()
        .flat_map(|m| reference(&fixtures_dir().join(if *m == "qwen" { "qwen3-tiny" } else { "gemma-tiny" })).cases[0].texts.clone().into_iter().map(move |t| (*m, t)))
        .collect();
    let mut c = client().await;
    let mut alone = Vec::new();
    for (m, t) in &inputs {
        alone.push(c.embed(request(m, vec![text(t)])).await.unwrap().into_inner().embeddings.remove(0).values);
    }
    let stats = server().engine.stats();
    let before = stats.batches.load(std::sync::atomic::Ordering::Relaxed);
    let tasks: Vec<_> = (0..64).map(|i| {
        let (m, t) = inputs[i % inputs.len()].clone();
        tokio::spawn(async move {
            let mut c = client().await;
            (i, c.embed(request(m, vec![text(&t)])).await.unwrap().into_inner().embeddings.remove(0).values)
        })
    }).collect();
    for t in tasks {
        let (i, v) = t.await.unwrap();
        assert!(max_abs_diff(&v, &alone[i % inputs.len()]) <= 1e-5, "client {i}");
    }
    let batches = stats.batches.load(std::sync::atomic::Ordering::Relaxed) - before;
    assert!(stats.max_batch_size.load(std::sync::atomic::Ordering::Relaxed) > 1 && batches < 64,
        "no batching: {batches} batches for 64 requests");
}

/// Runs `grpcurl -plaintext FLAGS ADDRESS VERB…` against the test server.
fn grpcurl(flags: &[&str], verb: &[&str]) -> (bool, String) {
    let bin = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/bin/grpcurl");
    assert!(bin.exists(), "{} missing: run scripts/setup.sh", bin.display());
    let out = std::process::Command::new(bin)
        .arg("-plaintext").args(flags).arg(server().addr.to_string()).args(verb)
        .output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn grpcurl_lists_describes_checks_health_and_embeds_through_reflection() {
    let (ok, out) = grpcurl(&[], &["list"]);
    assert!(ok && out.contains("embedding.v1.EmbeddingService") && out.contains("grpc.health.v1.Health"), "{out}");
    let (ok, out) = grpcurl(&[], &["describe", "embedding.v1.EmbedRequest"]);
    assert!(ok && out.contains("repeated .embedding.v1.Item items"), "{out}");
    let (ok, out) = grpcurl(&["-d", r#"{"service":"qwen"}"#], &["grpc.health.v1.Health/Check"]);
    assert!(ok && out.contains("\"SERVING\""), "{out}");

    let case = reference(&fixtures_dir().join("gemma-tiny")).cases.into_iter().find(|c| c.prompt_name.as_deref() == Some("query")).unwrap();
    let body = serde_json::json!({"model": "gemma", "promptName": "query", "items": [{"text": case.texts[2]}]}).to_string();
    let (ok, out) = grpcurl(&["-d", &body], &["embedding.v1.EmbeddingService/Embed"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let got: Vec<f32> = serde_json::from_value(v["embeddings"][0]["values"].clone()).unwrap();
    assert!(max_abs_diff(&got, &case.embeddings[2]) <= 1e-5);

    // Errors come back with their code and the BadRequest detail, decoded through reflection.
    let (ok, out) = grpcurl(&["-d", r#"{"model":"qwen","items":[{"text":""}]}"#], &["embedding.v1.EmbeddingService/Embed"]);
    assert!(!ok && out.contains("InvalidArgument") && out.contains(r#""field":"items[0].text""#), "{out}");
}

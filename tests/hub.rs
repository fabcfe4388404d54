//! Models from the Hugging Face hub, against a fake hub on 127.0.0.1 (`common::fake_hub`) serving
//! the fixture repositories: the first pull downloads only what the model needs into the shared
//! cache layout, the next start needs no network, damaged files (in transit or on disk) are
//! detected and fetched again, a pull killed half-way resumes, revision pins hold, gated
//! repositories explain the token, and `mlx-embed serve` ends up serving the reference vectors.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::fake_hub::{git_blob_id, sha256_hex, FakeHub};
use common::server::{request, text};
use common::*;
use mlx_embed::grpc::pb;
use mlx_embed::registry::{self, Display, HubRef, HubSettings, PullError};
use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};

fn settings(hub: &FakeHub, cache: &Path) -> HubSettings {
    HubSettings { endpoint: hub.endpoint.clone(), cache_dir: cache.to_path_buf(), token: None, offline: false }
}

fn hub_ref(s: &str) -> HubRef {
    HubRef::parse(s).unwrap()
}

/// A fixture folder's files, plus files no model needs.
fn repo_files(fixture: &str) -> Vec<(String, Vec<u8>)> {
    let mut files = common::fake_hub::folder_files(&fixtures_dir().join(fixture));
    files.push(("pytorch_model.bin".into(), vec![7; 4096]));
    files.push(("onnx/model.onnx".into(), vec![8; 4096]));
    files
}

#[test]
fn a_first_pull_fetches_only_what_the_model_needs_and_the_next_start_needs_no_network() {
    let hub = FakeHub::start();
    let commit = hub.commit("org/qwen-tiny", "main", repo_files("qwen3-tiny"));
    let cache = tempfile::tempdir().unwrap();
    let s = settings(&hub, cache.path());
    let r = hub_ref("org/qwen-tiny");
    let found = registry::pull(&s, &r, Display::Log).unwrap();
    assert_eq!(found.commit.as_deref(), Some(commit.as_str()));
    let mut files = found.files.clone();
    files.sort();
    assert_eq!(files, ["1_Pooling/config.json", "config.json", "config_sentence_transformers.json", "model.safetensors",
        "modules.json", "sentence_bert_config.json", "tokenizer.json"]);
    for junk in ["pytorch_model.bin", "onnx", "reference.json", "tokenizer_config.json"] {
        assert!(!hub.log().iter().any(|l| l.contains(junk)), "{junk} was requested");
    }
    // The layout Python's huggingface_hub uses: refs, snapshot links into blobs named by hash.
    let root = cache.path().join("models--org--qwen-tiny");
    assert_eq!(std::fs::read_to_string(root.join("refs/main")).unwrap().trim(), commit);
    assert_eq!(found.dir, root.join("snapshots").join(&commit));
    let weights = std::fs::read(fixtures_dir().join("qwen3-tiny/model.safetensors")).unwrap();
    let link = std::fs::read_link(found.dir.join("model.safetensors")).unwrap();
    assert_eq!(link, Path::new("../../blobs").join(sha256_hex(&weights)));
    let config = std::fs::read(fixtures_dir().join("qwen3-tiny/config.json")).unwrap();
    assert!(root.join("blobs").join(git_blob_id(&config)).is_file());
    assert_eq!(found.size_on_disk(), found.files.iter().map(|f| std::fs::metadata(found.dir.join(f)).unwrap().len()).sum::<u64>());

    // The next start: from the cache, not a single request; also when offline.
    let before = hub.log().len();
    assert_eq!(registry::resolve(&s, &r, Display::Log).unwrap(), found);
    assert_eq!(registry::resolve(&HubSettings { offline: true, ..s.clone() }, &r, Display::Log).unwrap(), found);
    assert_eq!(hub.log().len(), before, "a start from a complete cache asked the hub: {:?}", &hub.log()[before..]);
}

#[test]
fn a_repository_without_sentence_transformers_files_is_complete_offline() {
    let hub = FakeHub::start();
    hub.commit("org/q8", "main", repo_files("qwen3-tiny-q8"));
    let cache = tempfile::tempdir().unwrap();
    let s = settings(&hub, cache.path());
    let pulled = registry::pull(&s, &hub_ref("org/q8"), Display::Log).unwrap();
    // Absent optional files are recorded (`.no_exist/`), so the copy is known to be complete.
    let offline = HubSettings { offline: true, ..s };
    assert_eq!(registry::cached(&offline, &hub_ref("org/q8"), true).unwrap(), pulled);
    let marker = cache.path().join("models--org--q8/.no_exist").join(pulled.commit.unwrap()).join("modules.json");
    assert!(marker.exists());
}

#[test]
fn sharded_weights_are_fetched_shard_by_shard() {
    let hub = FakeHub::start();
    hub.commit("org/q4", "main", repo_files("qwen3-tiny-q4"));
    let cache = tempfile::tempdir().unwrap();
    let found = registry::pull(&settings(&hub, cache.path()), &hub_ref("org/q4"), Display::Log).unwrap();
    for shard in ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"] {
        assert!(found.files.contains(&shard.to_string()), "{shard}");
        assert_eq!(std::fs::read(found.dir.join(shard)).unwrap(), std::fs::read(fixtures_dir().join("qwen3-tiny-q4").join(shard)).unwrap());
    }
}

#[test]
fn offline_without_a_complete_copy_says_what_is_missing() {
    let hub = FakeHub::start();
    hub.commit("org/qwen-tiny", "main", repo_files("qwen3-tiny"));
    let cache = tempfile::tempdir().unwrap();
    let s = HubSettings { offline: true, ..settings(&hub, cache.path()) };
    let err = registry::resolve(&s, &hub_ref("org/qwen-tiny"), Display::Log).unwrap_err();
    assert!(matches!(err, PullError::NotCached { .. }) && err.to_string().contains("HF_HUB_OFFLINE"), "{err}");
    assert!(hub.log().is_empty(), "offline asked the hub");

    let found = registry::pull(&HubSettings { offline: false, ..s.clone() }, &hub_ref("org/qwen-tiny"), Display::Log).unwrap();
    std::fs::remove_file(found.dir.join("tokenizer.json")).unwrap();
    let err = registry::resolve(&s, &hub_ref("org/qwen-tiny"), Display::Log).unwrap_err();
    assert!(matches!(err, PullError::Incomplete { ref file, .. } if file == "tokenizer.json"), "{err}");
}

#[test]
fn a_file_damaged_in_transit_is_detected_and_fetched_again() {
    let hub = FakeHub::start();
    hub.commit("org/gemma-tiny", "main", repo_files("gemma-tiny"));
    hub.damage_once("2_Dense/model.safetensors");
    hub.damage_once("tokenizer.json");
    let cache = tempfile::tempdir().unwrap();
    let found = registry::pull(&settings(&hub, cache.path()), &hub_ref("org/gemma-tiny"), Display::Log).unwrap();
    for f in ["2_Dense/model.safetensors", "tokenizer.json"] {
        assert_eq!(std::fs::read(found.dir.join(f)).unwrap(), std::fs::read(fixtures_dir().join("gemma-tiny").join(f)).unwrap(), "{f}");
    }
    let dense_gets = hub.log().iter().filter(|l| l.starts_with("GET /cdn/") && l.contains("2_Dense") && !l.ends_with("bytes=0-0")).count();
    assert_eq!(dense_gets, 2, "{:?}", hub.log());
}

#[test]
fn a_file_damaged_in_the_cache_is_detected_and_fetched_again() {
    let hub = FakeHub::start();
    hub.commit("org/qwen-tiny", "main", repo_files("qwen3-tiny"));
    let cache = tempfile::tempdir().unwrap();
    let s = settings(&hub, cache.path());
    let r = hub_ref("org/qwen-tiny");
    let found = registry::pull(&s, &r, Display::Log).unwrap();
    let blob = std::fs::canonicalize(found.dir.join("model.safetensors")).unwrap();
    let mut bytes = std::fs::read(&blob).unwrap();
    let good = bytes.clone();
    let n = bytes.len();
    bytes[n / 2] ^= 1;
    std::fs::write(&blob, &bytes).unwrap();

    let err = registry::cached(&s, &r, true).unwrap_err();
    assert!(matches!(err, PullError::Integrity { ref file, .. } if file == "model.safetensors"), "{err}");
    assert!(registry::cached(&s, &r, false).is_ok(), "without checks the damage goes unseen");
    let again = registry::resolve(&s, &r, Display::Log).unwrap();
    assert_eq!(std::fs::read(again.dir.join("model.safetensors")).unwrap(), good);
    registry::cached(&s, &r, true).unwrap();
}

#[test]
fn a_partial_file_as_long_as_the_file_is_not_taken_as_complete_nor_stuck() {
    let hub = FakeHub::start();
    hub.commit("org/qwen-tiny", "main", repo_files("qwen3-tiny"));
    let cache = tempfile::tempdir().unwrap();
    // Killed after writing every byte but before the rename: the part file is full length.
    let weights = std::fs::read(fixtures_dir().join("qwen3-tiny/model.safetensors")).unwrap();
    let blobs = cache.path().join("models--org--qwen-tiny/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let mut damaged = weights.clone();
    damaged[10] ^= 1;
    std::fs::write(blobs.join(format!("{}.part", sha256_hex(&weights))), &damaged).unwrap();
    let found = registry::pull(&settings(&hub, cache.path()), &hub_ref("org/qwen-tiny"), Display::Log).unwrap();
    assert_eq!(std::fs::read(found.dir.join("model.safetensors")).unwrap(), weights);
}

#[test]
fn a_branch_moves_in_the_cache_only_once_its_new_commit_is_complete() {
    let hub = FakeHub::start();
    let old = hub.commit("org/m", "main", repo_files("qwen3-tiny"));
    let cache = tempfile::tempdir().unwrap();
    let s = settings(&hub, cache.path());
    registry::pull(&s, &hub_ref("org/m"), Display::Log).unwrap();
    // A new commit whose weights stall half-way (as if the pull were killed there).
    let mut files = repo_files("qwen3-tiny");
    let weights = files.iter_mut().find(|(n, _)| n == "model.safetensors").unwrap();
    weights.1.extend_from_slice(&[0; 64]);
    let new_weights = weights.1.clone();
    let new = hub.commit("org/m", "main", files);
    hub.stall(&new_weights, new_weights.len() / 2);
    let s2 = s.clone();
    std::thread::spawn(move || registry::pull(&s2, &hub_ref("org/m"), Display::Log));
    let t0 = Instant::now();
    while hub.stalled_at().is_none() {
        assert!(t0.elapsed() < Duration::from_secs(30), "never stalled");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    // New commit's small files are in, yet main still names the old, complete commit.
    assert!(cache.path().join("models--org--m/snapshots").join(&new).join("config.json").exists());
    let offline = HubSettings { offline: true, ..s };
    assert_eq!(registry::resolve(&offline, &hub_ref("org/m"), Display::Log).unwrap().commit, Some(old));
    let refs: Vec<String> = std::fs::read_dir(cache.path().join("models--org--m/refs")).unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(refs, ["main"]);
}

#[test]
fn a_link_to_a_missing_blob_or_unsettled_optional_files_send_a_start_to_the_hub() {
    let hub = FakeHub::start();
    hub.commit("org/q8", "main", repo_files("qwen3-tiny-q8"));
    let cache = tempfile::tempdir().unwrap();
    let s = settings(&hub, cache.path());
    let r = hub_ref("org/q8");
    let found = registry::pull(&s, &r, Display::Log).unwrap();
    let commit = found.commit.clone().unwrap();

    // Optional files neither cached nor recorded as absent: online, the hub settles them.
    std::fs::remove_dir_all(cache.path().join("models--org--q8/.no_exist")).unwrap();
    let before = hub.log().len();
    assert_eq!(registry::resolve(&s, &r, Display::Log).unwrap(), found);
    assert!(hub.log().len() > before, "the start did not ask the hub");
    assert!(cache.path().join("models--org--q8/.no_exist").join(&commit).join("modules.json").exists());

    // A blob removed under its link: incomplete, and downloaded again.
    std::fs::remove_file(std::fs::canonicalize(found.dir.join("tokenizer.json")).unwrap()).unwrap();
    let err = registry::cached(&s, &r, false).unwrap_err();
    assert!(matches!(err, PullError::Incomplete { ref file, .. } if file == "tokenizer.json"), "{err}");
    registry::resolve(&s, &r, Display::Log).unwrap();
    assert_eq!(std::fs::read(found.dir.join("tokenizer.json")).unwrap(), std::fs::read(fixtures_dir().join("qwen3-tiny-q8/tokenizer.json")).unwrap());
}

#[test]
fn revision_pins_are_honoured() {
    let hub = FakeHub::start();
    let v1 = hub.commit("org/m", "main", repo_files("qwen3-tiny"));
    hub.tag("org/m", "v1", &v1);
    let v2 = hub.commit("org/m", "main", repo_files("qwen3-tiny-q8"));
    assert_ne!(v1, v2);
    let cache = tempfile::tempdir().unwrap();
    let s = settings(&hub, cache.path());
    let by_commit = registry::pull(&s, &hub_ref(&format!("org/m@{v1}")), Display::Log).unwrap();
    let tagged = registry::pull(&s, &hub_ref("org/m@v1"), Display::Log).unwrap();
    assert_eq!(tagged.commit.as_deref(), Some(v1.as_str()));
    assert_eq!(by_commit.dir, tagged.dir);
    let config = |dir: &Path| std::fs::read(dir.join("config.json")).unwrap();
    assert_eq!(config(&tagged.dir), config(&fixtures_dir().join("qwen3-tiny")));
    let refs: Vec<String> = std::fs::read_dir(cache.path().join("models--org--m/refs")).unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(refs, ["v1"], "branches and tags get refs, commits none");
    let main = registry::pull(&s, &hub_ref("org/m"), Display::Log).unwrap();
    assert_eq!(main.commit.as_deref(), Some(v2.as_str()));
    assert_eq!(config(&main.dir), config(&fixtures_dir().join("qwen3-tiny-q8")));
    // Offline, each reference still finds its own commit.
    let offline = HubSettings { offline: true, ..s };
    assert_eq!(registry::cached(&offline, &hub_ref("org/m@v1"), false).unwrap().commit, Some(v1));
    assert_eq!(registry::cached(&offline, &hub_ref("org/m"), false).unwrap().commit, Some(v2));
}

#[test]
fn a_gated_repository_needs_the_right_token_and_says_so() {
    let hub = FakeHub::start();
    hub.commit("google/gemma-tiny", "main", repo_files("gemma-tiny"));
    hub.gate("google/gemma-tiny", "hf_good");
    let cache = tempfile::tempdir().unwrap();
    let r = hub_ref("google/gemma-tiny");
    let err = registry::pull(&settings(&hub, cache.path()), &r, Display::Log).unwrap_err();
    assert!(matches!(err, PullError::NoToken { status: 401, .. }), "{err:?}");
    assert!(err.to_string().contains("HF_TOKEN") && err.to_string().contains("google/gemma-tiny"), "{err}");
    let wrong = HubSettings { token: Some("hf_bad".into()), ..settings(&hub, cache.path()) };
    let err = registry::pull(&wrong, &r, Display::Log).unwrap_err();
    assert!(matches!(err, PullError::Refused { status: 403, .. }) && err.to_string().contains("accept its terms"), "{err}");
    let good = HubSettings { token: Some("hf_good".into()), ..settings(&hub, cache.path()) };
    registry::pull(&good, &r, Display::Log).unwrap();
}

#[test]
fn unknown_repositories_and_revisions_are_reported_as_such() {
    let hub = FakeHub::start();
    hub.commit("org/m", "main", repo_files("qwen3-tiny"));
    let cache = tempfile::tempdir().unwrap();
    let s = settings(&hub, cache.path());
    let err = registry::pull(&s, &hub_ref("org/m@nope"), Display::Log).unwrap_err();
    assert!(matches!(err, PullError::NotFound { ref what } if what.contains("org/m@nope")), "{err}");
    let err = registry::pull(&HubSettings { token: Some("t".into()), ..s.clone() }, &hub_ref("org/none"), Display::Log).unwrap_err();
    assert!(matches!(err, PullError::NotFound { .. }), "{err}");
    let err = registry::pull(&HubSettings { endpoint: "http://127.0.0.1:1".into(), ..s }, &hub_ref("org/m"), Display::Log).unwrap_err();
    assert!(matches!(err, PullError::Network { .. }), "{err}");
}

fn mlx_embed() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mlx-embed"));
    c.env_remove("HF_TOKEN").env_remove("HF_HUB_OFFLINE").env_remove("HF_HUB_CACHE");
    c
}

fn write_config(dir: &Path, models: &str) -> PathBuf {
    let path = dir.join("config.yaml");
    std::fs::write(&path, format!("models:\n{models}")).unwrap();
    path
}

#[test]
fn a_pull_killed_half_way_resumes_and_never_leaves_a_file_taken_for_complete() {
    let hub = FakeHub::start();
    hub.commit("org/gemma-tiny", "main", repo_files("gemma-tiny"));
    let weights = std::fs::read(fixtures_dir().join("gemma-tiny/model.safetensors")).unwrap();
    let half = weights.len() / 2;
    hub.stall(&weights, half);
    let home = tempfile::tempdir().unwrap();
    let config = write_config(home.path(), "  - {name: g, source: hf://org/gemma-tiny}\n");
    let pull = || {
        let mut c = mlx_embed();
        c.args(["pull", "--config"]).arg(&config).env("HF_HOME", home.path()).env("HF_ENDPOINT", &hub.endpoint);
        c
    };
    let mut child = pull().stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let t0 = Instant::now();
    while hub.stalled_at().is_none() {
        assert!(t0.elapsed() < Duration::from_secs(60), "the transfer never reached the stall");
        std::thread::sleep(Duration::from_millis(20));
    }
    let part = home.path().join("hub/models--org--gemma-tiny/blobs").join(format!("{}.part", sha256_hex(&weights)));
    while std::fs::metadata(&part).map_or(0, |m| m.len()) < half as u64 {
        assert!(t0.elapsed() < Duration::from_secs(60), "the partial file never filled");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();

    // Killed: the weights are a partial file only; the copy is not complete.
    let snapshot_weights = std::fs::read_dir(home.path().join("hub/models--org--gemma-tiny/snapshots")).unwrap()
        .map(|e| e.unwrap().path().join("model.safetensors")).next().unwrap();
    assert!(!snapshot_weights.exists(), "a partial download is in the snapshot");
    let out = mlx_embed().args(["models", "--config"]).arg(&config).env("HF_HOME", home.path()).output().unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    let row = listing.lines().find(|l| l.starts_with("g ")).unwrap();
    assert!(row.contains("no: "), "{listing}");

    hub.clear_stall();
    let out = pull().output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let resumed = hub.log().iter().any(|l| l.starts_with("GET /cdn/") && l.ends_with(&format!("bytes={half}-")));
    assert!(resumed, "the second pull did not resume at byte {half}: {:?}", hub.log());
    assert_eq!(std::fs::read(&snapshot_weights).unwrap(), weights);
    assert!(!part.exists());
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(progress.contains("org/gemma-tiny: model.safetensors: done"), "{progress}");

    let out = mlx_embed().args(["models", "--verify", "--config"]).arg(&config).env("HF_HOME", home.path()).output().unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    let row = listing.lines().find(|l| l.starts_with("g ")).unwrap();
    assert!(row.ends_with("yes") && row.contains("hf://org/gemma-tiny"), "{listing}");
}

/// `mlx-embed serve` on `config` with the hub at `hub`; returns the child and its address.
fn serve(config: &Path, home: &Path, hub: &FakeHub, token: Option<&str>) -> (std::process::Child, String) {
    let (child, addr, _log) = spawn_serve(config, |c| {
        c.env_remove("HF_TOKEN").env_remove("HF_HUB_OFFLINE").env_remove("HF_HUB_CACHE")
            .env("HF_HOME", home).env("HF_ENDPOINT", &hub.endpoint);
        if let Some(t) = token {
            c.env("HF_TOKEN", t);
        }
    });
    (child, addr)
}

struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_fetches_hub_models_in_the_background_and_serves_the_reference_vectors() {
    let hub = FakeHub::start();
    let commit = hub.commit("google/gemma-tiny", "main", repo_files("gemma-tiny"));
    hub.gate("google/gemma-tiny", "hf_good");
    hub.commit("org/q4", "main", repo_files("qwen3-tiny-q4"));
    hub.commit("org/locked", "main", repo_files("qwen3-tiny"));
    hub.gate("org/locked", "hf_other");
    hub.fail_next("/api/models/org/q4/", 1); // q4's first try meets a 503 and is retried
    let home = tempfile::tempdir().unwrap();
    let config = write_config(home.path(), "  - {name: g, source: hf://google/gemma-tiny, dtype: f32, device: cpu}
  - {name: q4, source: hf://org/q4, dtype: f32, device: cpu}
  - {name: q4-short, source: hf://org/q4, dtype: f32, device: cpu, max_tokens: 16}
  - {name: locked, source: hf://org/locked, device: cpu}
  - {name: local, source: LOCAL, dtype: f32, device: cpu}
".replace("LOCAL", fixtures_dir().join("qwen3-tiny").to_str().unwrap()).as_str());
    let (child, addr) = serve(&config, home.path(), &hub, Some("hf_good"));
    let _child = Killed(child);
    let mut c = pb::embedding_service_client::EmbeddingServiceClient::connect(format!("http://{addr}")).await.unwrap();
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut health = HealthClient::new(channel);
    let check = |h: &mut HealthClient<tonic::transport::Channel>, service: &str| {
        let mut h = h.clone();
        let service = service.to_string();
        async move { h.check(HealthCheckRequest { service }).await.unwrap().into_inner().status }
    };
    assert_eq!(check(&mut health, "").await, ServingStatus::Serving as i32, "the server answers at once");

    // Every hub model becomes ready without a manual step, the locked one excepted.
    let t0 = Instant::now();
    let state = |m: &pb::Model| pb::ModelState::try_from(m.state).unwrap();
    loop {
        let models = c.list_models(pb::ListModelsRequest {}).await.unwrap().into_inner().models;
        let ready = models.iter().filter(|m| state(m) == pb::ModelState::Ready).count();
        let locked = models.iter().find(|m| m.name == "locked").unwrap();
        assert_ne!(state(locked), pb::ModelState::Ready);
        // The 503 may have met any model; the locked one ends up explaining its token.
        if ready == 4 && locked.error.contains("HF_TOKEN") {
            assert_eq!(state(locked), pb::ModelState::Downloading);
            assert!(locked.error.contains("next try"), "{}", locked.error);
            let g = models.iter().find(|m| m.name == "g").unwrap();
            assert_eq!(g.revision, commit);
            assert!(g.path.ends_with(&format!("models--google--gemma-tiny/snapshots/{commit}")), "{}", g.path);
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(90), "models never became ready: {models:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    for (model, fixture) in [("g", "gemma-tiny"), ("q4", "qwen3-tiny-q4")] {
        for case in reference(&fixtures_dir().join(fixture)).cases {
            let mut req = request(model, case.texts.iter().map(|t| text(t)).collect());
            req.prompt_name = case.prompt_name.clone().unwrap_or_default();
            req.instruction = case.instruction.clone().unwrap_or_default();
            req.dimensions = case.dimensions.map(|d| d as u32);
            let resp = c.embed(req).await.unwrap().into_inner();
            for (e, want) in resp.embeddings.iter().zip(&case.embeddings) {
                let d = max_abs_diff(&e.values, want);
                assert!(d <= 1e-4, "{model} / {}: {d:e}", case.name);
            }
        }
    }
    assert_eq!(check(&mut health, "g").await, ServingStatus::Serving as i32);
    assert_eq!(check(&mut health, "locked").await, ServingStatus::NotServing as i32);
    let q4_listings = hub.log().iter().filter(|l| l.contains("/api/models/org/q4/")).count();
    assert_eq!(q4_listings, 2, "one failed try, one retry");
    // Two models of one repository: fetched once.
    let shard_gets = hub.log().iter().filter(|l| l.starts_with("GET /cdn/") && l.contains("model-00001") && !l.ends_with("bytes=0-0")).count();
    assert_eq!(shard_gets, 1, "{:?}", hub.log());
    let err = c.embed(request("locked", vec![text("x")])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(err.message().contains("not downloaded yet"), "{}", err.message());
}

/// Python's `huggingface_hub` (pinned, installed by `scripts/setup.sh` into `.tools/hf`) reads a
/// copy this service pulled, offline, and this service uses a copy Python downloaded.
#[test]
fn python_tools_share_the_cache() {
    let site = Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/hf");
    assert!(site.join("huggingface_hub").is_dir(), "{} is missing: run scripts/setup.sh", site.display());
    let hub = FakeHub::start();
    let gemma = hub.commit("org/gemma-tiny", "main", repo_files("gemma-tiny"));
    let q8 = hub.commit("org/q8", "main", repo_files("qwen3-tiny-q8"));
    let home = tempfile::tempdir().unwrap();
    let s = settings(&hub, &home.path().join("hub"));
    let ours = registry::pull(&s, &hub_ref("org/gemma-tiny"), Display::Log).unwrap();
    let script = r#"
import json
from huggingface_hub import snapshot_download, scan_cache_dir
ours = snapshot_download("org/gemma-tiny", allow_patterns=["*.json", "*.safetensors"])
scan = scan_cache_dir()
repos = {r.repo_id: {"size": r.size_on_disk, "commits": [rev.commit_hash for rev in r.revisions], "refs": sorted(r.refs), "files": r.nb_files} for r in scan.repos}
print(json.dumps({"ours": ours, "repos": repos, "warnings": [str(w) for w in scan.warnings]}))
"#;
    let python = |code: &str, offline: bool| {
        let mut c = Command::new("python3");
        c.arg("-c").arg(code).env("PYTHONPATH", &site).env("HF_HOME", home.path()).env("HF_ENDPOINT", &hub.endpoint).env_remove("HF_TOKEN");
        if offline {
            c.env("HF_HUB_OFFLINE", "1");
        } else {
            c.env_remove("HF_HUB_OFFLINE");
        }
        let out = c.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let seen: serde_json::Value = serde_json::from_str(&python(script, true)).unwrap();
    assert_eq!(seen["ours"], ours.dir.to_str().unwrap());
    assert_eq!(seen["warnings"], serde_json::json!([]));
    let repo = &seen["repos"]["org/gemma-tiny"];
    assert_eq!(repo["commits"], serde_json::json!([gemma]));
    assert_eq!(repo["refs"], serde_json::json!(["main"]));
    let blobs: std::collections::HashSet<PathBuf> = ours.files.iter().map(|f| std::fs::canonicalize(ours.dir.join(f)).unwrap()).collect();
    assert_eq!(repo["files"], blobs.len());

    // Python downloads a whole repository (it records no absent files); offline, it is usable.
    let theirs = python("from huggingface_hub import snapshot_download; print(snapshot_download('org/q8'))", false);
    let offline = HubSettings { offline: true, ..s };
    let found = registry::cached(&offline, &hub_ref("org/q8"), true).unwrap();
    assert_eq!(found.dir, Path::new(theirs.trim()));
    assert_eq!(found.commit, Some(q8));
    assert!(found.files.contains(&"model.safetensors".to_string()));
}

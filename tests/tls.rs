//! TLS and mutual TLS, against `mlx-embed serve` as a process with certificates from a test CA made
//! here: a client that trusts the CA is served; a plaintext client is refused; with a client CA
//! configured, only clients presenting a certificate from that CA get in.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::server::{request, text};
use common::{fixtures_dir, spawn_serve};
use mlx_embed::grpc::pb::{embedding_service_client::EmbeddingServiceClient, ListModelsRequest};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let pem = params.self_signed(&key).unwrap().pem();
    Ca { pem, issuer: Issuer::new(params, key) }
}

/// A certificate and key (PEM) for `names`, signed by `ca`, for a server or a client.
fn leaf(ca: &Ca, names: &[&str], usage: ExtendedKeyUsagePurpose) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, names[0]);
    params.extended_key_usages = vec![usage];
    (params.signed_by(&key, &ca.issuer).unwrap().pem(), key.serialize_pem())
}

/// Writes the server's certificate (and, for mutual TLS, the client CA) and a config using them.
fn tls_config(dir: &Path, ca: &Ca, client_ca: Option<&Ca>) -> std::path::PathBuf {
    let (cert, key) = leaf(ca, &["localhost", "127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth);
    std::fs::write(dir.join("server.pem"), cert).unwrap();
    std::fs::write(dir.join("server.key"), key).unwrap();
    let mut tls = "tls:\n  cert_file: server.pem\n  key_file: server.key\n".to_string();
    if let Some(c) = client_ca {
        std::fs::write(dir.join("clients.pem"), &c.pem).unwrap();
        tls.push_str("  client_ca_file: clients.pem\n");
    }
    let path = dir.join("config.yaml");
    std::fs::write(&path, format!("{tls}models:\n  - {{name: q, source: {}, device: cpu}}\n", fixtures_dir().join("qwen3-tiny").display())).unwrap();
    path
}

/// A TLS client trusting `ca`, presenting `identity` if given.
async fn tls_client(addr: &str, ca: &Ca, identity: Option<(String, String)>) -> Result<EmbeddingServiceClient<Channel>, String> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca.pem)).domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Channel::from_shared(format!("https://{addr}")).unwrap().tls_config(tls).map_err(|e| e.to_string())?;
    Ok(EmbeddingServiceClient::new(channel.connect().await.map_err(|e| format!("{e:?}"))?))
}

/// Whether `c` gets an answer (ListModels needs no loaded model).
async fn answered(c: Result<EmbeddingServiceClient<Channel>, String>) -> Result<(), String> {
    c?.list_models(ListModelsRequest {}).await.map(|_| ()).map_err(|s| format!("{s:?}"))
}

async fn plaintext(addr: &str) -> Result<(), String> {
    let c = EmbeddingServiceClient::connect(format!("http://{addr}")).await.map_err(|e| format!("{e:?}"));
    answered(c).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_trusting_the_ca_is_served_and_a_plaintext_client_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca("test CA");
    let (mut child, addr, log) = spawn_serve(&tls_config(dir.path(), &ca, None), |_| {});

    assert!(plaintext(&addr).await.is_err(), "a plaintext client was served");
    let other = self::ca("another CA");
    assert!(answered(tls_client(&addr, &other, None).await).await.is_err(), "a client trusting another CA accepted the server");

    let mut c = tls_client(&addr, &ca, None).await.unwrap();
    let t0 = Instant::now();
    let resp = loop {
        match c.embed(request("q", vec![text("over TLS")])).await {
            Ok(r) => break r.into_inner(),
            Err(_) if t0.elapsed() < Duration::from_secs(30) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(s) => panic!("{s:?}"),
        }
    };
    assert_eq!(resp.embeddings.len(), 1);
    assert!(log.lock().unwrap().contains("TLS on"), "{}", log.lock().unwrap());
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_client_ca_only_clients_with_a_certificate_from_it_get_in() {
    let dir = tempfile::tempdir().unwrap();
    let (server_ca, client_ca, stranger_ca) = (ca("server CA"), ca("client CA"), ca("stranger CA"));
    let (mut child, addr, _log) = spawn_serve(&tls_config(dir.path(), &server_ca, Some(&client_ca)), |_| {});

    let mine = leaf(&client_ca, &["vector-store"], ExtendedKeyUsagePurpose::ClientAuth);
    let theirs = leaf(&stranger_ca, &["intruder"], ExtendedKeyUsagePurpose::ClientAuth);
    assert!(answered(tls_client(&addr, &server_ca, None).await).await.is_err(), "a client without a certificate got in");
    assert!(answered(tls_client(&addr, &server_ca, Some(theirs)).await).await.is_err(), "a certificate from another CA got in");
    assert!(plaintext(&addr).await.is_err(), "a plaintext client was served");
    answered(tls_client(&addr, &server_ca, Some(mine)).await).await.unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_client_gets_in_with_its_certificate_and_api_key_and_without_the_key_is_refused_at_once() {
    use mlx_embed::client::{Client, Tls};
    let dir = tempfile::tempdir().unwrap();
    let (server_ca, client_ca) = (ca("server CA"), ca("client CA"));
    let config = tls_config(dir.path(), &server_ca, Some(&client_ca));
    let yaml = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("auth:\n  api_keys_env: TEST_CLIENT_KEYS\n{yaml}")).unwrap();
    let (mut child, addr, _log) = spawn_serve(&config, |c| {
        c.env("TEST_CLIENT_KEYS", "key-one");
    });
    let port = addr.rsplit(':').next().unwrap();
    let (cert, key) = leaf(&client_ca, &["vector-store"], ExtendedKeyUsagePurpose::ClientAuth);
    let tls = Tls::new().ca_certificate_pem(server_ca.pem.clone()).identity_pem(cert, key);

    // `localhost` is the name in the server's certificate; the client verifies it.
    let client = Client::builder().endpoint(format!("https://localhost:{port}")).tls(tls.clone()).api_key("key-one").build().await.unwrap();
    let t0 = Instant::now();
    let vector = loop {
        match client.embed_query("q", "over mutual TLS").await {
            Ok(v) => break v,
            Err(_) if t0.elapsed() < Duration::from_secs(30) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => panic!("{e}"),
        }
    };
    assert!(!vector.is_empty());

    let keyless = Client::builder().endpoint(format!("https://localhost:{port}")).tls(tls).build().await.unwrap();
    let err = keyless.embed_query("q", "no key").await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::Unauthenticated), "{err}");
    // (`localhost` may also name ::1, where nothing listens: only the server's address counts.)
    let served: u64 = keyless.endpoints().iter().filter(|e| e.address.to_string() == addr).map(|e| e.calls).sum();
    assert_eq!(served, 1, "UNAUTHENTICATED was retried");
    child.kill().unwrap();
    child.wait().unwrap();
}

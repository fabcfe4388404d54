//! Every bad request gets the right gRPC code and, for invalid arguments, a BadRequest naming the
//! field; a valid request sent right after each one succeeds (nothing is poisoned); huge client
//! strings come back as short quotes, never whole in the trailers.

mod common;

use common::server::*;
use mlx_embed::grpc::pb;
use tonic::Code;
use tonic_types::StatusExt;

/// What a bad request must produce: a code and, for INVALID_ARGUMENT, the field named.
struct Case {
    name: &'static str,
    req: pb::EmbedRequest,
    code: Code,
    field: Option<&'static str>,
    /// Text the message must contain.
    says: &'static str,
}

fn case(name: &'static str, req: pb::EmbedRequest, code: Code, field: Option<&'static str>, says: &'static str) -> Case {
    Case { name, req, code, field, says }
}

fn with(mut req: pb::EmbedRequest, f: impl FnOnce(&mut pb::EmbedRequest)) -> pb::EmbedRequest {
    f(&mut req);
    req
}

fn cases() -> Vec<Case> {
    let ok = request("qwen", vec![text("fine")]);
    let invalid = Code::InvalidArgument;
    let mut v64 = vec![0.5f32; 64];
    vec![
        case("empty model name", request("", vec![text("x")]), invalid, Some("model"), "required"),
        case("unknown model", request("nope", vec![text("x")]), Code::NotFound, None, "nope"),
        case("model that failed to load", request("absent", vec![text("x")]), Code::Unavailable, None, "absent"),
        case("no items", request("qwen", vec![]), invalid, Some("items"), "at least one"),
        case("too many items", request("qwen", (0..17).map(|_| text("x")).collect()), invalid, Some("items"), "17 items exceed the limit of 16"),
        case("item with neither text nor vector", request("qwen", vec![text("a"), pb::Item { input: None }]), invalid, Some("items[1]"), "either text or vector"),
        case("empty text", request("qwen", vec![text("a"), text("")]), invalid, Some("items[1].text"), "empty"),
        case("vector of the wrong length", request("qwen", vec![vector(vec![1.0; 10])]), invalid, Some("items[0].vector.values"), "has 10 values, expected 64"),
        case("empty vector", request("qwen", vec![vector(vec![])]), invalid, Some("items[0].vector.values"), "has 0 values"),
        case("NaN in a vector", request("qwen", vec![vector({ v64[3] = f32::NAN; v64.clone() })]), invalid, Some("items[0].vector.values[3]"), "NaN"),
        case("+Inf in a vector", request("qwen", vec![vector({ v64[3] = 0.5; v64[5] = f32::INFINITY; v64.clone() })]), invalid, Some("items[0].vector.values[5]"), "inf"),
        case("-Inf in a vector", request("qwen", vec![text("t"), vector({ v64[5] = f32::NEG_INFINITY; v64.clone() })]), invalid, Some("items[1].vector.values[5]"), "-inf"),
        case("zero vector to normalize", request("qwen", vec![vector(vec![0.0; 64])]), invalid, Some("items[0].vector"), "cannot be normalized"),
        case("subnormal vector to normalize", request("qwen", vec![text("t"), vector(vec![1e-40; 64])]), invalid, Some("items[1].vector"), "cannot be normalized"),
        case("vector that is zero within the requested dimensions", with(request("qwen", vec![vector((0..64).map(|i| if i < 40 { 0.0 } else { 1.0 }).collect())]), |r| r.dimensions = Some(40)), invalid, Some("items[0].vector"), "first 40"),
        case("vector of the full size when a cut is asked is fine, but not of another", with(request("qwen", vec![vector(vec![1.0; 48])]), |r| r.dimensions = Some(40)), invalid, Some("items[0].vector.values"), "or 40"),
        case("dimensions not allowed", with(ok.clone(), |r| r.dimensions = Some(7)), invalid, Some("dimensions"), "7 is not allowed"),
        case("dimensions larger than the model", with(ok.clone(), |r| r.dimensions = Some(4096)), invalid, Some("dimensions"), "4096"),
        case("dimensions zero", with(ok.clone(), |r| r.dimensions = Some(0)), invalid, Some("dimensions"), "0 is not allowed"),
        case("dimensions not in the configured list", with(request("gemma", vec![text("x")]), |r| r.dimensions = Some(40)), invalid, Some("dimensions"), "40"),
        case("unknown prompt name", with(ok.clone(), |r| r.prompt_name = "poem".into()), invalid, Some("prompt_name"), "unknown prompt `poem`"),
        case("prompt name and instruction", with(ok.clone(), |r| { r.prompt_name = "query".into(); r.instruction = "x".into() }), invalid, Some("instruction"), "at most one"),
        case("input type and prompt name", with(ok.clone(), |r| { r.input_type = pb::InputType::Query as i32; r.prompt_name = "query".into() }), invalid, Some("prompt_name"), "at most one"),
        case("unknown input type", with(ok.clone(), |r| r.input_type = 42), invalid, Some("input_type"), "unknown value 42"),
        case("unknown truncation", with(ok.clone(), |r| r.truncation = 9), invalid, Some("truncation"), "unknown value 9"),
        case("unknown encoding", with(ok.clone(), |r| r.encoding = 7), invalid, Some("encoding"), "unknown value 7"),
        case("over-long text with truncation off", request("short", vec![text("a b c d e f g h i j k l m n o p q r s t u v w x y z")]), invalid, Some("items[0].text"), "exceed the limit of 16"),
        case("over-long text with truncation off by request", with(request("qwen", vec![text(&"word ".repeat(600))]), |r| r.truncation = pb::Truncation::None as i32), invalid, Some("items[0].text"), "exceed the limit of 512"),
        case("message over the size limit", request("qwen", vec![text(&"x".repeat(70_000))]), Code::ResourceExhausted, None, "message"),
    ]
}

#[tokio::test]
async fn each_bad_request_gets_its_code_and_field_and_the_next_request_succeeds() {
    let mut c = client().await;
    let cases = cases();
    assert!(cases.len() >= 25);
    for k in cases {
        let status = c.embed(k.req.clone()).await.expect_err(k.name);
        assert_eq!(status.code(), k.code, "{}: {status:?}", k.name);
        assert!(status.message().contains(k.says), "{}: message {:?} lacks {:?}", k.name, status.message(), k.says);
        if let Some(field) = k.field {
            let details = status.get_error_details();
            let violations = &details.bad_request().unwrap_or_else(|| panic!("{}: no BadRequest", k.name)).field_violations;
            assert_eq!(violations[0].field, field, "{}", k.name);
        }
        let next = c.embed(request("qwen", vec![text("still fine")])).await;
        assert!(next.is_ok(), "{}: the next request failed: {next:?}", k.name);
    }
}

#[tokio::test]
async fn bad_requests_to_the_other_calls_get_their_codes() {
    let mut c = client().await;
    let s = c.get_model(pb::GetModelRequest { model: "nope".into() }).await.unwrap_err();
    assert_eq!(s.code(), Code::NotFound);
    let s = c.tokenize(pb::TokenizeRequest { model: "qwen".into(), text: "x".into(), prompt_name: "poem".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    let s = c.tokenize(pb::TokenizeRequest { model: "absent".into(), text: "x".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(s.code(), Code::Unavailable);
    // An empty text is refused by Tokenize as by Embed, prompt or not.
    for prompt_name in ["", "query"] {
        let s = c.tokenize(pb::TokenizeRequest { model: "qwen".into(), prompt_name: prompt_name.into(), ..Default::default() }).await.unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        assert_eq!(s.get_details_bad_request().unwrap().field_violations[0].field, "text");
    }
}

/// A vector item whose norm is zero (or too small to divide by) is returned as is when
/// `normalize` is off: only normalizing it is refused.
#[tokio::test]
async fn a_zero_vector_passes_through_when_normalize_is_off() {
    let mut c = client().await;
    let resp = c.embed(with(request("qwen", vec![vector(vec![0.0; 64]), vector(vec![1e-40; 64])]), |r| r.normalize = Some(false))).await.unwrap().into_inner();
    assert_eq!((resp.embeddings[0].values.clone(), resp.embeddings[1].values.clone()), (vec![0.0; 64], vec![1e-40; 64]));
}

/// `EmbedRequest` with its text as raw bytes, to put malformed UTF-8 on the wire.
#[derive(Clone, PartialEq, prost::Message)]
struct RawRequest {
    #[prost(string, tag = "1")]
    model: String,
    #[prost(message, repeated, tag = "2")]
    items: Vec<RawItem>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RawItem {
    #[prost(bytes = "vec", tag = "1")]
    text: Vec<u8>,
}

#[tokio::test]
async fn malformed_utf8_is_an_invalid_argument() {
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server().addr)).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let raw = RawRequest { model: "qwen".into(), items: vec![RawItem { text: vec![b'a', 0xff, 0xfe, b'b'] }] };
    let path = http::uri::PathAndQuery::from_static("/embedding.v1.EmbeddingService/Embed");
    let codec = tonic_prost::ProstCodec::<RawRequest, pb::EmbedResponse>::default();
    let status = grpc.unary(tonic::Request::new(raw), path, codec).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("malformed"), "{status:?}");
    let mut c = client().await;
    assert!(c.embed(request("qwen", vec![text("ok")])).await.is_ok());
}

#[tokio::test]
async fn an_expired_deadline_is_deadline_exceeded_and_the_next_request_succeeds() {
    use mlx_embed::grpc::pb::embedding_service_server::EmbeddingService;
    // Called in-process: a tonic client enforces the same deadline itself and would cancel first.
    let config = config();
    let origins = config.models.iter().map(|m| mlx_embed::registry::Origin::new(m.source.clone())).collect();
    let service = mlx_embed::grpc::service::Service::new(server().engine.clone(), &config, origins, Default::default());
    let mut req = tonic::Request::new(request("gemma", (0..16).map(|i| text(&format!("text number {i} "))).collect()));
    req.metadata_mut().insert("grpc-timeout", "1n".parse().unwrap());
    let status = service.embed(req).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let mut req = tonic::Request::new(request("gemma", vec![text("after")]));
    req.metadata_mut().insert("grpc-timeout", "10S".parse().unwrap());
    assert!(service.embed(req).await.is_ok());
}

/// The size of `status` as trailers on the wire: every header the server writes for it (message
/// percent-encoded, details in base64), names included, as grpc-core counts it against its
/// 8 KB metadata limit.
fn trailer_bytes(status: &tonic::Status) -> usize {
    let mut headers = http::HeaderMap::new();
    status.add_header(&mut headers).unwrap();
    headers.iter().map(|(name, value)| name.as_str().len() + value.len()).sum()
}

/// A megabyte of client input in the fields errors quote (`model`, `prompt_name`), ASCII and
/// not, still gets its code with a message and trailers of a few KB: errors quote a short
/// prefix and the length, never the whole input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_quote_only_a_short_prefix_of_huge_client_input() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, format!(
        "limits:\n  max_message_bytes: 4194304\nmodels:\n  - {{name: q, source: {}, device: cpu}}\n",
        common::fixtures_dir().join("qwen3-tiny").display()
    )).unwrap();
    let (mut child, addr, _log) = common::spawn_serve(&config, |_| {});
    let mut c = pb::embedding_service_client::EmbeddingServiceClient::connect(format!("http://{addr}")).await.unwrap()
        .max_decoding_message_size(4 << 20).max_encoding_message_size(4 << 20);
    let t0 = std::time::Instant::now();
    while c.embed(request("q", vec![text("warm")])).await.is_err() {
        assert!(t0.elapsed() < std::time::Duration::from_secs(30), "the model never became ready");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut refusals = Vec::new();
    for huge in ["m".repeat(1 << 20), "é".repeat(1 << 19)] {
        let embed = |f: &dyn Fn(&mut pb::EmbedRequest)| with(request("q", vec![text("x")]), f);
        refusals.push(("Embed model", Code::NotFound, c.embed(embed(&|r| r.model = huge.clone())).await.map(drop)));
        refusals.push(("Embed prompt_name", Code::InvalidArgument, c.embed(embed(&|r| r.prompt_name = huge.clone())).await.map(drop)));
        let tokenize = pb::TokenizeRequest { model: "q".into(), text: "x".into(), prompt_name: huge.clone(), ..Default::default() };
        refusals.push(("Tokenize prompt_name", Code::InvalidArgument, c.tokenize(tokenize).await.map(drop)));
        refusals.push(("GetModel model", Code::NotFound, c.get_model(pb::GetModelRequest { model: huge.clone() }).await.map(drop)));
    }
    let _ = child.kill();
    let _ = child.wait();
    for (what, code, got) in refusals {
        let status = got.expect_err(what);
        assert_eq!(status.code(), code, "{what}: {}", status.message().chars().take(200).collect::<String>());
        assert!(status.message().len() <= 1024, "{what}: a message of {} bytes", status.message().len());
        assert!(trailer_bytes(&status) <= 4096, "{what}: trailers of {} bytes", trailer_bytes(&status));
        if what.ends_with("prompt_name") {
            assert!(status.message().contains("…` (1048576 bytes)"), "{what}: {}", status.message());
        }
    }
}

//! gRPC calls made by hand over HTTP/2 (the `h2` crate), for what gRPC clients never send on
//! purpose: a request whose message comes in a later write than its headers, bytes that are not
//! a protobuf message, a message over the server's limit. The answer is read as the server wrote
//! it, without a client library's own deadline in between.

use std::time::Duration;

/// A call's HTTP/2 request, to be sent by [`call`].
pub struct RawCall<'a> {
    /// `/package.Service/Method`.
    pub path: &'a str,
    /// The `grpc-timeout` header (`100m`), if any.
    pub timeout: Option<&'a str>,
    /// The message's bytes (framed by [`call`]).
    pub message: Vec<u8>,
    /// How long after the headers the message (and the end of the request) is written.
    pub after: Duration,
}

/// The status a server answered with.
#[derive(Debug)]
pub struct RawAnswer {
    pub code: tonic::Code,
    pub message: String,
}

/// Makes `call` on its own connection to `addr`; returns the grpc-status and grpc-message of
/// the answer, from the headers (a trailers-only answer) or the trailers.
pub async fn call(addr: &str, call: RawCall<'_>) -> RawAnswer {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let mut request = http::Request::post(format!("http://{addr}{}", call.path))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(t) = call.timeout {
        request = request.header("grpc-timeout", t);
    }
    let (response, mut send) = client.send_request(request.body(()).unwrap(), false).unwrap();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(call.message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&call.message);
    let sending = tokio::spawn(async move {
        tokio::time::sleep(call.after).await;
        // The server may have answered (and closed the stream) already.
        let _ = send.send_data(framed.into(), true);
        // Keeps the stream's sending half until the data is out.
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(send);
    });
    let response = response.await.unwrap();
    let status = |h: &http::HeaderMap| -> Option<RawAnswer> {
        let code = h.get("grpc-status")?.to_str().unwrap().parse::<i32>().unwrap();
        let message = h.get("grpc-message").map(|m| percent_decoded(m.as_bytes())).unwrap_or_default();
        Some(RawAnswer { code: tonic::Code::from(code), message })
    };
    if let Some(answer) = status(response.headers()) {
        sending.abort();
        return answer;
    }
    let mut body = response.into_body();
    while let Some(data) = body.data().await {
        let data = data.unwrap();
        let _ = body.flow_control().release_capacity(data.len());
    }
    let trailers = body.trailers().await.unwrap().expect("an answer without a status");
    sending.abort();
    status(&trailers).expect("trailers without grpc-status")
}

/// A `grpc-message` value as text (it is percent-encoded).
fn percent_decoded(v: &[u8]) -> String {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        let hex = v.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
        match (v[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

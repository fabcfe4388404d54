//! API keys: a tower layer in front of every service that answers UNAUTHENTICATED unless the
//! request carries `authorization: Bearer <key>` with one of the configured keys. Health checks
//! and reflection can be left open (the default), so probes and grpcurl's discovery work. Key
//! files are read here too ([`parse_key_file`]), so what counts as a key is decided in one place.
//!
//! Keys are kept as sha256 digests and compared without early exit; neither they nor the
//! presented value are ever logged, and the refusal says nothing about which part was wrong.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::{Either, Ready};
use sha2::{Digest, Sha256};
use tower::{Layer, Service};

#[derive(Clone)]
pub struct Auth {
    keys: Arc<Vec<[u8; 32]>>,
    exempt_health: bool,
    exempt_reflection: bool,
}

impl Auth {
    pub fn new(keys: &[String], exempt_health: bool, exempt_reflection: bool) -> Auth {
        let keys = keys.iter().map(|k| Sha256::digest(k.as_bytes()).into()).collect();
        Auth { keys: Arc::new(keys), exempt_health, exempt_reflection }
    }

    /// Whether a request to `path` with this `authorization` header value may pass.
    pub fn allows(&self, path: &str, authorization: Option<&[u8]>) -> bool {
        if (self.exempt_health && path.starts_with("/grpc.health.v1.Health/"))
            || (self.exempt_reflection && path.starts_with("/grpc.reflection."))
        {
            return true;
        }
        let Some(value) = authorization else { return false };
        let Some(key) = bearer(value) else { return false };
        let presented: [u8; 32] = Sha256::digest(key).into();
        // Every key is compared in full, whichever matches.
        self.keys.iter().fold(false, |found, k| found | constant_time_eq(k, &presented))
    }
}

/// Keys from a key file's text: one per line, surrounding blanks trimmed, blank lines skipped. As
/// in YAML, `#` starts a comment only at the start of a line or after a blank: a `#` inside a key
/// is part of it (cutting there would silently turn `k2#x` into the weaker key `k2`).
pub fn parse_key_file(text: &str) -> Vec<String> {
    text.lines()
        .map(|line| {
            let comment = line.char_indices()
                .find(|&(i, c)| c == '#' && line[..i].chars().next_back().is_none_or(char::is_whitespace))
                .map_or(line.len(), |(i, _)| i);
            line[..comment].trim()
        })
        .filter(|key| !key.is_empty())
        .map(String::from)
        .collect()
}

/// The token of `Bearer <token>` (scheme case-insensitive).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    (scheme.eq_ignore_ascii_case(b"bearer ") && !rest.trim_ascii().is_empty()).then(|| rest.trim_ascii())
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl<S> Layer<S> for Auth {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService { inner, auth: self.clone() }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Auth,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for AuthService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    ResBody: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<S::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let header = req.headers().get(http::header::AUTHORIZATION).map(|v| v.as_bytes());
        if self.auth.allows(req.uri().path(), header) {
            return Either::Left(self.inner.call(req));
        }
        ::metrics::counter!(crate::metrics::AUTH_FAILURES).increment(1);
        let status = tonic::Status::unauthenticated("missing or invalid API key (authorization: Bearer <key>)");
        Either::Right(futures_util::future::ready(Ok(status.into_http())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_starts_a_comment_only_at_a_line_start_or_after_a_blank() {
        let keys = parse_key_file("# team\nk1\n\n  k2#inside  \nk3 # laptop\n\tk4\t#ci\n#k5\n   # k6\nk#7#\n");
        assert_eq!(keys, ["k1", "k2#inside", "k3", "k4", "k#7#"]);
        assert!(parse_key_file("# nobody yet\n\n").is_empty());
    }

    #[test]
    fn only_a_configured_bearer_key_passes_and_probes_can_stay_open() {
        let auth = Auth::new(&["k-one".into(), "k-two".into()], true, false);
        let embed = "/embedding.v1.EmbeddingService/Embed";
        assert!(auth.allows(embed, Some(b"Bearer k-two")));
        assert!(auth.allows(embed, Some(b"bearer k-one")));
        for bad in [&b"Bearer k-three"[..], b"k-one", b"Basic k-one", b"Bearer ", b"Bearer k-one-and-more", b""] {
            assert!(!auth.allows(embed, Some(bad)), "{}", String::from_utf8_lossy(bad));
        }
        assert!(!auth.allows(embed, None));
        assert!(auth.allows("/grpc.health.v1.Health/Check", None));
        assert!(!auth.allows("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", None));
        let closed = Auth::new(&["k".into()], false, true);
        assert!(!closed.allows("/grpc.health.v1.Health/Check", None));
        assert!(closed.allows("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", None));
    }
}

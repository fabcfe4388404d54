//! The endpoints a client talks to, and which of them takes the next call.
//!
//! Targets are URIs (`http://10.0.0.5:50051`, `https://embed.internal:443`). A host name is
//! resolved to all its addresses (a Kubernetes headless Service answers with one per ready pod)
//! and resolved again every `resolve_interval`, so replicas that come and go are followed; each
//! address is a member with its own HTTP/2 connection, opened on first use.
//!
//! A call goes to the less busy of two members drawn at random among those in service (power of
//! two choices on calls in flight). A member whose connection failed, or that said UNAVAILABLE,
//! sits out for a while that doubles with each failure in a row (1 s up to 30 s); when no member
//! is in service the one due back first is tried, and names are resolved again.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use http::Uri;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use super::retry::Jitter;
use super::{ClientError, Tls};

/// Turns a host name into addresses. The default asks the system resolver; tests and service
/// meshes can supply their own.
pub trait Resolve: Send + Sync + 'static {
    fn resolve(&self, host: &str, port: u16) -> BoxFuture<'static, io::Result<Vec<SocketAddr>>>;
}

/// The system resolver (getaddrinfo, through tokio).
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(&self, host: &str, port: u16) -> BoxFuture<'static, io::Result<Vec<SocketAddr>>> {
        let host = host.to_owned();
        Box::pin(async move { Ok(tokio::net::lookup_host((host.as_str(), port)).await?.collect()) })
    }
}

/// One target as given, parsed.
struct Target {
    given: String,
    host: String,
    port: u16,
    tls: bool,
    literal: Option<IpAddr>,
}

impl Target {
    fn parse(given: &str, tls_configured: bool) -> Result<Target, ClientError> {
        let bad = |why: &str| ClientError::Config(format!("endpoint {given:?}: {why}"));
        let with_scheme =
            if given.contains("://") { given.to_owned() } else if tls_configured { format!("https://{given}") } else { format!("http://{given}") };
        let uri: Uri = with_scheme.parse().map_err(|e| bad(&format!("not a URI ({e})")))?;
        let tls = match uri.scheme_str() {
            Some("http") => tls_configured,
            Some("https") => true,
            _ => return Err(bad("the scheme must be http or https")),
        };
        let host = uri.host().filter(|h| !h.is_empty()).ok_or_else(|| bad("no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        if uri.path_and_query().is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty()) {
            return Err(bad("a path is not allowed"));
        }
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let literal = host.parse::<IpAddr>().ok();
        Ok(Target { given: given.to_owned(), host, port, tls, literal })
    }

    /// `scheme://host:port` as the requests' authority (and TLS server name).
    fn origin(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        match self.literal {
            Some(IpAddr::V6(ip)) => format!("{scheme}://[{ip}]:{}", self.port),
            _ => format!("{scheme}://{}:{}", self.host, self.port),
        }
    }
}

/// How members' connections are made.
pub(crate) struct ChannelSettings {
    pub connect_timeout: Duration,
    pub tls: Option<Tls>,
}

/// One address of one target, with its connection and its record.
pub(crate) struct Member {
    target: usize,
    pub(crate) addr: SocketAddr,
    pub(crate) channel: Channel,
    in_flight: AtomicUsize,
    calls: AtomicU64,
    failures: AtomicU64,
    health: Mutex<Health>,
}

#[derive(Default)]
struct Health {
    failures_in_a_row: u32,
    out_until: Option<Instant>,
}

impl Member {
    fn in_service(&self, now: Instant) -> bool {
        self.health.lock().expect("health lock").out_until.is_none_or(|until| until <= now)
    }

    fn due_back(&self) -> Option<Instant> {
        self.health.lock().expect("health lock").out_until
    }

    pub(crate) fn succeeded(&self) {
        *self.health.lock().expect("health lock") = Health::default();
    }

    /// The endpoint could not serve: out for 1 s, doubling per failure in a row, at most 30 s.
    pub(crate) fn failed(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let mut health = self.health.lock().expect("health lock");
        health.failures_in_a_row = health.failures_in_a_row.saturating_add(1);
        let out = Duration::from_secs(1 << (health.failures_in_a_row - 1).min(5)).min(Duration::from_secs(30));
        health.out_until = Some(Instant::now() + out);
    }
}

/// A member's place for one attempt: counted in flight until dropped.
pub(crate) struct Lease(pub(crate) Arc<Member>);

impl Lease {
    fn new(member: Arc<Member>) -> Lease {
        member.in_flight.fetch_add(1, Ordering::Relaxed);
        member.calls.fetch_add(1, Ordering::Relaxed);
        Lease(member)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a client knows about one endpoint address, for logs and dashboards.
#[derive(Clone, Debug)]
pub struct EndpointStats {
    /// The target as given (URI or name).
    pub target: String,
    pub address: SocketAddr,
    /// Attempts sent to it so far.
    pub calls: u64,
    /// Attempts it could not serve (unreachable, connection lost, UNAVAILABLE).
    pub failures: u64,
    pub in_flight: usize,
    /// False while it sits out after failures.
    pub in_service: bool,
}

pub(crate) struct Pool {
    targets: Vec<Target>,
    members: RwLock<Arc<Vec<Arc<Member>>>>,
    resolver: Arc<dyn Resolve>,
    settings: ChannelSettings,
    jitter: Jitter,
    last_resolve: Mutex<Instant>,
    /// One lookup at a time, so a slow one cannot overwrite a newer list.
    resolving: tokio::sync::Mutex<()>,
}

impl Pool {
    /// Parses and resolves the targets; fails unless at least one address came out. Names are
    /// resolved again every `resolve_interval` for as long as the pool lives.
    pub(crate) async fn new(
        targets: &[String],
        settings: ChannelSettings,
        resolver: Arc<dyn Resolve>,
        resolve_interval: Duration,
    ) -> Result<Arc<Pool>, ClientError> {
        if targets.is_empty() {
            return Err(ClientError::Config("no endpoint given".into()));
        }
        let targets = targets
            .iter()
            .map(|t| Target::parse(t, settings.tls.is_some()))
            .collect::<Result<Vec<_>, _>>()?;
        let pool = Arc::new(Pool {
            targets,
            members: RwLock::new(Arc::new(Vec::new())),
            resolver,
            settings,
            jitter: Jitter::new(),
            last_resolve: Mutex::new(Instant::now()),
            resolving: tokio::sync::Mutex::new(()),
        });
        let errors = pool.resolve().await?;
        if pool.members().is_empty() {
            let given: Vec<_> = pool.targets.iter().map(|t| t.given.as_str()).collect();
            return Err(ClientError::NoEndpoints(format!("{} ({})", given.join(", "), errors.join("; "))));
        }
        if pool.targets.iter().any(|t| t.literal.is_none()) {
            tokio::spawn(refresh_every(Arc::downgrade(&pool), resolve_interval));
        }
        Ok(pool)
    }

    fn members(&self) -> Arc<Vec<Arc<Member>>> {
        self.members.read().expect("members lock").clone()
    }

    /// Resolves every target and replaces the member list, keeping the members (connections and
    /// records) of addresses that are still there. A target whose lookup fails or comes back
    /// empty keeps the members it had: a DNS blip must not empty the pool. Returns the lookup
    /// errors.
    async fn resolve(&self) -> Result<Vec<String>, ClientError> {
        let _one_at_a_time = self.resolving.lock().await;
        *self.last_resolve.lock().expect("resolve lock") = Instant::now();
        let old = self.members();
        let mut members = Vec::new();
        let mut errors = Vec::new();
        for (index, target) in self.targets.iter().enumerate() {
            let found = match target.literal {
                Some(ip) => Ok(vec![SocketAddr::new(ip, target.port)]),
                None => self.resolver.resolve(&target.host, target.port).await,
            };
            let mut addrs = match found {
                Ok(addrs) if !addrs.is_empty() => addrs,
                other => {
                    errors.push(match other {
                        Err(e) => format!("{}: {e}", target.given),
                        Ok(_) => format!("{}: no address", target.given),
                    });
                    members.extend(old.iter().filter(|m| m.target == index).cloned());
                    continue;
                }
            };
            addrs.sort();
            addrs.dedup();
            for addr in addrs {
                match old.iter().find(|m| m.target == index && m.addr == addr) {
                    Some(kept) => members.push(kept.clone()),
                    None => match self.member(index, addr) {
                        Ok(member) => members.push(Arc::new(member)),
                        Err(e) => errors.push(e.to_string()),
                    },
                }
            }
        }
        *self.members.write().expect("members lock") = Arc::new(members);
        Ok(errors)
    }

    fn member(&self, target: usize, addr: SocketAddr) -> Result<Member, ClientError> {
        let t = &self.targets[target];
        let scheme = if t.tls { "https" } else { "http" };
        let config = |e: tonic::transport::Error| ClientError::Config(format!("endpoint {}: {e}", t.given));
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(config)?
            .origin(t.origin().parse().map_err(|e| ClientError::Config(format!("endpoint {}: {e}", t.given)))?)
            .connect_timeout(self.settings.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        if t.tls {
            let tls = self.settings.tls.clone().unwrap_or_default();
            endpoint = endpoint.tls_config(tls.client_config(&t.host)).map_err(config)?;
        }
        Ok(Member {
            target,
            addr,
            channel: endpoint.connect_lazy(),
            in_flight: AtomicUsize::new(0),
            calls: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            health: Mutex::new(Health::default()),
        })
    }

    /// The member for the next attempt: the less busy of two in service, avoiding `avoid` (the
    /// one that just failed) when another is in service. With none in service, the one due back
    /// first, and the names are looked up again (at most once a second).
    pub(crate) fn pick(self: &Arc<Self>, avoid: Option<&Arc<Member>>) -> Option<Lease> {
        let members = self.members();
        let now = Instant::now();
        let mut up: Vec<&Arc<Member>> = members.iter().filter(|m| m.in_service(now)).collect();
        if up.len() > 1 {
            if let Some(avoid) = avoid {
                up.retain(|m| !Arc::ptr_eq(m, avoid));
            }
        }
        let chosen = match up.len() {
            0 => {
                self.resolve_soon();
                members.iter().min_by_key(|m| m.due_back())?
            }
            1 => up[0],
            n => {
                let a = self.jitter.below(n);
                let b = (a + 1 + self.jitter.below(n - 1)) % n;
                let (a, b) = (up[a], up[b]);
                if b.in_flight.load(Ordering::Relaxed) < a.in_flight.load(Ordering::Relaxed) { b } else { a }
            }
        };
        Some(Lease::new(chosen.clone()))
    }

    /// Whether a member other than `member` is in service.
    pub(crate) fn another_in_service(&self, member: &Arc<Member>) -> bool {
        let now = Instant::now();
        self.members().iter().any(|m| !Arc::ptr_eq(m, member) && m.in_service(now))
    }

    fn resolve_soon(self: &Arc<Self>) {
        if self.targets.iter().all(|t| t.literal.is_some()) {
            return;
        }
        let mut last = self.last_resolve.lock().expect("resolve lock");
        if last.elapsed() < Duration::from_secs(1) {
            return;
        }
        *last = Instant::now();
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            if let Some(pool) = pool.upgrade() {
                let _ = pool.resolve().await;
            }
        });
    }

    pub(crate) fn stats(&self) -> Vec<EndpointStats> {
        let now = Instant::now();
        self.members()
            .iter()
            .map(|m| EndpointStats {
                target: self.targets[m.target].given.clone(),
                address: m.addr,
                calls: m.calls.load(Ordering::Relaxed),
                failures: m.failures.load(Ordering::Relaxed),
                in_flight: m.in_flight.load(Ordering::Relaxed),
                in_service: m.in_service(now),
            })
            .collect()
    }
}

async fn refresh_every(pool: Weak<Pool>, interval: Duration) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        match pool.resolve().await {
            Ok(errors) => {
                for e in errors {
                    tracing::warn!(error = %e, "embedding endpoint lookup failed; keeping the addresses known");
                }
            }
            Err(e) => tracing::warn!(error = %e, "embedding endpoint lookup failed"),
        }
    }
}

impl Tls {
    fn client_config(&self, host: &str) -> ClientTlsConfig {
        let mut config = ClientTlsConfig::new();
        config = match &self.ca_pem {
            Some(pem) => config.ca_certificate(tonic::transport::Certificate::from_pem(pem)),
            None => config.with_native_roots(),
        };
        if let Some((cert, key)) = &self.identity {
            config = config.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        config.domain_name(self.domain.clone().unwrap_or_else(|| host.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_with_defaults_for_scheme_and_port() {
        let t = Target::parse("10.0.0.5:50051", false).unwrap();
        assert_eq!((t.host.as_str(), t.port, t.tls, t.literal.is_some()), ("10.0.0.5", 50051, false, true));
        let t = Target::parse("embed.internal", true).unwrap();
        assert_eq!((t.port, t.tls, t.literal), (443, true, None));
        assert_eq!(t.origin(), "https://embed.internal:443");
        let t = Target::parse("http://[::1]:7000", false).unwrap();
        assert_eq!((t.host.as_str(), t.origin().as_str()), ("::1", "http://[::1]:7000"));
        assert!(Target::parse("https://embed:1", false).unwrap().tls);
        for bad in ["ftp://x:1", "http://x:1/path", "http://:80", ""] {
            assert!(matches!(Target::parse(bad, false), Err(ClientError::Config(_))), "{bad:?}");
        }
    }
}

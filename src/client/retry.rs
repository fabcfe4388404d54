//! Retries: which failures deserve another attempt, and how long to wait before it.
//!
//! An embedding is a pure function of the request, so repeating a call is always safe. Retried:
//! RESOURCE_EXHAUSTED (refused at admission or a full queue; the server says when to come back
//! with google.rpc.RetryInfo), UNAVAILABLE (draining, unreachable, connection refused), and the
//! CANCELLED or UNKNOWN that tonic reports itself when a connection breaks under a call (a status
//! with a transport error as its source, as opposed to one the server sent). Everything else is
//! final: the caller's mistakes (INVALID_ARGUMENT, NOT_FOUND, UNAUTHENTICATED, ...), INTERNAL,
//! and DEADLINE_EXCEEDED.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::StatusExt;

/// How often and how patiently a call is repeated. The call's deadline bounds it all: no wait
/// runs past it.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1: never retry).
    pub max_attempts: u32,
    /// Wait before the first retry when the server gave no RetryInfo.
    pub initial_backoff: Duration,
    /// Longest wait between attempts the client chooses itself; a longer delay asked for by the
    /// server (RetryInfo) is kept, since an earlier attempt would be refused again.
    pub max_backoff: Duration,
    /// Growth of the wait from one retry to the next.
    pub multiplier: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 6,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            multiplier: 2.0,
        }
    }
}

impl RetryPolicy {
    /// One attempt, no retry.
    pub fn never() -> Self {
        RetryPolicy { max_attempts: 1, ..RetryPolicy::default() }
    }

    /// The wait before retry number `retry` (1 for the first), jittered into [½, 1] of the
    /// exponential step so that clients refused together do not come back together. A delay the
    /// server asked for is a floor: it is kept, plus up to a fifth for the same reason.
    pub(crate) fn wait(&self, retry: u32, asked: Option<Duration>, jitter: &Jitter) -> Duration {
        match asked {
            // Capped at an hour so that no server can make the arithmetic overflow; the call's
            // deadline cuts it shorter anyway.
            Some(asked) => asked.min(Duration::from_secs(3600)).mul_f64(1.0 + 0.2 * jitter.unit()),
            None => {
                let step = self.multiplier.max(1.0).powi(retry.saturating_sub(1).min(64) as i32);
                let base = self.initial_backoff.as_secs_f64() * step;
                Duration::from_secs_f64(base.min(self.max_backoff.as_secs_f64()) * (0.5 + 0.5 * jitter.unit()))
            }
        }
    }
}

/// What a failed attempt means for the call and for the endpoint that answered.
#[derive(Debug, PartialEq)]
pub(crate) enum Verdict {
    /// Give the status to the caller.
    Final,
    /// Try again, not before `after` if the server said so. `endpoint_fault`: the endpoint could
    /// not serve at all (unreachable, broken connection, draining), so it sits out for a while.
    Retry { after: Option<Duration>, endpoint_fault: bool },
}

pub(crate) fn classify(status: &Status) -> Verdict {
    match status.code() {
        Code::ResourceExhausted => Verdict::Retry { after: retry_delay(status), endpoint_fault: false },
        Code::Unavailable => Verdict::Retry { after: retry_delay(status), endpoint_fault: true },
        Code::Cancelled | Code::Unknown if std::error::Error::source(status).is_some() => {
            Verdict::Retry { after: None, endpoint_fault: true }
        }
        _ => Verdict::Final,
    }
}

fn retry_delay(status: &Status) -> Option<Duration> {
    status.get_details_retry_info().and_then(|info| info.retry_delay)
}

/// A cheap source of uniform numbers for jitter and random choices (splitmix64 over a counter,
/// seeded from the process's hash keys); not for anything that needs to be unpredictable.
pub(crate) struct Jitter(AtomicU64);

impl Jitter {
    pub(crate) fn new() -> Jitter {
        Jitter(AtomicU64::new(RandomState::new().build_hasher().finish()))
    }

    pub(crate) fn next(&self) -> u64 {
        let mut z = self.0.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed).wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub(crate) fn unit(&self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n); n > 0.
    pub(crate) fn below(&self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::{ErrorDetails, StatusExt};

    #[test]
    fn overload_is_retried_after_the_delay_the_server_asked_for() {
        let details = ErrorDetails::with_retry_info(Some(Duration::from_millis(100)));
        let status = Status::with_error_details(Code::ResourceExhausted, "busy", details);
        assert_eq!(
            classify(&status),
            Verdict::Retry { after: Some(Duration::from_millis(100)), endpoint_fault: false }
        );
        let jitter = Jitter::new();
        for _ in 0..100 {
            let wait = RetryPolicy::default().wait(1, Some(Duration::from_millis(100)), &jitter);
            assert!(wait >= Duration::from_millis(100) && wait <= Duration::from_millis(120), "{wait:?}");
        }
    }

    #[test]
    fn unavailable_blames_the_endpoint_and_caller_mistakes_are_final() {
        assert_eq!(classify(&Status::unavailable("draining")), Verdict::Retry { after: None, endpoint_fault: true });
        for code in [Code::InvalidArgument, Code::NotFound, Code::Unauthenticated, Code::Internal, Code::DeadlineExceeded] {
            assert_eq!(classify(&Status::new(code, "x")), Verdict::Final, "{code:?}");
        }
        // CANCELLED sent by a server (no transport error under it) is the server's word: final.
        assert_eq!(classify(&Status::cancelled("by server")), Verdict::Final);
    }

    #[test]
    fn a_broken_connection_is_retried_on_another_endpoint() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        let status = Status::from_error(Box::new(io));
        assert_eq!(status.code(), Code::Unknown);
        assert_eq!(classify(&status), Verdict::Retry { after: None, endpoint_fault: true });
    }

    #[test]
    fn a_huge_retry_delay_is_capped_instead_of_overflowing() {
        let wait = RetryPolicy::default().wait(1, Some(Duration::MAX), &Jitter::new());
        assert!(wait >= Duration::from_secs(3600) && wait <= Duration::from_secs(4320), "{wait:?}");
    }

    #[test]
    fn backoff_grows_by_the_multiplier_up_to_the_cap_with_jitter_inside_half_to_full() {
        let policy = RetryPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(500),
            multiplier: 2.0,
            ..RetryPolicy::default()
        };
        let jitter = Jitter::new();
        for (retry, full) in [(1, 100), (2, 200), (3, 400), (4, 500), (30, 500)] {
            for _ in 0..50 {
                let wait = policy.wait(retry, None, &jitter).as_secs_f64() * 1000.0;
                assert!(wait >= full as f64 / 2.0 - 1e-6 && wait <= full as f64 + 1e-6, "retry {retry}: {wait}");
            }
        }
    }

    #[test]
    fn jitter_is_uniform_enough_to_spread_choices() {
        let jitter = Jitter::new();
        let mut seen = [0u32; 4];
        for _ in 0..4000 {
            seen[jitter.below(4)] += 1;
        }
        assert!(seen.iter().all(|&n| (800..1200).contains(&n)), "{seen:?}");
    }
}

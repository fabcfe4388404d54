//! The request side of one `EmbedStream`: its messages are read as they arrive, ahead of their
//! answers, into a queue the handler works through in order.
//!
//! Why read ahead: HTTP/2 (h2) guards against floods of small DATA frames by closing the whole
//! connection (GOAWAY `ENHANCE_YOUR_CALM`) when too many received small frames sit unread. Bulk
//! ingest sends exactly that, one small message per frame; leaving them unread while earlier ones
//! are computed (or while the stream is paced) would close every call on the connection. So the
//! flow control that holds a client back is ours, in bytes: a stream may run `max_pending` bytes
//! ahead of its answers (each message counted as its encoded size plus [`STREAM_MESSAGE_OVERHEAD`]);
//! further ahead, it is ended with RESOURCE_EXHAUSTED after the answers owed before that point.
//!
//! A stream that owes no answer and sends nothing for `idle_timeout` is ended with
//! DEADLINE_EXCEEDED: an open stream holds a place among `max_concurrent_requests`, and a stuck or
//! forgotten client must not keep it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::Stream;
use prost::Message;
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use crate::config::STREAM_MESSAGE_OVERHEAD;
use crate::error::Error;
use crate::grpc::observe::Call;
use crate::grpc::pb;

/// A message read, with what it counts against `max_pending` until it is answered.
pub struct Queued {
    pub request: pb::EmbedRequest,
    pub cost: usize,
}

/// What the reader and the handler of one stream share.
pub struct Ledger {
    /// Bytes of messages read and not yet answered.
    pending: AtomicUsize,
    /// When the stream last did something: a message read or an answer sent.
    last_activity: Mutex<Instant>,
}

impl Ledger {
    fn touch(&self) {
        *self.last_activity.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    /// An answer for a message of `cost` went out.
    pub fn answered(&self, cost: usize) {
        self.pending.fetch_sub(cost, Ordering::SeqCst);
        self.touch();
    }
}

/// Limits of one stream's read-ahead.
#[derive(Debug, Clone, Copy)]
pub struct ReadAhead {
    pub max_pending: usize,
    pub idle_timeout: Duration,
}

/// Starts reading `incoming` on a task of its own; returns the queue of its messages (an error
/// ends the queue: the client's, or ours when the stream runs too far ahead or goes idle) and the
/// ledger the handler reports answers to. Reading stops when the queue's receiver is dropped.
pub fn read_ahead(incoming: Streaming<pb::EmbedRequest>, limits: ReadAhead) -> (impl Stream<Item = Result<Queued, Status>>, Arc<Ledger>) {
    let ledger = Arc::new(Ledger { pending: AtomicUsize::new(0), last_activity: Mutex::new(Instant::now()) });
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(read(incoming, tx, Arc::clone(&ledger), limits));
    (futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)), ledger)
}

async fn read(mut incoming: Streaming<pb::EmbedRequest>, tx: mpsc::UnboundedSender<Result<Queued, Status>>, ledger: Arc<Ledger>, limits: ReadAhead) {
    let last_activity = || *ledger.last_activity.lock().unwrap_or_else(|e| e.into_inner());
    // While answers are owed the stream is not idle, however long they take.
    let mut owed_at = Instant::now();
    loop {
        let idle_at = last_activity().max(owed_at) + limits.idle_timeout;
        let next = tokio::select! {
            _ = tx.closed() => return,
            next = tokio::time::timeout_at(idle_at.into(), incoming.message()) => next,
        };
        let outcome = match next {
            Err(_) if ledger.pending.load(Ordering::SeqCst) > 0 => {
                owed_at = Instant::now();
                continue;
            }
            Err(_) if last_activity().elapsed() < limits.idle_timeout => continue,
            Err(_) => Err(ended(Error::DeadlineExceeded(format!(
                "the stream sent nothing for {:?} with no answer owed (limits.stream_idle_timeout)", limits.idle_timeout)))),
            Ok(Ok(Some(request))) => {
                let cost = request.encoded_len() + STREAM_MESSAGE_OVERHEAD;
                let pending = ledger.pending.fetch_add(cost, Ordering::SeqCst) + cost;
                ledger.touch();
                if pending > limits.max_pending {
                    Err(ended(Error::Overloaded(format!(
                        "the stream ran {pending} bytes ahead of its answers, past limits.max_stream_pending_bytes ({}); \
                         wait for answers before sending more", limits.max_pending))))
                } else {
                    Ok(Queued { request, cost })
                }
            }
            Ok(Ok(None)) => return,
            Ok(Err(status)) => Err(status),
        };
        let last = outcome.is_err();
        if tx.send(outcome).is_err() || last {
            return;
        }
    }
}

/// The status that ends a stream for a reason of ours (idle, too far ahead), counted as an
/// `EmbedStream` call as each answered message is.
fn ended(e: Error) -> Status {
    // No model is known for the stream as a whole: counted like the other calls answered before
    // a handler saw a model.
    Call::start("EmbedStream", "unknown".into(), String::new()).refuse(Status::from(e))
}

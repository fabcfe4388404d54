//! Bulk ingest: a stream of texts of any length becomes bounded requests (at most `batch_items`
//! texts, about `batch_bytes` bytes), `concurrency` of them in flight across the endpoints, and
//! comes back as a stream of embedded batches in input order. Each request is retried on its own,
//! so an endpoint lost mid-ingest costs a retry of its requests, not the ingest; a request that
//! fails for good hands its texts back with the error, so nothing is lost silently.

use std::ops::Range;
use std::pin::Pin;
use std::time::Duration;

use futures_util::stream::{self, Stream, StreamExt};

use super::{decode, with_texts, Client, ClientError, EmbedOptions, Embedded};

/// A request of an ingest that failed after its retries, with its texts handed back.
#[derive(Debug, thiserror::Error)]
#[error("texts {first_index}..{}: {error}", .first_index + .items.len() as u64)]
pub struct IngestError<T: std::fmt::Debug> {
    /// The texts of the failed request, as given.
    pub items: Vec<T>,
    /// Position of the first of them in the input.
    pub first_index: u64,
    #[source]
    pub error: ClientError,
}

/// Splits texts of these byte lengths into ranges of at most `max_items` texts whose lengths add
/// up to at most `max_bytes`; a text longer than `max_bytes` goes alone.
pub(crate) fn split(lengths: impl Iterator<Item = usize>, max_items: usize, max_bytes: usize) -> Vec<Range<usize>> {
    let mut ranges = Vec::new();
    let (mut start, mut bytes, mut end) = (0, 0, 0);
    for len in lengths {
        if end > start && !fits(end - start, bytes, len, max_items, max_bytes) {
            ranges.push(start..end);
            (start, bytes) = (end, 0);
        }
        bytes += len;
        end += 1;
    }
    if end > start {
        ranges.push(start..end);
    }
    ranges
}

/// Whether one more text of `len` bytes joins a request of `count` texts and `bytes` bytes.
fn fits(count: usize, bytes: usize, len: usize, max_items: usize, max_bytes: usize) -> bool {
    count < max_items && bytes + len <= max_bytes
}

struct Chunker<T, S> {
    input: Pin<Box<S>>,
    held: Option<T>,
    next_index: u64,
    done: bool,
}

/// Groups the input into requests as it arrives. A request goes when full, at the end of the
/// input, or when the input has been quiet for `linger` (a trickle is not held back).
fn chunks<T, S>(input: S, max_items: usize, max_bytes: usize, linger: Duration) -> impl Stream<Item = (u64, Vec<T>)>
where
    T: AsRef<str>,
    S: Stream<Item = T>,
{
    let state = Chunker { input: Box::pin(input), held: None, next_index: 0, done: false };
    stream::unfold(state, move |mut st| async move {
        let mut items: Vec<T> = st.held.take().into_iter().collect();
        let mut bytes: usize = items.iter().map(|t| t.as_ref().len()).sum();
        while !st.done && items.len() < max_items {
            let next = if items.is_empty() {
                st.input.next().await
            } else {
                match tokio::time::timeout(linger, st.input.next()).await {
                    Ok(next) => next,
                    Err(_) => break,
                }
            };
            let Some(text) = next else {
                st.done = true;
                break;
            };
            let len = text.as_ref().len();
            if !items.is_empty() && !fits(items.len(), bytes, len, max_items, max_bytes) {
                st.held = Some(text);
                break;
            }
            bytes += len;
            items.push(text);
        }
        if items.is_empty() {
            return None;
        }
        let first = st.next_index;
        st.next_index += items.len() as u64;
        Some(((first, items), st))
    })
}

impl Client {
    /// Embeds a stream of texts (any `AsRef<str>`: a `String`, or a document type that carries
    /// its id) and yields `(text, embedding)` batches in input order. Each input item comes out
    /// exactly once: in an `Ok` batch, or handed back in the `IngestError` of its request.
    pub fn ingest<T, S>(
        &self,
        model: &str,
        options: &EmbedOptions,
        input: S,
    ) -> impl Stream<Item = Result<Vec<(T, Embedded)>, IngestError<T>>> + Send + 'static
    where
        T: AsRef<str> + std::fmt::Debug + Send + 'static,
        S: Stream<Item = T> + Send + 'static,
    {
        let inner = &self.inner;
        let template = options.request(model);
        let client = self.clone();
        chunks(input, inner.batch_items, inner.batch_bytes, inner.linger)
            .map(move |(first_index, items)| {
                let client = client.clone();
                let request = with_texts(&template, items.iter().map(|t| t.as_ref()));
                async move {
                    let result = client.embed(request).await.and_then(|response| decode(response, items.len()));
                    match result {
                        Ok(embedded) => Ok(items.into_iter().zip(embedded).collect()),
                        Err(error) => Err(IngestError { items, first_index, error }),
                    }
                }
            })
            .buffered(inner.concurrency)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_bounds_items_and_bytes_and_sends_a_long_text_alone() {
        assert_eq!(split([1, 1, 1, 1, 1].into_iter(), 2, 100), vec![0..2, 2..4, 4..5]);
        assert_eq!(split([40, 40, 40].into_iter(), 10, 100), vec![0..2, 2..3]);
        assert_eq!(split([10, 500, 10].into_iter(), 10, 100), vec![0..1, 1..2, 2..3]);
        assert_eq!(split(std::iter::empty(), 4, 4), Vec::<Range<usize>>::new());
    }

    #[tokio::test]
    async fn chunks_cover_the_input_once_in_order_within_the_bounds() {
        let texts: Vec<String> = (0..103).map(|i| "x".repeat(i % 17)).collect();
        let out: Vec<(u64, Vec<String>)> = chunks(stream::iter(texts.clone()), 8, 40, Duration::from_secs(1)).collect().await;
        let mut next = 0u64;
        let mut seen = Vec::new();
        for (first, items) in &out {
            assert_eq!(*first, next);
            assert!(items.len() <= 8);
            let bytes: usize = items.iter().map(|t| t.len()).sum();
            assert!(bytes <= 40 || items.len() == 1, "{bytes}");
            next += items.len() as u64;
            seen.extend(items.iter().cloned());
        }
        assert_eq!(seen, texts);
        let expected = split(texts.iter().map(|t| t.len()), 8, 40);
        assert_eq!(out.iter().map(|(_, items)| items.len()).collect::<Vec<_>>(), expected.iter().map(|r| r.len()).collect::<Vec<_>>());
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_input_sends_what_it_has_after_the_linger() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let mut out = Box::pin(chunks(tokio_stream_from(rx), 100, 1 << 20, Duration::from_millis(20)));
        tx.send("a".into()).unwrap();
        tx.send("b".into()).unwrap();
        let started = tokio::time::Instant::now();
        let (first, items) = out.next().await.unwrap();
        assert_eq!((first, items), (0, vec!["a".to_string(), "b".to_string()]));
        assert_eq!(started.elapsed(), Duration::from_millis(20));
        tx.send("c".into()).unwrap();
        drop(tx);
        assert_eq!(out.next().await.unwrap(), (2, vec!["c".to_string()]));
        assert!(out.next().await.is_none());
    }

    fn tokio_stream_from(mut rx: tokio::sync::mpsc::UnboundedReceiver<String>) -> impl Stream<Item = String> {
        stream::poll_fn(move |cx| rx.poll_recv(cx))
    }
}

//! Batch formation for one model's queue — pure logic, no MLX, unit-tested.
//!
//! Sequences wait in arrival order. A batch always contains the oldest sequence (so nothing
//! starves), then the queued sequences closest to it in length (so padding stays small), while the
//! padded cost (longest × count) fits `max_tokens` and the count fits `max_size`. A queue that
//! cannot fill a batch waits up to `max_wait` after its oldest arrival for more work.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// One tokenized text waiting for the model.
#[derive(Debug, Clone)]
pub struct Seq {
    /// The request it belongs to, and its place there.
    pub job: u64,
    pub index: usize,
    pub ids: Vec<u32>,
    pub enqueued: Instant,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_tokens: usize,
    pub max_size: usize,
    pub max_wait: Duration,
    /// How long the engine polls for work before sleeping when it has nothing to do (see the
    /// config's `batching.idle_spin`).
    pub idle_spin: Duration,
}

/// What the queue should do now.
#[derive(Debug)]
pub enum Next {
    /// Nothing queued.
    Idle,
    /// Work is queued but a fuller batch may come: look again at this instant.
    WaitUntil(Instant),
    /// Run these sequences, sorted by length.
    Run(Vec<Seq>),
}

#[derive(Debug, Default)]
pub struct Queue {
    seqs: VecDeque<Seq>,
}

impl Queue {
    pub fn push(&mut self, s: Seq) {
        self.seqs.push_back(s);
    }

    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Removes every sequence `keep` rejects (e.g. of requests whose caller left); returns how many.
    pub fn retain(&mut self, mut keep: impl FnMut(&Seq) -> bool) -> usize {
        let before = self.seqs.len();
        self.seqs.retain(|s| keep(s));
        before - self.seqs.len()
    }

    /// Decides what to run at `now`.
    pub fn next(&mut self, now: Instant, limits: Limits) -> Next {
        let Some(oldest) = self.seqs.front() else { return Next::Idle };
        let pick = self.choose(limits);
        // A full batch, or everything queued fits and the oldest has waited long enough: run.
        let full = pick.len() >= limits.max_size || pick.len() < self.seqs.len();
        let deadline = oldest.enqueued + limits.max_wait;
        if !full && now < deadline {
            return Next::WaitUntil(deadline);
        }
        let mut chosen: Vec<Seq> = Vec::with_capacity(pick.len());
        let mut taken = vec![false; self.seqs.len()];
        for &i in &pick {
            taken[i] = true;
        }
        let mut rest = VecDeque::with_capacity(self.seqs.len() - pick.len());
        for (i, s) in self.seqs.drain(..).enumerate() {
            if taken[i] { chosen.push(s) } else { rest.push_back(s) }
        }
        self.seqs = rest;
        chosen.sort_by_key(|s| s.ids.len());
        Next::Run(chosen)
    }

    /// Indices of the batch: the oldest, then the closest in length, within the limits.
    fn choose(&self, limits: Limits) -> Vec<usize> {
        let anchor = self.seqs[0].ids.len();
        let mut order: Vec<usize> = (1..self.seqs.len()).collect();
        order.sort_by_key(|&i| (self.seqs[i].ids.len().abs_diff(anchor), i));
        let mut pick = vec![0];
        let mut longest = anchor.max(1);
        for i in order {
            if pick.len() >= limits.max_size {
                break;
            }
            let l = longest.max(self.seqs[i].ids.len());
            if l * (pick.len() + 1) <= limits.max_tokens {
                pick.push(i);
                longest = l;
            }
        }
        pick
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(job: u64, len: usize, at: Instant) -> Seq {
        Seq { job, index: 0, ids: vec![1; len], enqueued: at }
    }

    const LIMITS: Limits = Limits { max_tokens: 64, max_size: 4, max_wait: Duration::from_millis(5), idle_spin: Duration::ZERO };

    #[test]
    fn a_lone_request_waits_for_company_then_runs() {
        let t0 = Instant::now();
        let mut q = Queue::default();
        q.push(seq(1, 8, t0));
        assert!(matches!(q.next(t0, LIMITS), Next::WaitUntil(t) if t == t0 + LIMITS.max_wait));
        match q.next(t0 + LIMITS.max_wait, LIMITS) {
            Next::Run(b) => assert_eq!(b.len(), 1),
            other => panic!("{other:?}"),
        }
        assert!(matches!(q.next(t0, LIMITS), Next::Idle));
    }

    #[test]
    fn a_full_batch_runs_at_once() {
        let t0 = Instant::now();
        let mut q = Queue::default();
        for j in 0..5 {
            q.push(seq(j, 4, t0));
        }
        match q.next(t0, LIMITS) {
            Next::Run(b) => assert_eq!(b.len(), 4),
            other => panic!("{other:?}"),
        }
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn the_token_budget_counts_padding() {
        let t0 = Instant::now();
        let mut q = Queue::default();
        q.push(seq(0, 30, t0));
        q.push(seq(1, 2, t0));
        q.push(seq(2, 2, t0));
        // 30 × 3 = 90 > 64 padded tokens: only two fit, the oldest and one short one.
        match q.next(t0, LIMITS) {
            Next::Run(b) => {
                assert_eq!(b.len(), 2);
                assert!(b.iter().any(|s| s.job == 0));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn batches_group_similar_lengths_and_come_out_sorted() {
        let t0 = Instant::now();
        let mut q = Queue::default();
        for (j, len) in [10, 2, 11, 3, 9, 12].into_iter().enumerate() {
            q.push(seq(j as u64, len, t0));
        }
        let Next::Run(b) = q.next(t0, LIMITS) else { panic!() };
        let lens: Vec<usize> = b.iter().map(|s| s.ids.len()).collect();
        assert_eq!(lens, vec![9, 10, 11, 12]);
    }

    #[test]
    fn the_oldest_is_always_in_the_next_batch() {
        let t0 = Instant::now();
        let mut q = Queue::default();
        q.push(seq(0, 60, t0));
        for j in 1..10 {
            q.push(seq(j, 1, t0 + Duration::from_millis(1)));
        }
        let Next::Run(b) = q.next(t0, LIMITS) else { panic!() };
        assert_eq!(b.iter().map(|s| s.job).collect::<Vec<_>>(), vec![0]);
    }

    #[test]
    fn a_sequence_longer_than_the_budget_still_runs_alone() {
        let t0 = Instant::now();
        let mut q = Queue::default();
        q.push(seq(0, 500, t0));
        q.push(seq(1, 5, t0));
        let Next::Run(b) = q.next(t0, LIMITS) else { panic!() };
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].job, 0);
    }

    #[test]
    fn retain_drops_abandoned_work() {
        let t0 = Instant::now();
        let mut q = Queue::default();
        for j in 0..4 {
            q.push(seq(j, 3, t0));
        }
        assert_eq!(q.retain(|s| s.job % 2 == 0), 2);
        assert_eq!(q.len(), 2);
    }
}

//! The engine's memory: MLX's memory and cache limits, set from the config (`memory:`) when the
//! engine starts, and memory handed back to the system once the engine has been idle.
//!
//! Without a cache limit MLX's GPU allocators keep every buffer a batch frees, up to the memory
//! limit (most of the card), and on the CPU the allocator under MLX keeps the pages of large
//! batches after they end. The limits bound what is held while serving; the release after an idle
//! period returns the rest, at the price of the next batch taking its memory from the system
//! again.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::config::{MemoryConfig, MemorySize};
use crate::mlx;

use super::Stats;

/// MLX's memory limit on a GPU where the config sets none. MLX's CUDA backend keeps a buffer
/// until the kernels using it have run, and the host hands over a large batch's kernels much
/// faster than the device runs them, so most of a forward's intermediates are alive at once; past
/// the limit MLX waits for running work before handing over more (MLX's own limit is 95% of the
/// card). README, "Memory", has the measurements.
const GPU_MEMORY_LIMIT: MemorySize = MemorySize::Share(0.25);
/// MLX's cache limit where the config sets none. On a GPU a batch frees buffers of the same few
/// padded shapes the next one asks for, and a cache miss is a device allocation; MLX's own default
/// there (its memory limit) lets the cache grow to most of the card.
const GPU_CACHE_LIMIT: u64 = 1 << 30;
/// MLX's own on the CPU: batches run at their exact shapes, so a larger cache fills with buffers
/// of sizes no later batch asks for.
const CPU_CACHE_LIMIT: u64 = 32 << 20;

/// Owned by the engine thread.
pub(super) struct Memory {
    release_after_idle: Duration,
    /// The `device` label of MLX's memory counters.
    device: &'static str,
    /// Whether MLX has run since memory was last handed back.
    owed: bool,
    /// MLX's memory limit as it stands after the start.
    limit: Option<usize>,
}

impl Memory {
    /// Sets MLX's limits from `config` (a share needs the device's memory: when unknown, the
    /// limit is left at MLX's default, with an error logged) and records them.
    pub fn start(config: &MemoryConfig, device: &'static str, stats: &Stats) -> Memory {
        let total = mlx::memory::device_memory();
        let resolve = |field: &str, size: MemorySize| {
            let bytes = size.bytes(total).map(|b| usize::try_from(b).unwrap_or(usize::MAX));
            if bytes.is_none() {
                tracing::error!(field, "the device's memory is unknown: a share cannot be worked out; MLX's default stays");
            }
            bytes
        };
        let limit = config.limit.or((device == "gpu").then_some(GPU_MEMORY_LIMIT));
        if let Some(limit) = limit.and_then(|l| resolve("memory.limit", l)) {
            if let Err(e) = mlx::memory::set_memory_limit(limit) {
                tracing::error!(error = %e, "memory.limit could not be set");
            }
        }
        let mut cache_limit = None;
        let default = MemorySize::Bytes(if device == "gpu" { GPU_CACHE_LIMIT } else { CPU_CACHE_LIMIT });
        if let Some(limit) = resolve("memory.cache_limit", config.cache_limit.unwrap_or(default)) {
            match mlx::memory::set_cache_limit(limit) {
                Ok(_) => cache_limit = Some(limit),
                Err(e) => tracing::error!(error = %e, "memory.cache_limit could not be set"),
            }
        }
        let limit = mlx::memory::memory_limit().ok();
        tracing::info!(device, device_memory = total, memory_limit = limit, cache_limit,
            release_after_idle = ?config.release_after_idle, "MLX memory limits");
        for (kind, value) in [("memory", limit), ("cache", cache_limit)] {
            if let Some(v) = value {
                metrics::gauge!(crate::metrics::MLX_MEMORY_LIMIT, "device" => device, "kind" => kind).set(v as f64);
            }
        }
        metrics::counter!(crate::metrics::IDLE_RELEASES).absolute(0);
        stats.mlx_memory_limit.store(limit.map_or(u64::MAX, |l| l as u64), Ordering::Relaxed);
        stats.mlx_cache_limit.store(cache_limit.map_or(u64::MAX, |c| c as u64), Ordering::Relaxed);
        Memory { release_after_idle: config.release_after_idle, device, owed: true, limit }
    }

    /// Warns when the arrays held after a model's load (its weights, and those of the models
    /// before it) take half the memory limit or more: MLX would then wait for running work often.
    pub fn loaded(&self, model: &str) {
        let active = mlx::memory_stats().active;
        if let Some(limit) = self.limit.filter(|&l| active >= l / 2) {
            tracing::warn!(model, weights = active, memory_limit = limit,
                "the models' weights take half of MLX's memory limit or more: raise memory.limit");
        }
    }

    /// Notes that MLX ran (a batch, a model's load): memory is owed back once idle.
    pub fn used(&mut self) {
        self.owed = true;
    }

    /// How long the engine may stay idle before [`Memory::release`] is due (`None`: nothing owed).
    pub fn release_due(&self) -> Option<Duration> {
        (self.owed && !self.release_after_idle.is_zero()).then_some(self.release_after_idle)
    }

    /// Empties MLX's cache and hands the allocator's free pages back to the system.
    pub fn release(&mut self, stats: &Stats) {
        self.owed = false;
        let before = mlx::memory_stats();
        if let Err(e) = mlx::memory::release_free_memory() {
            tracing::error!(error = %e, "memory could not be handed back");
            return;
        }
        let after = record(self.device, stats);
        stats.memory_releases.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::metrics::IDLE_RELEASES).increment(1);
        tracing::debug!(mlx_cache_before = before.cache, mlx_active = after.active, "idle: memory handed back");
    }
}

/// Records MLX's counters in the metrics and in `stats`; returns them.
pub(super) fn record(device: &'static str, stats: &Stats) -> mlx::MemoryStats {
    let m = mlx::memory_stats();
    crate::metrics::record_mlx_memory(device, m);
    stats.mlx_active.store(m.active as u64, Ordering::Relaxed);
    stats.mlx_cache.store(m.cache as u64, Ordering::Relaxed);
    m
}

//! MLX's memory counters, limits and cache, and the return of free memory to the system.
//!
//! Memory a batch frees is kept twice before the system sees it again: MLX keeps freed buffers in
//! a cache of its own, up to its cache limit, to reuse them; what goes beyond is freed to the
//! process's allocator (mimalloc on Linux, `src/main.rs`), which keeps free pages for reuse until
//! it purges them, and only purges while threads allocate or free. [`release_free_memory`] empties
//! both, for a service that has gone idle.

use super::ffi::ffi;
use super::Result;

/// MLX's allocator counters, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryStats {
    /// Held by arrays.
    pub active: usize,
    /// The most `active` has been since the start.
    pub peak: usize,
    /// Freed buffers MLX keeps for reuse.
    pub cache: usize,
}

pub fn memory_stats() -> MemoryStats {
    MemoryStats { active: ffi::active_memory(), peak: ffi::peak_memory(), cache: ffi::cache_memory() }
}

/// Sets MLX's memory limit (`mlx::core::set_memory_limit`); returns the one before.
pub fn set_memory_limit(bytes: usize) -> Result<usize> {
    Ok(ffi::set_memory_limit(bytes)?)
}

pub fn memory_limit() -> Result<usize> {
    Ok(ffi::memory_limit()?)
}

/// Sets how much freed memory MLX keeps for reuse (`mlx::core::set_cache_limit`; 0: none);
/// returns the limit before (MLX has no other way to read it). A cache above the new limit
/// shrinks at once on the CPU, at the next allocation on a GPU.
pub fn set_cache_limit(bytes: usize) -> Result<usize> {
    Ok(ffi::set_cache_limit(bytes)?)
}

/// Frees MLX's cached buffers to the allocator.
pub fn clear_cache() -> Result<()> {
    Ok(ffi::clear_cache()?)
}

/// The memory of the device MLX's allocator serves, in bytes: the GPU's when MLX has one (CUDA's
/// total memory; Metal's memory size, on a Mac the unified memory), else the machine's RAM or its
/// control group's limit (a container's), whichever is smaller. `None` when unknown.
pub fn device_memory() -> Option<u64> {
    if super::gpu_is_available() {
        return ["total_memory", "memory_size"].iter().find_map(|key| ffi::gpu_info_size(key).ok()).map(|b| b as u64);
    }
    let ram = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        let kb = m.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.trim().trim_end_matches("kB").trim().parse::<u64>().ok()?;
        Some(kb * 1024)
    })?;
    Some(cgroup_limit().map_or(ram, |c| c.min(ram)))
}

/// The memory limit of this process's control group (v2, else v1), if it has one.
fn cgroup_limit() -> Option<u64> {
    let group = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let v2 = group.lines().find_map(|l| l.strip_prefix("0::")).map(|p| p.trim().to_string());
    let files = [
        v2.map(|p| format!("/sys/fs/cgroup{}/memory.max", p.trim_end_matches('/'))),
        Some("/sys/fs/cgroup/memory.max".to_string()),
        Some("/sys/fs/cgroup/memory/memory.limit_in_bytes".to_string()),
    ];
    // "max" (v2) or a number near u64::MAX (v1) mean no limit; neither parses below 2^62.
    files.into_iter().flatten().find_map(|f| std::fs::read_to_string(f).ok()?.trim().parse::<u64>().ok().filter(|&b| b < 1 << 62))
}

/// Empties MLX's cache, then has the allocator hand the free pages it holds back to the system
/// (`mi_collect(true)`: this thread's heap, the heaps of threads that have ended, and the free
/// ranges of every arena). Call it on the thread that runs MLX, once it is idle: the next batch
/// takes its memory from the system again.
pub fn release_free_memory() -> Result<()> {
    clear_cache()?;
    #[cfg(target_os = "linux")]
    // SAFETY: mi_collect takes no pointers and may be called from any thread at any time.
    unsafe {
        libmimalloc_sys::mi_collect(true)
    };
    Ok(())
}

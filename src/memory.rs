//! What a node does about the C allocator's habits (glibc on Linux; elsewhere
//! these do nothing).
//!
//! glibc gives threads their own heaps ("arenas", by default up to eight per
//! CPU) and keeps what is freed in them for reuse. A node's async workers and
//! blocking threads all allocate during a bulk sync, so after syncing 100,000
//! files both nodes of the benchmark held 160-240 MB, and kept it while idle.
//! With one arena per CPU and the freed memory handed back once the index is
//! quiet, the same run peaks at ~90 MB and idles at ~47 MB, at no measurable
//! cost in speed (`cargo bench --bench sync -- scale`).

/// Caps the allocator's arenas at one per CPU (at least two). Call it first in
/// `main`, before the async runtime starts its threads (arenas already made are
/// kept).
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(
                param: std::os::raw::c_int,
                value: std::os::raw::c_int,
            ) -> std::os::raw::c_int;
        }
        /// glibc's `M_ARENA_MAX`.
        const M_ARENA_MAX: std::os::raw::c_int = -8;
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        let arenas = cpus.clamp(2, 64) as std::os::raw::c_int;
        // SAFETY: mallopt takes no pointer; it only changes a tunable of glibc's
        // allocator, which it guards itself.
        unsafe {
            mallopt(M_ARENA_MAX, arenas);
        }
    }
}

/// Hands the memory free in the allocator's heaps back to the system.
pub fn release_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> std::os::raw::c_int;
        }
        // SAFETY: malloc_trim takes no pointer of ours and only releases memory
        // that is free in glibc's heaps; it is thread-safe.
        unsafe {
            malloc_trim(0);
        }
    }
}

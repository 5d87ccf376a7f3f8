//! The allocator, and what a node does about allocators' habits.
//!
//! Rust's allocations go to jemalloc (the default `jemalloc` feature). With
//! glibc's allocator, the threads of a bulk sync fought over its heaps: of the
//! ~39,000 `futex` calls while syncing `gen.py small` (10,000 files), ~13,500
//! were waits for and wake-ups of a glibc heap lock (`perf record -e
//! syscalls:sys_enter_futex --call-graph dwarf`), because a buffer made on one
//! thread (a QUIC packet, a file's bytes) is freed on another. jemalloc's
//! per-thread caches take most of those without a lock: the same sync uses ~8%
//! less CPU and ends ~8% sooner (medians of 6 interleaved runs), for ~9 MB more
//! at its peak; 100,000 tiny files sync ~23% sooner, with a peak ~17 MB lower.
//! It is tuned for that: two arenas (more only add memory here; the thread
//! caches do the scaling), and freed pages handed back after 200 ms instead of
//! 10 s (`MALLOC_CONF` below; `_RJEM_MALLOC_CONF` overrides it at run time).
//!
//! glibc's allocator still serves the C code (SQLite). It gives threads their
//! own heaps ("arenas", by default up to eight per CPU) and keeps what is freed
//! in them for reuse: those are capped at one per CPU, and the memory free in
//! both allocators is handed back once the index is quiet.

/// jemalloc's tuning, read by jemalloc itself at its first allocation.
#[cfg(feature = "jemalloc")]
#[export_name = "_rjem_malloc_conf"]
pub static MALLOC_CONF: Option<&'static std::os::raw::c_char> =
    // SAFETY: the first byte of a NUL-terminated static string, which is what
    // jemalloc's `malloc_conf` points to.
    Some(unsafe { &*c"narenas:2,dirty_decay_ms:200,muzzy_decay_ms:0".as_ptr() });

#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Caps glibc's arenas at one per CPU (at least two). Call it first in
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

/// Hands the memory free in the allocators' heaps back to the system.
pub fn release_freed() {
    #[cfg(feature = "jemalloc")]
    purge_jemalloc();
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

/// Hands jemalloc's free pages in every arena back to the system; returns
/// mallctl's result (0 when done).
#[cfg(feature = "jemalloc")]
fn purge_jemalloc() -> std::os::raw::c_int {
    // `MALLCTL_ARENAS_ALL` (4096) stands for every arena.
    let name = c"arena.4096.purge";
    // SAFETY: a NUL-terminated name, and no value read or written (null
    // pointers, zero length), as the `arena.<i>.purge` command takes.
    unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    }
}

#[cfg(all(test, feature = "jemalloc"))]
mod tests {
    #[test]
    fn jemalloc_reads_our_tuning() {
        let name = c"opt.narenas";
        let mut narenas: std::os::raw::c_uint = 0;
        let mut len = std::mem::size_of::<std::os::raw::c_uint>();
        // SAFETY: a NUL-terminated name and a buffer of `len` bytes for the
        // option's value, an `unsigned`.
        let rc = unsafe {
            tikv_jemalloc_sys::mallctl(
                name.as_ptr(),
                (&mut narenas as *mut std::os::raw::c_uint).cast(),
                &mut len,
                std::ptr::null_mut(),
                0,
            )
        };
        assert_eq!(rc, 0, "mallctl opt.narenas");
        // jemalloc's default is four per CPU: 2 means MALLOC_CONF was linked in
        // and read.
        assert_eq!(narenas, 2);
        assert_eq!(super::purge_jemalloc(), 0, "purge every arena");
    }
}

//! The `tally` binary: the command line lives in `tally_cli::cli`.

/// mimalloc instead of the system allocator: `serve` allocates and frees
/// many short-lived buffers on two runtime threads, where glibc's malloc
/// spent about a fifth of its CPU (BENCHMARKS.md). Built without
/// transparent huge pages (`no_thp`), and it returns freed memory to the
/// system at once ([`MI_OPTION_PURGE_DELAY`] 0): with its defaults (huge
/// pages, a purge delay of a second) `serve`'s peak RSS grew by half.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in `mi_option_t` of libmimalloc-sys 0.1.49
/// (pinned exactly in Cargo.toml; the same number since mimalloc 2).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> anyhow::Result<()> {
    purge_at_once();
    limit_malloc_arenas();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(tally_cli::cli::run())
}

/// Unless the operator set `MIMALLOC_PURGE_DELAY` themselves.
#[allow(unsafe_code)]
fn purge_at_once() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets an option of the allocator, before any other thread
        // exists.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    }
}

/// glibc's malloc still serves the C code (SQLite): it gives each thread
/// that allocates an arena of its own (up to 8 per
/// core) and keeps freed pages in it; with SQLite's thread per connection,
/// `tally serve` held 2–3× its live heap (509 MiB resident for a 144 MiB
/// heap; 242 MiB with two arenas: BENCHMARKS.md, issue 19). Two arenas, unless
/// the operator set `MALLOC_ARENA_MAX` themselves.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a malloc tunable, and runs before any
        // other thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}

//! The `tally` binary: the command line lives in `tally_cli::cli`.

fn main() -> anyhow::Result<()> {
    limit_malloc_arenas();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(tally_cli::cli::run())
}

/// glibc gives each thread that allocates an arena of its own (up to 8 per
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

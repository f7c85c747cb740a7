//! The `portcullis` binary: parse the command line and hand over to `cli`.

// mimalloc: the proxy and the snapshot allocate many small strings; it keeps
// RSS and allocation latency lower than glibc's malloc (see benches/snapshot_load.rs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    portcullis::cli::main()
}

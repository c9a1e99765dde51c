//! `mayfly-server`: parse the command line and run it. See
//! [`mayfly_server::cli`] for the commands.

/// mimalloc instead of the system allocator: the request path allocates
/// small buffers on several threads, where glibc's malloc showed as a tenth
/// of the server's time in the issuance benchmark (`docs/performance.md`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    mayfly_server::cli::main()
}

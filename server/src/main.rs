//! `mayfly-server`: parse the command line and run it. See
//! [`mayfly_server::cli`] for the commands.

fn main() -> std::process::ExitCode {
    mayfly_server::cli::main()
}

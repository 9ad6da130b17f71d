//! The `kiln` binary: parse, run, map errors to exit codes.

fn main() -> std::process::ExitCode {
    kiln::cli::main()
}

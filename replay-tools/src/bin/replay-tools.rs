//! `replay-tools`: see `replay-tools --help`.

use clap::Parser;
use replay_tools::cli::{run, Cli};

#[global_allocator]
static ALLOCATOR: replay_tools::Allocator = replay_tools::Allocator;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    streams::telemetry::init_cli_logs();
    let mut stdout = std::io::stdout().lock();
    match run(cli, &mut stdout).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("replay-tools: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

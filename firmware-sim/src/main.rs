//! `firmware-sim`: parses the command line, sets up tracing, and runs the command.

use std::process::ExitCode;

use clap::Parser;
use firmware_sim::cli::{self, Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // rskafka warns at every retry of a connect; `verify --kafka` reports the final error itself.
    // lapin warns at every returned message; `command` counts and reports them.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            "warn,firmware_sim=info,rskafka=error,lapin::returned_messages=error",
        )
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the tokio runtime: {e}");
            return ExitCode::from(cli::EXIT_ERROR);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => cli::run_command(args, false).await,
            Command::Bench(args) => cli::run_command(args, true).await,
            Command::Verify(args) => cli::verify_command(args).await,
            Command::SendCommands(args) => cli::send_command(args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(cli::EXIT_ERROR)
        }
    }
}

//! The `spire-lab` binary: parses the command line and hands over to
//! [`spire_lab::cmd`].

#![forbid(unsafe_code)]

use clap::Parser;

#[tokio::main]
async fn main() {
    let cli = spire_lab::cmd::Cli::parse();
    spire_healer::telemetry::init_logging(cli.log_format, "warn");
    let code = spire_lab::cmd::run(cli.command).await;
    std::process::exit(code);
}

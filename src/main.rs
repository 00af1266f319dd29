//! The `spire-healer` binary: parses the command line and hands over to
//! [`spire_healer::cli`].

#![forbid(unsafe_code)]

#[tokio::main]
async fn main() {
    let cli = spire_healer::cli::parse();
    let code = spire_healer::cli::main(cli).await;
    std::process::exit(code);
}

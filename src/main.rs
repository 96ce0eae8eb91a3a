//! The `servicedb` binary: CLI wiring only (operator | relay | crd).

use std::io::Write;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "servicedb",
    version,
    about = "Database per service for Kubernetes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print both CustomResourceDefinitions as YAML.
    Crd,
    /// Run one outbox relay: move committed outbox events to Kafka or NATS JetStream.
    /// The database comes from PGHOST, PGPORT, PGDATABASE, PGUSER, PGPASSWORD, PGSSLMODE.
    Relay {
        /// The relay configuration file (YAML or JSON).
        #[arg(long, value_name = "FILE")]
        config: std::path::PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            let yaml = servicedb::api::crds_yaml().context("rendering the CRDs")?;
            std::io::stdout().write_all(yaml.as_bytes())?;
        }
        Command::Relay { config } => {
            servicedb::telemetry::init();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(servicedb::relay::run_from_file(&config))?;
        }
    }
    Ok(())
}

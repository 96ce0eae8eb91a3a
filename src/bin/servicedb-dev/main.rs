//! `servicedb-dev`: development tools for a cluster without a kubelet (CLI wiring only).

mod devrunner;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "servicedb-dev",
    about = "Development tools for servicedb-operator (not for production)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every relay pod the operator created as a local `servicedb relay` process, with the
    /// pod's args, env (secretKeyRefs resolved) and mounted config, and report its /readyz back
    /// as the pod's Ready condition. Stands in for a kubelet in `make dev` and tests.
    RunRelays {
        /// Only pods of this namespace (all namespaces when omitted).
        #[arg(long)]
        namespace: Option<String>,
        /// The `servicedb` binary to run.
        #[arg(long)]
        program: PathBuf,
        /// Directory for re-rooted mounts and relay logs.
        #[arg(long, default_value = "target/dev/relays")]
        work_dir: PathBuf,
    },
    /// Print the next N messages from a Kafka topic (from the beginning) with their headers.
    ConsumeKafka {
        /// Bootstrap servers.
        #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS")]
        bootstrap_servers: String,
        /// Topic.
        #[arg(long)]
        topic: String,
        /// How many messages to print.
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// Skip messages until one whose event id (header `id`, `ce_id`, `ce-id` or
        /// `Nats-Msg-Id`) is this one.
        #[arg(long)]
        id: Option<String>,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout_seconds: u64,
    },
    /// Print the messages of a JetStream stream with their headers.
    ConsumeNats {
        /// Server URL.
        #[arg(long, env = "NATS_URL")]
        url: String,
        /// Stream name.
        #[arg(long)]
        stream: String,
        /// How many messages to print.
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// Skip messages until one whose event id (header `id`, `ce_id`, `ce-id` or
        /// `Nats-Msg-Id`) is this one.
        #[arg(long)]
        id: Option<String>,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout_seconds: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    servicedb::telemetry::init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match cli.command {
        Command::RunRelays {
            namespace,
            program,
            work_dir,
        } => runtime.block_on(async move {
            let client = kube::Client::try_default()
                .await
                .context("connecting to Kubernetes")?;
            let program = std::fs::canonicalize(&program)
                .with_context(|| format!("{} not found", program.display()))?;
            std::fs::create_dir_all(&work_dir)?;
            let work_dir = std::fs::canonicalize(&work_dir)?;
            devrunner::run(client, namespace, program, work_dir, async {
                // Ctrl-C or SIGTERM (make dev's cleanup) stops the relays gracefully.
                let mut term =
                    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    {
                        Ok(t) => t,
                        Err(_) => return std::future::pending().await,
                    };
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            })
            .await?;
            anyhow::Ok(())
        })?,
        Command::ConsumeKafka {
            bootstrap_servers,
            topic,
            count,
            id,
            timeout_seconds,
        } => runtime.block_on(consume_kafka(
            bootstrap_servers,
            topic,
            count,
            id,
            timeout_seconds,
        ))?,
        Command::ConsumeNats {
            url,
            stream,
            count,
            id,
            timeout_seconds,
        } => runtime.block_on(consume_nats(url, stream, count, id, timeout_seconds))?,
    }
    Ok(())
}

async fn consume_kafka(
    bootstrap: String,
    topic: String,
    count: usize,
    id: Option<String>,
    timeout_seconds: u64,
) -> anyhow::Result<()> {
    use rdkafka::Message;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::Headers;
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set(
            "group.id",
            format!("servicedb-dev-{}", uuid::Uuid::new_v4()),
        )
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&[&topic])?;
    let deadline = std::time::Duration::from_secs(timeout_seconds);
    let mut printed = 0;
    let mut found = id.is_none();
    while printed < count {
        let msg = tokio::time::timeout(deadline, consumer.recv())
            .await
            .context("timed out waiting for a Kafka message")??;
        let headers: Vec<String> = msg
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        format!(
                            "{}={}",
                            h.key,
                            String::from_utf8_lossy(h.value.unwrap_or_default())
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        found = found
            || id
                .as_ref()
                .is_some_and(|id| headers.iter().any(|h| is_id_header(h, id)));
        if !found {
            continue;
        }
        printed += 1;
        println!(
            "kafka {topic}[{}]@{} key={} headers=[{}] value={}",
            msg.partition(),
            msg.offset(),
            String::from_utf8_lossy(msg.key().unwrap_or_default()),
            headers.join(", "),
            String::from_utf8_lossy(msg.payload().unwrap_or_default())
        );
    }
    Ok(())
}

async fn consume_nats(
    url: String,
    stream: String,
    count: usize,
    id: Option<String>,
    timeout_seconds: u64,
) -> anyhow::Result<()> {
    use futures::StreamExt;
    let client = async_nats::connect(&url).await?;
    let js = async_nats::jetstream::new(client);
    let deadline = std::time::Duration::from_secs(timeout_seconds);
    // The relay creates the stream with its first publish: wait for it.
    let stream = tokio::time::timeout(deadline, async {
        loop {
            if let Ok(s) = js.get_stream(&stream).await {
                return s;
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
    })
    .await
    .with_context(|| format!("timed out waiting for JetStream stream {stream}"))?;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut printed = 0;
    let mut found = id.is_none();
    while printed < count {
        let msg = tokio::time::timeout(deadline, messages.next())
            .await
            .context("timed out waiting for a NATS message")?
            .context("stream ended")??;
        let headers: Vec<String> = msg
            .headers
            .iter()
            .flat_map(|h| {
                h.iter().map(|(k, v)| {
                    format!(
                        "{k}={}",
                        v.iter().map(|x| x.as_str()).collect::<Vec<_>>().join(",")
                    )
                })
            })
            .collect();
        msg.ack().await.map_err(|e| anyhow::anyhow!("ack: {e}"))?;
        found = found
            || id
                .as_ref()
                .is_some_and(|id| headers.iter().any(|h| is_id_header(h, id)));
        if !found {
            continue;
        }
        printed += 1;
        println!(
            "nats {} headers=[{}] data={}",
            msg.subject,
            headers.join(", "),
            String::from_utf8_lossy(&msg.payload)
        );
    }
    Ok(())
}

/// Whether a printed `key=value` header names event `id`.
fn is_id_header(header: &str, id: &str) -> bool {
    ["id", "ce_id", "ce-id", "Nats-Msg-Id"]
        .iter()
        .any(|k| header == format!("{k}={id}"))
}

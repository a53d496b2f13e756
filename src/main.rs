//! The `postern` command: parses arguments, loads the config, owns signals, calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use postern::config::Config;
use tokio_util::sync::CancellationToken;

// glibc's allocator showed up as about 15 % of the proxy's CPU under load (malloc, free and
// consolidation); mimalloc keeps small, short-lived allocations cheap. It is built without its
// transparent-huge-page advice (Cargo.toml, feature `no_thp`): on hosts with THP in `madvise` mode
// that advice turned its eagerly committed arena into 2 MiB pages and doubled idle and peak RSS.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "postern",
    version,
    about = "Reliable webhooks in both directions, with your own Postgres as the only infrastructure."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ConfigArg {
    /// The TOML config file. Environment variables POSTERN__SECTION__KEY override it.
    #[arg(long, short, env = "POSTERN_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar until SIGTERM or SIGINT, then drain within shutdown_grace.
    Run(ConfigArg),
    /// Create or upgrade the schema and install the notify trigger, then exit.
    Migrate(ConfigArg),
    /// Validate the config and print it with every secret redacted (exit 2 when invalid).
    CheckConfig(ConfigArg),
    /// A self-contained first run: publish events and watch them arrive, signed, at a local receiver.
    Demo(postern::demo::DemoArgs),
    /// Manage endpoints from the command line.
    #[command(subcommand)]
    Endpoints(EndpointsCommand),
}

#[derive(Subcommand)]
enum EndpointsCommand {
    /// Delete the config endpoints retired because they left the config file (their unfinished
    /// deliveries become `cancelled`); prints their ids.
    Prune(ConfigArg),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::CheckConfig(arg) => check_config(arg),
        Command::Run(arg) => runtime.block_on(run(arg)),
        Command::Migrate(arg) => runtime.block_on(migrate(arg)),
        Command::Endpoints(EndpointsCommand::Prune(arg)) => runtime.block_on(prune(arg)),
        Command::Demo(args) => runtime.block_on(async {
            match postern::demo::run(args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }),
    }
}

/// Loads the config or prints one line per problem; `None` means exit 2.
fn load(arg: &ConfigArg) -> Option<Config> {
    match postern::checks::load(arg.config.as_deref()) {
        Ok(c) => Some(c),
        Err(e) => {
            for p in &e.problems {
                eprintln!("{p}");
            }
            None
        }
    }
}

fn check_config(arg: ConfigArg) -> ExitCode {
    let Some(config) = load(&arg) else {
        return ExitCode::from(2);
    };
    for warning in config.warnings() {
        eprintln!("warning: {warning}");
    }
    print!("{}", config.to_redacted_toml());
    ExitCode::SUCCESS
}

async fn run(arg: ConfigArg) -> ExitCode {
    let Some(config) = load(&arg) else {
        return ExitCode::from(2);
    };
    postern::telemetry::init(&config.log);
    for warning in config.warnings() {
        tracing::warn!(%warning, "config");
    }
    let grace = config.shutdown_grace.0;
    let shutdown = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone()));
    let metrics = std::sync::Arc::new(postern::telemetry::Metrics::new());
    // Inbox routes store through committers the pipeline runs; the proxy holds the other end.
    let (writer, queue) = match postern::inbound::has_inbox(&config) {
        true => {
            let queued = config
                .inbound
                .as_ref()
                .map_or(32 << 20, |i| i.max_buffered.0);
            let (w, q) = postern::inbox::writer::channel(queued);
            (Some(w), Some(q))
        }
        false => (None, None),
    };
    let inbound = match postern::inbound::spawn(&config, shutdown.clone(), metrics.clone(), writer)
    {
        Ok(thread) => thread,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "cannot start the inbound proxy");
            return ExitCode::FAILURE;
        }
    };
    let token = shutdown.clone();
    let mut sidecar = tokio::spawn(async move {
        let result = postern::app::run(config, token.clone(), metrics, queue).await;
        // Whatever ended the pipeline ends the proxy too, then waits for it to drain.
        token.cancel();
        if let Some(thread) = inbound {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        result
    });
    let outcome = tokio::select! {
        r = &mut sidecar => r,
        _ = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::error!(grace_s = grace.as_secs_f64(), "shutdown_grace exceeded; exiting with work unfinished (leases will lapse and other replicas retry it)");
            return ExitCode::FAILURE;
        }
    };
    match outcome {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            tracing::error!(error = %format!("{e:#}"), "postern failed");
            ExitCode::FAILURE
        }
        Err(e) => {
            tracing::error!(error = %e, "postern panicked");
            ExitCode::FAILURE
        }
    }
}

/// SIGTERM or SIGINT starts a graceful shutdown; a second one exits at once.
async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = name, "shutdown requested");
    shutdown.cancel();
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::warn!("second signal: exiting now");
    std::process::exit(130);
}

async fn migrate(arg: ConfigArg) -> ExitCode {
    let Some(config) = load(&arg) else {
        return ExitCode::from(2);
    };
    postern::telemetry::init(&config.log);
    match postern::app::migrate(&config).await {
        Ok(applied) if applied.is_empty() => {
            println!(
                "schema {} is up to date (version {})",
                config.database.schema,
                postern::db::SCHEMA_VERSION
            );
            ExitCode::SUCCESS
        }
        Ok(applied) => {
            println!(
                "schema {} migrated: applied {:?}",
                config.database.schema, applied
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn prune(arg: ConfigArg) -> ExitCode {
    let Some(config) = load(&arg) else {
        return ExitCode::from(2);
    };
    postern::telemetry::init(&config.log);
    match postern::app::prune_endpoints(&config).await {
        Ok(ids) if ids.is_empty() => {
            println!("no retired config endpoints to prune");
            ExitCode::SUCCESS
        }
        Ok(ids) => {
            println!(
                "pruned {} retired config endpoint(s): {}",
                ids.len(),
                ids.join(", ")
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

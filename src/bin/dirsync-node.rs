//! `dirsync-node`: runs one node until Ctrl-C or SIGTERM.

use anyhow::Context;
use clap::Parser;
use dirsync::config::NodeArgs;

fn main() -> std::process::ExitCode {
    // Before the runtime starts its threads.
    dirsync::memory::limit_arenas();
    let args = NodeArgs::parse();
    init_logging(args.log.as_deref());
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dirsync-node: error: starting the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dirsync-node: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logging(flag: Option<&str>) {
    let filter = match flag {
        Some(f) => tracing_subscriber::EnvFilter::new(f),
        None => tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

async fn run(args: NodeArgs) -> anyhow::Result<()> {
    let config = args.into_config()?;
    let node = dirsync::node::start(config)
        .await
        .context("cannot start the node")?;
    // One human line per action, e.g. `a: <- docs/report.pdf from b (1.2 MiB, 38 ms)`.
    let mut events = node.events();
    let printer = tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(e) => eprintln!("{}", e.human()),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    eprintln!("({n} events not shown)")
                }
                Err(_) => return,
            }
        }
    });
    wait_for_signal().await?;
    printer.abort();
    tracing::info!("shutting down");
    node.shutdown().await;
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("cannot listen for Ctrl-C")?,
        _ = term.recv() => {}
    }
    Ok(())
}

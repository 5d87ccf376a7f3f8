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

/// Prints each event as its human line on stderr. The lines already queued go
/// out in one write (a bulk transfer makes thousands a second; `eprintln!` costs
/// two system calls per line).
async fn print_events(mut events: tokio::sync::broadcast::Receiver<dirsync::events::Event>) {
    use std::fmt::Write as _;
    use std::io::Write as _;
    use tokio::sync::broadcast::error::{RecvError, TryRecvError};
    /// Written once this much is pending, even with more lines queued.
    const FLUSH_AT: usize = 64 * 1024;
    let mut out = String::new();
    let mut first = events.recv().await;
    loop {
        let mut closed = false;
        let mut next = Some(first);
        while let Some(event) = next.take() {
            match event {
                Ok(e) => {
                    let _ = writeln!(out, "{}", e.human());
                }
                Err(RecvError::Lagged(n)) => {
                    let _ = writeln!(out, "({n} events not shown)");
                }
                Err(RecvError::Closed) => closed = true,
            }
            if out.len() < FLUSH_AT && !closed {
                next = match events.try_recv() {
                    Ok(e) => Some(Ok(e)),
                    Err(TryRecvError::Lagged(n)) => Some(Err(RecvError::Lagged(n))),
                    Err(TryRecvError::Closed) => Some(Err(RecvError::Closed)),
                    Err(TryRecvError::Empty) => None,
                };
            }
        }
        let _ = std::io::stderr().write_all(out.as_bytes());
        out.clear();
        if closed {
            return;
        }
        first = events.recv().await;
    }
}

async fn run(args: NodeArgs) -> anyhow::Result<()> {
    let config = args.into_config()?;
    let node = dirsync::node::start(config)
        .await
        .context("cannot start the node")?;
    // One human line per action, e.g. `a: <- docs/report.pdf from b (1.2 MiB, 38 ms)`.
    let printer = tokio::spawn(print_events(node.events()));
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

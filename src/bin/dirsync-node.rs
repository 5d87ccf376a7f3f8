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

/// Prints each event as its human line to `out` (stderr). The lines already
/// queued go out in one write, up to [`FLUSH_AT`] bytes (a bulk transfer makes
/// thousands a second; `eprintln!` costs two system calls per line). Returns
/// once the node's event channel closes.
async fn print_events(
    mut events: tokio::sync::broadcast::Receiver<dirsync::events::Event>,
    mut out: impl std::io::Write,
) {
    use std::fmt::Write as _;
    use tokio::sync::broadcast::error::{RecvError, TryRecvError};
    let mut lines = String::new();
    loop {
        let mut next = events.recv().await;
        let closed = loop {
            match next {
                Ok(e) => {
                    let _ = writeln!(lines, "{}", e.human());
                }
                Err(RecvError::Lagged(n)) => {
                    let _ = writeln!(lines, "({n} events not shown)");
                }
                Err(RecvError::Closed) => break true,
            }
            if lines.len() >= FLUSH_AT {
                break false;
            }
            next = match events.try_recv() {
                Ok(e) => Ok(e),
                Err(TryRecvError::Lagged(n)) => Err(RecvError::Lagged(n)),
                Err(TryRecvError::Closed) => Err(RecvError::Closed),
                Err(TryRecvError::Empty) => break false,
            };
        };
        let _ = out.write_all(lines.as_bytes());
        lines.clear();
        if closed {
            return;
        }
    }
}

/// Event lines are written once this many bytes are pending, even with more
/// queued.
const FLUSH_AT: usize = 64 * 1024;

async fn run(args: NodeArgs) -> anyhow::Result<()> {
    let config = args.into_config()?;
    let node = dirsync::node::start(config)
        .await
        .context("cannot start the node")?;
    // One human line per action, e.g. `a: <- docs/report.pdf from b (1.2 MiB, 38 ms)`.
    let printer = tokio::spawn(print_events(node.events(), std::io::stderr()));
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

#[cfg(test)]
mod tests {
    use super::*;
    use dirsync::events::{Event, EventKind};

    /// Records each `write` call separately.
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);
    impl std::io::Write for &mut Writes {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Queued events come out as their lines, in order, one per line, several
    /// per write; a lag says how many were dropped; a closed channel ends it.
    #[tokio::test]
    async fn queued_event_lines_go_out_together_in_order() {
        let (tx, rx) = tokio::sync::broadcast::channel(4);
        let events: Vec<Event> = (0..3)
            .map(|i| {
                Event::new("b", EventKind::Received)
                    .path(format!("f{i}.txt"))
                    .peer("a")
                    .bytes(10)
            })
            .collect();
        for e in &events {
            tx.send(e.clone()).unwrap();
        }
        drop(tx);
        let mut writes = Writes::default();
        print_events(rx, &mut writes).await;
        let want: String = events.iter().map(|e| format!("{}\n", e.human())).collect();
        assert_eq!(writes.0.len(), 1, "three queued lines in one write");
        assert_eq!(String::from_utf8(writes.0.concat()).unwrap(), want);

        // Six sent into room for four: the two oldest are reported as not shown.
        let (tx, rx) = tokio::sync::broadcast::channel(4);
        for i in 0..6 {
            tx.send(
                Event::new("b", EventKind::Deleted)
                    .path(format!("g{i}"))
                    .peer("a"),
            )
            .unwrap();
        }
        drop(tx);
        let mut writes = Writes::default();
        print_events(rx, &mut writes).await;
        let text = String::from_utf8(writes.0.concat()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "(2 events not shown)");
        assert_eq!(
            lines[1..],
            [
                "b: deleted g2 (from a)",
                "b: deleted g3 (from a)",
                "b: deleted g4 (from a)",
                "b: deleted g5 (from a)"
            ]
        );
    }

    /// More than `FLUSH_AT` queued: written in parts, no line split or lost.
    #[tokio::test]
    async fn a_long_backlog_is_written_in_parts_of_whole_lines() {
        let n = 2 * FLUSH_AT / 40;
        let (tx, rx) = tokio::sync::broadcast::channel(n);
        for i in 0..n {
            tx.send(
                Event::new("b", EventKind::Deleted)
                    .path(format!("dir/file-{i:06}"))
                    .peer("a"),
            )
            .unwrap();
        }
        drop(tx);
        let mut writes = Writes::default();
        print_events(rx, &mut writes).await;
        assert!(writes.0.len() >= 2, "{} writes", writes.0.len());
        for w in &writes.0 {
            assert!(w.ends_with(b"\n"), "a write ends with a whole line");
        }
        let text = String::from_utf8(writes.0.concat()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), n);
        assert_eq!(
            lines[n - 1],
            format!("b: deleted dir/file-{:06} (from a)", n - 1)
        );
    }
}

//! `dirsync-cli`: talks to one node (listing), makes certificates, runs the demo.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use dirsync::certs::{self, CertRequest};
use dirsync::client::Client;
use dirsync::demo::Demo;
use dirsync::listing::Listing;

#[derive(Parser, Debug)]
#[command(name = "dirsync-cli", version, about = "Client of a dirsync node")]
struct Cli {
    /// The node to talk to, HOST:PORT.
    #[arg(
        long,
        env = "DIRSYNC_SERVER",
        default_value = "127.0.0.1:4433",
        global = true
    )]
    server: String,
    /// Directory with ca.pem, NAME.pem and NAME.key.
    #[arg(long, env = "DIRSYNC_CERTS", default_value = "certs", global = true)]
    certs: PathBuf,
    /// Our client certificate's name.
    #[arg(
        long,
        env = "DIRSYNC_CLIENT_NAME",
        default_value = "cli",
        global = true
    )]
    name: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List the merged contents of the node and all its peers.
    Ls {
        /// Print JSON (a stable schema) instead of a table.
        #[arg(long)]
        json: bool,
        /// Fail (exit 1) if any peer could not be asked.
        #[arg(long)]
        strict: bool,
    },
    /// Stream what the node does (transfers, deletions, conflicts), live.
    Watch {
        /// JSON lines instead of human lines.
        #[arg(long)]
        json: bool,
    },
    /// The node's peers, indexed files and transfers.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Lock a file on the node: peers' versions of it are staged and queued there
    /// instead of overwriting it, until `unlock` (or the TTL) applies them in order.
    Lock {
        #[command(flatten)]
        target: Target,
        /// Release the lock by itself after this long (e.g. 30m, 2h).
        #[arg(long, value_parser = dirsync::duration::parse_duration)]
        ttl: Option<std::time::Duration>,
    },
    /// Release your lock on a file and apply the updates queued meanwhile, in order.
    Unlock {
        #[command(flatten)]
        target: Target,
        /// Release another user's lock (needs an admin certificate).
        #[arg(long)]
        force: bool,
    },
    /// The node's locks: path, owner, since, TTL left, queued updates.
    Locks {
        #[arg(long)]
        json: bool,
    },
    /// Make a private CA and node/client certificates.
    Certs {
        /// Output directory.
        #[arg(long, default_value = "certs")]
        out: PathBuf,
        /// A node certificate to make; repeatable (default: a and b).
        #[arg(long = "node")]
        nodes: Vec<String>,
        /// A client certificate to make; repeatable (default: cli).
        #[arg(long = "client")]
        clients: Vec<String>,
        /// An admin client certificate (may `unlock --force` other users' locks);
        /// repeatable (default: admin).
        #[arg(long = "admin")]
        admins: Vec<String>,
        /// An extra host name or IP for the certificates; repeatable.
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Replace existing certificates of these names (the CA is always kept).
        #[arg(long)]
        force: bool,
    },
    /// Run a local two-node demo and print its merged listing.
    Demo {
        /// Keep the demo's files here instead of a temporary directory.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Keep the nodes running until Ctrl-C, to try other commands against them.
        #[arg(long)]
        keep_running: bool,
    },
}

/// A file, by path or by the index `ls` shows.
#[derive(clap::Args, Debug)]
#[group(required = true, multiple = false)]
struct Target {
    /// The file's path relative to the synced folder, as `ls` shows it.
    path: Option<String>,
    /// The file's index in `dirsync-cli ls`.
    #[arg(short = 'i', long = "index")]
    index: Option<usize>,
}

impl Target {
    /// The path to act on: given, or looked up in a fresh listing.
    async fn resolve(&self, client: &Client) -> anyhow::Result<String> {
        match (&self.path, self.index) {
            (Some(p), _) => Ok(p.trim_start_matches("./").to_string()),
            (None, Some(i)) => {
                let listing = client.list().await?;
                Ok(listing
                    .path_at(i)
                    .map_err(|e| anyhow::anyhow!(e))?
                    .to_string())
            }
            (None, None) => bail!("give a PATH or --index N"),
        }
    }
}

fn main() -> ExitCode {
    // Before the runtime starts its threads (`demo` runs two nodes here).
    dirsync::memory::limit_arenas();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dirsync-cli: error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("dirsync-cli: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Ls { json, strict } => {
            let client = Client::connect(&cli.server, &cli.certs, &cli.name).await?;
            let listing = client.list().await?;
            client.close().await;
            print_listing(&listing, json);
            if strict && !listing.warnings.is_empty() {
                bail!(
                    "{} peer(s) could not be listed (--strict)",
                    listing.warnings.len()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Watch { json } => {
            let client = Client::connect(&cli.server, &cli.certs, &cli.name).await?;
            client
                .watch(|e| {
                    let line = if json {
                        serde_json::to_string(&e).unwrap_or_default()
                    } else {
                        e.human()
                    };
                    // Stop quietly when stdout is closed (e.g. piped into `head`).
                    writeln!(std::io::stdout(), "{line}").is_ok()
                })
                .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { json } => {
            let client = Client::connect(&cli.server, &cli.certs, &cli.name).await?;
            let status = client.status().await?;
            client.close().await;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Certs {
            out,
            nodes,
            clients,
            admins,
            sans,
            force,
        } => {
            let mut req = CertRequest::defaults(out);
            if !nodes.is_empty() || !clients.is_empty() || !admins.is_empty() {
                req.nodes = nodes;
                req.clients = clients;
                req.admins = admins;
            }
            req.extra_sans = sans;
            req.force = force;
            let report = certs::generate(&req)?;
            if report.ca_created {
                println!("created a new CA in {}", req.out.display());
            }
            for p in &report.written {
                println!("wrote {}", p.display());
            }
            for p in &report.kept {
                println!("kept {} (exists; --force replaces it)", p.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { dir, keep_running } => demo(dir, keep_running).await,
        Command::Lock { target, ttl } => {
            let client = Client::connect(&cli.server, &cli.certs, &cli.name).await?;
            let path = target.resolve(&client).await?;
            let lock = client.lock(&path, ttl).await;
            client.close().await;
            let lock = lock?;
            let until = match lock.expires {
                Some(t) => format!(" until {}", local_time(t)),
                None => String::new(),
            };
            println!("locked {} for {}{until}", lock.path, lock.owner);
            Ok(ExitCode::SUCCESS)
        }
        Command::Unlock { target, force } => {
            let client = Client::connect(&cli.server, &cli.certs, &cli.name).await?;
            let path = target.resolve(&client).await?;
            let done = client.unlock(&path, force).await;
            client.close().await;
            let (queued, applied) = done?;
            println!("unlocked {path}; applied {applied} of {queued} queued updates");
            Ok(ExitCode::SUCCESS)
        }
        Command::Locks { json } => {
            let client = Client::connect(&cli.server, &cli.certs, &cli.name).await?;
            let locks = client.locks().await;
            client.close().await;
            print_locks(&locks?, json)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn local_time(t: dirsync::wire::Timestamp) -> String {
    t.to_datetime()
        .map(|d| {
            d.with_timezone(&chrono::Local)
                .format("%Y-%m-%d %H:%M:%S")
                .to_string()
        })
        .unwrap_or_default()
}

fn print_locks(locks: &[dirsync::wire::LockInfo], json: bool) -> anyhow::Result<()> {
    let now = chrono::Utc::now().timestamp();
    let ttl_left = |l: &dirsync::wire::LockInfo| l.expires.map(|t| (t.secs - now).max(0));
    if json {
        let out: Vec<serde_json::Value> = locks
            .iter()
            .map(|l| {
                serde_json::json!({
                    "path": l.path,
                    "owner": l.owner,
                    "since": dirsync::listing::rfc3339(l.since),
                    "expires": l.expires.map(dirsync::listing::rfc3339),
                    "ttl_left_secs": ttl_left(l),
                    "queued": l.queued,
                    "releasing": l.releasing,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    if locks.is_empty() {
        println!("no locks");
        return Ok(());
    }
    println!("PATH\tOWNER\tSINCE\tTTL LEFT\tQUEUED");
    for l in locks {
        let ttl = match ttl_left(l) {
            Some(s) => dirsync::duration::human(std::time::Duration::from_secs(s as u64)),
            None => "none".into(),
        };
        let state = if l.releasing { " (releasing)" } else { "" };
        println!(
            "{}\t{}\t{}\t{ttl}\t{}{state}",
            l.path,
            l.owner,
            local_time(l.since),
            l.queued
        );
    }
    Ok(())
}

fn print_status(s: &dirsync::events::NodeStatus) {
    println!("node {} syncing {}", s.name, s.dir);
    println!(
        "indexed: {} files, {}",
        s.files,
        dirsync::listing::human_size(s.bytes)
    );
    println!(
        "transfers: {} in flight, {} queued",
        s.transfers_in_flight, s.transfers_queued
    );
    if s.peers.is_empty() {
        println!("peers: none");
    }
    for p in &s.peers {
        match (p.connected, &p.since, &p.last_error) {
            (true, Some(since), _) => println!(
                "peer {}: connected since {since} ({})",
                p.name,
                p.address.as_deref().unwrap_or("?")
            ),
            (_, _, Some(err)) => println!("peer {}: not connected: {err}", p.name),
            _ => println!("peer {}: not connected", p.name),
        }
    }
}

fn print_listing(listing: &Listing, json: bool) {
    if json {
        println!("{}", listing.to_json());
    } else {
        print!("{}", listing.to_table());
    }
    for w in &listing.warnings {
        eprintln!("warning: {w}");
    }
}

async fn demo(dir: Option<PathBuf>, keep_running: bool) -> anyhow::Result<ExitCode> {
    // Keep the nodes' own logging to warnings so the listing stands out.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let temp;
    let base = match dir {
        Some(d) => d,
        None => {
            temp = tempfile::Builder::new()
                .prefix("dirsync-demo-")
                .tempdir()
                .context("cannot make a temporary directory")?;
            temp.path().to_path_buf()
        }
    };
    let mut demo = Demo::start(&base).await?;
    println!(
        "dirsync demo: node a at {} over {}, node b at {} over {}\n",
        demo.nodes[0].local_addr(),
        base.join("a").display(),
        demo.nodes[1].local_addr(),
        base.join("b").display()
    );
    let started = std::time::Instant::now();
    let printers = demo.forward_events(|e| {
        if !matches!(e.event, dirsync::events::EventKind::LocalChanges) {
            println!("{}", e.human());
        }
    });
    let listing = demo.converged(std::time::Duration::from_secs(20)).await?;
    println!(
        "\nconverged in {} ms; merged listing, as `dirsync-cli ls` asks node a:\n",
        started.elapsed().as_millis()
    );
    print_listing(&listing, false);
    if keep_running {
        println!(
            "\nnodes are running; try:\n  dirsync-cli --server {} --certs {} ls --json\nCtrl-C stops them.",
            demo.server(),
            demo.certs.display()
        );
        tokio::signal::ctrl_c()
            .await
            .context("cannot listen for Ctrl-C")?;
    }
    for p in printers {
        p.abort();
    }
    demo.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

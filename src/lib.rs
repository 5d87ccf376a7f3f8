//! dirsync: real-time directory synchronization over mutually authenticated QUIC.
//!
//! # Map
//! | module | what it holds |
//! |---|---|
//! | [`wire`] | the protocol: messages, the length-prefixed frame codec (no I/O, fuzzed), thin stream helpers |
//! | [`hash`] | [`hash::ContentHash`], BLAKE3 of file content, streamed |
//! | [`certs`] | the private CA and node/client certificates (rcgen) |
//! | [`tls`] | rustls/quinn configurations and the peer's identity and [`tls::Role`] |
//! | [`index`] | scanning the tree, the persistent index (SQLite: records, peers, locks, queues), local change detection |
//! | [`engine`] | the sync engine: local scans, applying peers' records, transfers (delta transfers of large files by content-defined blocks), conflicts, locks and their staged FIFO queues |
//! | [`events`] | what a node does, as events (log lines, `dirsync-cli watch`) and its status |
//! | [`listing`] | merging every node's files into one listing; table and JSON output |
//! | [`memory`] | the C allocator's arenas capped, and freed memory handed back once a node is quiet |
//! | [`path`] | [`path::RelPath`]: relative paths validated so a peer can never escape the root |
//! | [`sync`] | the pure sync model: records, version vectors, diff to a plan, conflicts |
//! | [`ignore`] | `.dirsyncignore` rules (gitignore syntax) |
//! | [`watch`] | inotify events coalesced into batches of changed paths |
//! | [`node`] | a running node: endpoint, peer sessions, serving requests |
//! | [`client`] | a typed client of one node (used by `dirsync-cli` and tests) |
//! | [`config`] | command-line/env options of `dirsync-node`, turned into a [`node::NodeConfig`] |
//! | [`demo`] | the local two-node demo (`dirsync-cli demo`) |
//! | [`duration`] | parsing `500ms`, `5s`, `2m` style durations |
//!
//! The binaries (`src/bin/`) only parse arguments, call into this library, and map
//! errors to exit codes.

pub mod certs;
pub mod client;
pub mod config;
pub mod demo;
pub mod duration;
pub mod engine;
pub mod events;
pub mod hash;
pub mod ignore;
pub mod index;
pub mod listing;
pub mod memory;
pub mod node;
pub mod path;
pub mod sync;
pub mod tls;
pub mod watch;
pub mod wire;

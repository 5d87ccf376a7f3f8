# dirsync developer recipes. `just` alone lists them.

default:
    @just --list

# Dev certificates for nodes a, b, client cli and admin into certs/ (existing ones are kept)
certs:
    cargo run --release --bin dirsync-cli -- certs --out certs

# The local two-node demo (same as the README's first command)
demo:
    cargo run --release --bin dirsync-cli -- demo

# A node over DIR: `just node a ./a 4433 127.0.0.1:4434`
node name dir port *peers:
    cargo run --release --bin dirsync-node -- --name {{name}} --dir {{dir}} --listen 127.0.0.1:{{port}} {{ if peers == "" { "" } else { "--peer " + replace(peers, " ", " --peer ") } }}

# The test suite (the README's second command)
test:
    cargo test

# Formatting and lints, as CI checks them
lint:
    cargo fmt --all --check
    cargo clippy --all-targets -- -D warnings

# Fuzz the frame decoder (cargo-fuzz needs the nightly toolchain for its sanitizer)
fuzz secs="60":
    cargo fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz --locked
    cargo +nightly fuzz run frame_decode -- -max_total_time={{secs}}

# Benchmarks with figures: latency, gen.py small/large vs cp -a and rsync (with memory per file), restart, delta (modify/insert vs rsync), cut (block cutting vs FastCDC's own streaming chunker); `just bench delta` runs one; `just bench scale` (100,000 tiny files) runs only when named; DIRSYNC_BENCH_ROUNDS=N repeats small/large N times beside rsync and prints medians
bench *which:
    command -v rsync >/dev/null || (apt-get update && apt-get install -y rsync)
    cargo bench --bench sync -- {{which}}

# Long randomized soak: 30 seeds of partitioned random edits (DIRSYNC_SEED=N to start elsewhere)
soak:
    cargo test --release --test sync_random -- --ignored --nocapture

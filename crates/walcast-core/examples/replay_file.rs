//! Times decode + verify + apply of one segment file, natively, as a
//! replica does (best of 5). Prints `records=<n> ms=<best>` for scripts that
//! compare it with the same work in wasm (`tests/js/bench.mjs`).
//!
//! `cargo run --release -p walcast-core --example replay_file -- <segment.wseg>`

use std::time::Instant;

use walcast_core::state::KvState;
use walcast_core::{batch, segment};

fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: replay_file <segment.wseg>");
        std::process::exit(2);
    };
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("{path}: {e}");
            std::process::exit(1);
        }
    };
    let mut best = f64::MAX;
    let mut records = 0u64;
    for _ in 0..5 {
        let t = Instant::now();
        let seg = match segment::decode(&bytes, None) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("{path}: {e}");
                std::process::exit(1);
            }
        };
        let mut state = KvState::new();
        records = 0;
        for rec in seg.records() {
            let Ok(rec) = rec else { std::process::exit(1) };
            let Ok(ops) = batch::Batch::parse(rec.payload) else {
                std::process::exit(1)
            };
            state.apply(ops);
            records += 1;
        }
        std::hint::black_box(state.len());
        best = best.min(t.elapsed().as_secs_f64() * 1e3);
    }
    println!("records={records} ms={best:.3}");
}

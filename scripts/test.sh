#!/usr/bin/env bash
# Every test walcast has, in the order a failure is cheapest to find.
# Installs what it needs (the wasm32 toolchain) and skips what is there.
#   SIM_SEEDS=N  simulation seeds (default 2000); SIM_SEED=S replays one.
set -euo pipefail
cd "$(dirname "$0")/.."
# Each step says how long the one before it took (the suite's budget is 45
# minutes on a fresh 2-core machine), and the last line the total.
last=$SECONDS
step() { printf '\n(%d s)\n== %s\n' $((SECONDS - last)) "$*"; last=$SECONDS; }
deps_pid=""
trap '[[ -z $deps_pid ]] || kill -- "-$deps_pid" 2>/dev/null; printf "\n(%d s)\ntest.sh: %d s in all\n" $((SECONDS - last)) $SECONDS' EXIT

step "format"
cargo fmt --all --check

# What the later steps run against (moto, nginx, Azurite, fake-gcs-server;
# Deno, TypeScript, fake-indexeddb; workerd, wrangler, playwright-core and
# Chromium; Bun, puppeteer-core and Firefox) installs in the background
# while the steps before them compile: installs wait on the network and the
# disk, builds on the CPU. One script after another (apt-get takes a lock);
# each skips what is there, and the steps that need them run them again
# (then a quick check). In a session of their own, so that a run that
# ends early stops them all (the EXIT trap kills the group), not only the
# shell that started them. The native end-to-end tests wait for the first
# script alone (its exit status goes to $e2e_rc), so that a failed JS or
# browser install fails the edge steps, which install again and name it,
# not the native ones.
mkdir -p target
deps_log=target/test-deps.log
e2e_rc=target/test-deps.e2e-rc
rm -f "$e2e_rc"
setsid bash -c 'bash scripts/e2e-deps.sh; rc=$?; echo $rc >"$0.tmp" && mv "$0.tmp" "$0"
  ((rc == 0)) || exit $rc
  bash scripts/js-deps.sh && bash scripts/browser-deps.sh && bash scripts/runtime-deps.sh' \
  "$e2e_rc" >"$deps_log" 2>&1 </dev/null &
deps_pid=$!
# Waits for the background installs to end; prints their log once.
deps_wait() {
  [[ -n $deps_pid ]] || return 0
  local rc=0
  wait "$deps_pid" || rc=$?
  deps_pid=""
  cat "$deps_log"
  ((rc == 0)) || echo "test.sh: a background install failed ($rc); the steps that need it install again"
}

step "clippy (warnings are errors)"
cargo clippy --workspace --all-targets -- -D warnings

step "docs (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc -p walcast-core -p walcast-client -p walcast --no-deps -q

step "crates as published: cargo package of walcast-core, walcast-client and walcast (metadata and file lists; about 10 s, no verify build)"
pkg_out=$(cargo package --no-verify --allow-dirty --locked -p walcast-core -p walcast-client -p walcast 2>&1) || { echo "$pkg_out"; exit 1; }
if grep -E "warning: manifest has no|^error" <<<"$pkg_out"; then exit 1; fi
grep -E "Packaged" <<<"$pkg_out"

step "walcast-core: unit, doc, golden, fuzz-corpus and simulation tests (${SIM_SEEDS:-2000} seeds)"
SIM_SEEDS="${SIM_SEEDS:-2000}" cargo test -p walcast-core -- --nocapture 2>&1 |
  grep -vE '^(running [0-9]+ tests?|)$' | grep -vE '^test .* \.\.\. ok$'
test "${PIPESTATUS[0]}" -eq 0

step "end-to-end dependencies, installed in the background since the start (log: $deps_log)"
while [[ ! -f $e2e_rc ]] && kill -0 "$deps_pid" 2>/dev/null; do sleep 1; done
if [[ "$(cat "$e2e_rc" 2>/dev/null)" != 0 ]]; then
  deps_wait
  echo "test.sh: installing the end-to-end dependencies failed (scripts/e2e-deps.sh)"
  exit 1
fi
echo "scripts/e2e-deps.sh done (the JS and browser installs go on beside the native tests)"

# walcast-bench is built here (it has no tests of its own) so that its
# dependencies share this build's features: built on its own, SlateDB's
# feature choices (serde on bytes, futures' executor, ...) would rebuild the
# whole tokio, object_store and walcast stack for the benchmark step.
step "walcast (native): WAL, serve and end-to-end tests with real processes (s3://, az://, gs://, file://, http://)"
cargo test -p walcast-client -p walcast -p walcast-bench -- --test-threads=1 2>&1 | grep -vE '^(running [0-9]+ tests?|)$'
test "${PIPESTATUS[0]}" -eq 0

# On its own: in the command above it would change the features of shared
# dependencies and rebuild the walcast stack (about 5 minutes).
step "walcast-wasm: unit tests of its native parts (scan bounds, response classes, persistence, open scans)"
cargo test -p walcast-wasm 2>&1 | grep -vE '^(running [0-9]+ tests?|)$'
test "${PIPESTATUS[0]}" -eq 0

step "walcast-core builds for wasm32-unknown-unknown and imports nothing"
bash scripts/check-wasm.sh

step "the JS, browser and runtime installs begun at the start (log: $deps_log)"
deps_wait

step "edge: the npm package (wasm build), conformance in Node, Deno and Bun, type declarations"
bash tests/js/run.sh

step "edge: the worker in workerd, conformance and IndexedDB reloads in Chromium and Firefox, the packed npm tarball in every runtime, the JS examples"
bash tests/js/run-edge.sh

step "benchmarks: walcast-bench --quick, walcast beside SlateDB on file:// and moto (checks every scenario produced a number; no timing assertions)"
# The quick run checks that every scenario produces a number; it runs in the
# test profile (opt-level 1, whose dependencies the native tests above built
# with the same features)
# instead of compiling the whole tree again in release. Figures come from the
# full benchmark: cargo run --release -p walcast-bench (docs/BENCHMARKS.md).
cargo run --profile test -q -p walcast-bench -- --quick --out target/bench-quick

#!/usr/bin/env bash
# The edge and browser suites of the walcast npm package, in the real runtimes:
#   - workerd (Cloudflare's runtime): the Worker in worker/ over HTTP (also as
#     wrangler bundles it, and worker/deno.js under Deno), and the conformance
#     cases inside an isolate, and the worker over a private R2 bucket in
#     miniflare               (tests/js/workerd/{handler,workerd,r2}.test.mjs)
#   - Chromium (Debian's, via playwright-core): the conformance cases in a
#     page, IndexedDB reload, two tabs        (tests/js/chromium/chromium.test.mjs)
#   - Firefox ESR (Debian's, via puppeteer-core over WebDriver BiDi): the
#     conformance cases in a page, IndexedDB reload (tests/js/firefox/firefox.test.mjs)
#   - the npm tarball as users get it: `npm pack`, installed into an empty
#     project under the temp dir, the conformance suite there in Node, Deno,
#     Bun, workerd (a wrangler bundle) and Chromium (tests/js/pack/pack.test.mjs)
#   - examples/worker-kv (wrangler dev) and examples/browser-offline (Chromium,
#     screenshots in target/examples/)   (tests/js/examples/examples.test.mjs)
# Builds js/dist only when it is missing (scripts/build-js.sh), installs
# workerd, playwright-core and chromium (scripts/browser-deps.sh, skips what is
# there), starts one dataset orchestrator (tests/js/datasets.mjs) for both
# suites, and stops every process it started. Bounded: WALCAST_EDGE_TIMEOUT
# seconds for the suites (default 2400). Exits non-zero on any failure.
#   bash tests/js/run-edge.sh [workerd|chromium|firefox|pack|examples]...   (default: all)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
say() { printf 'run-edge: %s\n' "$*"; }

suites=()
for a in "${@:-workerd chromium firefox pack examples}"; do
  for s in $a; do
    case $s in
      workerd) suites+=(tests/js/workerd/handler.test.mjs tests/js/workerd/workerd.test.mjs tests/js/workerd/r2.test.mjs) ;;
      chromium) suites+=(tests/js/chromium/chromium.test.mjs) ;;
      firefox) suites+=(tests/js/firefox/firefox.test.mjs) ;;
      pack) suites+=(tests/js/pack/pack.test.mjs) ;;
      examples) suites+=(tests/js/examples/examples.test.mjs) ;;
      *) say "unknown suite $s (workerd, chromium, firefox, pack, examples)"; exit 2 ;;
    esac
  done
done

if [[ ! -f js/dist/web.js || ! -f js/dist/workerd.js || ! -f js/dist/wasm/walcast_wasm_bg.wasm ]]; then
  say "js/dist is missing: bash scripts/build-js.sh"
  bash scripts/build-js.sh
fi
bash scripts/browser-deps.sh
# Bun, puppeteer-core and Firefox ESR (the Firefox and pack suites).
bash scripts/runtime-deps.sh
# Deno, for worker/deno.js (the workerd suite skips those tests without it).
if [[ -f scripts/js-deps.sh ]]; then bash scripts/js-deps.sh; fi
export DENO_NO_UPDATE_CHECK=1 DENO_NO_PROMPT=1 DENO_DIR="${DENO_DIR:-$ROOT/.deno}"

work=$(mktemp -d "${TMPDIR:-/tmp}/walcast-edge-XXXXXX")
export WALCAST_EDGE_PIDS=$work/pids
: >"$WALCAST_EDGE_PIDS"
orchestrator=""

cleanup() {
  local rc=$?
  if [[ -n $orchestrator ]] && kill -0 "$orchestrator" 2>/dev/null; then
    kill -TERM "$orchestrator" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$orchestrator" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$orchestrator" 2>/dev/null || true
  fi
  # Whatever a runner started and could not stop itself (it was killed).
  while read -r pid name; do
    [[ -n $pid ]] || continue
    if [[ -r /proc/$pid/cmdline ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$name"; then
      say "stopping leftover $name (pid $pid)"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done <"$WALCAST_EDGE_PIDS"
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

limit=${WALCAST_EDGE_TIMEOUT:-2400}

# One orchestrator for both suites; each suite takes its own instances.
say "building and serving the datasets (tests/js/datasets.mjs)"
WALCAST_DATASETS_MAX_SECONDS=$((limit + 600)) WALCAST_DATASETS_QUIET=1 \
  node tests/js/datasets.mjs serve >"$work/datasets.out" 2>"$work/datasets.err" &
orchestrator=$!
for _ in $(seq 1500); do
  [[ -s $work/datasets.out ]] && break
  kill -0 "$orchestrator" 2>/dev/null || { cat "$work/datasets.err" >&2; say "FAIL: the orchestrator exited"; exit 1; }
  sleep 0.2
done
[[ -s $work/datasets.out ]] || { cat "$work/datasets.err" >&2; say "FAIL: the orchestrator was not ready in 300 s"; exit 1; }
WALCAST_DATASETS=$(node -e 'const l = require("fs").readFileSync(process.argv[1], "utf8").split("\n")[0]; console.log(JSON.parse(l).control)' "$work/datasets.out")
export WALCAST_DATASETS
say "orchestrator pid $orchestrator, control $WALCAST_DATASETS"

say "suites: ${suites[*]} (at most ${limit} s)"
# Their temp dirs (workerd config, browser profile) live under $work, removed at exit.
mkdir -p "$work/tmp"
TMPDIR="$work/tmp" timeout --kill-after=30 "$limit" node --test --test-concurrency=1 "${suites[@]}"

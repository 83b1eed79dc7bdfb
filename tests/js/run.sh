#!/usr/bin/env bash
# Runs the tests of the npm package `walcast`, from a fresh machine:
#   1. scripts/build-js.sh   (wasm build, wasm-bindgen, wasm-opt -> js/dist)
#   2. scripts/js-deps.sh    (typescript, deno, fake-indexeddb; skips what exists)
#   3. tests/js/datasets.mjs serve   (datasets + walcast serve + control endpoint)
#   4. the conformance suite in Node (node --test), Deno (deno test) and Bun
#      (tests/js/run-cases.mjs; Bun installed by scripts/runtime-deps.sh)
#   5. tsc: js/index.d.ts against js/test/usage.ts
#   6. tests/js/idb.test.mjs: the IndexedDB store's layout on fake-indexeddb, and a
#      replica over tampered copies and over a custom store with append
#   7. tests/js/longpoll.test.mjs: long-poll against walcast serve and through
#      faulty proxies (about 20 s); tests/js/answers.test.mjs: redirects with
#      the caller's headers, a 206 without Content-Range; tests/js/hostile.test.mjs:
#      many concurrent lazy reads in the worker (block GETs in flight, an origin
#      that ignores Range, the reads each answer wakes)
# Every step runs even when an earlier test step failed; exits non-zero on any failure.
# Usage: bash tests/js/run.sh [--skip-build]
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
say() { printf 'js-tests: %s\n' "$*"; }

if [[ ${1:-} != --skip-build ]]; then
  bash scripts/build-js.sh || { say "FAIL: build-js.sh"; exit 1; }
fi
bash scripts/js-deps.sh || { say "FAIL: js-deps.sh"; exit 1; }
[[ -f js/dist/wasm/walcast_wasm_bg.wasm ]] || { say "FAIL: js/dist is not built (run scripts/build-js.sh)"; exit 1; }
export DENO_NO_UPDATE_CHECK=1 DENO_NO_PROMPT=1 DENO_DIR="$ROOT/.deno"

# --- the orchestrator (one for both runners; each takes its own instance) ---------
tmp=$(mktemp -d "${TMPDIR:-/tmp}/walcast-js-run.XXXXXX")
orch_pid=""
cleanup() {
  if [[ -n $orch_pid ]] && kill -0 "$orch_pid" 2>/dev/null; then
    kill -TERM "$orch_pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$orch_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$orch_pid" 2>/dev/null
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
WALCAST_DATASETS_MAX_SECONDS=1800 node tests/js/datasets.mjs serve --out "$tmp/fixtures.json" \
  >"$tmp/orchestrator.out" 2>"$tmp/orchestrator.err" &
orch_pid=$!
for _ in $(seq 600); do
  [[ -s $tmp/orchestrator.out ]] && break
  kill -0 "$orch_pid" 2>/dev/null || break
  sleep 0.5
done
if ! [[ -s $tmp/orchestrator.out ]]; then
  say "FAIL: the dataset orchestrator did not start:"
  cat "$tmp/orchestrator.err" >&2
  exit 1
fi
control=$(node -e 'console.log(JSON.parse(require("fs").readFileSync(process.argv[1], "utf8").split("\n")[0]).control)' "$tmp/orchestrator.out")
say "datasets ready (control $control, pid $orch_pid)"
export WALCAST_DATASETS=$control

passed=0
failed=0
failures=()
step() {
  local name=$1; shift
  say "--- $name: $*"
  local t0=$SECONDS
  if "$@"; then
    passed=$((passed + 1))
    say "--- $name: ok ($((SECONDS - t0)) s)"
  else
    failed=$((failed + 1))
    failures+=("$name")
    say "--- $name: FAILED ($((SECONDS - t0)) s)"
  fi
}

# --test-force-exit: a replica's leftover timers must not hold the run (the
# conformance suite reports them as a failure of its own).
step node node --test --test-force-exit --test-reporter=spec tests/js/node.test.mjs
# The IndexedDB store of persist: "indexeddb" on its own, then a replica over a
# tampered copy and over a custom store (fake-indexeddb; about 2 s).
step idb node --test --test-reporter=spec tests/js/idb.test.mjs
# Long-poll against walcast serve and through faulty proxies (early, silent, caching).
step longpoll node --test --test-force-exit --test-reporter=spec tests/js/longpoll.test.mjs
# Answers the driver must not take at their word (redirects with headers, a 206 without Content-Range).
step answers node --test --test-force-exit --test-reporter=spec tests/js/answers.test.mjs
step hostile node --test --test-force-exit --test-reporter=spec tests/js/hostile.test.mjs
step deno bash -c 'cd tests/js && NO_COLOR=1 exec node_modules/.bin/deno test --quiet --allow-read --allow-net --allow-env --allow-run deno.test.mjs'
# Bun (npm's @oven/bun-linux-x64, scripts/runtime-deps.sh): resolves "walcast"
# through tests/js/node_modules like Node; run-cases.mjs needs no test framework.
step bun bash -c 'WALCAST_NO_FIREFOX=1 bash scripts/runtime-deps.sh >&2 && exec tests/js/runtimes/node_modules/@oven/bun-linux-x64/bin/bun tests/js/run-cases.mjs'
step tsc js/node_modules/.bin/tsc -p js/test/tsconfig.json

# The packed tarball alone (its "files" list) installs and works by name.
pack_check() {
  local dir=$tmp/pack
  mkdir -p "$dir/node_modules/walcast"
  local tgz
  tgz=$(cd js && npm pack --silent --pack-destination "$dir" 2>/dev/null | tail -1) || return 1
  tar -xzf "$dir/$tgz" -C "$dir/node_modules/walcast" --strip-components=1 || return 1
  local url
  url=$(node -p 'JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")).scenarios.basic.url' "$tmp/fixtures.json")
  local want
  want=$(node -p 'JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")).scenarios.basic.expected.lsn' "$tmp/fixtures.json")
  (cd "$dir" && printf '%s\n' \
    'import { Replica } from "walcast";' \
    'const r = await Replica.open(process.argv[2]);' \
    'const lsn = await r.sync();' \
    'if (lsn !== Number(process.argv[3])) throw new Error(`synced to ${lsn}, want ${process.argv[3]}`);' \
    'console.log(`packed walcast: ${r.size} keys at LSN ${lsn}`);' \
    'await r.close();' \
    'process.exit(0);' >check.mjs && node check.mjs "$url" "$want")
}
step pack pack_check

if ((failed)); then
  say "orchestrator log:"
  sed 's/^/  /' "$tmp/orchestrator.err" >&2
  say "FAILED: ${failures[*]}"
fi
echo "js-steps: $passed passed, $failed failed"
((failed == 0))

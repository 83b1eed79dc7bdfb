#!/usr/bin/env bash
# Installs the npm dependencies of the JS package and its tests, and skips what
# is already there (idempotent; run it as often as you like):
#   - js/:        devDependencies (typescript, for the .d.ts check)
#   - tests/js/:  deno (the real binary ships in the npm package), fake-indexeddb
#                 (IndexedDB for the Node run), and `walcast` linked to ../../js
# Versions come from the committed package-lock.json files (`npm ci`). npm does not run install scripts here, and nothing here
# needs them.
#
# Deno is used with DENO_NO_UPDATE_CHECK=1 DENO_NO_PROMPT=1 DENO_DIR=<repo>/.deno
# (tests/js/run.sh sets them).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
say() { printf 'js-deps: %s\n' "$*"; }

command -v node >/dev/null || { say "error: node (20+) not found"; exit 1; }
command -v npm >/dev/null || { say "error: npm not found"; exit 1; }
major=$(node -p 'process.versions.node.split(".")[0]')
((major >= 20)) || { say "error: node $(node --version) is too old (need 20+)"; exit 1; }

export DENO_NO_UPDATE_CHECK=1 DENO_NO_PROMPT=1 DENO_DIR="$ROOT/.deno"
NPM_FLAGS=(--no-audit --no-fund --loglevel=error)

# install DIR CHECK...: runs npm in DIR unless every CHECK command succeeds
# there and node_modules is newer than package.json and the lock file.
install() {
  local dir=$1; shift
  local fresh=1 check
  for check in "$@"; do
    (cd "$dir" && eval "$check") >/dev/null 2>&1 || { fresh=0; break; }
  done
  if ((fresh)) && [[ -f $dir/node_modules/.package-lock.json ]]; then
    for f in "$dir/package.json" "$dir/package-lock.json"; do
      [[ -f $f && $f -nt $dir/node_modules/.package-lock.json ]] && fresh=0
    done
  else
    fresh=0
  fi
  if ((fresh)); then
    say "skip $dir: dependencies installed"
    return
  fi
  # `npm ci` installs exactly the committed package-lock.json and never
  # rewrites it, so the test suite leaves the working tree as it found it.
  # The locks list every platform's optional packages (deno's per-OS
  # binaries); npm picks this machine's.
  [[ -f $dir/package-lock.json ]] || { say "error: $dir/package-lock.json is missing"; exit 1; }
  say "$dir: npm ci (from package-lock.json)"
  (cd "$dir" && npm ci "${NPM_FLAGS[@]}")
  for check in "$@"; do
    (cd "$dir" && eval "$check") >/dev/null 2>&1 || { say "error: '$check' fails in $dir after install"; exit 1; }
  done
}

install js 'node_modules/.bin/tsc --version'
install tests/js \
  'node_modules/.bin/deno --version' \
  'test -f node_modules/fake-indexeddb/package.json' \
  'test -f node_modules/walcast/package.json'

say "tsc $(js/node_modules/.bin/tsc --version | awk '{print $2}'), $(tests/js/node_modules/.bin/deno --version | head -1)"

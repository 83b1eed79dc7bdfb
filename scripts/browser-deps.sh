#!/usr/bin/env bash
# Installs what the edge and browser tests (tests/js/run-edge.sh) need, and
# skips what is already there:
#   - workerd, wrangler (to check worker/wrangler.toml builds), miniflare
#     (the worker against a simulated R2 bucket) and
#     playwright-core from npm into tests/js/edge/node_modules (versions pinned
#     by tests/js/edge/package.json + package-lock.json)
#   - Chromium from Debian (/usr/bin/chromium), driven by playwright-core.
# Never downloads a browser build of its own (no `playwright install`).
# Idempotent: run it as often as you like.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=tests/js/edge
say() { printf 'browser-deps: %s\n' "$*"; }

# --- npm: workerd, wrangler, playwright-core ---------------------------------
npm_works() {
  [ -x "$DIR/node_modules/.bin/workerd" ] &&
    "$DIR/node_modules/.bin/workerd" --version >/dev/null 2>&1 &&
    [ -f "$DIR/node_modules/playwright-core/package.json" ] &&
    [ -x "$DIR/node_modules/.bin/wrangler" ] &&
    [ -f "$DIR/node_modules/miniflare/package.json" ] &&
    [ -f "$DIR/node_modules/.package-lock.json" ] &&
    ! [ "$DIR/package-lock.json" -nt "$DIR/node_modules/.package-lock.json" ]
}

command -v npm >/dev/null || { say "error: npm not found (need Node >= 20)"; exit 1; }
if npm_works; then
  say "skip npm: workerd $("$DIR/node_modules/.bin/workerd" --version | awk '{print $2}'), wrangler $(node -p "require('./$DIR/node_modules/wrangler/package.json').version"), playwright-core $(node -p "require('./$DIR/node_modules/playwright-core/package.json').version") already installed"
else
  say "installing workerd, wrangler and playwright-core into $DIR/node_modules"
  # `npm ci` installs exactly the committed lock and never rewrites it, so
  # the test suite leaves the working tree as it found it.
  [ -f "$DIR/package-lock.json" ] || { say "error: $DIR/package-lock.json is missing"; exit 1; }
  (cd "$DIR" && npm ci --no-audit --no-fund --loglevel=error)
  npm_works || { say "error: workerd, wrangler or playwright-core still missing after npm ci"; exit 1; }
  say "installed workerd $("$DIR/node_modules/.bin/workerd" --version | awk '{print $2}')"
fi

# --- Chromium (Debian) ------------------------------------------------------
if [ -x /usr/bin/chromium ]; then
  say "skip chromium: /usr/bin/chromium already installed"
else
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  say "installing chromium with apt-get (about a minute)"
  if ! $SUDO apt-get install -y -q chromium >/dev/null 2>&1; then
    say "apt-get install failed; running apt-get update first"
    $SUDO apt-get update -q >/dev/null
    $SUDO apt-get install -y -q chromium >/dev/null
  fi
  [ -x /usr/bin/chromium ] || { say "error: /usr/bin/chromium still missing after install"; exit 1; }
  say "chromium installed: $(/usr/bin/chromium --version 2>/dev/null | head -1)"
fi

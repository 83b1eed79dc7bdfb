#!/usr/bin/env bash
# Installs the runtimes of the Bun, Firefox and packed-tarball tests, and skips
# what is already there (idempotent; run it as often as you like):
#   - Bun (npm's @oven/bun-linux-x64: the real binary ships in the package) and
#     puppeteer-core (drives Firefox over WebDriver BiDi) into
#     tests/js/runtimes/node_modules, exactly as tests/js/runtimes/package-lock.json
#     pins them (`npm ci`, which never rewrites the lock).
#   - Firefox ESR from Debian (/usr/bin/firefox-esr), with apt-get.
# Never downloads a browser or runtime build of its own.
#   WALCAST_NO_FIREFOX=1   skip Firefox (the Firefox tests are then skipped).
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=tests/js/runtimes
BUN=$DIR/node_modules/@oven/bun-linux-x64/bin/bun
say() { printf 'runtime-deps: %s\n' "$*"; }

command -v npm >/dev/null || { say "error: npm not found (need Node >= 20)"; exit 1; }
case "$(uname -s)-$(uname -m)" in
  Linux-x86_64) ;;
  *) say "error: the locked Bun binary is for Linux x86_64; this is $(uname -s)-$(uname -m)"; exit 1 ;;
esac

npm_works() {
  [ -x "$BUN" ] && "$BUN" --version >/dev/null 2>&1 &&
    [ -f "$DIR/node_modules/puppeteer-core/package.json" ] &&
    [ -f "$DIR/node_modules/.package-lock.json" ] &&
    ! [ "$DIR/package-lock.json" -nt "$DIR/node_modules/.package-lock.json" ] &&
    ! [ "$DIR/package.json" -nt "$DIR/node_modules/.package-lock.json" ]
}
if npm_works; then
  say "skip npm: bun $("$BUN" --version), puppeteer-core $(node -p "require('./$DIR/node_modules/puppeteer-core/package.json').version") already installed"
else
  [ -f "$DIR/package-lock.json" ] || { say "error: $DIR/package-lock.json is missing"; exit 1; }
  say "installing bun and puppeteer-core into $DIR/node_modules (npm ci)"
  (cd "$DIR" && npm ci --no-audit --no-fund --loglevel=error)
  npm_works || { say "error: bun or puppeteer-core still missing after npm ci"; exit 1; }
  say "installed bun $("$BUN" --version)"
fi

if [ "${WALCAST_NO_FIREFOX:-}" = 1 ]; then
  say "skip firefox: WALCAST_NO_FIREFOX=1"
elif [ -x /usr/bin/firefox-esr ]; then
  say "skip firefox: $(/usr/bin/firefox-esr --version 2>/dev/null | head -1) already installed"
else
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  say "installing firefox-esr with apt-get"
  if ! $SUDO apt-get install -y -q firefox-esr >/dev/null 2>&1; then
    say "apt-get install failed; running apt-get update first"
    $SUDO apt-get update -q >/dev/null
    $SUDO apt-get install -y -q firefox-esr >/dev/null
  fi
  [ -x /usr/bin/firefox-esr ] || { say "error: /usr/bin/firefox-esr still missing after install"; exit 1; }
  say "firefox installed: $(/usr/bin/firefox-esr --version 2>/dev/null | head -1)"
fi

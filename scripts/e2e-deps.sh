#!/usr/bin/env bash
# Installs what the end-to-end tests (crates/walcast/tests/e2e.rs) need, and
# skips what is already there:
#   - moto server (S3 API) in a Python venv at .tools/moto
#   - nginx (plain HTTP server) from Debian
# Idempotent: run it as often as you like.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.tools/moto
say() { printf 'e2e-deps: %s\n' "$*"; }

# --- moto -------------------------------------------------------------------
moto_works() {
  [ -x "$VENV/bin/moto_server" ] &&
    "$VENV/bin/python" -c 'import moto.server, boto3, flask' >/dev/null 2>&1
}

if moto_works; then
  say "skip moto: $VENV/bin/moto_server already works"
else
  PY="${PYTHON:-python3}"
  command -v "$PY" >/dev/null || { say "error: $PY not found (need Python >= 3.9)"; exit 1; }
  say "installing moto[server] and boto3 into $VENV"
  mkdir -p .tools
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check 'moto[server]' boto3
  moto_works || { say "error: moto_server still does not work after install"; exit 1; }
  say "moto installed: $("$VENV/bin/python" -c 'import moto; print(moto.__version__)')"
fi

# --- nginx ------------------------------------------------------------------
if command -v nginx >/dev/null 2>&1; then
  say "skip nginx: $(command -v nginx) already on PATH"
elif [ -x /usr/sbin/nginx ]; then
  say "skip nginx: /usr/sbin/nginx already installed"
else
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  say "installing nginx with apt-get"
  if ! $SUDO apt-get install -y -q --no-install-recommends nginx >/dev/null 2>&1; then
    say "apt-get install failed; running apt-get update first"
    $SUDO apt-get update -q >/dev/null
    $SUDO apt-get install -y -q --no-install-recommends nginx >/dev/null
  fi
  # The package may start a system nginx on port 80; the tests start their own.
  if command -v service >/dev/null 2>&1; then $SUDO service nginx stop >/dev/null 2>&1 || true; fi
  [ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1 ||
    { say "error: nginx still missing after install"; exit 1; }
  say "nginx installed: $( (/usr/sbin/nginx -v || nginx -v) 2>&1 | head -1)"
fi

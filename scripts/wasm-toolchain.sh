#!/usr/bin/env bash
# wasm32 toolchain for walcast: source it (defines `wasm_cargo`) or run it
# (installs, then prints how to build). Idempotent: installs only what is missing.
#
#   source scripts/wasm-toolchain.sh && wasm_cargo build --release -p walcast-wasm-probe
#
# Order of preference (see shared TOOLING.md, "wasm32 toolchain"):
#   1. a rustup toolchain with the wasm32-unknown-unknown target installed;
#   2. one `timeout 20 rustup target add` per checkout (it hangs without internet;
#      a failure is remembered in target/wasm/.rustup-target-add-failed);
#   3. Debian's rustc-web/cargo-web + rust-web-src, building std via -Zbuild-std.
# WALCAST_WASM_TOOLCHAIN=rustup|debian forces one of them (default: auto).
# Either way wasm builds go to their own target dir, target/wasm, so the
# native toolchain's target/ is never touched.

WALCAST_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WALCAST_WASM_TARGET_DIR="$WALCAST_ROOT/target/wasm"
WALCAST_WASM_OUT="$WALCAST_WASM_TARGET_DIR/wasm32-unknown-unknown"
export WALCAST_ROOT WALCAST_WASM_TARGET_DIR WALCAST_WASM_OUT

# Installs what is missing; prints the mode (rustup|debian) on stdout, logs on stderr.
# Runs in a subshell so `set -e` never leaks into a shell that sources this file.
_walcast_wasm_setup() (
  set -euo pipefail
  log() { echo "wasm-toolchain: $*" >&2; }
  has_rustup_target() {
    command -v rustup >/dev/null &&
      timeout 20 rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown
  }
  want=${WALCAST_WASM_TOOLCHAIN:-auto}
  if [[ $want != debian ]] && has_rustup_target; then echo rustup; return; fi
  [[ $want == rustup ]] && { log "no rustup wasm32-unknown-unknown target"; return 1; }
  stamp="$WALCAST_WASM_TARGET_DIR/.rustup-target-add-failed"
  if [[ $want == auto && ! -e $stamp ]] && command -v rustup >/dev/null; then
    log "trying 'rustup target add wasm32-unknown-unknown' (20 s limit, once)"
    if timeout 20 rustup target add wasm32-unknown-unknown >&2 && has_rustup_target; then
      echo rustup; return
    fi
    mkdir -p "$WALCAST_WASM_TARGET_DIR" && touch "$stamp"
    log "rustup target unavailable; falling back to Debian rustc-web (rm $stamp to retry)"
  fi
  pkgs=(rustc-web cargo-web rust-web-src lld binaryen)
  missing=()
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
  done
  if ((${#missing[@]})); then
    log "installing ${missing[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    sudo=""; [[ $(id -u) == 0 ]] || sudo="sudo"
    # apt-get update only when the lists don't know a package, or an install fails.
    if ! apt-cache show "${missing[@]}" >/dev/null 2>&1; then $sudo apt-get update -qq >&2; fi
    $sudo apt-get install -y -qq "${missing[@]}" >&2 ||
      { $sudo apt-get update -qq >&2 && $sudo apt-get install -y -qq "${missing[@]}" >&2; }
  fi
  [[ -x /usr/bin/rustc && -x /usr/bin/cargo && -d /usr/lib/rustlib/src/rust/library ]] ||
    { log "Debian rustc/cargo/rust-src not found after install"; return 1; }
  command -v wasm-ld >/dev/null || { log "wasm-ld (package lld) not found"; return 1; }
  echo debian
)

# wasm_cargo <cargo subcommand> [args...]: cargo for wasm32-unknown-unknown in target/wasm.
wasm_cargo() {
  local sub=$1; shift
  if [[ $WALCAST_WASM_MODE == rustup ]]; then
    (cd "$WALCAST_ROOT" && cargo "$sub" --target wasm32-unknown-unknown \
      --target-dir "$WALCAST_WASM_TARGET_DIR" "$@")
  else
    # Debian's rustc 1.96 only for wasm; RUSTC_BOOTSTRAP lets stable use -Zbuild-std.
    (cd "$WALCAST_ROOT" && CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER=wasm-ld \
      RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1 /usr/bin/cargo "$sub" \
      --target wasm32-unknown-unknown --target-dir "$WALCAST_WASM_TARGET_DIR" \
      -Zbuild-std=std,panic_abort "$@")
  fi
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  # Run directly: install, then print how to build.
  set -euo pipefail
  WALCAST_WASM_MODE="$(_walcast_wasm_setup)"
  echo "wasm toolchain: $WALCAST_WASM_MODE"
  echo "build with: source scripts/wasm-toolchain.sh && wasm_cargo build --release -p <crate>"
  if [[ $WALCAST_WASM_MODE == rustup ]]; then
    echo "  (= cargo build --release -p <crate> --target wasm32-unknown-unknown --target-dir target/wasm)"
  else
    echo "  (= CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER=wasm-ld RUSTC=/usr/bin/rustc RUSTC_BOOTSTRAP=1"
    echo "     /usr/bin/cargo build --release -p <crate> --target wasm32-unknown-unknown"
    echo "     --target-dir target/wasm -Zbuild-std=std,panic_abort)"
  fi
  echo "output: target/wasm/wasm32-unknown-unknown/release/"
else
  # Sourced: install, export the mode; leave the caller's shell options alone.
  WALCAST_WASM_MODE="$(_walcast_wasm_setup)" || return 1
  export WALCAST_WASM_MODE
fi

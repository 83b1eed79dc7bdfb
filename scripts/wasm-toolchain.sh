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

# The flags of `wasm-opt` for the shipped module (scripts/build-js.sh) and the
# modules measured beside it. `--converge` repeats -Oz while it still shrinks
# the module. `--low-memory-unused` lets wasm-opt fold constant offsets into
# loads and stores: it assumes the program never uses the memory below
# address 1,024 (a folded access that would have reached it traps instead).
# The module is linked stack first (data from 1 MiB, the stack below it
# growing down), so that memory is the last KiB of a 1 MiB stack, which
# the module never reaches. Measured on
# 2026-12-03: 102,643 -> 101,935 bytes gzip -9 for the second flag,
# -> 102,367 for the first. The `producers` and `target_features` custom
# sections (toolchain names and the features the code was compiled with, for
# linkers; no runtime reads them) are stripped: 102,367 -> 102,177 bytes
# gzip -9, measured on 2026-12-03. Before -Oz, the code is first flattened
# and its control flow rebuilt (`--flatten --rereloop --simplify-locals`),
# and after it functions that differ only in constants are merged
# (`--merge-similar-functions`, then -Oz again): 103,233 -> 102,327 bytes
# gzip -9 on 2026-12-06 (about 22 s instead of 10).
WALCAST_WASM_OPT_FLAGS=(--flatten --rereloop --simplify-locals -Oz --converge
  --merge-similar-functions -Oz --converge --low-memory-unused --enable-bulk-memory
  --enable-nontrapping-float-to-int --enable-sign-ext --enable-mutable-globals
  --enable-reference-types --enable-multivalue --strip-producers
  --strip-target-features)

# wasm_module_build: builds crates/walcast-wasm for size, as shipped, into
# target/wasm-module (a target dir of its own: its flags differ from the
# other wasm builds, which would otherwise rebuild each other's
# dependencies). Sets WALCAST_WASM_MODULE to the module's path and
# WALCAST_WASM_BUILD to how it was built. Profile `wasm`: opt-level "z", one
# codegen unit, LTO, no debug info. Where the toolchain allows (std sources:
# rustup's rust-src component, or Debian's rust-web-src) std is built with
# the module (-Zbuild-std, RUSTC_BOOTSTRAP on a stable compiler) with
# `optimize_for_size`, and a panic is an immediate trap (no panic message
# formatting in the module: the JS side reports a trap as code `internal`).
# Measured on 2026-12-02: 151,789 -> 141,405 bytes gzip -9 after wasm-opt.
# -Zlocation-detail=none leaves the source paths of panic locations (of no
# use in a trap) out of the module: 102,463 -> 101,742 bytes gzip -9 on
# 2026-12-03. With sha2's compact SHA-256 (walcast-wasm's wasm32 dependency) and
# --cfg walcast_panic_trap on the Debian path: 100,514 B (rustup 1.95) and
# 106,254 B (Debian 1.85) gzip -9 after wasm-opt, on 2026-12-03.
# Where that build fails, the plain build (std as shipped, panic=abort) is
# made and WALCAST_WASM_BUILD says so.
#
# WALCAST_WASM_FEATURES (optional): cargo features of walcast-wasm to build
# with, into a target dir of their own (target/wasm-module-<features>), e.g.
# `bench-hooks` for the benchmark's module (scripts/build-bench-wasm.sh).
wasm_module_build() {
  local dir="$WALCAST_ROOT/target/wasm-module"
  local features=()
  if [[ -n ${WALCAST_WASM_FEATURES:-} ]]; then
    dir="$dir-${WALCAST_WASM_FEATURES//[^a-z0-9]/-}"
    features=(--features "$WALCAST_WASM_FEATURES")
  fi
  local profile=(CARGO_PROFILE_WASM_INHERITS=release CARGO_PROFILE_WASM_OPT_LEVEL=z
    CARGO_PROFILE_WASM_LTO=true CARGO_PROFILE_WASM_CODEGEN_UNITS=1 CARGO_PROFILE_WASM_DEBUG=false)
  local size_std=0
  if [[ $WALCAST_WASM_MODE == rustup ]]; then
    if rustup component list --installed 2>/dev/null | grep -q '^rust-src' ||
      timeout 60 rustup component add rust-src >&2; then
      size_std=1
    fi
  else
    size_std=1
  fi
  WALCAST_WASM_MODULE="$dir/wasm32-unknown-unknown/wasm/walcast_wasm.wasm"
  if ((size_std)) && (
    cd "$WALCAST_ROOT" && export "${profile[@]}" CARGO_PROFILE_WASM_PANIC=immediate-abort \
      RUSTC_BOOTSTRAP=1 RUSTFLAGS="-Zunstable-options -Zlocation-detail=none" &&
      if [[ $WALCAST_WASM_MODE == rustup ]]; then
        cargo build --profile wasm -p walcast-wasm "${features[@]}" --target wasm32-unknown-unknown \
          --target-dir "$dir" -Zbuild-std=std,panic_abort \
          -Zbuild-std-features=optimize_for_size -Zpanic-immediate-abort
      else
        # Debian's cargo (1.85) predates -Zpanic-immediate-abort and the
        # profile's `immediate-abort`: std's feature of that name does it,
        # and --cfg walcast_panic_trap tells walcast-wasm that no panic hook
        # can ever run (its `cfg(panic = "immediate-abort")` otherwise).
        CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER=wasm-ld RUSTC=/usr/bin/rustc \
          CARGO_PROFILE_WASM_PANIC=abort RUSTFLAGS="$RUSTFLAGS --cfg walcast_panic_trap" \
          /usr/bin/cargo build --profile wasm -p walcast-wasm "${features[@]}" --target wasm32-unknown-unknown \
          --target-dir "$dir" -Zbuild-std=std,panic_abort \
          -Zbuild-std-features=optimize_for_size,panic_immediate_abort
      fi
  ); then
    WALCAST_WASM_BUILD="std built for size, panics trap"
  else
    ((size_std)) && echo "wasm-toolchain: the size build failed; building with std as shipped" >&2
    (cd "$WALCAST_ROOT" && export "${profile[@]}" CARGO_PROFILE_WASM_PANIC=abort &&
      WALCAST_WASM_TARGET_DIR="$dir" wasm_cargo build --profile wasm -p walcast-wasm "${features[@]}") || return 1
    WALCAST_WASM_BUILD="std as shipped, panic=abort"
  fi
  export WALCAST_WASM_MODULE WALCAST_WASM_BUILD
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

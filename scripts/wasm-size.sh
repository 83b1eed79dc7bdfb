#!/usr/bin/env bash
# Where the wasm module's bytes go: builds crates/walcast-wasm as
# scripts/build-js.sh does (profile `wasm`), installs twiggy into .tools/twiggy
# (cargo install, about 2 minutes, once) and prints the bytes of code and data
# by crate and the largest functions (names come from cargo's output, before
# wasm-bindgen and wasm-opt strip them), then the shipped module's size.
# Not part of scripts/test.sh. Usage: bash scripts/wasm-size.sh [TOP]
set -euo pipefail
cd "$(dirname "$0")/.."
top=${1:-20}
twiggy=.tools/twiggy/bin/twiggy
if ! "$twiggy" --version >/dev/null 2>&1; then
  echo "wasm-size: installing twiggy into .tools/twiggy" >&2
  cargo install twiggy --root .tools/twiggy >&2
fi
# shellcheck source=wasm-toolchain.sh
source scripts/wasm-toolchain.sh
export CARGO_PROFILE_WASM_INHERITS=release CARGO_PROFILE_WASM_OPT_LEVEL=z \
  CARGO_PROFILE_WASM_LTO=true CARGO_PROFILE_WASM_CODEGEN_UNITS=1 \
  CARGO_PROFILE_WASM_DEBUG=false CARGO_PROFILE_WASM_PANIC=abort
wasm_cargo build --profile wasm -p walcast-wasm >&2
module="$WALCAST_WASM_OUT/wasm/walcast_wasm.wasm"
"$twiggy" top -n 1000000 --format csv "$module" | python3 scripts/wasm-size.py "$top"
bg=js/dist/wasm/walcast_wasm_bg.wasm
if [[ -f $bg ]]; then
  echo
  echo "shipped module ($bg, after wasm-bindgen and wasm-opt -Oz): $(stat -c %s "$bg") bytes raw, $(gzip -9c "$bg" | wc -c) gzip -9"
fi

#!/usr/bin/env bash
# Where the wasm module's bytes go: builds crates/walcast-wasm as
# scripts/build-js.sh does (profile `wasm`), installs twiggy into .tools/twiggy
# (cargo install, about 2 minutes, once) and prints the bytes of code and data
# by crate and the largest functions in two forms: cargo's output (before
# wasm-bindgen and wasm-opt), and the module as it ships (wasm-bindgen, then
# `wasm-opt -Oz` with the flags of build-js.sh, plus -g so that the names stay
# for this report: the code is that of the shipped module), then the shipped
# module's sections and largest data segments, raw and gzip -9. The second
# form needs the tools build-js.sh installs (run it once first).
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
wasm_module_build >&2
module="$WALCAST_WASM_MODULE"
echo "module built with: $WALCAST_WASM_BUILD"
echo "## cargo's output ($module)"
"$twiggy" top -n 1000000 --format csv "$module" | python3 scripts/wasm-size.py "$top"
export PATH="$HOME/.cargo/bin:$PATH"
wasm_opt=.tools/binaryen/node_modules/.bin/wasm-opt
if command -v wasm-bindgen >/dev/null && "$wasm_opt" --version >/dev/null 2>&1; then
  dir="$WALCAST_WASM_TARGET_DIR/size"
  rm -rf "$dir" && mkdir -p "$dir"
  wasm-bindgen --target web --no-typescript --out-dir "$dir" --out-name walcast_wasm "$module"
  "$wasm_opt" "${WALCAST_WASM_OPT_FLAGS[@]}" -o "$dir/shipped.wasm" "$dir/walcast_wasm_bg.wasm"
  "$wasm_opt" "${WALCAST_WASM_OPT_FLAGS[@]}" -g -o "$dir/named.wasm" "$dir/walcast_wasm_bg.wasm"
  echo
  echo "## as shipped (after wasm-bindgen and wasm-opt -Oz; names kept for this report)"
  "$twiggy" top -n 1000000 --format csv "$dir/named.wasm" | python3 scripts/wasm-size.py "$top"
  echo
  python3 scripts/wasm-size.py --sections "$dir/shipped.wasm"
else
  echo "wasm-size: no wasm-bindgen or wasm-opt yet (bash scripts/build-js.sh installs them): cargo's output only" >&2
fi
bg=js/dist/wasm/walcast_wasm_bg.wasm
if [[ -f $bg ]]; then
  echo
  echo "shipped module ($bg, after wasm-bindgen and wasm-opt -Oz): $(stat -c %s "$bg") bytes raw, $(gzip -9c "$bg" | wc -c) gzip -9"
fi

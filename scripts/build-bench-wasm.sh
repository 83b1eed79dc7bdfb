#!/usr/bin/env bash
# The benchmark's wasm module: crates/walcast-wasm built exactly as the
# shipped module (scripts/build-js.sh: profile `wasm`, wasm-bindgen, wasm-opt
# with the same flags) plus the feature `bench-hooks`, whose exports
# `benchReplay` and `benchStateMemory` tests/js/bench.mjs calls. Writes
# target/wasm-bench/pkg/walcast_wasm.js and walcast_wasm_bg.wasm. Needs the
# tools scripts/build-js.sh installs (run it first). Not part of the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "build-bench-wasm: $*" >&2; }
# shellcheck source=wasm-toolchain.sh
source scripts/wasm-toolchain.sh
export PATH="$HOME/.cargo/bin:$PATH"
WALCAST_WASM_FEATURES=bench-hooks wasm_module_build >&2
module="$WALCAST_WASM_MODULE"
out=target/wasm-bench/pkg
wasm_opt=.tools/binaryen/node_modules/.bin/wasm-opt
command -v wasm-bindgen >/dev/null && "$wasm_opt" --version >/dev/null 2>&1 ||
  { say "no wasm-bindgen or wasm-opt: run scripts/build-js.sh first"; exit 1; }
stamp=$out/.inputs
inputs="$(sha256sum "$module" | cut -d' ' -f1) ${WALCAST_WASM_OPT_FLAGS[*]}"
if [[ -f $stamp && $(cat "$stamp") == "$inputs" ]]; then
  say "module unchanged: $out"
  exit 0
fi
rm -rf "$out" && mkdir -p "$out"
wasm-bindgen --target web --no-typescript --out-dir "$out" --out-name walcast_wasm "$module"
"$wasm_opt" "${WALCAST_WASM_OPT_FLAGS[@]}" -o "$out/opt.wasm" "$out/walcast_wasm_bg.wasm"
mv "$out/opt.wasm" "$out/walcast_wasm_bg.wasm"
printf '%s' "$inputs" >"$stamp"
say "wrote $out ($WALCAST_WASM_BUILD, with bench-hooks)"

#!/usr/bin/env bash
# Builds the npm package `walcast` into js/dist/ from a fresh machine:
#   1. the wasm32 toolchain (scripts/wasm-toolchain.sh: a rustup wasm32 target,
#      else Debian's rustc-web with -Zbuild-std) builds crates/walcast-wasm;
#   2. wasm-bindgen-cli at exactly the version of `wasm-bindgen` in Cargo.lock
#      (cargo install, ~4 min, skipped when `wasm-bindgen --version` matches)
#      writes the `--target web` glue to js/dist/wasm/;
#   3. wasm-opt -Oz (Debian's binaryen) shrinks walcast_wasm_bg.wasm;
#   4. js/src/*.js is copied next to it (js/dist/{replica,idb,node,web,workerd}.js);
#   5. prints the module's size, raw and gzipped.
# Steps 2-3 are skipped when the cargo output and the CLI version are those of
# the last build (cargo itself is incremental). Output: js/dist/ (gitignored).
# Usage: bash scripts/build-js.sh   (WALCAST_WASM_TOOLCHAIN=rustup|debian to force one)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
say() { printf 'build-js: %s\n' "$*"; }
fail() { say "FAIL: $*" >&2; exit 1; }

# shellcheck source=wasm-toolchain.sh
source scripts/wasm-toolchain.sh || fail "wasm toolchain setup failed"
say "toolchain $WALCAST_WASM_MODE"

# --- 1. cargo -------------------------------------------------------------------
# The module is built for size (scripts/wasm-toolchain.sh, wasm_module_build):
# profile `wasm` (opt-level "z", one codegen unit, LTO, no debug info) and,
# where the toolchain has std's sources, std built for size with panics as
# immediate traps. `bash scripts/wasm-size.sh` shows where the bytes go.
start=$SECONDS
wasm_module_build || fail "wasm32 build of walcast-wasm failed"
say "cargo build took $((SECONDS - start)) s ($WALCAST_WASM_BUILD)"
module="$WALCAST_WASM_MODULE"
[[ -f $module ]] || fail "no module at $module"

# --- 2. wasm-bindgen-cli at the Cargo.lock version -------------------------------
want=$(awk '$0 == "name = \"wasm-bindgen\"" { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)
[[ -n $want ]] || fail "no wasm-bindgen in Cargo.lock"
export PATH="$HOME/.cargo/bin:$PATH"
have=$(wasm-bindgen --version 2>/dev/null | awk '{print $2}' || true)
if [[ $have == "$want" ]]; then
  say "skip wasm-bindgen-cli: $want installed"
else
  say "installing wasm-bindgen-cli $want (have: ${have:-none}; about 4 min)"
  # No --locked: a locked dependency version of the CLI is missing from the registry here.
  cargo install wasm-bindgen-cli --version "$want" --force ||
    fail "cargo install wasm-bindgen-cli --version $want failed"
  have=$(wasm-bindgen --version | awk '{print $2}')
  [[ $have == "$want" ]] || fail "wasm-bindgen --version says $have, want $want"
fi

# --- 3. wasm-opt ------------------------------------------------------------------
# Debian's binaryen (108) breaks wasm-bindgen's externref table ("failed to grow
# table"), so wasm-opt comes from npm's `binaryen` package (a current release,
# run by Node), installed under .tools/binaryen.
WASM_OPT=.tools/binaryen/node_modules/.bin/wasm-opt
if ! "$WASM_OPT" --version >/dev/null 2>&1; then
  say "installing binaryen (wasm-opt) from npm into .tools/binaryen"
  mkdir -p .tools/binaryen
  (cd .tools/binaryen && npm install --silent --no-audit --no-fund binaryen@132 >/dev/null) ||
    fail "npm install binaryen failed"
fi
wasm-opt() { "$WASM_OPT" "$@"; }

out=js/dist
wasm_dir=$out/wasm
bg=$wasm_dir/walcast_wasm_bg.wasm
stamp=$wasm_dir/.inputs
inputs="$(sha256sum "$module" | cut -d' ' -f1) wasm-bindgen-$have $(wasm-opt --version 2>/dev/null | head -1) ${WALCAST_WASM_OPT_FLAGS[*]}"
if [[ -f $stamp && -f $bg && -f $wasm_dir/walcast_wasm.js && $(cat "$stamp") == "$inputs" ]]; then
  say "skip wasm-bindgen + wasm-opt: module unchanged"
else
  rm -rf "$wasm_dir"
  mkdir -p "$wasm_dir"
  wasm-bindgen --target web --no-typescript --out-dir "$wasm_dir" --out-name walcast_wasm "$module" ||
    fail "wasm-bindgen failed"
  before=$(stat -c %s "$bg")
  wasm-opt "${WALCAST_WASM_OPT_FLAGS[@]}" -o "$bg.opt" "$bg" || fail "wasm-opt failed"
  mv "$bg.opt" "$bg"
  say "wasm-opt ${WALCAST_WASM_OPT_FLAGS[*]:0:3}: $before -> $(stat -c %s "$bg") bytes"
  printf '%s' "$inputs" >"$stamp"
fi

# --- 4. the JS sources ----------------------------------------------------------------
for f in js/src/*.js; do
  cp "$f" "$out/$(basename "$f")"
done
# Files of an older layout that no longer have a source.
for f in "$out"/*.js; do
  [[ -f js/src/$(basename "$f") ]] || rm -f "$f"
done

# --- 5. sizes ----------------------------------------------------------------------------
raw=$(stat -c %s "$bg")
gz=$(gzip -9c "$bg" | wc -c)
glue=$(cat "$wasm_dir/walcast_wasm.js" "$out"/*.js | wc -c)
glue_gz=$(cat "$wasm_dir/walcast_wasm.js" "$out"/*.js | gzip -9c | wc -c)
say "$bg: $raw bytes raw, $gz bytes gzip -9"
say "JS (glue + wrapper): $glue bytes raw, $glue_gz bytes gzip -9"
say "OK: js/dist ($(cd "$out" && ls | tr '\n' ' '))"

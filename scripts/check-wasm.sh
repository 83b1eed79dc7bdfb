#!/usr/bin/env bash
# Proves walcast-core builds for wasm32-unknown-unknown and runs with no host imports:
#   1. builds tests/wasm-probe (cdylib linking walcast-core) in release for wasm32;
#   2. parses the module's import section (inline Python, stdlib only): any import fails;
#   3. prints the module size, raw and gzipped (also without custom/debug sections);
#   4. instantiates it in Node with an empty import object and calls walcast_probe_run.
# Usage: bash scripts/check-wasm.sh   (WALCAST_WASM_TOOLCHAIN=rustup|debian to force one)
set -euo pipefail
cd "$(dirname "$0")/.."
fail() { echo "check-wasm: FAIL: $*" >&2; exit 1; }

# shellcheck source=wasm-toolchain.sh
source scripts/wasm-toolchain.sh || fail "wasm toolchain setup failed"
echo "check-wasm: toolchain $WALCAST_WASM_MODE, target dir target/wasm"

start=$SECONDS
wasm_cargo build --release -p walcast-wasm-probe || fail "wasm32 build of walcast-wasm-probe failed"
echo "check-wasm: build took $((SECONDS - start)) s"
wasm="$WALCAST_WASM_OUT/release/walcast_wasm_probe.wasm"
[[ -f $wasm ]] || fail "no module at $wasm"

# Imports: walk the sections; list every import, fail if there is any (env or other).
# Also writes a copy without custom sections (names, DWARF) to report its size.
python3 - "$wasm" "${wasm%.wasm}.stripped.wasm" <<'PY' || fail "module has imports or is malformed"
import sys
data = open(sys.argv[1], "rb").read()
assert data[:8] == b"\0asm\1\0\0\0", "not a wasm v1 module"
pos = 8
def uleb():
    global pos
    val = shift = 0
    while True:
        b = data[pos]; pos += 1
        val |= (b & 0x7F) << shift; shift += 7
        if b < 0x80: return val
def name():
    global pos
    n = uleb(); s = data[pos:pos + n].decode(); pos += n; return s
def limits():
    global pos
    flags = data[pos]; pos += 1; uleb()
    if flags & 1: uleb()
imports, exports, kept = [], [], [data[:8]]
while pos < len(data):
    start, sid = pos, data[pos]; pos += 1
    size = uleb(); end = pos + size
    if sid != 0: kept.append(data[start:end])
    if sid == 2:  # import section
        for _ in range(uleb()):
            mod, field, kind = name(), name(), data[pos]; pos += 1
            if kind == 0: uleb()                        # func: type index
            elif kind == 1: pos += 1; limits()          # table: reftype, limits
            elif kind == 2: limits()                    # memory
            elif kind == 3: pos += 2                    # global: valtype, mut
            elif kind == 4: pos += 1; uleb()            # tag
            imports.append((mod, field, "func table memory global tag".split()[kind]))
    elif sid == 7:  # export section
        for _ in range(uleb()):
            exports.append(name()); pos += 1; uleb()
    pos = end
open(sys.argv[2], "wb").write(b"".join(kept))
print("check-wasm: exports:", ", ".join(exports))
for mod, field, kind in imports:
    print(f"check-wasm: import {mod}.{field} ({kind})" + ("  <-- env import" if mod == "env" else ""))
if imports:
    sys.exit(f"check-wasm: {len(imports)} import(s); the module must import nothing")
print("check-wasm: imports: none")
PY

for f in "$wasm" "${wasm%.wasm}.stripped.wasm"; do
  printf 'check-wasm: size %-34s %8d bytes raw, %8d bytes gzip -9\n' \
    "$(basename "$f")" "$(stat -c %s "$f")" "$(gzip -9c "$f" | wc -c)"
done

# Run it: empty import object, alloc + fill a small buffer, call the probe.
command -v node >/dev/null || fail "node (20+) not found"
node -e '
const fs = require("fs");
const mod = new WebAssembly.Module(fs.readFileSync(process.argv[1]));
const e = new WebAssembly.Instance(mod, {}).exports;  // empty import object
const input = Buffer.from("walcast wasm probe");
const ptr = e.walcast_probe_alloc(input.length);
new Uint8Array(e.memory.buffer, ptr, input.length).set(input);
const out = e.walcast_probe_run(ptr, input.length) >>> 0;
console.log(`check-wasm: node ${process.version}: walcast_probe_run(${input.length} bytes) = 0x${out.toString(16)}`);
' "$wasm" || fail "running the module in node failed"
echo "check-wasm: OK"

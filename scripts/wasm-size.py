#!/usr/bin/env python3
"""Where a wasm module's bytes go, by crate: reads `twiggy top --format csv`
of a module that still has its name section (cargo's output, before
wasm-bindgen and wasm-opt) and prints the top crates and functions.

Usage: twiggy top -n 1000000 --format csv M.wasm | python3 scripts/wasm-size.py [N]
"""
import csv
import re
import sys

top = int(sys.argv[1]) if len(sys.argv) > 1 else 15
rows = list(csv.DictReader(sys.stdin))
by_crate = {}
funcs = []
code = 0
for r in rows:
    name, size = r["Name"], int(r["ShallowSize"])
    if name.startswith("custom section") or "subsection" in name or name.startswith("Σ"):
        continue  # debug info and names: stripped by wasm-bindgen / wasm-opt
    code += size
    if name.startswith("data segment"):
        crate = "(data)"
    else:
        # `<&mut serde_json::de::X as T>::f` -> serde_json; `core[abc]::x` -> core
        m = re.match(r"[<&\s]*(?:mut\s+|dyn\s+)?([A-Za-z_][A-Za-z0-9_]*)", name)
        crate = m.group(1) if m else "(other)"
        if "::" not in name:
            crate = "(unnamed: " + ("wasm-bindgen glue" if name.startswith(("__wbg", "__wbindgen")) else "other") + ")"
        funcs.append((size, name))
    by_crate[crate] = by_crate.get(crate, 0) + size
print(f"code and data (without debug info and names): {code} bytes")
print("| crate | bytes | share |\n| --- | ---: | ---: |")
for c, s in sorted(by_crate.items(), key=lambda x: -x[1])[:top]:
    print(f"| {c} | {s} | {100 * s / code:.1f} % |")
print("\n| largest functions | bytes |\n| --- | ---: |")
for s, n in sorted(funcs, reverse=True)[:top]:
    n = re.sub(r"::h[0-9a-f]{16}$", "", n)
    print(f"| `{n[:90]}` | {s} |")

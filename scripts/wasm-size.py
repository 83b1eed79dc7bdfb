#!/usr/bin/env python3
"""Where a wasm module's bytes go, by crate: reads `twiggy top --format csv`
of a module that still has its name section (cargo's output, before
wasm-bindgen and wasm-opt) and prints the top crates and functions.

Usage: twiggy top -n 1000000 --format csv M.wasm | python3 scripts/wasm-size.py [N]
       python3 scripts/wasm-size.py --sections M.wasm   (raw and deflated bytes per
       section of a module, and of its largest data segments: what ships;
       deflated with Python's zlib at level 9, within 0.3 % of gzip -9)
"""
import csv
import gzip
import re
import sys


def leb(b, i):
    """Reads an unsigned LEB128 at b[i]; returns (value, next index)."""
    r = s = 0
    while True:
        x = b[i]
        i += 1
        r |= (x & 0x7F) << s
        s += 7
        if x < 0x80:
            return r, i


def sections(path):
    """Prints each section's raw and zlib -9 bytes, then the data section's
    largest segments (tables such as float-parsing powers, Unicode tables,
    panic locations, messages)."""
    b = open(path, "rb").read()
    names = {0: "custom", 1: "type", 2: "import", 3: "function", 4: "table", 5: "memory",
             6: "global", 7: "export", 8: "start", 9: "element", 10: "code", 11: "data", 12: "datacount"}
    print(f"{path}: {len(b)} bytes raw, {len(gzip.compress(b, 9))} zlib -9")
    print("| section | raw | zlib -9 alone |\n| --- | ---: | ---: |")
    i, data = 8, None
    while i < len(b):
        sid = b[i]
        n, i = leb(b, i + 1)
        body = b[i:i + n]
        print(f"| {names.get(sid, sid)} | {n} | {len(gzip.compress(body, 9))} |")
        if sid == 11:
            data = body
        i += n
    if data is None:
        return
    segs, j = [], 0
    count, j = leb(data, j)
    for _ in range(count):
        flag, j = leb(data, j)
        if flag != 0:
            return  # passive or multi-memory segments: not produced by this build
        while data[j] != 0x0B:  # the offset expression, up to `end`
            j += 1
        n, j = leb(data, j + 1)
        segs.append(data[j:j + n])
        j += n
    print("\n| largest data segments | raw | zlib -9 | starts with |\n| --- | ---: | ---: | --- |")
    for seg in sorted(segs, key=len, reverse=True)[:8]:
        text = re.sub(rb"[^\x20-\x7e]+", b" ", seg[:400]).decode()
        text = re.sub(r"\s+", " ", text).strip()[:60].replace("|", "/")
        print(f"| | {len(seg)} | {len(gzip.compress(seg, 9))} | `{text}` |")


if len(sys.argv) > 2 and sys.argv[1] == "--sections":
    sections(sys.argv[2])
    sys.exit(0)

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

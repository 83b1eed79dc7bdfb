// Node (and Bun) entry: the module's bytes come from the file next to this one.
import { readFile } from "node:fs/promises";
import { setWasmSource } from "./replica.js";

setWasmSource(() => readFile(new URL("./wasm/walcast_wasm_bg.wasm", import.meta.url)));

export { Replica, init, shouldReplace } from "./replica.js";

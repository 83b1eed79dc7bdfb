// Cloudflare Workers (workerd) entry: the bundler/runtime imports the .wasm as
// a compiled WebAssembly.Module (workers may not compile wasm from bytes).
import wasm from "./wasm/walcast_wasm_bg.wasm";
import { setWasmSource } from "./replica.js";

setWasmSource(() => wasm);

export { Replica, init, shouldReplace } from "./replica.js";

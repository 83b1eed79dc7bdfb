// Cloudflare Workers (workerd) entry: the bundler/runtime imports the .wasm as
// a compiled WebAssembly.Module (workers may not compile wasm from bytes).
import wasm from "./wasm/walcast_wasm_bg.wasm";
import { setRequestScopedIo, setWasmSource } from "./replica.js";

setWasmSource(() => wasm);
// A request's I/O is torn down with it, and a promise one request resolves
// for another may continue in the wrong request: each request drives the
// replica for itself (see replica.js, "the module's GETs").
setRequestScopedIo(true);

export { Replica, init, shouldReplace } from "./replica.js";

// The wasm module: one compiled module, a replaceable instance.
//
// Traps. Every call into the module is synchronous (JS steps the module,
// performs the GETs it asks for and hands every answer back; see
// crates/walcast-wasm), so a trap (a Rust
// panic aborts; a stack overflow) surfaces at the call. The module instance
// is then poisoned for good (borrows stay taken, its stack is not unwound),
// so it is replaced: every live replica's state is carried over to a fresh
// instance of the same compiled module, and the replica whose call trapped is
// rebuilt from its last good state — its state as it was when a read trapped,
// else its persisted copy, else empty (the next sync fetches the dataset
// again; a lazy replica always starts over: its next read syncs first).

import * as glue from "./wasm/walcast_wasm.js";
import { MAX_TIMER_MS, noop, walcastError } from "./util.js";

let wasmSource = null; // () => source: a WebAssembly.Module, bytes, a Response, or a URL
let wasmReady = null;

/**
 * The instance the wasm-bindgen glue calls. The glue keeps one `wasm`
 * object for good; it is `engine.shim`, whose properties are the current
 * instance's exports, so a fresh instance is swapped in underneath it.
 */
export const engine = {
  module: null,
  imports: null, // the glue's import object (captured while it initialises)
  shim: null,
  exports: null, // the current instance's exports
  replaceable: false, // false when the glue could not be set up this way
  pending: null, // an asynchronous replacement in progress
  poisoned: false, // a trap's instance is still installed: no fresh one came yet
};

// Test-only faults, armed through the trap hook: the next re-instantiations
// of the module, or constructions of a WasmReplica in a rebuild, fail.
export const testFaults = { instantiate: 0, construct: 0 };
/** Test-only: throws when a fault of `kind` is armed (and disarms one). */
export function testFault(kind) {
  if (testFaults[kind] > 0) {
    testFaults[kind]--;
    throw new Error(`walcast test: the ${kind} fails`);
  }
}

/** How long loading the wasm module may take, by default (`init`'s `timeoutMs`). */
const WASM_LOAD_TIMEOUT_MS = 60_000;

/**
 * The most bytes a module answer may have (the module is some 230 KB): a
 * server sending more, or claiming more, fails the load with `data`.
 */
const WASM_MAX_BYTES = 16 << 20;

/** Called by the runtime entry: how to get the module when first needed. */
export function setWasmSource(fn) {
  wasmSource = fn;
}

/**
 * Loads and instantiates the wasm module (once). `Replica.open` calls it; call
 * it yourself to load early, or to pass the module yourself (a
 * `WebAssembly.Module`, the bytes, a `Response`, or a URL). Rejects with code
 * "timeout" when the module is not loaded within `options.timeoutMs` (60 s).
 */
export function init(source, options) {
  if (wasmReady) return wasmReady;
  const ms = options?.timeoutMs ?? WASM_LOAD_TIMEOUT_MS;
  if (typeof ms !== "number" || !(ms >= 1)) {
    return Promise.reject(walcastError("invalid_input", `walcast: init's timeoutMs must be a number of milliseconds (at least 1), not ${ms}`));
  }
  // A source given here that can be read again (a module, bytes, a URL)
  // is kept for the loads after a failed one; anything else (a Response,
  // or a promise of one, is read once) serves this load only: after it, a
  // load takes the source there was before.
  const from = source !== undefined ? () => source : wasmSource;
  const again =
    source instanceof WebAssembly.Module ||
    typeof source === "string" ||
    (typeof URL === "function" && source instanceof URL) ||
    source instanceof ArrayBuffer ||
    ArrayBuffer.isView(source);
  if (again) wasmSource = from;
  if (!from) {
    return Promise.reject(walcastError("invalid_input", "walcast: no wasm source; import the package through its runtime entry or call init(source)"));
  }
  {
    // A server that never finishes sending the module fails the load after
    // `timeoutMs` (the fetch is aborted) instead of holding every open;
    // setTimeout's largest delay bounds it (a larger one fires at once).
    const ac = typeof AbortController === "function" ? new AbortController() : null;
    let timer;
    const expired = new Promise((_, reject) => {
      timer = setTimeout(() => {
        ac?.abort();
        reject(walcastError("timeout", `walcast: loading the wasm module: not loaded within ${ms} ms`));
      }, Math.min(ms, MAX_TIMER_MS));
    });
    const load = Promise.resolve()
      .then(from)
      .then((src) => compile(src, ac?.signal));
    wasmReady = Promise.race([load, expired])
      .finally(() => clearTimeout(timer))
      .then(start);
    wasmReady.catch(() => {
      ac?.abort(); // a download cut short is not read on
      wasmReady = null; // let a later call try again
    });
  }
  return wasmReady;
}

async function compile(src, signal) {
  src = await src;
  if (src instanceof WebAssembly.Module) return src;
  if (typeof src === "string" || (typeof URL === "function" && src instanceof URL) || (typeof Request === "function" && src instanceof Request)) {
    src = await fetch(src, signal ? { signal } : undefined);
  }
  if (typeof Response === "function" && src instanceof Response) {
    if (!src.ok) throw walcastError("unavailable", `walcast: loading the wasm module: HTTP ${src.status}`);
    const tooLarge = (n) => walcastError("data", `walcast: loading the wasm module: ${n} bytes, above the ${WASM_MAX_BYTES} a module may have`);
    const claimed = Number(src.headers.get("content-length") ?? NaN);
    if (claimed > WASM_MAX_BYTES) throw tooLarge(claimed);
    // A body of no stated length, or one the runtime decodes (whose
    // decoded length none states), is counted as it streams and cut past
    // the bound (the Response then compiled has no URL of its own).
    let over = null;
    if ((!(claimed >= 0) || src.headers.has("content-encoding")) && src.body && typeof TransformStream === "function") {
      let n = 0;
      const counted = src.body.pipeThrough(
        new TransformStream({
          transform(chunk, c) {
            n += chunk.byteLength;
            if (n > WASM_MAX_BYTES) c.error((over = tooLarge(`more than ${WASM_MAX_BYTES}`)));
            else c.enqueue(chunk);
          },
        }),
      );
      src = new Response(counted, { headers: src.headers });
    }
    const type = src.headers.get("content-type") ?? "";
    try {
      if (typeof WebAssembly.compileStreaming === "function" && type.split(";")[0].trim() === "application/wasm") {
        return await WebAssembly.compileStreaming(src);
      }
      return await WebAssembly.compile(await src.arrayBuffer());
    } catch (e) {
      throw over ?? e;
    }
  }
  if (src instanceof ArrayBuffer || ArrayBuffer.isView(src)) return WebAssembly.compile(src);
  throw walcastError("invalid_input", "walcast: the wasm source must be a WebAssembly.Module, bytes, a Response or a URL");
}

async function start(module) {
  engine.module = module;
  if (!engine.imports) captureImports(module);
  if (engine.imports) {
    engine.replaceable = true;
    install((await WebAssembly.instantiate(module, engine.imports)).exports);
  } else {
    // The glue was set up by someone else (or the runtime froze WebAssembly):
    // its one instance for good (after a trap, replicas are rebuilt in it).
    engine.exports = await glue.default({ module_or_path: module });
  }
}

/**
 * Lets the glue set itself up with `engine.shim` as its instance: its
 * initSync constructs `new WebAssembly.Instance(module, imports)`, which here
 * only hands over the import object.
 */
function captureImports(module) {
  const shim = { __wbindgen_start() {} };
  const Real = WebAssembly.Instance;
  let imports = null;
  try {
    WebAssembly.Instance = function Instance(_module, importObject) {
      imports = importObject;
      return { exports: shim };
    };
    if (WebAssembly.Instance !== Real) glue.initSync({ module });
  } catch {
    // not replaceable here
  } finally {
    if (WebAssembly.Instance !== Real) WebAssembly.Instance = Real;
  }
  if (imports) {
    engine.imports = imports;
    engine.shim = shim;
  }
}

const RealInstance = WebAssembly.Instance;

/** Makes `exports` the instance behind the glue. */
function install(exports) {
  const old = engine.exports;
  Object.assign(engine.shim, exports);
  engine.exports = exports;
  // The glue caches views of the old memory; detaching its buffer makes it
  // take new ones from the fresh instance's memory.
  if (old && old.memory && old.memory !== exports.memory) {
    try {
      old.memory.grow(0);
    } catch {
      // nothing else holds it
    }
  }
  if (typeof exports.__wbindgen_start === "function") exports.__wbindgen_start();
}

// Every live WasmReplica, so a replacement reaches them all. A handle holds
// its WasmReplica strongly until it is freed or retired, so wasm-bindgen's
// own finalizer never frees one behind our back (after a replacement it
// would free a pointer of the old instance in the new one).
export const handles = new Set(); // { w, dead, owner: WeakRef<Replica> }
export const finalizer =
  typeof FinalizationRegistry === "function" ? new FinalizationRegistry((slot) => releaseHandle(slot.h)) : null;

/** Frees a handle's WasmReplica once (a poisoned one goes with its instance). */
export function releaseHandle(h) {
  if (!h || h.dead) return;
  h.dead = true;
  handles.delete(h);
  try {
    h.w.free();
  } catch {
    // a poisoned object: dropped with its instance
  }
}

function isTrap(e) {
  // A trap (unreachable, out-of-bounds access, ...), or a stack overflow /
  // failed memory growth inside the module.
  return e instanceof WebAssembly.RuntimeError || e instanceof RangeError || e?.name === "InternalError";
}

function panicMessage() {
  try {
    return glue.takePanicMessage() ?? null;
  } catch {
    return null;
  }
}

/**
 * Replaces the poisoned instance after a trap in a call of `culprit` (a
 * handle; `kind` "read" when the call only read the state). Returns the
 * Error the trapped call throws.
 */
function recoverFromTrap(cause, culprit, kind) {
  const panic = panicMessage();
  const what = panic ? `it panicked: ${panic.split("\n").slice(-1)[0]}` : `${cause?.name ?? "Error"}: ${cause?.message ?? cause}`;
  const err = walcastError("internal", `walcast: the wasm module trapped (${what}); the replica was rebuilt`, { cause });
  // Carry each replica's state over: a snapshot of every state that no
  // trapped call was changing.
  const moves = [];
  for (const h of [...handles]) {
    const owner = h.owner.deref();
    let snapshot = null;
    if (owner && (h !== culprit || kind === "read")) {
      try {
        snapshot = h.w.snapshot();
      } catch {
        snapshot = null;
      }
    }
    h.dead = true;
    handles.delete(h);
    try {
      h.w.__destroy_into_raw(); // its instance goes away whole
    } catch {
      // already detached
    }
    if (owner) moves.push({ owner, snapshot, culprit: h === culprit });
  }
  const finish = (first) => {
    for (const m of moves) m.owner[REBUILD](m.snapshot, first && m.culprit ? err : null, "rebuilt");
  };
  if (!engine.replaceable) {
    // No fresh instance to be had (the glue was set up elsewhere): new
    // objects in the old one. Their own borrows are fresh; what the trapped
    // call left behind stays allocated.
    finish(true);
    return err;
  }
  engine.poisoned = true;
  let exports = null;
  try {
    testFault("instantiate");
    exports = new RealInstance(engine.module, engine.imports).exports;
  } catch {
    exports = null; // e.g. synchronous instantiation not allowed here
  }
  if (exports) {
    install(exports);
    engine.poisoned = false;
    finish(true);
  } else {
    for (const m of moves) m.owner[REBUILD](m.snapshot, m.culprit ? err : null, "pending");
    // When this fails too, each replica tries again on its next sync
    // (ensureEngine): none is left without a module for good.
    reinstantiate().then(() => finish(false), noop);
  }
  return err;
}

/** A fresh instance of the module, asynchronously (engine.pending until it is installed or failed). */
function reinstantiate() {
  const p = (async () => {
    testFault("instantiate");
    const inst = await WebAssembly.instantiate(engine.module, engine.imports);
    install(inst.exports);
    engine.poisoned = false;
  })();
  engine.pending = p;
  const clear = () => {
    if (engine.pending === p) engine.pending = null;
  };
  p.then(clear, clear);
  return p;
}

/**
 * Waits for the fresh instance a trap asked for; when none is coming (the
 * last try failed), tries again. Rejects when this try fails.
 */
function ensureEngine() {
  if (engine.pending) return engine.pending;
  if (engine.poisoned && engine.replaceable) return reinstantiate();
  return null;
}

/** ensureEngine for a new replica: never one in a trap's instance when a fresh one can be had. */
export async function readyEngine() {
  // A try started elsewhere (the trap's own) that fails gets one of ours.
  let theirs = Boolean(engine.pending);
  for (;;) {
    try {
      await ensureEngine();
      return;
    } catch (e) {
      if (theirs) {
        theirs = false;
        continue;
      }
      throw walcastError("internal", `walcast: the wasm module could not be instantiated again after a trap (${e?.message ?? e}); try again`, { cause: e });
    }
  }
}

/** Runs `fn(w)` on the handle's WasmReplica; a trap replaces the instance and throws code "internal". */
export function call(h, kind, fn) {
  if (!h || h.dead) {
    throw walcastError("unavailable", "walcast: the replica is being rebuilt after an internal error; try again");
  }
  try {
    return fn(h.w);
  } catch (e) {
    if (!isTrap(e)) throw e;
    throw recoverFromTrap(e, h, kind);
  }
}

/** A new WasmReplica (`fn` constructs it); a trap while constructing also replaces the instance. */
export function construct(fn) {
  // Never in a trapped instance, nor in one about to be replaced (its
  // pointer would point into the fresh instance's memory, at nothing).
  if (engine.pending || engine.poisoned) {
    throw walcastError("unavailable", "walcast: the wasm module is being replaced after an internal error; try again");
  }
  try {
    return fn();
  } catch (e) {
    if (!isTrap(e)) throw e;
    throw recoverFromTrap(e, null, "read");
  }
}

/** Rebuilds a replica after a trap: `replica[REBUILD](snapshot, err, how)`. */
export const REBUILD = Symbol("walcast.rebuild");

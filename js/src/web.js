// Browser and Deno entry: the module is fetched (streamed and compiled) from
// next to this file. Deno reads a file: URL directly instead of fetching it.
import { setWasmSource } from "./replica.js";

setWasmSource(() => {
  const url = new URL("./wasm/walcast_wasm_bg.wasm", import.meta.url);
  const deno = globalThis.Deno;
  if (url.protocol === "file:" && deno && typeof deno.readFile === "function") return deno.readFile(url);
  return url;
});

export { Replica, init, shouldReplace } from "./replica.js";

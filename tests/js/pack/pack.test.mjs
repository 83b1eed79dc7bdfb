// The npm package as users get it: `npm pack` in js/, the tarball installed
// into an empty project outside the repository (under the temp dir), and the
// conformance suite run there in every runtime, each resolving "walcast"
// through its own export condition of the installed package.json:
//   - Node  (`node run-cases.mjs`: condition "node")
//   - Deno  (`deno run`, node_modules resolution: condition "deno")
//   - Bun   (`bun run-cases.mjs`: Bun resolves "node")
//   - workerd (the project bundled by `wrangler deploy --dry-run`, which
//     resolves "workerd" and takes the .wasm as a CompiledWasm module; the
//     bundle serves the cases in workerd, one request each)
//   - Chromium (a page in the project; its import map points "walcast" at
//     the entry the "browser" condition names)
//
//   node --test tests/js/pack/pack.test.mjs     (bash tests/js/run-edge.sh pack)
//
// Needs js/dist (scripts/build-js.sh), Deno (scripts/js-deps.sh), workerd,
// wrangler and Chromium (scripts/browser-deps.sh), Bun (scripts/runtime-deps.sh).
// Logs the tarball's size. Datasets come from tests/js/datasets.mjs
// (WALCAST_DATASETS=<control URL> uses a running orchestrator).
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import fs from "node:fs";
import http from "node:http";
import path from "node:path";
import { after, before, test } from "node:test";
import {
  CHROMIUM,
  CHROMIUM_ARGS,
  EDGE_MODULES,
  REPO,
  connectDatasets,
  distReady,
  loadPlaywright,
  log,
  makeTmp,
  startOnFreePort,
  startProcess,
  stopProcess,
  wranglerEnv,
} from "../edge/lib.mjs";

const TIMEOUT = 20 * 60_000;
const JS = path.join(REPO, "js");
const DENO = process.env.DENO ?? path.join(REPO, "tests/js/node_modules/.bin/deno");
const BUN = process.env.BUN ?? path.join(REPO, "tests/js/runtimes/node_modules/@oven/bun-linux-x64/bin/bun");
const WORKERD = path.join(EDGE_MODULES, ".bin", "workerd");
const WRANGLER = path.join(EDGE_MODULES, ".bin", "wrangler");
const COMPAT_DATE = "2025-11-01";

if (!distReady()) throw new Error("js/dist is missing: run bash scripts/build-js.sh");
for (const [what, p, script] of [
  ["deno", DENO, "js-deps.sh"],
  ["bun", BUN, "runtime-deps.sh"],
  ["workerd", WORKERD, "browser-deps.sh"],
  ["wrangler", WRANGLER, "browser-deps.sh"],
  ["chromium", CHROMIUM, "browser-deps.sh"],
]) {
  if (!fs.existsSync(p)) throw new Error(`${what} is missing (${p}): run bash scripts/${script}`);
}

/** Runs a command to its end (never blocking this process's event loop); rejects on a non-zero exit. */
function run(cmd, args, { cwd, env, timeoutMs = TIMEOUT, quiet = false } = {}) {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { cwd, env: { ...process.env, ...env }, stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    let err = "";
    child.stdout.on("data", (d) => (out += d));
    child.stderr.on("data", (d) => (err += d));
    const t = setTimeout(() => child.kill("SIGKILL"), timeoutMs);
    child.on("error", (e) => {
      clearTimeout(t);
      reject(e);
    });
    child.on("exit", (code, signal) => {
      clearTimeout(t);
      if (!quiet && err.trim()) log(`${path.basename(cmd)} stderr:\n${err.trim().split("\n").slice(-20).join("\n")}`);
      if (code === 0) resolve({ out, err });
      else reject(new Error(`${path.basename(cmd)} ${args.join(" ")} exited ${code ?? signal}\n${out}\n${err}`));
    });
  });
}

const datasets = await connectDatasets();
const project = makeTmp("walcast-pack-");
let tarball;
let installed; // the installed package.json

before(async () => {
  // npm pack: exactly what `npm publish` would upload ("files" in js/package.json).
  const packOut = await run("npm", ["pack", "--json", "--pack-destination", project], { cwd: JS, quiet: true });
  const info = JSON.parse(packOut.out)[0];
  tarball = { file: path.join(project, info.filename), size: info.size, unpackedSize: info.unpackedSize, files: info.files.map((f) => f.path) };
  log(`npm pack: ${info.filename}, ${tarball.size} bytes (${tarball.unpackedSize} unpacked, ${tarball.files.length} files: ${tarball.files.join(", ")})`);

  // An empty project that depends on the tarball, as a user's would on the registry's copy.
  fs.writeFileSync(
    path.join(project, "package.json"),
    JSON.stringify({ name: "walcast-pack-check", private: true, type: "module", dependencies: { walcast: `file:./${info.filename}` } }, null, 2),
  );
  await run("npm", ["install", "--offline", "--no-audit", "--no-fund", "--loglevel=error"], { cwd: project });
  const dir = path.join(project, "node_modules/walcast");
  assert.ok(!fs.lstatSync(dir).isSymbolicLink(), "node_modules/walcast is the unpacked tarball, not a link");
  installed = JSON.parse(fs.readFileSync(path.join(dir, "package.json"), "utf8"));
  for (const f of ["run-cases.mjs", "conformance.js"]) fs.copyFileSync(path.join(REPO, "tests/js", f), path.join(project, f));
  fs.writeFileSync(path.join(project, "deno.json"), JSON.stringify({ nodeModulesDir: "manual" }));
});

after(async () => {
  await datasets.close();
});

/** The file an export condition of the installed package names (absolute). */
function entryFor(condition) {
  const target = installed.exports["."][condition];
  assert.ok(target, `the installed package.json has no "${condition}" export condition`);
  return path.join(project, "node_modules/walcast", target);
}

test("the tarball holds the package's entries, types and module, and nothing of the sources", () => {
  for (const f of ["package.json", "README.md", "index.d.ts", "dist/node.js", "dist/web.js", "dist/workerd.js", "dist/replica.js", "dist/wasm/walcast_wasm.js", "dist/wasm/walcast_wasm_bg.wasm"]) {
    assert.ok(tarball.files.includes(f), `${f} is in the tarball (${tarball.files.join(", ")})`);
  }
  for (const f of tarball.files) assert.ok(!/^(src|test|node_modules)\//.test(f), `${f} is not shipped`);
  for (const [cond, target] of Object.entries(installed.exports["."])) {
    assert.ok(fs.existsSync(path.join(project, "node_modules/walcast", target)), `export condition ${cond}: ${target} is installed`);
  }
});

/** Runs run-cases.mjs in the project with a runtime; checks which entry it resolved. */
async function cli(runtime, cmd, args, condition, env = {}) {
  const r = await run(cmd, [...args, "run-cases.mjs"], { cwd: project, env: { WALCAST_DATASETS: datasets.controlUrl, ...env } });
  const lines = r.out.trim().split("\n");
  log(`pack ${runtime}: ${lines[0]}; ${lines.at(-2)}; ${lines.at(-1)}`);
  const resolved = /walcast resolved to (\S+)/.exec(lines[0])?.[1];
  assert.equal(resolved && new URL(resolved).pathname, entryFor(condition), `${runtime} resolves "walcast" through the "${condition}" condition`);
  assert.match(lines.at(-1), /: [1-9]\d* passed, 0 failed$/);
}

test("node: the conformance suite against the installed tarball", { timeout: TIMEOUT }, () => cli("node", process.execPath, [], "node"));

test("deno: the conformance suite against the installed tarball", { timeout: TIMEOUT }, () =>
  cli("deno", DENO, ["run", "--quiet", "--allow-read", "--allow-net", "--allow-env"], "deno", {
    DENO_NO_UPDATE_CHECK: "1",
    DENO_NO_PROMPT: "1",
    DENO_DIR: process.env.DENO_DIR ?? path.join(REPO, ".deno"),
    NO_COLOR: "1",
  }),
);

test("bun: the conformance suite against the installed tarball", { timeout: TIMEOUT }, () => cli("bun", BUN, [], "node"));

test("workerd: a wrangler bundle of the installed package runs the conformance suite", { timeout: TIMEOUT }, async (t) => {
  // The worker imports "walcast" by name; wrangler resolves the "workerd"
  // condition from node_modules and takes the .wasm as a compiled module.
  fs.copyFileSync(path.join(REPO, "tests/js/workerd/conformance-worker.js"), path.join(project, "worker.js"));
  fs.writeFileSync(
    path.join(project, "wrangler.toml"),
    [
      'name = "walcast-pack-check"',
      'main = "worker.js"',
      `compatibility_date = "${COMPAT_DATE}"`,
      "send_metrics = false",
      "[[rules]]",
      'type = "CompiledWasm"',
      'globs = ["**/*.wasm"]',
      "fallthrough = true",
      "",
    ].join("\n"),
  );
  const out = path.join(project, "wrangler-out");
  await run(WRANGLER, ["deploy", "--dry-run", "--outdir", out], {
    cwd: project,
    quiet: true,
    timeoutMs: 180_000,
    env: wranglerEnv(path.join(project, "wrangler-logs")),
  });
  const files = fs.readdirSync(out);
  const wasm = files.find((f) => f.endsWith(".wasm"));
  assert.ok(files.includes("worker.js") && wasm, `wrangler wrote ${files.join(", ")}`);
  const bundled = fs.readFileSync(path.join(out, "worker.js"), "utf8");
  assert.ok(bundled.includes("setRequestScopedIo(true)"), "the bundle holds the workerd entry");
  log(`pack workerd: wrangler bundle ${files.map((f) => `${f} ${fs.statSync(path.join(out, f)).size} B`).join(", ")}`);

  const fixtures = await datasets.newInstance();
  fs.writeFileSync(path.join(project, "fixtures.json"), JSON.stringify(fixtures));
  const lit = (s) => JSON.stringify(s);
  const logFile = path.join(project, "workerd.log");
  const { child: workerd, port } = await startOnFreePort({
    start: (port) => {
      fs.writeFileSync(
        path.join(project, "config.capnp"),
        `using Workerd = import "/workerd/workerd.capnp";
const config :Workerd.Config = (
  services = [
    (name = "main", worker = (
      modules = [
        (name = "worker.js", esModule = embed "wrangler-out/worker.js"),
        (name = ${lit(wasm)}, wasm = embed ${lit(`wrangler-out/${wasm}`)}),
      ],
      compatibilityDate = ${lit(COMPAT_DATE)},
      bindings = [ (name = "FIXTURES", text = embed "fixtures.json"), (name = "CONTROL", text = ${lit(datasets.controlUrl)}) ],
      globalOutbound = "net",
    )),
    (name = "net", network = (allow = ["public", "private", "local"])),
  ],
  sockets = [ (name = "http", address = ${lit(`127.0.0.1:${port}`)}, http = (), service = "main") ],
);
`,
      );
      return startProcess(WORKERD, ["serve", "config.capnp"], { cwd: project, name: "workerd", logFile });
    },
    readyUrl: (port) => `http://127.0.0.1:${port}/cases`,
    logFile,
    signal: "SIGINT",
  });
  try {
    const base = `http://127.0.0.1:${port}`;
    const names = await (await fetch(`${base}/cases`)).json();
    assert.ok(names.length > 10, `${names.length} cases`);
    let failed = 0;
    for (let i = 0; i < names.length; i++) {
      await t.test(names[i], { timeout: 300_000 }, async () => {
        const res = await (await fetch(`${base}/run?case=${i}`)).json();
        if (!res.ok) {
          failed++;
          assert.fail(`${res.name}: ${res.error}`);
        }
      });
    }
    log(`pack workerd: ${names.length - failed} passed, ${failed} failed`);
  } catch (e) {
    throw new Error(`${e.message}\n--- workerd log:\n${fs.existsSync(logFile) ? fs.readFileSync(logFile, "utf8") : ""}`);
  } finally {
    await stopProcess(workerd, { signal: "SIGINT" });
    await datasets.dropInstance(fixtures.instance).catch(() => {});
  }
});

test("chromium: a page resolving the browser condition runs the conformance suite", { timeout: TIMEOUT }, async (t) => {
  const browserEntry = path.relative(project, entryFor("browser")).split(path.sep).join("/");
  fs.copyFileSync(path.join(REPO, "tests/js/pack/page.js"), path.join(project, "page.js"));
  fs.writeFileSync(
    path.join(project, "index.html"),
    `<!doctype html>
<meta charset="utf-8">
<title>walcast packed</title>
<script type="importmap">${JSON.stringify({ imports: { walcast: `/${browserEntry}` } })}</script>
<script type="module" src="/page.js"></script>
`,
  );
  const TYPES = { ".js": "text/javascript; charset=utf-8", ".html": "text/html; charset=utf-8", ".wasm": "application/wasm" };
  const server = http.createServer((req, res) => {
    let p = decodeURIComponent(new URL(req.url, "http://x").pathname);
    if (p === "/") p = "/index.html";
    const file = path.join(project, p);
    if (p.includes("..") || !fs.existsSync(file) || !fs.statSync(file).isFile()) {
      res.writeHead(404, { "content-type": "text/plain" });
      return res.end("not found");
    }
    res.writeHead(200, { "content-type": TYPES[path.extname(file)] ?? "application/octet-stream", "cache-control": "no-store" });
    fs.createReadStream(file).pipe(res);
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  const { chromium } = await loadPlaywright();
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, timeout: 60_000 });
  const fixtures = await datasets.newInstance();
  try {
    const page = await browser.newPage();
    page.on("pageerror", (e) => log(`[pack chromium] page error: ${e.message}`));
    const served = [];
    page.on("request", (r) => served.push(new URL(r.url()).pathname));
    await page.goto(`http://127.0.0.1:${server.address().port}/`, { waitUntil: "load" });
    await page.waitForFunction(() => window.walcastPack?.ready === true, null, { timeout: 30_000 });
    const names = await page.evaluate(([fx, control]) => window.walcastPack.setup(fx, control), [fixtures, datasets.controlUrl]);
    assert.ok(names.length > 10, `${names.length} cases`);
    let failed = 0;
    for (let i = 0; i < names.length; i++) {
      await t.test(names[i], { timeout: 300_000 }, async () => {
        const res = await page.evaluate((i) => window.walcastPack.runCase(i), i);
        if (!res.ok) {
          failed++;
          assert.fail(`${res.name}: ${res.error}`);
        }
      });
    }
    assert.ok(served.includes(`/${browserEntry}`), `the page loaded /${browserEntry}`);
    assert.ok(served.some((p) => p.startsWith("/node_modules/walcast/") && p.endsWith(".wasm")), "the page fetched the installed .wasm");
    log(`pack chromium ${browser.version()}: ${names.length - failed} passed, ${failed} failed (entry /${browserEntry})`);
  } finally {
    await browser.close().catch(() => {});
    await new Promise((r) => server.close(r));
    await datasets.dropInstance(fixtures.instance).catch(() => {});
  }
});

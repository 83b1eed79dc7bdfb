// Exercises the public API as users write it; `tsc -p js/test/tsconfig.json`
// checks it against js/index.d.ts (it is type-checked, never run).
import { init, Replica, shouldReplace } from "walcast";
import type {
  Entry, ErrorCode, LazyOpenOptions, LazyReplica, OpenOptions, PersistedState, PersistStore, ReplicaBase, ScanOptions, Status, WalcastError,
} from "walcast";

async function main(): Promise<void> {
  await init();
  const replica: Replica = await Replica.open("https://cdn.example.com/app", { persist: "indexeddb", pollInterval: 1000 });
  const lsn: number = await replica.sync();
  const v: Uint8Array | undefined = replica.get("user:42");
  const vb: Uint8Array | undefined = replica.get(new Uint8Array([0xff, 1]));
  const text: string | undefined = replica.getText("user:42");
  const user = replica.getJSON<{ name: string }>("user:42");
  const name: string | undefined = user?.name;
  const rows: Entry[] = replica.scan({ prefix: "user:", limit: 100 });
  for (const { key, value } of rows) {
    const k: string = typeof key === "string" ? key : new TextDecoder().decode(key);
    const n: number = value.byteLength;
    void k;
    void n;
  }
  const opts: ScanOptions = { start: "a", end: new Uint8Array([0x62]) };
  replica.scan(opts);
  replica.scan();

  const s: Status = replica.status();
  const nums: number[] = [s.appliedLsn, s.committedLsn, s.epoch, s.lagMs, s.requests, s.bytesReceived];
  const at: number | null = s.lastPollAt;
  const id: string | null = s.datasetId;
  const state: string = s.state;
  const code: ErrorCode | undefined = s.lastError?.code;
  const running: boolean = s.running;
  const longPolling: boolean = s.longPoll;
  const heldReads: number = s.requestsByKind.longPoll + s.bytesByKind.segment;
  const polling: Replica = await Replica.open("https://cdn.example.com/app", { longPoll: false });
  void longPolling;
  void heldReads;
  void polling;
  const recoveries: number = s.recoveries;
  const errObject: string | undefined = s.lastError?.object;
  const internal: ErrorCode = "internal";
  const untrusted: ErrorCode = "untrusted";
  const signer: string | null = s.signer;
  const pinned: Replica = await Replica.open("https://cdn.example.com/app", { trust: "ed25519:iojj3XQJ8ZX9UtstPLpdcspnCb8dlBIb83SIAbQPb1w=" });
  const pinnedLazy: LazyReplica = await Replica.open("https://cdn.example.com/app", { load: "lazy", trust: ["ed25519:a", "ed25519:b"] });
  void [untrusted, signer, pinned, pinnedLazy];

  replica.start();
  replica.stop();
  const off: () => void = replica.onChange(({ first, last }) => console.log(first, last));
  off();
  replica.onReset(({ lsn }) => console.log("reset at", lsn));
  const size: number = replica.size;
  const url: string = replica.url;

  const snap: Uint8Array = replica.snapshot();
  const again = await Replica.restore(url, snap, { pollInterval: 500 });
  await again.close();

  try {
    await replica.sync();
  } catch (e) {
    const err = e as WalcastError;
    if (err.code === "data") console.log(err.object, err.lsn);
  }

  // Raw mode and a custom store.
  const saved = new Map<string, PersistedState>();
  const store: PersistStore = {
    load: (u) => saved.get(u),
    async save(u, st, { replace }) {
      if (shouldReplace(saved.get(u), st, { replace })) saved.set(u, st);
    },
  };
  const options: OpenOptions = {
    raw: true,
    persist: store,
    persistTimeoutMs: 5000,
    headers: { authorization: "Bearer x" },
    concurrency: 4,
    onRecord: (l: number, payload: Uint8Array) => console.log(l, payload.length),
    onError: (e) => console.error(e.message),
  };
  const raw = await Replica.open(new URL("https://cdn.example.com/raw"), options);
  await raw.close();
  await replica.close();
  void [lsn, v, vb, text, name, nums, at, id, state, code, running, recoveries, errObject, internal, size];
}

// Lazy mode: reads return promises.
async function lazyMode(): Promise<void> {
  const lazy: LazyReplica = await Replica.open("https://cdn.example.com/app", { load: "lazy", cacheBytes: 8 << 20, pollInterval: 1000 });
  const mode: "lazy" = lazy.mode;
  const v: Uint8Array | undefined = await lazy.get("user:42");
  const t: string | undefined = await lazy.getText(new Uint8Array([0xff]));
  const j = await lazy.getJSON<{ name: string }>("user:42");
  const n: string | undefined = j?.name;
  const rows: Entry[] = await lazy.scan({ prefix: "user:", limit: 100 });
  const all: Entry[] = await lazy.scan();
  // A caller that gives up aborts its read.
  const ac = new AbortController();
  const late: Uint8Array | undefined = await lazy.get("user:42", { signal: ac.signal });
  const lateText: string | undefined = await lazy.getText("user:42", { signal: ac.signal });
  const lateRows: Entry[] = await lazy.scan({ prefix: "user:", signal: ac.signal });
  const lsn: number = await lazy.sync();
  const s: Status = lazy.status();
  const figures: number[] = [s.cachedBytes, s.blocksFetched, s.overlayBytes, s.overlayEntries];
  const m: "full" | "lazy" = s.mode;
  lazy.start();
  lazy.stop();
  lazy.onChange(({ last }) => console.log(last));
  const opts: LazyOpenOptions = { load: "lazy", headers: { authorization: "Bearer x" }, persist: "memory" };
  const again = await Replica.open("https://cdn.example.com/app", opts);
  await again.close();
  // Either mode through one type.
  const either: ReplicaBase = Math.random() < 0.5 ? lazy : await Replica.open("https://cdn.example.com/app");
  await either.sync();
  const loose: OpenOptions = { load: Math.random() < 0.5 ? "lazy" : "full" };
  const r: Replica | LazyReplica = await Replica.open("https://cdn.example.com/app", loose);
  if (r.mode === "lazy") await r.get("k");
  else r.get("k");
  await lazy.close();
  void [mode, v, t, n, rows, all, lsn, figures, m];

  // @ts-expect-error: a lazy read is a promise, not the value
  const sync: Uint8Array | undefined = lazy.get("user:42");
  // @ts-expect-error: a lazy scan is a promise, not the rows
  const syncRows: Entry[] = lazy.scan();
  // @ts-expect-error: a lazy replica holds no whole state to snapshot
  lazy.snapshot();
  void [sync, syncRows];
}

// @ts-expect-error: a lazy replica cannot be persisted
void Replica.open("x", { load: "lazy", persist: "indexeddb" });
// @ts-expect-error: load is "full" or "lazy"
void Replica.open("x", { load: "eager" });
// @ts-expect-error: a full replica's reads are not promises
void (null as unknown as Replica).get("k").then;

void lazyMode;

// @ts-expect-error: keys are strings or bytes
(null as unknown as Replica).get(42);
// @ts-expect-error: trust takes keys as strings
void Replica.open("x", { trust: 42 });
// @ts-expect-error: persist takes a known mode
void Replica.open("x", { persist: "localStorage" });
// @ts-expect-error: the constructor is private; use Replica.open
void new Replica();

void main;

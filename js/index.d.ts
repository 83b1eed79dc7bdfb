// Types of the `walcast` npm package (hand-written; checked by
// `tsc -p js/test/tsconfig.json` against js/test/usage.ts).
//
// The same API in every runtime: browsers, Cloudflare Workers (workerd),
// Deno, Node and Bun. Conditional exports pick the entry that knows how to
// load the wasm module there.
//
// Two modes. `Replica.open(url)` (load "full", the default) loads the whole
// dataset into the replica at `sync()`: `get`, `getText`, `getJSON` and
// `scan` answer synchronously. `Replica.open(url, { load: "lazy" })` gives a
// `LazyReplica`: it reads the head and the segments after the newest
// snapshot, never downloads the snapshot, and fetches the snapshot blocks a
// read needs: `get`, `getText`, `getJSON` and `scan` return promises.

/** A key or key bound: a string (encoded as UTF-8) or raw bytes. */
export type Key = string | Uint8Array;

/** `error.code` of every error walcast rejects or throws with. */
export type ErrorCode =
  /** A checksum or format check failed; nothing of it was applied (retrying is useless until the object is fixed). */
  | "data"
  /** The store could not be reached or answered 5xx/timeouts, after retries; try again later. */
  | "unavailable"
  /** The dataset (its head) does not exist at that URL. */
  | "not_found"
  /** A bad argument (empty URL, bad option, a key that is neither string nor bytes). */
  | "invalid_input"
  /** The dataset's writer was fenced (seen by publishers; kept for completeness). */
  | "fenced"
  /** The replica was closed. */
  | "closed"
  /**
   * The wasm module trapped (a bug in walcast). The call that trapped throws
   * this; the replica was rebuilt in a fresh module instance (its state
   * carried over, else reloaded from `persist`, else fetched again by the
   * next `sync()`) and keeps working.
   */
  | "internal"
  /** `waitFor(lsn, { timeout })`: the LSN was not applied in time (the message names it). */
  | "timeout"
  /**
   * A custom persistence store (`persist`) threw from `load`, `save` or
   * `append` (`object`: "persist store append", …; `cause`: what it threw).
   * Reported to `onError` and in `status().persistError`; the replica keeps
   * its state, and after a failed `append` its next write is the whole state.
   */
  | "persist"
  /**
   * A replica opened with `trust` refused what the dataset served: a head
   * not signed by a trusted key (or unsigned), a signed head older than one
   * it applied (rollback), or an object whose SHA-256 differs from the digest
   * the signed head records. Nothing of it was applied; the replica keeps its
   * last good state. `object` names what was refused.
   */
  | "untrusted";

/** The errors walcast rejects or throws with: an `Error` with a stable `code`. */
export interface WalcastError extends Error {
  code: ErrorCode;
  /** Key of the object concerned (e.g. `segments/2/…-….wseg`), when known. */
  object?: string;
  /** The LSN concerned, when known. */
  lsn?: number;
}

/** The state persisted per dataset URL (IndexedDB or a custom store). */
export interface PersistedState {
  /** `Replica.snapshot()` bytes: the whole state at `appliedLsn`. */
  snapshot: Uint8Array;
  appliedLsn: number;
  datasetId: string | null;
  /** `Date.now()` when written. */
  savedAt?: number;
  /**
   * True for a key-value replica's state (not a raw one's): a copy that
   * says so opens even with no keys (a dataset whose keys were all
   * deleted); one without it, at an LSN above 0 with no keys and no log,
   * is taken for a raw replica's record of older versions and not opened.
   * Keep it with the rest.
   */
  kv?: boolean;
  /**
   * Incremental persistence: chunks of applied batches (framed like segment
   * records, LSNs dense from the snapshot's) replayed on `snapshot` at
   * open, in order, up to `appliedLsn`. Absent for a whole state.
   */
  log?: Uint8Array[];
}

/** What a sync applied, for a store's `append`. */
export interface PersistChunk {
  datasetId: string | null;
  /** First and last LSN of the batches in `bytes`. */
  first: number;
  last: number;
  /** The batches `first..=last`, each framed like a segment record (lsn u64, len u32, crc u32, payload). */
  bytes: Uint8Array;
  /**
   * The whole state now, for a store that cannot take the chunk (its log
   * is due for compaction, or does not end at `first - 1`); null when the
   * replica moved on to another dataset. Call it synchronously.
   */
  whole(): PersistedState | null;
}

/**
 * A custom persistence store. `save` is called after a sync that applied
 * something (and after a reset), only when the state is newer than what this
 * replica last loaded or saved; a store shared between processes should keep
 * the newest (see `shouldReplace`). `url` is the dataset URL without its
 * query string (a token in the query is never stored, and a new token keeps
 * the same record).
 */
export interface PersistStore {
  load(url: string): PersistedState | undefined | Promise<PersistedState | undefined>;
  save(url: string, state: PersistedState, opts: { replace: boolean; repair: boolean; repairOf?: number; rewind?: boolean }): unknown | Promise<unknown>;
  /**
   * Optional: incremental persistence. Called instead of `save` after a
   * sync that applied batches on the same dataset; `load` then returns the
   * chunks appended since the last whole state in `log`. `repair` in
   * `save`: the copy `load` returned was damaged; the same LSN rewrites it,
   * and so does any LSN while the store still holds that copy (`repairOf`:
   * the `appliedLsn` it claimed). `rewind` in `save`: the dataset went back
   * in history under the same id (a bucket restored from a backup) and this
   * state replaces the stored copy of the history it left, at any LSN.
   * Pass `opts` on to `shouldReplace`.
   * What `load` returns is checked before use: an `appliedLsn` that is not
   * an integer LSN, or a `log` entry that is not bytes, is reported as a
   * `data` error and the replica opens at the last good state before it.
   */
  append?(url: string, chunk: PersistChunk): unknown | Promise<unknown>;
}

/** Options of both modes. */
export interface CommonOpenOptions {
  /**
   * Milliseconds between polls of `start()`'s background loop, against
   * servers that do not hold head reads (S3, R2, a CDN, a static server).
   * Default 1000.
   */
  pollInterval?: number;
  /**
   * Long-poll: when the server says it holds head reads (`walcast serve`'s
   * `Walcast-Long-Poll` header), `start()`'s loop sends one conditional head
   * GET with a wait hint (`Prefer: wait=30`, `?wait=30`) after another, so a
   * change is applied as soon as the server sees it and an idle replica
   * makes about 2 requests a minute; a server that answers a held read at
   * once is polled every `pollInterval` instead. `sync()` never waits on a
   * held read, and `stop()`/`close()` abort it. `false`: always poll.
   * Default true (ignored under Workers, whose request-scoped I/O cannot
   * hold a read across requests).
   */
  longPoll?: boolean;
  /**
   * Extra request headers for every GET (e.g. `{ authorization: "Bearer <token>" }` for `walcast serve --verify-key`).
   * With headers set, a redirect is followed only within the dataset's origin (at most 5 in a row; not at all where
   * the runtime hides the target, as browsers do), so they never reach another origin.
   */
  headers?: Record<string, string>;
  /**
   * The fetch every GET goes through, instead of the runtime's global
   * `fetch`: called as `fetch(url, init)` with the object's URL (the dataset
   * URL's query string, e.g. `?token=…`, appended to every object's URL) and
   * `init.headers` (a plain object: `range`, `if-none-match` and `headers`
   * above) and `init.signal`; it must resolve a `Response` (200, 206 with
   * `Content-Range`, 304, 404, …). Use it to read a private R2 bucket
   * through its binding (`r2Fetch(env.BUCKET)` from the worker), to sign
   * requests, or to add credentials. A fetch that ignores the signal is
   * still cut off at the GET's timeout.
   */
  fetch?: (url: string, init: { headers: Record<string, string>; signal: AbortSignal; cache?: "no-store" }) => Promise<Response>;
  /**
   * Pins the publisher's public keys (`ed25519:<base64>`, as printed by
   * `walcast keygen`; one or several): the replica applies only heads one of
   * them signed (or a key they endorsed through the head's rotation chain),
   * never a signed head older than one it applied, and only objects whose
   * SHA-256 equals the digest the signed head records. Anything else
   * rejects with code `untrusted`, naming the object. A malformed key is
   * `invalid_input`. Default: no keys pinned (the CRC-32 checksums only).
   */
  trust?: string | string[];
  /** How many segment GETs may be in flight at once. */
  concurrency?: number;
  /** Errors of the background loop, of persistence and of callbacks. */
  onError?: (error: WalcastError | Error) => void;
}

/** Options of a full replica (the default): `sync()` loads the whole dataset and reads answer at once. */
export interface FullOpenOptions extends CommonOpenOptions {
  load?: "full";
  /**
   * Where the state is kept between sessions: `"memory"` (default: nowhere),
   * `"indexeddb"` (browsers: one record per dataset URL, restored on open so
   * reads are served at once, offline too), or a custom store.
   */
  persist?: "memory" | "indexeddb" | PersistStore;
  /**
   * How long one call of the persist store (`load`, `save`, `append`) may
   * take, in ms, before it counts as failed (code `persist`): a store that
   * never answers does not hold up syncs, `start()` or `close()`. Default
   * 30000.
   */
  persistTimeoutMs?: number;
  /** Raw mode: records are not walcast KV batches; each goes to `onRecord`. */
  raw?: boolean;
  /**
   * Raw mode: called with each verified record, in LSN order, during `sync()`.
   * Do not call back into the replica from here.
   */
  onRecord?: (lsn: number, payload: Uint8Array) => void;
}

/**
 * Options of a lazy replica: `open` syncs before it resolves (one GET of the
 * head, plus the segments after the newest snapshot; the snapshot is not
 * downloaded), and reads fetch the snapshot blocks they need. A lazy replica
 * holds no whole state, so it cannot be persisted (`persist` other than
 * `"memory"` is `invalid_input`, as is `raw`).
 */
export interface LazyOpenOptions extends CommonOpenOptions {
  load: "lazy";
  /** Bytes of snapshot data blocks kept in memory (least recently used go first). Default 8 MiB (8388608). */
  cacheBytes?: number;
  persist?: "memory";
}

/** `Replica.open`'s options: `load` picks the mode. */
export type OpenOptions = FullOpenOptions | LazyOpenOptions;

export interface ScanOptions {
  /** Only keys starting with these bytes. */
  prefix?: Key;
  /** First key (inclusive). */
  start?: Key;
  /** Last key (exclusive). At or before `start`: no entries. */
  end?: Key;
  /** At most this many entries (0 gives none). Default: all. */
  limit?: number;
  /**
   * End at the entry that brings the bytes of the keys and values returned
   * to this many or more (at least one entry is returned), so one answer
   * stays near this size however large the values. Fewer than `limit`
   * entries whose bytes reach it: go on from the last key plus a zero byte.
   * Default: no bound; a value above 2^32 - 1 counts as 2^32 - 1.
   */
  maxBytes?: number;
  /**
   * Lazy mode: a scan whose caller gave up. Once it aborts, the scan leaves
   * the queue of scans waiting for a turn, queues no more GETs, and
   * rejects with the signal's reason once its GETs out are answered. Full mode ignores it.
   */
  signal?: AbortSignal;
}

/** A lazy read's options. */
export interface ReadOptions {
  /**
   * A read whose caller gave up: once it aborts, the read leaves the queue
   * of reads waiting for a turn, queues no more GETs, and rejects with the
   * signal's reason once its GETs out are answered (their blocks are
   * cached; GETs the module had queued for it may still go out).
   */
  signal?: AbortSignal;
}

/** A scanned entry. `key` is a string when the key's bytes are valid UTF-8, else the bytes. */
export interface Entry {
  key: string | Uint8Array;
  value: Uint8Array;
}

export interface Status {
  /** How the replica loads the dataset. */
  mode: "full" | "lazy";
  /** Everything at or below is applied (0: nothing yet). */
  appliedLsn: number;
  /** The head's committed LSN as last seen. */
  committedLsn: number;
  /** The writer epoch as last seen. */
  epoch: number;
  /** The dataset id (32 hex digits) as last seen; null before the first head. */
  datasetId: string | null;
  /**
   * Time since the newest head this replica read was committed (ms): how old
   * the newest write it knows of is. On a dataset nobody writes it keeps
   * growing while the replica is caught up (`appliedLsn === committedLsn`);
   * `lastPollAt` then says how fresh the replica is.
   */
  lagMs: number;
  /** When the head was last polled (ms since the epoch), or null. */
  lastPollAt: number | null;
  /** With `trust`: the key that signed the newest head accepted; null without `trust` or before the first head. */
  signer: string | null;
  /** The replica machine's phase: "starting", "bootstrapping", "catching_up", "idle" or "retrying". */
  state: "starting" | "bootstrapping" | "catching_up" | "idle" | "retrying" | (string & {});
  /**
   * The error of the last sync (or the last trap: code "internal"), or null
   * after a successful sync. `object` and `lsn` say what it concerns, when known.
   */
  lastError: { code: ErrorCode; message: string; object?: string; lsn?: number } | null;
  /** GETs made so far. */
  requests: number;
  /** Body bytes received so far. */
  bytesReceived: number;
  /** Lazy mode: bytes of snapshot data blocks held (at most about `cacheBytes`); 0 in full mode. */
  cachedBytes: number;
  /** Lazy mode: snapshot blocks fetched from the current snapshot (index and data); 0 in full mode. */
  blocksFetched: number;
  /** Lazy mode: bytes held by the writes after the snapshot (the overlay); 0 in full mode. */
  overlayBytes: number;
  /** Lazy mode: keys written (or deleted) after the snapshot; 0 in full mode. */
  overlayEntries: number;
  /** Whether `start()`'s background loop runs. */
  running: boolean;
  /**
   * Whether the head is read by long-poll (the server advertised it and holds
   * reads) rather than polled every `pollInterval`.
   */
  longPoll: boolean;
  /**
   * GETs sent, by kind of object: `head` (plain head reads), `longPoll`
   * (held head reads), `page`, `segment`, `snapshot` (whole, windows or
   * lazy blocks), `delta`, `other`.
   */
  requestsByKind: Record<"head" | "longPoll" | "page" | "segment" | "snapshot" | "delta" | "other", number>;
  /** Body bytes received, by kind of object (as `requestsByKind`). */
  bytesByKind: Record<"head" | "longPoll" | "page" | "segment" | "snapshot" | "delta" | "other", number>;
  /** How often this replica was rebuilt after a trap of the wasm module. */
  recoveries: number;
  /** The last persistence failure, or null. */
  persistError: { code: string; message: string } | null;
}

/** What full and lazy replicas have in common. */
export interface ReplicaBase {
  /** The dataset URL. */
  readonly url: string;
  /** How the replica loads the dataset. */
  readonly mode: "full" | "lazy";

  /**
   * Catches up to the head as of now; resolves the applied LSN. Rejects with a
   * `WalcastError` (the state stays at its last good LSN). Calls during a sync
   * run once more after it.
   */
  sync(): Promise<number>;
  /**
   * Read-your-writes: resolves the applied LSN once it is at least `lsn`
   * (for example the LSN `walcast write` printed), syncing meanwhile; rejects
   * with code "timeout" after `timeout` ms (default 30000).
   */
  waitFor(lsn: number, options?: { timeout?: number }): Promise<number>;
  status(): Status;
  /**
   * Starts following the head in the background: sync, then long-poll while
   * the server holds head reads, else wait `pollInterval` and sync again.
   * A page in the background (`document.visibilityState === "hidden"`)
   * polls instead of holding a read, and long-polls again once shown.
   * Errors go to `status().lastError` and `onError`.
   */
  start(): void;
  /** Stops background polling (a sync in flight finishes). */
  stop(): void;
  /** Called after a sync with each applied LSN range; returns an unsubscribe function. */
  onChange(cb: (change: { first: number; last: number }) => void): () => void;
  /** Called when the state was replaced (re-bootstrap from a snapshot, or a new dataset); returns an unsubscribe function. */
  onReset(cb: (reset: { lsn: number }) => void): () => void;
  /** Stops polling, ends a sync in flight (it rejects with `closed`) and frees the wasm memory; every call of it resolves once that is done. Later calls of the other methods fail with `closed`. */
  close(): Promise<void>;
}

/**
 * A lazy replica (`load: "lazy"`): every read returns a promise, answered
 * from one state at the applied LSN (the snapshot's blocks plus the writes
 * after it), fetching the blocks it needs. A block that fails verification
 * or cannot be fetched rejects that read with `data`, `not_found` or
 * `unavailable` naming the snapshot in `object`; later reads fetch it again.
 */
export interface LazyReplica extends ReplicaBase {
  readonly mode: "lazy";
  /** Unknown without reading every block: always undefined. */
  readonly size: undefined;
  /** The value of `key`, or undefined. */
  get(key: Key, options?: ReadOptions): Promise<Uint8Array | undefined>;
  /** The value of `key` decoded as UTF-8, or undefined. */
  getText(key: Key, options?: ReadOptions): Promise<string | undefined>;
  /** The value of `key` parsed as JSON, or undefined. Rejects on invalid JSON. */
  getJSON<T = unknown>(key: Key, options?: ReadOptions): Promise<T | undefined>;
  /** Entries in key order; empty when `end` does not sort after `start` (and the prefix). */
  scan(options?: ScanOptions): Promise<Entry[]>;
}

/** A read replica of one dataset (full mode: reads answer at once). */
export declare class Replica implements ReplicaBase {
  private constructor();

  /**
   * Opens a replica of the dataset at `url` (the prefix holding `catalog/`,
   * `segments/`, `snapshots/`). Full mode makes no request; with `persist`
   * it restores the last persisted state first. With `load: "lazy"` the
   * first sync runs before it resolves (and it rejects with that sync's
   * error). Rejects `invalid_input` on bad options.
   */
  static open(url: string | URL, options: LazyOpenOptions): Promise<LazyReplica>;
  static open(url: string | URL, options?: FullOpenOptions): Promise<Replica>;
  static open(url: string | URL, options?: OpenOptions): Promise<Replica | LazyReplica>;

  /** Opens a replica from bytes of `snapshot()`: reads are served at once; `sync()` fetches only the rest. Full mode only. */
  static restore(url: string | URL, snapshot: Uint8Array, options?: Omit<FullOpenOptions, "persist">): Promise<Replica>;

  /** The dataset URL. */
  readonly url: string;
  readonly mode: "full";
  /** Number of keys held. */
  readonly size: number;

  /**
   * Catches up to the head as of now; resolves the applied LSN. Rejects with a
   * `WalcastError` (the state stays at its last good LSN). Calls during a sync
   * run once more after it.
   */
  sync(): Promise<number>;
  /**
   * Read-your-writes: resolves the applied LSN once it is at least `lsn`
   * (for example the LSN `walcast write` printed), syncing meanwhile; rejects
   * with code "timeout" after `timeout` ms (default 30000).
   */
  waitFor(lsn: number, options?: { timeout?: number }): Promise<number>;

  /** The value of `key`, or undefined. */
  get(key: Key): Uint8Array | undefined;
  /** The value of `key` decoded as UTF-8, or undefined. */
  getText(key: Key): string | undefined;
  /** The value of `key` parsed as JSON, or undefined. Throws on invalid JSON. */
  getJSON<T = unknown>(key: Key): T | undefined;
  /** Entries in key order; empty when `end` does not sort after `start` (and the prefix). */
  scan(options?: ScanOptions): Entry[];

  status(): Status;
  /** The whole state at the applied LSN (walcast's snapshot format), for `Replica.restore`. */
  snapshot(): Uint8Array;

  /**
   * Starts following the head in the background: sync, then long-poll while
   * the server holds head reads, else wait `pollInterval` and sync again.
   * A page in the background (`document.visibilityState === "hidden"`)
   * polls instead of holding a read, and long-polls again once shown.
   * Errors go to `status().lastError` and `onError`.
   */
  start(): void;
  /** Stops background polling (a sync in flight finishes). */
  stop(): void;

  /** Called after a sync with each applied LSN range; returns an unsubscribe function. */
  onChange(cb: (change: { first: number; last: number }) => void): () => void;
  /** Called when the state was replaced (re-bootstrap from a snapshot, or a new dataset); returns an unsubscribe function. */
  onReset(cb: (reset: { lsn: number }) => void): () => void;

  /** Stops polling, ends a sync in flight (it rejects with `closed`) and frees the wasm memory; every call of it resolves once that is done. Later calls of the other methods fail with `closed`. */
  close(): Promise<void>;
}

/**
 * Loads the wasm module now (otherwise the first `Replica.open` does). Pass
 * the module yourself where the entry cannot find it (bundlers, CSP): a
 * `WebAssembly.Module`, its bytes, a `Response` or a URL. A load not done
 * within `timeoutMs` (default 60000; a URL's fetch is aborted) rejects with
 * code `timeout`, an answer of more than 16 MiB (sent or claimed) with
 * `data`, and a later call tries again (with the same source, but
 * a `Response`, read once, only for that load).
 */
export declare function init(
  source?: WebAssembly.Module | BufferSource | Response | URL | string,
  options?: { timeoutMs?: number },
): Promise<void>;

/** Whether a store holding `old` should take `state` (same dataset: newer LSN, or any after a rewind; another: only after a reset). */
export declare function shouldReplace(
  old: PersistedState | undefined,
  state: Pick<PersistedState, "appliedLsn" | "datasetId">,
  opts?: { replace?: boolean; repair?: boolean; repairOf?: number; rewind?: boolean },
): boolean;

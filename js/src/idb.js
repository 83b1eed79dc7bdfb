// IndexedDB persistence for browsers (persist: "indexeddb").
//
// Layout (docs/FORMAT.md, "A browser replica's IndexedDB store"), database
// "walcast" version 2, per dataset URL:
//   replicas[url]      the record: { format: 2, appliedLsn, datasetId,
//                      baseLsn, baseBytes, logBytes, logChunks, savedAt } (small)
//   bases[url]         the base: snapshot bytes at baseLsn
//   log[[url, first]]  a chunk of applied batches first..=last, framed like
//                      segment records, dense from baseLsn + 1
// A sync that applied N bytes of batches appends one chunk of about N bytes
// and rewrites the small record; once the log outgrows the base (and
// COMPACT_MIN_BYTES), or holds COMPACT_MAX_CHUNKS chunks, the next write is
// a compaction: the whole state as the new base, the log deleted. Every write is one readwrite transaction over
// the three stores that first reads the record, so a tab closed mid-write
// reopens at the old or the new LSN, never a mix, and an older tab never
// rolls back a newer tab's state; writers are serialized across tabs with
// the Web Locks API where the runtime has it. A version 1 record (the whole
// snapshot inline, { snapshot, appliedLsn, datasetId }) is still read, and
// replaced by the next write.

const DB_NAME = "walcast";
const STORE = "replicas";
const BASES = "bases";
const LOG = "log";
const STORES = [STORE, BASES, LOG];
const DB_VERSION = 2;
/** The layout version of a record (`format`). */
const FORMAT = 2;
/** A log this small is never compacted, whatever the base's size. */
export const COMPACT_MIN_BYTES = 256 << 10;
/**
 * A log of this many chunks is compacted whatever its bytes: a replica
 * following a large dataset's small commits would otherwise pile up
 * chunks a reload reads one by one.
 */
export const COMPACT_MAX_CHUNKS = 1000;

/**
 * Whether a store holding `old` should take `rec`. Same dataset: only a newer
 * LSN, unless this replica found that the dataset went back in history
 * (`rewind`: a bucket restored from a backup), when the stored copy holds a
 * history the store no longer has and any LSN replaces it. Another dataset:
 * only when this replica has reset to it (`replace`), so a tab still on an
 * old dataset does not overwrite one that moved on.
 */
export function shouldReplace(old, rec, { replace = false, repair = false, repairOf, rewind = false } = {}) {
  // Written by a newer walcast (another tab, say): never overwritten here.
  if (newerLayout(old)) return false;
  if (!old || !(old.snapshot || old.format === FORMAT)) return true;
  // A record whose LSN is not one (tampered, another program's) is never kept.
  if (!isLsn(old.appliedLsn)) return true;
  if ((old.datasetId ?? null) !== (rec.datasetId ?? null)) return replace || old.datasetId == null;
  if (rewind) return true;
  // repair: the stored copy was found damaged; the same LSN rewrites it
  // whole, and so does any LSN while the store still holds the damaged copy
  // (`repairOf`: the LSN it claimed, which its bytes did not reach).
  if (repair && repairOf !== undefined && old.appliedLsn === repairOf) return true;
  return rec.appliedLsn > old.appliedLsn || (repair && rec.appliedLsn === old.appliedLsn);
}

/** Whether the stored record `r` has a layout newer than this version's. */
function newerLayout(r) {
  return Number.isSafeInteger(r?.format) && r.format > FORMAT;
}

/**
 * What is wrong with the layout of a stored record `r` (neither version 1,
 * the whole state inline with no `format`, nor this version's), or null.
 */
function layoutDamage(url, r) {
  const name = `the IndexedDB record replicas[${JSON.stringify(url)}]`;
  if (r === null || typeof r !== "object") return `${name} is not a record (${typeof r})`;
  if (r.format === FORMAT || (r.format === undefined && r.snapshot)) return null;
  return `${name} has no layout this version reads (format ${String(r.format).slice(0, 40)})`;
}

/** Whether `v` can be an LSN (a persisted claim is checked before use). */
function isLsn(v) {
  return Number.isSafeInteger(v) && v >= 0;
}

/**
 * What is wrong with a version 2 record `r` against the bytes stored with it
 * (`base`, the `log` chunks), or null: a record's LSNs and sizes are claims,
 * checked before anything uses them.
 */
export function recordDamage(url, r, base, log) {
  const name = `the IndexedDB record replicas[${JSON.stringify(url)}]`;
  const show = (v) => String(v).slice(0, 40);
  if (!isLsn(r.appliedLsn) || !isLsn(r.baseLsn) || r.baseLsn > r.appliedLsn) {
    return `${name} claims appliedLsn ${show(r.appliedLsn)} and baseLsn ${show(r.baseLsn)}, which are not LSNs in order`;
  }
  const baseLen = base instanceof Uint8Array ? base.length : 0;
  if (r.baseBytes !== baseLen) return `${name} claims a base of ${show(r.baseBytes)} bytes; ${baseLen} are stored`;
  let logLen = 0;
  for (const c of log) logLen += c instanceof Uint8Array ? c.length : 0;
  if (r.logBytes !== logLen) return `${name} claims ${show(r.logBytes)} bytes of log; its chunks hold ${logLen}`;
  return null;
}

/**
 * Whether a log of `logBytes` in `logChunks` chunks over a base of
 * `baseBytes` is due for compaction.
 */
export function compactionDue(logBytes, baseBytes, logChunks = 0) {
  return logBytes > Math.max(baseBytes, COMPACT_MIN_BYTES) || logChunks > COMPACT_MAX_CHUNKS;
}

/**
 * The records of a chunk (`bytes`, framed like segment records: lsn u64,
 * len u32, crc u32, payload; little-endian) after `lsn`, or null when the
 * framing is not whole (the module verifies checksums when it replays).
 */
export function recordsAfter(bytes, lsn) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let pos = 0;
  while (pos + 16 <= bytes.length) {
    const at = view.getUint32(pos, true) + view.getUint32(pos + 4, true) * 2 ** 32;
    if (at > lsn) return bytes.subarray(pos);
    pos += 16 + view.getUint32(pos + 8, true);
  }
  return pos === bytes.length ? bytes.subarray(pos) : null;
}

let dbPromise = null;

/**
 * How long opening the database may take. Some browsers' IndexedDB never
 * answers an open (a wedged profile, a private window of an older Safari):
 * the call then fails with an error saying so, instead of hanging a
 * replica's open or sync; the next call tries again.
 */
export const OPEN_TIMEOUT_MS = 10_000;
let openTimeoutMs = OPEN_TIMEOUT_MS;

/** Test-only: sets the open timeout and forgets the open connection (the next call opens anew). */
export function setOpenTimeoutForTest(ms) {
  openTimeoutMs = ms;
  const p = dbPromise;
  dbPromise = null;
  p?.then(
    (db) => db.close(),
    () => {},
  );
}

function openDb() {
  if (!dbPromise) {
    let mine = null;
    mine = dbPromise = new Promise((resolve, reject) => {
      let settled = false;
      const timer = setTimeout(() => {
        if (settled) return;
        settled = true;
        reject(new Error(`walcast: IndexedDB did not open within ${openTimeoutMs} ms`));
      }, openTimeoutMs);
      const fail = (e) => {
        clearTimeout(timer);
        if (settled) return;
        settled = true;
        reject(e);
      };
      let r;
      try {
        r = globalThis.indexedDB.open(DB_NAME, DB_VERSION);
      } catch (e) {
        fail(e);
        return;
      }
      r.onupgradeneeded = () => {
        const db = r.result;
        for (const s of STORES) if (!db.objectStoreNames.contains(s)) db.createObjectStore(s);
      };
      r.onsuccess = () => {
        clearTimeout(timer);
        const db = r.result;
        if (settled) {
          // It came after the timeout: that call failed, and the next opens anew.
          db.close();
          return;
        }
        settled = true;
        // Another tab upgrading the schema: let it, reopen on next use.
        db.onversionchange = () => {
          db.close();
          if (dbPromise === mine) dbPromise = null;
        };
        // Closed by the browser (site data cleared, the backing store
        // lost): reopen on next use instead of failing every call after.
        db.onclose = () => {
          if (dbPromise === mine) dbPromise = null;
        };
        resolve(db);
      };
      r.onerror = () => fail(r.error);
      r.onblocked = () => fail(new Error("walcast: IndexedDB open blocked by another tab"));
    });
    dbPromise.catch(() => {
      dbPromise = null;
    });
  }
  return dbPromise;
}

function transaction(db, mode) {
  try {
    try {
      return db.transaction(STORES, mode, { durability: "strict" });
    } catch (e) {
      if (e?.name === "InvalidStateError") throw e;
      return db.transaction(STORES, mode);
    }
  } catch (e) {
    // A connection closed under us: this call fails, the next one reopens.
    if (e?.name === "InvalidStateError") forget(db);
    throw e;
  }
}

/** Drops the cached connection `db` (the next call opens a new one). */
function forget(db) {
  const p = dbPromise;
  if (!p) return;
  p.then(
    (cur) => {
      if (cur === db && dbPromise === p) dbPromise = null;
    },
    () => {},
  );
}

function done(tx, value) {
  return new Promise((resolve, reject) => {
    tx.oncomplete = () => {
      try {
        resolve(value());
      } catch (e) {
        reject(e);
      }
    };
    // The failed request's error (the transaction's is set only once it aborts).
    tx.onerror = (e) => reject(e?.target?.error ?? tx.error ?? new Error("walcast: IndexedDB transaction failed"));
    tx.onabort = () => reject(tx.error ?? new Error("walcast: IndexedDB transaction aborted"));
  });
}

function withLock(url, fn) {
  const locks = globalThis.navigator?.locks;
  if (locks && typeof locks.request === "function") return locks.request(`walcast:${url}`, fn);
  return fn();
}

/** The key range of every log chunk of `url`. */
function logRange(url) {
  return IDBKeyRange.bound([url, 0], [url, Infinity]);
}

/** Within `tx`: `rec` (a whole state) becomes the base, the log is emptied. Returns the bytes put. */
function putWhole(tx, url, rec) {
  const snapshot = rec.snapshot;
  tx.objectStore(BASES).put(snapshot, url);
  tx.objectStore(LOG).delete(logRange(url));
  tx.objectStore(STORE).put(
    {
      format: FORMAT,
      appliedLsn: rec.appliedLsn,
      datasetId: rec.datasetId ?? null,
      // A key-value replica's state (not a raw one's).
      ...(rec.kv === true ? { kv: true } : {}),
      baseLsn: rec.appliedLsn,
      baseBytes: snapshot.length,
      logBytes: 0,
      logChunks: 0,
      savedAt: rec.savedAt ?? Date.now(),
    },
    url,
  );
  return snapshot.length;
}

export const indexedDbStore = {
  /**
   * The persisted state of `url`: `{ snapshot, log, appliedLsn, datasetId }`
   * (`log`: the chunks to replay on the snapshot, in LSN order), or undefined.
   */
  async load(url) {
    const db = await openDb();
    const tx = transaction(db, "readonly");
    const rec = tx.objectStore(STORE).get(url);
    const base = tx.objectStore(BASES).get(url);
    const log = tx.objectStore(LOG).getAll(logRange(url));
    // A base or log the browser cannot read back (a large value whose file
    // it lost): the copy counts as damaged, so the replica starts from what
    // it can read and rewrites the store whole, instead of every load failing.
    let unreadable = null;
    const unread = (req, what) => {
      req.onerror = (e) => {
        e.preventDefault();
        e.stopPropagation();
        unreadable ??= `${what}[${JSON.stringify(url)}] could not be read back (${req.error?.name ?? "error"}: ${req.error?.message ?? ""})`;
      };
    };
    unread(base, "the IndexedDB base bases");
    unread(log, "the IndexedDB log chunks log");
    return done(tx, () => {
      const r = rec.result;
      if (r === undefined) return undefined;
      if (newerLayout(r)) {
        // Neither read nor overwritten (shouldReplace): a newer version's.
        throw new Error(
          `the IndexedDB record replicas[${JSON.stringify(url)}] has layout format ${r.format}, newer than this version's ${FORMAT} (a newer walcast wrote it): not read, and not overwritten`,
        );
      }
      const layout = layoutDamage(url, r);
      // Damaged (its layout unknown): nothing of it is used; the replica
      // reports it, starts over and rewrites the store whole.
      if (layout) return { snapshot: new Uint8Array(0), log: [], appliedLsn: r?.appliedLsn, damaged: layout, datasetId: null };
      if (r.format !== FORMAT) return r; // version 1: whole inline
      const chunks = unreadable ? [] : (log.result ?? []);
      const damaged = unreadable ?? recordDamage(url, r, unreadable ? undefined : base.result, chunks);
      return {
        // A missing base reads as an empty (undecodable) one: the replica
        // reports the damage and rewrites the store whole.
        snapshot: base.result instanceof Uint8Array ? base.result : new Uint8Array(0),
        log: chunks,
        appliedLsn: r.appliedLsn,
        // Set when the record disagrees with its bytes: the replica reports
        // it, opens at what the base and log hold, and rewrites the store whole.
        ...(damaged ? { damaged } : {}),
        datasetId: r.datasetId ?? null,
        ...(r.kv === true ? { kv: true } : {}),
        baseLsn: r.baseLsn,
        savedAt: r.savedAt,
      };
    });
  },

  /**
   * Writes a whole state `{ snapshot, appliedLsn, datasetId }` as the new
   * base. Resolves true when written, false when the stored one is as new.
   */
  save(url, rec, opts = {}) {
    return withLock(url, async () => {
      const db = await openDb();
      const tx = transaction(db, "readwrite");
      let wrote = false;
      const get = tx.objectStore(STORE).get(url);
      get.onsuccess = () => {
        if (shouldReplace(get.result, rec, opts)) {
          putWhole(tx, url, rec);
          wrote = true;
        }
      };
      return done(tx, () => wrote);
    });
  },

  /**
   * Appends the batches `first..=last` (`bytes`, framed records) a sync of
   * the dataset `datasetId` applied. Only the records after the stored LSN
   * are written; when the store is on another dataset, has a gap before
   * `first`, or its log is due for compaction, `whole()` is called (inside
   * the transaction, synchronously) for `{ snapshot, appliedLsn, datasetId }`
   * and written as the new base instead (null: nothing is written).
   * Resolves `{ wrote: "log" | "base" | null, bytes }`.
   */
  append(url, { datasetId, first, last, bytes, whole }) {
    return withLock(url, async () => {
      const db = await openDb();
      const tx = transaction(db, "readwrite");
      const out = { wrote: null, bytes: 0 };
      const get = tx.objectStore(STORE).get(url);
      get.onsuccess = () => {
        const old = get.result;
        const writeWhole = () => {
          const rec = whole();
          if (rec && shouldReplace(old, rec)) {
            out.bytes = putWhole(tx, url, rec);
            out.wrote = "base";
          }
        };
        // A newer release's record is not overwritten: no whole state is
        // made (whole() serializes all of it) only to be refused.
        if (newerLayout(old)) return undefined;
        if (!old || old.format !== FORMAT || (old.datasetId ?? null) !== (datasetId ?? null)) return writeWhole();
        // Claims that cannot be right (tampered): never built upon.
        if (!isLsn(old.appliedLsn) || !isLsn(old.logBytes) || !isLsn(old.baseBytes)) return writeWhole();
        if (old.appliedLsn >= last) return undefined; // as new already (another tab)
        if (old.appliedLsn + 1 < first) return writeWhole(); // a gap: records missing
        const tail = old.appliedLsn + 1 === first ? bytes : recordsAfter(bytes, old.appliedLsn);
        if (!tail || tail.length === 0) return writeWhole();
        const logBytes = (old.logBytes ?? 0) + tail.length;
        // (A record written before chunks were counted counts from here.)
        const logChunks = (isLsn(old.logChunks) ? old.logChunks : 0) + 1;
        if (compactionDue(logBytes, old.baseBytes ?? 0, logChunks)) return writeWhole();
        // A view is cloned with its whole buffer: store exactly the records.
        const own = tail.byteOffset === 0 && tail.byteLength === tail.buffer.byteLength ? tail : tail.slice();
        tx.objectStore(LOG).put(own, [url, old.appliedLsn + 1]);
        tx.objectStore(STORE).put({ ...old, appliedLsn: last, logBytes, logChunks, savedAt: Date.now() }, url);
        out.wrote = "log";
        out.bytes = tail.length;
        return undefined;
      };
      return done(tx, () => out);
    });
  },

  /** Removes the persisted copy of `url`. */
  async remove(url) {
    return withLock(url, async () => {
      const db = await openDb();
      const tx = transaction(db, "readwrite");
      tx.objectStore(STORE).delete(url);
      tx.objectStore(BASES).delete(url);
      tx.objectStore(LOG).delete(logRange(url));
      return done(tx, () => undefined);
    });
  },
};

// IndexedDB persistence for browsers (persist: "indexeddb").
//
// One record per dataset URL in the object store "replicas" of the database
// "walcast": { snapshot: Uint8Array, appliedLsn, datasetId, savedAt }. A
// record is written whole, in one readwrite transaction that first reads the
// stored record and writes only when ours is newer, so a tab closed mid-write
// reopens at the old or the new LSN, never a mix, and an older tab never
// overwrites a newer tab's state. Writers are serialized across tabs with the
// Web Locks API where the runtime has it.

const DB_NAME = "walcast";
const STORE = "replicas";
const DB_VERSION = 1;

/**
 * Whether a store holding `old` should take `rec`. Same dataset: only a newer
 * LSN. Another dataset: only when this replica has reset to it (`replace`),
 * so a tab still on an old dataset does not overwrite one that moved on.
 */
export function shouldReplace(old, rec, { replace = false } = {}) {
  if (!old || !old.snapshot) return true;
  if ((old.datasetId ?? null) !== (rec.datasetId ?? null)) return replace || old.datasetId == null;
  return rec.appliedLsn > old.appliedLsn;
}

let dbPromise = null;

function openDb() {
  if (!dbPromise) {
    dbPromise = new Promise((resolve, reject) => {
      const r = globalThis.indexedDB.open(DB_NAME, DB_VERSION);
      r.onupgradeneeded = () => {
        if (!r.result.objectStoreNames.contains(STORE)) r.result.createObjectStore(STORE);
      };
      r.onsuccess = () => {
        const db = r.result;
        // Another tab upgrading the schema: let it, reopen on next use.
        db.onversionchange = () => {
          db.close();
          dbPromise = null;
        };
        resolve(db);
      };
      r.onerror = () => reject(r.error);
      r.onblocked = () => reject(new Error("walcast: IndexedDB open blocked by another tab"));
    });
    dbPromise.catch(() => {
      dbPromise = null;
    });
  }
  return dbPromise;
}

function transaction(db, mode) {
  try {
    return db.transaction(STORE, mode, { durability: "strict" });
  } catch {
    return db.transaction(STORE, mode);
  }
}

function done(tx, value) {
  return new Promise((resolve, reject) => {
    tx.oncomplete = () => resolve(value());
    tx.onerror = () => reject(tx.error ?? new Error("walcast: IndexedDB transaction failed"));
    tx.onabort = () => reject(tx.error ?? new Error("walcast: IndexedDB transaction aborted"));
  });
}

function withLock(url, fn) {
  const locks = globalThis.navigator?.locks;
  if (locks && typeof locks.request === "function") return locks.request(`walcast:${url}`, fn);
  return fn();
}

export const indexedDbStore = {
  async load(url) {
    const db = await openDb();
    const tx = transaction(db, "readonly");
    const get = tx.objectStore(STORE).get(url);
    return done(tx, () => get.result ?? undefined);
  },

  /** Resolves true when the record was written, false when the stored one is as new. */
  save(url, rec, opts = {}) {
    return withLock(url, async () => {
      const db = await openDb();
      const tx = transaction(db, "readwrite");
      const store = tx.objectStore(STORE);
      let wrote = false;
      const get = store.get(url);
      get.onsuccess = () => {
        if (shouldReplace(get.result, rec, opts)) {
          store.put(rec, url);
          wrote = true;
        }
      };
      return done(tx, () => wrote);
    });
  },

  /** Removes the persisted copy of `url`. */
  async remove(url) {
    return withLock(url, async () => {
      const db = await openDb();
      const tx = transaction(db, "readwrite");
      tx.objectStore(STORE).delete(url);
      return done(tx, () => undefined);
    });
  },
};

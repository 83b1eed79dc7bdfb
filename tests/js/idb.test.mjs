// The IndexedDB store of `persist: "indexeddb"` (js/src/idb.js) on its own,
// over fake-indexeddb in Node: the layout of docs/FORMAT.md ("A browser
// replica's IndexedDB store"), appends that write only the records after the
// stored LSN, compaction, and the rules that keep two tabs' writes one
// consistent store. The replica on top of it runs in real browsers
// (tests/js/chromium, tests/js/firefox).
//
//   node --test tests/js/idb.test.mjs
import assert from "node:assert/strict";
import { test } from "node:test";

let fakeIdb = true;
try {
  await import("fake-indexeddb/auto");
} catch {
  fakeIdb = false;
}
const { indexedDbStore: store, recordsAfter, compactionDue, COMPACT_MIN_BYTES, shouldReplace } = await import("../../js/src/idb.js");

/** Framed records lsn first.. with payloads of the given lengths (checksums are not looked at here). */
function frames(first, lens) {
  const out = new Uint8Array(lens.reduce((n, l) => n + 16 + l, 0));
  const v = new DataView(out.buffer);
  let pos = 0;
  lens.forEach((len, i) => {
    v.setUint32(pos, first + i, true);
    v.setUint32(pos + 8, len, true);
    out.fill(0xa0 + i, pos + 16, pos + 16 + len);
    pos += 16 + len;
  });
  return out;
}

const whole = (lsn, bytes, datasetId = "ds") => () => ({ snapshot: new Uint8Array(bytes).fill(7), appliedLsn: lsn, datasetId });
const noWhole = () => assert.fail("whole() was not expected");

test("a version 1 database and record (the whole state inline) are upgraded, read and replaced", { skip: !fakeIdb && "fake-indexeddb is not installed" }, async () => {
  const url = "http://x/v1";
  // What version 1 wrote: database version 1, the record alone in
  // "replicas". First in this file: the store has not opened (and so not
  // upgraded) the database yet.
  await new Promise((resolve, reject) => {
    const r = indexedDB.open("walcast", 1);
    r.onupgradeneeded = () => r.result.createObjectStore("replicas");
    r.onsuccess = () => {
      const tx = r.result.transaction("replicas", "readwrite");
      tx.objectStore("replicas").put({ snapshot: new Uint8Array(9), appliedLsn: 4, datasetId: "ds", savedAt: 1 }, url);
      tx.oncomplete = () => {
        r.result.close();
        resolve();
      };
      tx.onerror = () => reject(tx.error);
    };
    r.onerror = () => reject(r.error);
  });
  const rec = await store.load(url);
  assert.equal(rec.appliedLsn, 4);
  assert.equal(rec.snapshot.length, 9);
  const out = await store.append(url, { datasetId: "ds", first: 5, last: 5, bytes: frames(5, [3]), whole: whole(5, 20) });
  assert.deepEqual(out, { wrote: "base", bytes: 20 }, "the first write after version 1 is whole");
  const after = await store.load(url);
  assert.equal(after.baseLsn, 5);
});

test("recordsAfter cuts a chunk at an LSN", () => {
  const c = frames(10, [3, 5, 1]);
  assert.equal(recordsAfter(c, 9).length, c.length);
  assert.deepEqual(recordsAfter(c, 10), c.subarray(19));
  assert.deepEqual(recordsAfter(c, 11), c.subarray(19 + 21));
  assert.equal(recordsAfter(c, 12).length, 0);
  assert.equal(recordsAfter(c.subarray(0, 20), 10), null, "a torn frame");
});

test("compaction is due once the log outgrows the base and the minimum", () => {
  assert.equal(compactionDue(COMPACT_MIN_BYTES, 10), false);
  assert.equal(compactionDue(COMPACT_MIN_BYTES + 1, 10), true);
  assert.equal(compactionDue(5 << 20, 6 << 20), false);
  assert.equal(compactionDue(7 << 20, 6 << 20), true);
});

test("shouldReplace: repair rewrites the same LSN", () => {
  const old = { format: 2, appliedLsn: 10, datasetId: "a" };
  assert.equal(shouldReplace(old, { appliedLsn: 10, datasetId: "a" }), false);
  assert.equal(shouldReplace(old, { appliedLsn: 10, datasetId: "a" }, { repair: true }), true);
  assert.equal(shouldReplace(old, { appliedLsn: 9, datasetId: "a" }, { repair: true }), false);
});

test("appends, slices, skips, compacts and loads", { skip: !fakeIdb && "fake-indexeddb is not installed" }, async () => {
  const url = "http://x/append";
  assert.equal(await store.load(url), undefined);

  // A whole state first.
  assert.equal(await store.save(url, { snapshot: new Uint8Array(1000).fill(1), appliedLsn: 10, datasetId: "ds" }), true);
  let rec = await store.load(url);
  assert.equal(rec.appliedLsn, 10);
  assert.equal(rec.snapshot.length, 1000);
  assert.deepEqual(rec.log, []);

  // A chunk that follows: appended as it is.
  const c1 = frames(11, [100, 100]);
  let out = await store.append(url, { datasetId: "ds", first: 11, last: 12, bytes: c1, whole: noWhole });
  assert.deepEqual(out, { wrote: "log", bytes: c1.length });

  // A chunk overlapping what is stored (another tab wrote 11..12): only 13.. is written.
  const c2 = frames(11, [100, 100, 50]);
  out = await store.append(url, { datasetId: "ds", first: 11, last: 13, bytes: c2, whole: noWhole });
  assert.deepEqual(out, { wrote: "log", bytes: 66 });

  // As new already: nothing.
  out = await store.append(url, { datasetId: "ds", first: 12, last: 13, bytes: frames(12, [1, 1]), whole: noWhole });
  assert.deepEqual(out, { wrote: null, bytes: 0 });

  rec = await store.load(url);
  assert.equal(rec.appliedLsn, 13);
  assert.equal(rec.baseLsn, 10);
  assert.deepEqual(
    rec.log.map((c) => c.length),
    [c1.length, 66],
  );
  assert.deepEqual(rec.log[1], c2.subarray(c1.length), "exactly the records after the stored LSN");
  assert.equal(rec.log[1].buffer.byteLength, 66, "a slice, not the view's whole buffer");

  // A gap (records 14..15 missing): the whole state instead.
  out = await store.append(url, { datasetId: "ds", first: 16, last: 16, bytes: frames(16, [10]), whole: whole(16, 1200) });
  assert.deepEqual(out, { wrote: "base", bytes: 1200 });
  rec = await store.load(url);
  assert.equal(rec.appliedLsn, 16);
  assert.equal(rec.baseLsn, 16);
  assert.deepEqual(rec.log, []);

  // The log outgrowing the base (and the minimum): compaction.
  let lsn = 16;
  let compacted = false;
  for (let i = 0; i < 40 && !compacted; i++) {
    const c = frames(lsn + 1, [16 << 10]);
    out = await store.append(url, { datasetId: "ds", first: lsn + 1, last: lsn + 1, bytes: c, whole: whole(lsn + 1, 1300) });
    lsn++;
    compacted = out.wrote === "base";
  }
  assert.ok(compacted, "compacted");
  rec = await store.load(url);
  assert.equal(rec.baseLsn, lsn);
  assert.deepEqual(rec.log, []);

  // Another dataset: only a whole state after a reset replaces it.
  out = await store.append(url, { datasetId: "other", first: 1, last: 1, bytes: frames(1, [1]), whole: whole(1, 10, "other") });
  assert.deepEqual(out, { wrote: null, bytes: 0 }, "an old tab on another dataset does not overwrite");
  assert.equal(await store.save(url, { snapshot: new Uint8Array(5), appliedLsn: 1, datasetId: "other" }, { replace: true }), true);
  rec = await store.load(url);
  assert.equal(rec.datasetId, "other");

  // A record whose base is gone reads as an empty base (the replica reports it and rewrites).
  await new Promise((resolve, reject) => {
    const r = indexedDB.open("walcast");
    r.onsuccess = () => {
      const tx = r.result.transaction("bases", "readwrite");
      tx.objectStore("bases").delete(url);
      tx.oncomplete = () => {
        r.result.close();
        resolve();
      };
      tx.onerror = () => reject(tx.error);
    };
    r.onerror = () => reject(r.error);
  });
  rec = await store.load(url);
  assert.equal(rec.snapshot.length, 0, "a missing base");
  assert.equal(rec.datasetId, "other");

  await store.remove(url);
  assert.equal(await store.load(url), undefined);
});

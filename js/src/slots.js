// A bounded set of slots (lazy reads and scans running at once) whose
// holders may be stranded by a runtime that tears their I/O down.

import { MAX_TIMER_MS, closedError } from "./util.js";

/**
 * At most `max` holders at once, the rest waiting first come first served.
 * A slot held `staleMs` or longer is taken back: its holder is taken for
 * stranded (a runtime that tore its request's I/O down).
 */
export class Slots {
  constructor(max, staleMs) {
    this.max = max;
    this.staleMs = staleMs;
    this.held = new Map(); // slot -> Date.now() when taken
    this.waiters = []; // wake-up functions, first come first
  }

  /**
   * A free slot, once one is free (or stale). `closed()` true: throws
   * closedError; `signal` aborted: throws its reason, leaving the queue.
   */
  async take(closed, signal) {
    let first = this.waiters.length === 0; // else queue behind the waiters
    for (;;) {
      if (closed()) throw closedError();
      signal?.throwIfAborted();
      const now = Date.now();
      let oldest = Infinity;
      for (const [slot, at] of this.held) {
        if (now - at >= this.staleMs) this.held.delete(slot);
        else oldest = Math.min(oldest, at);
      }
      // Slots freed by staleness go to those waiting first (a waiter whose
      // own timer a torn-down request never fires is woken here).
      while (this.held.size < this.max && this.waiters.length > 0) {
        const handed = {};
        this.held.set(handed, now);
        this.waiters.shift()(handed);
      }
      if (this.held.size < this.max) {
        const slot = {};
        this.held.set(slot, now);
        return slot;
      }
      // Handed a slot by a release, or woken when the oldest slot turns
      // stale. The timer is this caller's own: a stranded holder's timers
      // may never fire.
      const handed = await new Promise((resolve) => {
        let timer;
        const abort = () => wake(null);
        const wake = (slot) => {
          clearTimeout(timer);
          signal?.removeEventListener("abort", abort);
          const i = this.waiters.indexOf(wake);
          if (i >= 0) this.waiters.splice(i, 1);
          resolve(slot);
        };
        const wait = Math.max(1, Math.min(oldest + this.staleMs - now, this.staleMs, MAX_TIMER_MS));
        timer = setTimeout(() => wake(null), wait);
        signal?.addEventListener("abort", abort);
        // A waiter that got no slot when woken keeps its place in front.
        if (first) this.waiters.unshift(wake);
        else this.waiters.push(wake);
      });
      if (handed) return handed;
      first = true;
    }
  }

  /** Gives `slot` back; it goes to the first waiter, if any (a stale slot was already given away). */
  release(slot) {
    if (!this.held.delete(slot)) return;
    const next = this.waiters.shift();
    if (next) {
      const handed = {};
      this.held.set(handed, Date.now());
      next(handed);
    }
  }

  /** Wakes every waiter empty-handed (their take() then sees closed). */
  wakeAll() {
    for (const wake of this.waiters.splice(0)) wake(null);
  }
}

/**
 * A level-triggered work queue for reconcile loops. Keys (object names) are enqueued by watch
 * events and by a periodic resync; each key is reconciled by at most one call at a time, a key
 * enqueued while it runs is run again afterwards (nothing is lost, nothing runs twice at once),
 * and a reconcile that throws is retried with capped exponential backoff.
 *
 * The reconcile function returns how soon it wants to look again (ms), or null.
 */

export interface WorkQueueOptions {
  name: string;
  reconcile: (key: string) => Promise<number | null>;
  /** Keys reconciled at the same time. */
  concurrency?: number;
  backoffMsMin?: number;
  backoffMsMax?: number;
  log?: (event: Record<string, unknown>) => void;
}

export class WorkQueue {
  private readonly options: Required<WorkQueueOptions>;
  /** Keys waiting to run, in order. */
  private readonly ready = new Set<string>();
  private readonly running = new Set<string>();
  /** Keys enqueued again while running. */
  private readonly dirty = new Set<string>();
  private readonly timers = new Map<string, { timer: NodeJS.Timeout; dueMs: number }>();
  private readonly failures = new Map<string, number>();
  private stopped = false;
  private idleWaiters: (() => void)[] = [];

  constructor(options: WorkQueueOptions) {
    this.options = { concurrency: 4, backoffMsMin: 200, backoffMsMax: 10_000, log: () => {}, ...options };
  }

  /** Reconcile `key` soon (now, or after `delayMs`). */
  add(key: string, delayMs = 0): void {
    if (this.stopped) return;
    if (delayMs > 0) {
      const dueMs = Date.now() + delayMs;
      const existing = this.timers.get(key);
      if (existing !== undefined) {
        if (existing.dueMs <= dueMs) return; // an earlier wake-up is already set
        clearTimeout(existing.timer);
      }
      const timer = setTimeout(() => {
        this.timers.delete(key);
        this.add(key);
      }, delayMs);
      timer.unref();
      this.timers.set(key, { timer, dueMs });
      return;
    }
    if (this.running.has(key)) {
      this.dirty.add(key);
      return;
    }
    this.ready.add(key);
    this.pump();
  }

  private pump(): void {
    while (!this.stopped && this.running.size < this.options.concurrency && this.ready.size > 0) {
      const key = this.ready.values().next().value as string;
      this.ready.delete(key);
      this.running.add(key);
      this.options.reconcile(key).then(
        (againMs) => {
          this.failures.delete(key);
          this.done(key, againMs);
        },
        (err) => {
          const failures = (this.failures.get(key) ?? 0) + 1;
          this.failures.set(key, failures);
          const delayMs = Math.min(this.options.backoffMsMax, this.options.backoffMsMin * 2 ** Math.min(failures - 1, 16));
          this.options.log({ event: 'reconcile-failed', queue: this.options.name, key, failures, retryInMs: delayMs, error: (err as Error).message });
          this.done(key, delayMs);
        },
      );
    }
    if (this.running.size === 0 && this.ready.size === 0) {
      const waiters = this.idleWaiters;
      this.idleWaiters = [];
      for (const w of waiters) w();
    }
  }

  private done(key: string, againMs: number | null): void {
    this.running.delete(key);
    if (this.dirty.delete(key)) this.ready.add(key);
    else if (againMs !== null) this.add(key, againMs);
    this.pump();
  }

  /** Resolves once nothing runs or waits to run (timers aside). */
  idle(): Promise<void> {
    if (this.running.size === 0 && this.ready.size === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  async stop(): Promise<void> {
    this.stopped = true;
    for (const { timer } of this.timers.values()) clearTimeout(timer);
    this.timers.clear();
    this.ready.clear();
    this.dirty.clear();
    while (this.running.size > 0) await new Promise((r) => setTimeout(r, 20));
  }
}

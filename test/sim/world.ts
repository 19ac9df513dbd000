/**
 * The simulator's world: a seeded random source, a simulated clock with one event queue, and
 * processes whose timers die with them. Nothing here reads the real clock; everything that
 * happens is an event in the queue or a microtask that follows from one, so the same seed gives
 * the same run.
 */
import type { Clock, ClockTimer } from '../../src/os/clock.ts';
import { Prng as Random } from '../support/fault-prng.ts';

/** The simulator draws from the fault suite's seeded generator. */
export { Prng as Random } from '../support/fault-prng.ts';

interface SimEvent {
  atMs: number;
  seq: number;
  run: () => void;
  cancelled: boolean;
  owner: SimProcess | null;
}

/** A binary heap of events by time, then by the order they were scheduled. */
class EventQueue {
  private readonly heap: SimEvent[] = [];
  get size(): number {
    return this.heap.length;
  }
  push(e: SimEvent): void {
    const h = this.heap;
    h.push(e);
    let i = h.length - 1;
    while (i > 0) {
      const parent = (i - 1) >> 1;
      if (!before(h[i], h[parent])) break;
      [h[i], h[parent]] = [h[parent], h[i]];
      i = parent;
    }
  }
  pop(): SimEvent | undefined {
    const h = this.heap;
    if (h.length === 0) return undefined;
    const top = h[0];
    const last = h.pop()!;
    if (h.length > 0) {
      h[0] = last;
      let i = 0;
      for (;;) {
        const l = 2 * i + 1;
        const r = l + 1;
        let m = i;
        if (l < h.length && before(h[l], h[m])) m = l;
        if (r < h.length && before(h[r], h[m])) m = r;
        if (m === i) break;
        [h[i], h[m]] = [h[m], h[i]];
        i = m;
      }
    }
    return top;
  }
  peek(): SimEvent | undefined {
    return this.heap[0];
  }
}

function before(a: SimEvent, b: SimEvent): boolean {
  return a.atMs < b.atMs || (a.atMs === b.atMs && a.seq < b.seq);
}

/** Lets every microtask and nextTick that follows from the last event run (one macrotask turn). */
function settle(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

export class SimWorld {
  nowMs = 0;
  readonly random: Random;
  private readonly queue = new EventQueue();
  private seq = 0;
  /** Errors thrown by event handlers (an assertion in the code under test): the run has failed. */
  readonly crashes: string[] = [];

  constructor(seed: number) {
    this.random = new Random(seed);
  }

  schedule(delayMs: number, run: () => void, owner: SimProcess | null = null): SimEvent {
    const e: SimEvent = { atMs: this.nowMs + Math.max(0, delayMs), seq: this.seq++, run, cancelled: false, owner };
    this.queue.push(e);
    return e;
  }

  /** Runs the next event (after letting what follows from the last one finish). False: none left. */
  async step(untilMs = Infinity): Promise<boolean> {
    await settle();
    for (;;) {
      const e = this.queue.peek();
      if (e === undefined || e.atMs > untilMs) return false;
      this.queue.pop();
      if (e.cancelled || (e.owner !== null && !e.owner.alive)) continue;
      if (e.owner !== null && e.owner.frozenUntilMs > e.atMs) {
        // A hung process runs nothing, its timers included: they fire when it runs again. The
        // event object stays the same one, so a timer can still be cleared meanwhile.
        e.atMs = e.owner.frozenUntilMs;
        e.seq = this.seq++;
        this.queue.push(e);
        continue;
      }
      this.nowMs = e.atMs;
      try {
        e.run();
      } catch (err) {
        this.crashes.push(`t=${this.nowMs.toFixed(3)} event threw: ${(err as Error).stack ?? String(err)}`);
      }
      return true;
    }
  }

  /** Runs events for `durationMs` of simulated time. */
  async runFor(durationMs: number): Promise<void> {
    const until = this.nowMs + durationMs;
    while (await this.step(until)) {
      if (this.crashes.length > 0) return;
    }
    this.nowMs = Math.max(this.nowMs, until);
    await settle();
  }

  /**
   * Runs events until `promise` settles (or `limitMs` of simulated time pass: then throws, with
   * `what`). Returns its value; a rejection is rethrown.
   */
  async await<T>(promise: Promise<T>, what: string, limitMs = 600_000): Promise<T> {
    let settled = false;
    let value: T | undefined;
    let error: unknown = null;
    promise.then((v) => {
      settled = true;
      value = v;
    }, (err: unknown) => {
      settled = true;
      error = err ?? new Error('rejected');
    });
    const until = this.nowMs + limitMs;
    await settle();
    while (!settled) {
      if (this.crashes.length > 0) throw new Error(`${what}: the code under test threw: ${this.crashes[0]}`);
      const ran = await this.step(until);
      if (!ran && !settled) {
        await settle();
        if (!settled) throw new Error(`${what}: did not finish within ${limitMs} ms of simulated time (nothing left to run: ${this.queue.size === 0})`);
      }
    }
    if (error !== null) throw error;
    return value as T;
  }

  process(name: string): SimProcess {
    return new SimProcess(this, name);
  }
}

class SimTimer implements ClockTimer {
  event: SimEvent | null = null;
  unref(): ClockTimer {
    return this;
  }
}

/**
 * A process: its timers stop and its connections are cut when it is killed; while it hangs
 * (`frozenUntilMs`) none of its events run.
 */
export class SimProcess {
  readonly world: SimWorld;
  readonly name: string;
  alive = true;
  /** Until then the process hangs (SIGSTOP, a stalled disk in the kernel): nothing of it runs. */
  frozenUntilMs = 0;
  /** It died with its machine: nothing it had sent goes out any more. */
  diedWithMachine = false;
  private readonly killHandlers: (() => void)[] = [];
  readonly clock: Clock;

  constructor(world: SimWorld, name: string) {
    this.world = world;
    this.name = name;
    const timeout = (fn: () => void, delayMs: number, repeatMs: number | null): ClockTimer => {
      const timer = new SimTimer();
      const arm = (ms: number): void => {
        timer.event = world.schedule(ms, () => {
          if (repeatMs !== null) arm(repeatMs);
          else timer.event = null;
          fn();
        }, this);
      };
      arm(delayMs);
      return timer;
    };
    this.clock = {
      nowMs: () => world.nowMs,
      setTimeout: (fn, delayMs) => timeout(fn, delayMs, null),
      setInterval: (fn, intervalMs) => timeout(fn, intervalMs, Math.max(1, intervalMs)),
      clear: (timer) => {
        if (timer instanceof SimTimer && timer.event !== null) {
          timer.event.cancelled = true;
          timer.event = null;
        }
      },
      sleep: (delayMs) => new Promise((resolve) => world.schedule(delayMs, () => resolve(), this)),
    };
  }

  onKill(handler: () => void): void {
    this.killHandlers.push(handler);
  }

  /**
   * kill -9 (`process`): no more timers; what it had sent may still go out (the kernel lives on).
   * `machine`: its machine went down with it (power, a node crash): its connections die too.
   */
  kill(how: 'process' | 'machine' = 'process'): void {
    if (!this.alive) return;
    this.alive = false;
    this.diedWithMachine = how === 'machine';
    for (const h of this.killHandlers) h();
  }
}

/**
 * Time as the data path sees it: a monotonic "now" and timers. Everything on the data path
 * (engine, replica, protocol) takes a Clock instead of calling performance.now() or setTimeout
 * itself, so the simulator (test/sim) can run a whole volume under a simulated clock where the
 * same seed gives the same run.
 */
export interface ClockTimer {
  /** A timer that must not keep the process alive (the system clock's meaning; a no-op elsewhere). */
  unref(): ClockTimer;
}

export interface Clock {
  /** Milliseconds on a monotonic clock, for deadlines and durations (not wall time). */
  nowMs(): number;
  setTimeout(fn: () => void, delayMs: number): ClockTimer;
  setInterval(fn: () => void, intervalMs: number): ClockTimer;
  /** Cancels a timeout or an interval; null and already-fired timers are ignored. */
  clear(timer: ClockTimer | null): void;
  /** Resolves after `delayMs`. */
  sleep(delayMs: number): Promise<void>;
}

export const systemClock: Clock = {
  nowMs: () => performance.now(),
  setTimeout: (fn, delayMs) => setTimeout(fn, delayMs),
  setInterval: (fn, intervalMs) => setInterval(fn, intervalMs),
  clear: (timer) => {
    if (timer !== null) clearTimeout(timer as NodeJS.Timeout);
  },
  sleep: (delayMs) => new Promise((resolve) => setTimeout(resolve, delayMs)),
};

/**
 * A deadline for another process's answer that does not count time this process itself did not
 * run. A timer that fires much later than asked means the process was stopped or paused, and an
 * answer that came meanwhile may still sit unread in a socket: the deadline then waits a moment
 * more (the sockets are read before timers run again) instead of blaming the peer.
 */
export class AnswerDeadline {
  private readonly clock: Clock;
  private readonly onExpired: () => void;
  private timer: ClockTimer | null;
  private dueMs: number;

  constructor(clock: Clock, delayMs: number, onExpired: () => void) {
    this.clock = clock;
    this.onExpired = onExpired;
    this.dueMs = clock.nowMs() + delayMs;
    this.timer = clock.setTimeout(() => this.fired(), delayMs);
  }

  cancel(): void {
    this.clock.clear(this.timer);
    this.timer = null;
  }

  private fired(): void {
    const lateMs = this.clock.nowMs() - this.dueMs;
    if (lateMs > STALL_MS) {
      this.dueMs = this.clock.nowMs() + 1;
      this.timer = this.clock.setTimeout(() => this.fired(), 1);
      return;
    }
    this.timer = null;
    this.onExpired();
  }
}

/** A timer this much late means its process did not run meanwhile (ordinary event-loop lag is far less). */
export const STALL_MS = 250;

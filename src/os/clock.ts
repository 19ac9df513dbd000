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

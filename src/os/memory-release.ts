/**
 * Gives back the memory a load made a data-path process take, once the load is over.
 *
 * Node keeps Buffer payloads in malloc's heap. After a burst of I/O the freed chunks stay there
 * (glibc returns only the top of its heap by itself), so a replica, engine or frontend that served
 * 256 MiB of writes kept 40-60 MiB it no longer used, for ever. Each process runs this: a timer
 * samples the process's CPU time; after an interval with work followed by a quiet one, it lets go
 * of the buffers the process kept for reuse (emptyCaches), runs a full garbage collection where
 * the process was started with --expose-gc (the load's Buffers are freed only once V8 collects
 * them, and an idle process may not collect for a long time), then calls malloc_trim
 * (build/memory.node), which hands every free page back to the kernel. An idle process does
 * nothing more than the sample; a busy one is never interrupted by a trim.
 *
 * Without the addon the caches are still emptied and the collection still runs: large Buffers
 * (malloc maps each on its own) then go back to the kernel when they are freed; only the small
 * chunks left in malloc's heap stay.
 */
import { loadAddon } from './native-addon.ts';

interface MemoryAddon {
  trimMalloc(): boolean;
}

export interface MemoryReleaseOptions {
  /** How often CPU time is sampled (ms). */
  intervalMs?: number;
  /** CPU time in one interval (ms) from which the process counts as having worked. */
  busyCpuMs?: number;
  /**
   * Growth of the resident memory since the last trim (bytes) below which there is nothing worth
   * giving back: a light steady load, busy and quiet in turns, is not interrupted for nothing.
   */
  minGrowthBytes?: number;
  /**
   * Lets go of what the process keeps for reuse (its I/O buffer pool), before the collection and
   * the trim: kept buffers would otherwise stay resident after every load, however long it is over.
   */
  emptyCaches?: () => void;
  /** Stand-ins for tests: the trim, the process's CPU time in µs, its resident bytes. */
  trim?: () => boolean;
  cpuMicros?: () => number;
  residentBytes?: () => number;
  setInterval?: (fn: () => void, ms: number) => { unref?: () => void };
  clearInterval?: (timer: unknown) => void;
}

export interface MemoryRelease {
  /** Trims made so far. */
  readonly trims: number;
  stop(): void;
}

/** Why memory is not given back on this machine; null when it is. */
export function memoryReleaseUnavailable(): string | null {
  return loadAddon<MemoryAddon>('memory').reason;
}

/**
 * The Buffers of the load are freed only once V8 collects them, and an idle process may not
 * collect for a long time: a full collection first, where the process allows it (--expose-gc),
 * then malloc_trim where the addon is built.
 */
function collectAndTrim(): () => boolean {
  const { addon } = loadAddon<MemoryAddon>('memory');
  const gc = (globalThis as { gc?: () => void }).gc;
  return () => {
    gc?.();
    return addon !== null && addon.trimMalloc();
  };
}

/** Starts the sampling; without the addon (and no stand-in) a "trim" empties the caches and collects only. */
export function releaseMemoryAfterLoad(options: MemoryReleaseOptions = {}): MemoryRelease {
  const intervalMs = options.intervalMs ?? 5000;
  const busyMicros = (options.busyCpuMs ?? 50) * 1000;
  const doTrim = options.trim ?? collectAndTrim();
  const cpuMicros = options.cpuMicros ?? (() => {
    const used = process.cpuUsage();
    return used.user + used.system;
  });
  const residentBytes = options.residentBytes ?? (() => process.memoryUsage.rss());
  const minGrowthBytes = options.minGrowthBytes ?? 16 * 1024 * 1024;
  const state = { trims: 0, stop: () => {} };
  const emptyCaches = options.emptyCaches ?? (() => {});
  let last = cpuMicros();
  let workedSinceTrim = false;
  let residentAfterTrim = residentBytes();
  const timer = (options.setInterval ?? setInterval)(() => {
    const now = cpuMicros();
    const used = now - last;
    last = now;
    if (used >= busyMicros) {
      workedSinceTrim = true;
    } else if (workedSinceTrim) {
      workedSinceTrim = false;
      if (residentBytes() - residentAfterTrim < minGrowthBytes) return;
      emptyCaches();
      doTrim();
      state.trims++;
      residentAfterTrim = residentBytes();
    }
  }, intervalMs);
  timer.unref?.();
  state.stop = () => (options.clearInterval ?? clearInterval)(timer as never);
  return state;
}

/**
 * Seeded randomness for the fault suite. Every schedule (which block, when to kill, which fault)
 * comes from one seed, printed by each test, so that a failing run can be replayed with
 * ZEBU_FAULT_SEED=<seed> (process timing still varies; the decisions do not).
 */

/** The suite's seed: ZEBU_FAULT_SEED when set, else a fresh one. */
export function faultSeed(): number {
  const fromEnv = process.env.ZEBU_FAULT_SEED;
  if (fromEnv !== undefined && fromEnv !== '') {
    const seed = Number(fromEnv);
    if (!Number.isSafeInteger(seed) || seed < 0) throw new Error(`ZEBU_FAULT_SEED must be a non-negative integer, got ${fromEnv}`);
    return seed;
  }
  return Math.floor(Math.random() * 2 ** 31);
}

/** Whether the full run was asked for (ZEBU_FAULT_FULL=1): at least 200 kills across the matrix. */
export function faultFull(): boolean {
  return process.env.ZEBU_FAULT_FULL === '1';
}

/** A count from the environment (ZEBU_FAULT_KILLS and friends), else `fallback`. */
export function envCount(name: string, fallback: number): number {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return fallback;
  const n = Number(raw);
  if (!Number.isSafeInteger(n) || n < 0) throw new Error(`${name} must be a non-negative integer, got ${raw}`);
  return n;
}

/** mulberry32: small, fast, good enough to drive schedules; one instance per purpose. */
export class Prng {
  private state: number;

  constructor(seed: number) {
    this.state = seed >>> 0;
  }

  /** A uniform float in [0, 1). */
  next(): number {
    this.state = (this.state + 0x6d2b79f5) >>> 0;
    let t = this.state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  }

  /** A uniform integer in [0, n). */
  int(n: number): number {
    return Math.floor(this.next() * n);
  }

  /** A uniform integer in [lo, hi]. */
  range(lo: number, hi: number): number {
    return lo + this.int(hi - lo + 1);
  }

  chance(p: number): boolean {
    return this.next() < p;
  }

  pick<T>(items: readonly T[]): T {
    if (items.length === 0) throw new Error('pick from an empty list');
    return items[this.int(items.length)];
  }

  /** A new generator derived from this one (independent streams for independent purposes). */
  fork(): Prng {
    return new Prng(Math.floor(this.next() * 2 ** 32));
  }
}

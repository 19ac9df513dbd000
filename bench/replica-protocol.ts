/**
 * One local replica process, driven through the data protocol by a DataClient in this
 * process, against the same access patterns done directly with pwrite/pread (callback fs.write /
 * fs.read) on a plain file in the same temp directory. Run on demand: `npm run bench:replica`.
 *
 *   4 KiB random write / read, queue depth 32 (IOPS)
 *   1 MiB sequential write / read, queue depth 8 (MiB/s)
 *
 * Both targets start as ftruncated (sparse) files of the same size. Each phase issues requests
 * for a fixed time, then drains; write phases end with a flush (zebu) / fdatasync (direct),
 * included in the time. Before the read phases both are prefilled (1 MiB sequential writes over
 * the whole volume, then flushed, untimed), so every read hits data (page cache on both sides).
 *
 * Options (env, or argv `--seconds=N` / `--size-mib=N` / `--patterns=a,b` / `--cpu-prof=DIR`):
 *   BENCH_SECONDS      seconds per phase (default 5)
 *   BENCH_SIZE_MIB     volume and direct file size in MiB (default 1024)
 *   BENCH_PATTERNS     subset of randwrite,randread,seqwrite,seqread (default all)
 *   BENCH_CPU_PROF     directory: run the replica process with --cpu-prof into it (kept), e.g.
 *                      BENCH_CPU_PROF=/tmp/prof BENCH_PATTERNS=randwrite npm run bench:replica
 */
// Like src/cli/main.ts: the direct fs side must have as many threads as the replica has.
process.env.UV_THREADPOOL_SIZE ??= '16';

import { spawn, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import { DataClient } from '../src/protocol/client.ts';
import { Op, MAX_RANGE_BYTES } from '../src/protocol/frames.ts';
import { readSecretFile } from '../src/protocol/auth.ts';

const MAIN = fileURLToPath(new URL('../src/cli/main.ts', import.meta.url));

function option(name: string, envName: string): string | undefined {
  const prefix = `--${name}=`;
  const arg = process.argv.slice(2).find((a) => a.startsWith(prefix));
  return arg !== undefined ? arg.slice(prefix.length) : process.env[envName];
}

const SECONDS = Number(option('seconds', 'BENCH_SECONDS') ?? 5);
const SIZE_MIB = Number(option('size-mib', 'BENCH_SIZE_MIB') ?? 1024);
const CPU_PROF_DIR = option('cpu-prof', 'BENCH_CPU_PROF');
const SELECTED = (option('patterns', 'BENCH_PATTERNS') ?? 'randwrite,randread,seqwrite,seqread').split(',').map((s) => s.trim()).filter((s) => s !== '');
if (!(SECONDS > 0) || !Number.isFinite(SECONDS)) throw new Error(`bad BENCH_SECONDS ${SECONDS}`);
if (!Number.isInteger(SIZE_MIB) || SIZE_MIB < 1) throw new Error(`bad BENCH_SIZE_MIB ${SIZE_MIB}`);
const SIZE = SIZE_MIB * 1024 * 1024;
const KIB4 = 4096;
const MIB1 = 1024 * 1024;
const EMPTY = Buffer.alloc(0);

// ---- targets -----------------------------------------------------------------------------------

type Done = (err: Error | null) => void;

interface Target {
  readonly label: string;
  /** `buf` is never modified while in flight. */
  write(buf: Buffer, offset: number, cb: Done): void;
  /** `slot` owns a buffer of at least `length` bytes for as long as the request runs. */
  read(slot: number, offset: number, length: number, cb: Done): void;
  /** Makes the writes durable: FLUSH / fdatasync. */
  sync(): Promise<void>;
}

class DirectTarget implements Target {
  readonly label = 'direct';
  private readonly fd: number;
  private readonly readBufs: Buffer[] = [];
  constructor(fd: number) {
    this.fd = fd;
  }
  write(buf: Buffer, offset: number, cb: Done): void {
    fs.write(this.fd, buf, 0, buf.length, offset, (err, n) => {
      cb(err ?? (n !== buf.length ? new Error(`short write ${n}/${buf.length}`) : null));
    });
  }
  read(slot: number, offset: number, length: number, cb: Done): void {
    let buf = this.readBufs[slot];
    if (buf === undefined || buf.length < length) buf = this.readBufs[slot] = Buffer.allocUnsafe(length);
    fs.read(this.fd, buf, 0, length, offset, (err, n) => {
      cb(err ?? (n !== length ? new Error(`short read ${n}/${length}`) : null));
    });
  }
  sync(): Promise<void> {
    return new Promise((resolve, reject) => fs.fdatasync(this.fd, (err) => (err ? reject(err) : resolve())));
  }
  readInto(buf: Buffer, offset: number): number {
    return fs.readSync(this.fd, buf, 0, buf.length, offset);
  }
}

class ZebuTarget implements Target {
  readonly label = 'zebu';
  private readonly client: DataClient;
  constructor(client: DataClient) {
    this.client = client;
  }
  write(buf: Buffer, offset: number, cb: Done): void {
    this.client.send(Op.WRITE, 0, offset, buf.length, buf, (err) => cb(err));
  }
  read(_slot: number, offset: number, length: number, cb: Done): void {
    this.client.send(Op.READ, 0, offset, length, EMPTY, (err, payload) => {
      cb(err ?? (payload.length !== length ? new Error(`read returned ${payload.length}/${length} bytes`) : null));
    });
  }
  sync(): Promise<void> {
    return this.client.flush();
  }
}

// ---- phases ------------------------------------------------------------------------------------

interface PhaseResult {
  ops: number;
  bytes: number;
  seconds: number;
  /** Per-request latency in ms (request issued to callback), not including the final sync. */
  latencies: Float64Array;
  syncMs: number;
}

interface PhaseSpec {
  depth: number;
  blockBytes: number;
  /** Issue until this many ms have passed (Infinity: until next() returns -1). */
  durationMs: number;
  /** Offset of the next request, -1: no more. */
  next: () => number;
  issue: (slot: number, offset: number, cb: Done) => void;
  /** Awaited after the last request completed, inside the timed span. */
  finish?: () => Promise<void>;
}

function runPhase(spec: PhaseSpec): Promise<PhaseResult> {
  return new Promise((resolve, reject) => {
    const lat: number[] = [];
    let ops = 0;
    let inflight = 0;
    let failed: Error | null = null;
    let stopped = false;
    const start = performance.now();
    const deadline = start + spec.durationMs;

    let settled = false;
    const drained = (): void => {
      if (settled) return;
      settled = true;
      if (failed !== null) return reject(failed);
      const beforeSync = performance.now();
      const finish = spec.finish ? spec.finish() : Promise.resolve();
      finish.then(() => {
        const end = performance.now();
        resolve({ ops, bytes: ops * spec.blockBytes, seconds: (end - start) / 1000, latencies: Float64Array.from(lat), syncMs: end - beforeSync });
      }, reject);
    };

    const launch = (slot: number): void => {
      const offset = stopped ? -1 : spec.next();
      if (offset < 0) {
        stopped = true;
        if (inflight === 0) drained();
        return;
      }
      inflight++;
      const t0 = performance.now();
      spec.issue(slot, offset, (err) => {
        inflight--;
        const t1 = performance.now();
        if (err !== null) {
          failed ??= err;
          stopped = true;
        } else {
          ops++;
          lat.push(t1 - t0);
        }
        if (!stopped && t1 >= deadline) stopped = true;
        launch(slot);
      });
    };
    for (let slot = 0; slot < spec.depth; slot++) launch(slot);
  });
}

function randomOffsets(blockBytes: number): () => number {
  const blocks = Math.floor(SIZE / blockBytes);
  return () => Math.floor(Math.random() * blocks) * blockBytes;
}

function sequentialOffsets(blockBytes: number, once: boolean): () => number {
  let pos = 0;
  return () => {
    if (pos + blockBytes > SIZE) {
      if (once) return -1;
      pos = 0;
    }
    const at = pos;
    pos += blockBytes;
    return at;
  };
}

interface Pattern {
  name: string;
  unit: 'IOPS' | 'MiB/s';
  kind: 'write' | 'read';
  blockBytes: number;
  depth: number;
  random: boolean;
}

const ALL_PATTERNS: Record<string, Pattern> = {
  randwrite: { name: '4k randwrite QD32', unit: 'IOPS', kind: 'write', blockBytes: KIB4, depth: 32, random: true },
  randread: { name: '4k randread QD32', unit: 'IOPS', kind: 'read', blockBytes: KIB4, depth: 32, random: true },
  seqwrite: { name: '1M seqwrite QD8', unit: 'MiB/s', kind: 'write', blockBytes: MIB1, depth: 8, random: false },
  seqread: { name: '1M seqread QD8', unit: 'MiB/s', kind: 'read', blockBytes: MIB1, depth: 8, random: false },
};
for (const key of SELECTED) if (!(key in ALL_PATTERNS)) throw new Error(`unknown pattern ${key} (known: ${Object.keys(ALL_PATTERNS).join(', ')})`);
/** In a fixed order: random writes on the sparse files, prefill, then the rest. */
const PATTERNS: Record<string, Pattern> = Object.fromEntries(Object.entries(ALL_PATTERNS).filter(([key]) => SELECTED.includes(key)));

function runPattern(target: Target, p: Pattern): Promise<PhaseResult> {
  const depth = p.depth;
  // One write buffer per slot, random content, never modified while in flight.
  const bufs = Array.from({ length: depth }, () => crypto.randomBytes(p.blockBytes));
  return runPhase({
    depth,
    blockBytes: p.blockBytes,
    durationMs: SECONDS * 1000,
    next: p.random ? randomOffsets(p.blockBytes) : sequentialOffsets(p.blockBytes, false),
    issue:
      p.kind === 'write'
        ? (slot, offset, cb) => target.write(bufs[slot], offset, cb)
        : (slot, offset, cb) => target.read(slot, offset, p.blockBytes, cb),
    finish: p.kind === 'write' ? () => target.sync() : undefined,
  });
}

/** Writes the whole volume once with 1 MiB writes (QD 8), then syncs. Untimed. */
async function prefill(target: Target, pattern: Buffer): Promise<number> {
  const r = await runPhase({
    depth: 8,
    blockBytes: MIB1,
    durationMs: Infinity,
    next: sequentialOffsets(MIB1, true),
    issue: (_slot, offset, cb) => target.write(pattern, offset, cb),
    finish: () => target.sync(),
  });
  if (r.bytes !== Math.floor(SIZE / MIB1) * MIB1) throw new Error(`${target.label} prefill wrote ${r.bytes} bytes`);
  return r.seconds;
}

// ---- the replica process -----------------------------------------------------------------------

interface ReplicaProcess {
  child: ChildProcess;
  port: number;
  stderr: () => string;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

function startReplica(dir: string, secretFile: string): Promise<ReplicaProcess> {
  const nodeArgs = CPU_PROF_DIR !== undefined ? ['--cpu-prof', `--cpu-prof-dir=${path.resolve(CPU_PROF_DIR)}`] : [];
  const args = [...nodeArgs, MAIN, 'replica', 'serve', '--dir', dir, '--size', String(SIZE), '--listen', '127.0.0.1:0', '--secret-file', secretFile];
  const child = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let err = '';
  child.stderr!.setEncoding('utf8');
  child.stderr!.on('data', (s: string) => {
    err = (err + s).slice(-20_000);
  });
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    child.once('exit', (code, signal) => resolve({ code, signal }));
  });
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`replica not ready after 30 s; stderr:\n${err}`)), 30_000);
    readline.createInterface({ input: child.stdout! }).on('line', (line) => {
      let msg: { ready?: boolean; port?: number };
      try {
        msg = JSON.parse(line);
      } catch {
        return;
      }
      if (msg.ready === true && typeof msg.port === 'number') {
        clearTimeout(timer);
        resolve({ child, port: msg.port, stderr: () => err, exited });
      }
    });
    void exited.then(({ code, signal }) => {
      clearTimeout(timer);
      const hint = signal !== null ? ' (a signal this benchmark did not send)' : '';
      reject(new Error(`replica exited (code ${code}, signal ${signal}${hint}) before it was ready; stderr:\n${err}`));
    });
  });
}

async function stopReplica(r: ReplicaProcess): Promise<void> {
  r.child.kill('SIGTERM');
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<null>((resolve) => {
    timer = setTimeout(() => resolve(null), 60_000);
  });
  const result = await Promise.race([r.exited, timeout]);
  clearTimeout(timer);
  if (result === null) {
    r.child.kill('SIGKILL');
    throw new Error(`replica did not exit within 60 s of SIGTERM; stderr:\n${r.stderr()}`);
  }
  if (result.code !== 0) throw new Error(`replica exited with code ${result.code} signal ${result.signal} after SIGTERM; stderr:\n${r.stderr()}`);
}

// ---- report ------------------------------------------------------------------------------------

function rate(p: Pattern, r: PhaseResult): number {
  return p.unit === 'IOPS' ? r.ops / r.seconds : r.bytes / MIB1 / r.seconds;
}

function percentile(sorted: Float64Array, q: number): number {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
}

function latencyCell(r: PhaseResult): string {
  const s = r.latencies.slice().sort();
  const fmt = (ms: number): string => (ms < 10 ? ms.toFixed(3) : ms.toFixed(1));
  return `${fmt(percentile(s, 0.5))} / ${fmt(percentile(s, 0.99))}`;
}

function table(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (cells: string[]): string => cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join(' | ');
  return [line(header), widths.map((w) => '-'.repeat(w)).join('-|-'), ...rows.map(line)].join('\n');
}

function log(message: string): void {
  process.stderr.write(`${message}\n`);
}

// ---- main --------------------------------------------------------------------------------------

async function main(): Promise<void> {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'zebu-bench-replica-'));
  let replica: ReplicaProcess | null = null;
  let client: DataClient | null = null;
  let directFd: number | null = null;
  const onSignal = (): void => {
    replica?.child.kill('SIGKILL');
    fs.rmSync(root, { recursive: true, force: true });
    process.exit(130);
  };
  process.once('SIGINT', onSignal);
  process.once('exit', () => {
    if (replica !== null && replica.child.exitCode === null && replica.child.signalCode === null) replica.child.kill('SIGKILL');
  });

  const results = new Map<string, { direct: PhaseResult; zebu: PhaseResult }>();
  const startedAt = performance.now();
  try {
    const secretFile = path.join(root, 'secret');
    fs.writeFileSync(secretFile, crypto.randomBytes(24).toString('hex') + '\n', { mode: 0o600 });
    const secret = readSecretFile(secretFile);

    // Direct: a sparse file of the volume's size, like the replica's head data file.
    const directPath = path.join(root, 'direct.img');
    directFd = fs.openSync(directPath, 'w+', 0o600);
    fs.ftruncateSync(directFd, SIZE);
    fs.fdatasyncSync(directFd);
    const direct = new DirectTarget(directFd);

    replica = await startReplica(path.join(root, 'replica'), secretFile);
    client = await DataClient.connect({ host: '127.0.0.1', port: replica.port, secret, epoch: 1, requestTimeoutMs: 120_000 });
    await client.open();
    const zebu = new ZebuTarget(client);
    log(`replica pid ${replica.child.pid} on 127.0.0.1:${replica.port}, ${SIZE_MIB} MiB, ${SECONDS} s per phase, temp dir ${root}`);

    const run = async (key: string): Promise<void> => {
      const p = PATTERNS[key];
      const d = await runPattern(direct, p);
      log(`  ${p.name.padEnd(18)} direct ${rate(p, d).toFixed(0).padStart(8)} ${p.unit} (${d.seconds.toFixed(2)} s${p.kind === 'write' ? `, fdatasync ${d.syncMs.toFixed(0)} ms` : ''})`);
      const z = await runPattern(zebu, p);
      log(`  ${p.name.padEnd(18)} zebu   ${rate(p, z).toFixed(0).padStart(8)} ${p.unit} (${z.seconds.toFixed(2)} s${p.kind === 'write' ? `, flush ${z.syncMs.toFixed(0)} ms` : ''})`);
      results.set(key, { direct: d, zebu: z });
    };

    if ('randwrite' in PATTERNS) await run('randwrite');

    if ('randread' in PATTERNS || 'seqread' in PATTERNS) {
      // Both sides may hold a random-write footprint; fill them completely before reading.
      const fillPattern = crypto.randomBytes(MIB1);
      const fd = await prefill(direct, fillPattern);
      const fz = await prefill(zebu, fillPattern);
      log(`  prefill ${SIZE_MIB} MiB: direct ${fd.toFixed(2)} s, zebu ${fz.toFixed(2)} s (untimed)`);
      await checkFilled(client, direct, fillPattern);
    }

    for (const key of ['randread', 'seqwrite', 'seqread']) if (key in PATTERNS) await run(key);

    client.close();
    client = null;
    await stopReplica(replica);
    replica = null;
  } catch (err) {
    if (replica !== null) {
      // Give a crashing replica a moment to finish dying, then say what it said.
      await Promise.race([replica.exited, new Promise((r) => setTimeout(r, 500))]);
      const { exitCode, signalCode } = replica.child;
      const state = exitCode === null && signalCode === null ? 'still running' : `exited (code ${exitCode}, signal ${signalCode})`;
      const hint = signalCode !== null ? ` (this benchmark had not signalled it: something else on the machine killed it)` : '';
      log(`replica process: ${state}${hint}; stderr tail:\n${replica.stderr().slice(-4000)}`);
    }
    throw err;
  } finally {
    process.off('SIGINT', onSignal);
    client?.close();
    if (replica !== null) {
      replica.child.kill('SIGKILL');
      await replica.exited;
    }
    if (directFd !== null) fs.closeSync(directFd);
    // Slow after random writes: the files are heavily fragmented (and / may be mounted -o discard).
    const rmStart = performance.now();
    fs.rmSync(root, { recursive: true, force: true });
    log(`  removed ${root} in ${((performance.now() - rmStart) / 1000).toFixed(1)} s`);
  }

  const rows = Object.entries(PATTERNS).map(([key, p]) => {
    const { direct, zebu } = results.get(key)!;
    const d = rate(p, direct);
    const z = rate(p, zebu);
    return [p.name, `${d.toFixed(0)} ${p.unit}`, `${z.toFixed(0)} ${p.unit}`, (z / d).toFixed(2)];
  });
  const latRows = Object.entries(PATTERNS).map(([key, p]) => {
    const { direct, zebu } = results.get(key)!;
    return [p.name, latencyCell(direct), latencyCell(zebu)];
  });
  console.log(
    `zebu replica protocol bench: ${SIZE_MIB} MiB volume, ${SECONDS} s per phase (write phases include the final flush/fdatasync), ` +
      `${os.cpus().length} cores, node ${process.version}, total ${((performance.now() - startedAt) / 1000).toFixed(1)} s`,
  );
  console.log(table(['pattern', 'direct pwrite/pread', 'zebu replica via protocol', 'ratio (zebu/direct)'], rows));
  console.log('');
  console.log(table(['latency ms (p50 / p99)', 'direct', 'zebu'], latRows));
}

/** Both sides read back the prefill pattern, and the replica reports the whole volume as data. */
async function checkFilled(client: DataClient, direct: DirectTarget, fillPattern: Buffer): Promise<void> {
  for (let at = 0; at < SIZE; at += MAX_RANGE_BYTES + 1 - KIB4) {
    const length = Math.min(SIZE - at, MAX_RANGE_BYTES + 1 - KIB4);
    const extents = await client.blockStatus(at, length);
    if (extents.length !== 1 || !extents[0].data) throw new Error(`replica range ${at}+${length} is not all data after prefill: ${JSON.stringify(extents.slice(0, 4))}`);
  }
  const offset = Math.floor(Math.random() * (SIZE / KIB4)) * KIB4;
  const want = fillPattern.subarray(offset % MIB1, (offset % MIB1) + KIB4);
  const got = await client.read(offset, KIB4);
  const mine = Buffer.allocUnsafe(KIB4);
  direct.readInto(mine, offset);
  if (!got.equals(want) || !mine.equals(want)) throw new Error(`prefill check failed at offset ${offset}`);
}

await main();

/**
 * Rebuild (self-healing) cost, in one run on this machine:
 *   - baseline: `cp` of a file holding as many bytes as the volume, then sync (what copying the
 *     bytes costs on this disk);
 *   - a Zebu rebuild of a full volume (2 replicas -> 3) with no client I/O, the new replica
 *     pulling each chunk from a source replica, the copy loop in a copier process (the default);
 *     the same with the copy loop in the engine (`--no-copier-process`); and with the data
 *     passing through the engine (`--no-copier-process --no-copy-pull`, as before pulls);
 *   - the same rebuild while fio writes 4k at random (iodepth 16): fio's IOPS and write latency
 *     (p50, p99, max) while the rebuild runs, against the same fio on the same volume without a
 *     rebuild, with the copy loop in the engine, and against a rebuild that holds each 4 MiB
 *     region whole while it copies it (the way before region leases: `--copy-chunk-bytes 4MiB`),
 *     and against a rebuild held to a bandwidth limit (BENCH_REBUILD_LIMIT_MIB, default 64 MiB/s:
 *     the setting rebuild-max-mib-per-second);
 *   - a rebuild of a volume whose data is in a snapshot, 10% of it written since: the snapshot is
 *     copied, then only what the live volume changed since it;
 *   - a rebuild of a volume on a backing image (the same data as the image), 10% written: only
 *     what differs from the image is copied (the new replica has its own copy of the image);
 *   - resumed rebuilds: the new replica SIGKILLed midway, restarted and added again — with no
 *     snapshot (the rest is a delta of what was not copied) and while the second of two
 *     snapshots is copied (the rest goes on over the first, kept after a hash check), against a
 *     fresh rebuild of the same volume.
 * "MiB held" is what the new replica's files take on disk afterwards.
 * Run on demand: `npm run bench:rebuild`.  BENCH_SIZE_MIB (default 1024), BENCH_SECONDS (8).
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { controlRequest } from '../src/protocol/control-channel.ts';
import { dataPathMain, DATA_PATH_NODE_FLAGS } from '../src/os/js-build.ts';

// Started as `zebu up` starts the data path: the compiled build when current, with its Node flags.
const MAIN = dataPathMain().main;
const SIZE_MIB = Number(process.env.BENCH_SIZE_MIB ?? 1024);
const SIZE = SIZE_MIB * 1024 * 1024;
const SECONDS = Number(process.env.BENCH_SECONDS ?? 8);
const LIMIT_MIB = Number(process.env.BENCH_REBUILD_LIMIT_MIB ?? 64);

const children: ChildProcess[] = [];
process.on('exit', () => {
  for (const c of children) c.kill('SIGKILL');
});

function startReady(args: string[]): Promise<Record<string, unknown>> {
  const child = spawn(process.execPath, [...DATA_PATH_NODE_FLAGS, MAIN, ...args], { stdio: ['ignore', 'pipe', 'ignore'] });
  children.push(child);
  return new Promise((resolve, reject) => {
    readline.createInterface({ input: child.stdout! }).on('line', (line) => {
      try {
        const msg = JSON.parse(line);
        if (msg.ready) resolve(msg);
      } catch {
        // not JSON
      }
    });
    child.once('exit', (code) => reject(new Error(`${args.slice(0, 2).join(' ')} exited ${code}`)));
  });
}

function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

function mustSpawn(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { maxBuffer: 64 * 1024 * 1024 });
  if (r.status !== 0) throw new Error(`${cmd} failed: ${r.stderr}`);
  return r.stdout.toString();
}

function fioArgs(uri: string, seconds: number): string[] {
  return ['--name=load', '--ioengine=nbd', `--uri=${uri}`, '--rw=randwrite', '--bs=4k', '--iodepth=16', `--size=${SIZE_MIB}M`,
    '--time_based', `--runtime=${seconds}`, '--output-format=json'];
}

interface FioResult {
  iops: number;
  p50Ms: number;
  p99Ms: number;
  maxMs: number;
}

function fioResult(stdout: string): FioResult {
  const write = JSON.parse(stdout.slice(stdout.indexOf('{'))).jobs[0].write;
  const clat = write.clat_ns;
  return { iops: write.iops, p50Ms: clat.percentile['50.000000'] / 1e6, p99Ms: clat.percentile['99.000000'] / 1e6, maxMs: clat.max / 1e6 };
}

/** IOPS, p50, p99 and max latency of a fio run, as table cells. */
function latencyCells(r: FioResult, alone: FioResult | null = null): string[] {
  return [r.iops.toFixed(0), r.p50Ms.toFixed(2), r.p99Ms.toFixed(2), alone === null ? '-' : (r.p99Ms / alone.p99Ms).toFixed(2), r.maxMs.toFixed(1)];
}

/** A loaded rebuild's row: fio's numbers against `alone`, the rebuild's, and the writes that waited for a lease. */
function loadedRow(what: string, r: { fio: FioResult; rebuildSeconds: number; waits: ClaimWaits }, alone: FioResult): string[] {
  return [what, ...latencyCells(r.fio, alone), r.rebuildSeconds.toFixed(2), (SIZE_MIB / r.rebuildSeconds).toFixed(0), String(r.waits.writes), r.waits.longest];
}

/**
 * Starts a rebuild of a new replica and, once it runs, fio for `seconds` (shorter than the
 * rebuild, so that every request is measured during it); returns fio's result and the rebuild's.
 */
async function rebuildUnderFio(v: Volume, name: string, seconds: number): Promise<{ fio: FioResult; rebuildSeconds: number; waits: ClaimWaits }> {
  const before = await claimWaits(v);
  const rebuilt = rebuild(v, name);
  const fio = spawn('fio', fioArgs(v.uri, seconds), { stdio: ['ignore', 'pipe', 'ignore'] });
  children.push(fio);
  let out = '';
  fio.stdout.on('data', (d: Buffer) => (out += d.toString()));
  await new Promise<void>((resolve) => fio.once('exit', () => resolve()));
  const rebuildSeconds = await rebuilt;
  const after = await claimWaits(v);
  // The engine keeps its longest wait since it started: unchanged, this rebuild's was no longer.
  const longest = after.longestMs > before.longestMs ? after.longestMs.toFixed(1) : `<= ${after.longestMs.toFixed(1)}`;
  return { fio: fioResult(out), rebuildSeconds, waits: { writes: after.writes - before.writes, longest } };
}

interface ClaimWaits {
  writes: number;
  longest: string;
}

/** The engine's count of client writes that waited for a lease, and the longest wait. */
async function claimWaits(v: Volume): Promise<{ writes: number; longestMs: number }> {
  const stats = ((await controlRequest(v.control, 'GET', '/v1/info')) as { stats: { claimWaits: number; claimWaitLongestMs: number } }).stats;
  return { writes: stats.claimWaits, longestMs: stats.claimWaitLongestMs };
}

interface Volume {
  uri: string;
  control: string;
  secretFile: string;
  dir: string;
}

async function volume(dir: string, replicaArgs: string[] = [], volumeArgs: string[] = []): Promise<Volume> {
  fs.mkdirSync(dir, { recursive: true });
  const secretFile = path.join(dir, 'secret');
  fs.writeFileSync(secretFile, 'bench-secret-0123456789abcdef\n');
  const addrs: string[] = [];
  for (let i = 0; i < 2; i++) {
    const ready = await startReady(['replica', 'serve', '--dir', path.join(dir, `r${i}`), '--size', String(SIZE), '--listen', '127.0.0.1:0', '--secret-file', secretFile, ...replicaArgs]);
    addrs.push(`127.0.0.1:${ready.port}`);
  }
  const port = await freePort();
  const ready = await startReady(['volume', 'serve', '--name', 'bench', '--size', String(SIZE), ...addrs.flatMap((a) => ['--replica', a]),
    '--nbd', `127.0.0.1:${port}`, '--secret-file', secretFile, '--epoch', '1', '--run-dir', path.join(dir, 'run'), ...volumeArgs]);
  return { uri: `nbd://127.0.0.1:${port}/bench`, control: String(ready.controlSocket), secretFile, dir };
}

/** The address of the replica the last rebuild() added. */
let lastRebuilt = '';

/** Adds a fresh replica and waits until it is RW; returns the seconds it took. */
async function rebuild(v: Volume, name: string, replicaArgs: string[] = []): Promise<number> {
  const ready = await startReady(['replica', 'serve', '--dir', path.join(v.dir, name), '--size', String(SIZE), '--listen', '127.0.0.1:0', '--secret-file', v.secretFile, ...replicaArgs]);
  const address = `127.0.0.1:${ready.port}`;
  lastRebuilt = address;
  const started = performance.now();
  await controlRequest(v.control, 'POST', '/v1/replicas', { address });
  for (;;) {
    const list = (await controlRequest(v.control, 'GET', '/v1/replicas')) as { address: string; mode: string; reason: string | null }[];
    const r = list.find((x) => x.address === address)!;
    if (r.mode === 'RW') return (performance.now() - started) / 1000;
    if (r.mode === 'ERR') throw new Error(`rebuild failed: ${r.reason}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

interface ReplicaRow {
  address: string;
  mode: string;
  reason: string | null;
  rebuild: { copiedBytes: number; totalBytes: number } | null;
}

/** Starts a replica for a rebuild (on `port`, when it comes back); its process too, to kill it. */
async function startTarget(v: Volume, name: string, port = 0): Promise<{ address: string; child: ChildProcess }> {
  const at = children.length;
  const ready = await startReady(['replica', 'serve', '--dir', path.join(v.dir, name), '--size', String(SIZE), '--listen', `127.0.0.1:${port}`, '--secret-file', v.secretFile]);
  return { address: `127.0.0.1:${ready.port}`, child: children[at] };
}

async function replicaRow(v: Volume, address: string): Promise<ReplicaRow> {
  return ((await controlRequest(v.control, 'GET', '/v1/replicas')) as ReplicaRow[]).find((x) => x.address === address)!;
}

/**
 * A rebuild whose target is SIGKILLed once `killAt` of its copy is done, then restarted and
 * added again: seconds before the kill, seconds of the rest, and what the rest copied (a delta's
 * regions; or, over kept snapshots, what the engine's last rebuild says).
 */
async function resumedRebuild(v: Volume, name: string, killAt: number): Promise<{ address: string; firstSeconds: number; restSeconds: number; restMiB: number; kept: string[] }> {
  const target = await startTarget(v, name);
  const started = performance.now();
  await controlRequest(v.control, 'POST', '/v1/replicas', { address: target.address });
  for (;;) {
    const r = await replicaRow(v, target.address);
    if (r.mode !== 'WO') throw new Error(`the rebuild ended before the kill: ${r.mode} ${r.reason ?? ''}`);
    if (r.rebuild !== null && r.rebuild.copiedBytes >= killAt * r.rebuild.totalBytes) break;
    await new Promise((resolve) => setTimeout(resolve, 2));
  }
  target.child.kill('SIGKILL');
  const firstSeconds = (performance.now() - started) / 1000;
  while ((await replicaRow(v, target.address)).mode !== 'ERR') await new Promise((resolve) => setTimeout(resolve, 20));
  await startTarget(v, name, Number(target.address.split(':')[1]));
  const restStarted = performance.now();
  await controlRequest(v.control, 'POST', '/v1/replicas', { address: target.address });
  for (;;) {
    const r = await replicaRow(v, target.address);
    if (r.mode === 'RW') break;
    if (r.mode === 'ERR') throw new Error(`the resumed rebuild failed: ${r.reason}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  const restSeconds = (performance.now() - restStarted) / 1000;
  const last = ((await controlRequest(v.control, 'GET', '/v1/info')) as { lastRebuild: { delta: boolean; copiedBytes: number; totalBytes: number; keptSnapshots?: string[] } }).lastRebuild;
  return { address: target.address, firstSeconds, restSeconds, restMiB: last.totalBytes / 1024 / 1024, kept: last.keptSnapshots ?? [] };
}

/** MiB a directory's files take on disk. */
function heldMiB(dir: string): string {
  let bytes = 0;
  for (const name of fs.readdirSync(dir)) bytes += fs.statSync(path.join(dir, name)).blocks * 512;
  return (bytes / 1024 / 1024).toFixed(0);
}

/**
 * Fills the volume with `src`, durably, and lets the kernel write back what it holds dirty: the
 * rebuild timed next must not share the disk with the fill's writeback (the baseline's `cp`
 * starts from a synced file too).
 */
function fill(src: string, uri: string): void {
  mustSpawn('nbdcopy', ['--flush', src, uri]);
  mustSpawn('sync', []);
}

/** Writes every tenth 4 MiB region of the volume (10% of it) with one qemu-io. */
function writeTenth(uri: string): void {
  const commands: string[] = [];
  for (let mib = 0; mib + 4 <= SIZE_MIB; mib += 40) commands.push('-c', `write -P 0x3c ${mib}M 4M`);
  mustSpawn('qemu-io', ['-f', 'raw', ...commands, '-c', 'flush', uri]);
}

/** Stops a volume's processes (its rows are measured): the next one has the machine to itself. */
function stopVolume(v: Volume): void {
  spawnSync('pkill', ['-9', '-f', v.dir]);
}

async function main(): Promise<void> {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'zebu-bench-rebuild-'));
  const rows: string[][] = [];
  const latencyRows: string[][] = [];
  const resumedRows: string[][] = [];
  try {
    // Baseline: copy SIZE bytes of incompressible data on the same file system.
    const src = path.join(root, 'src.img');
    mustSpawn('dd', ['if=/dev/urandom', `of=${src}`, 'bs=1M', `count=${SIZE_MIB}`, 'status=none']);
    mustSpawn('sync', []);
    const cpStarted = performance.now();
    mustSpawn('cp', [src, path.join(root, 'copy.img')]);
    mustSpawn('sync', []);
    const cpSeconds = (performance.now() - cpStarted) / 1000;
    rows.push(['cp + sync (baseline)', cpSeconds.toFixed(2), (SIZE_MIB / cpSeconds).toFixed(0), '-', String(SIZE_MIB)]);
    fs.rmSync(path.join(root, 'copy.img'));

    const v = await volume(path.join(root, 'v'));
    fill(src, v.uri);
    const idleSeconds = await rebuild(v, 'idle');
    rows.push(['zebu rebuild, no client I/O', idleSeconds.toFixed(2), (SIZE_MIB / idleSeconds).toFixed(0), '-', heldMiB(path.join(v.dir, 'idle'))]);

    // The same, with the copy loop on the engine's event loop (no copier process).
    const inEngine = await volume(path.join(root, 'i'), [], ['--no-copier-process']);
    fill(src, inEngine.uri);
    const inEngineSeconds = await rebuild(inEngine, 'idle');
    rows.push(['zebu rebuild, no client I/O, copy loop in the engine', inEngineSeconds.toFixed(2), (SIZE_MIB / inEngineSeconds).toFixed(0), '-', heldMiB(path.join(inEngine.dir, 'idle'))]);

    // The same, with the data passing through the engine (the target does not pull).
    const e = await volume(path.join(root, 'e'), [], ['--no-copy-pull', '--no-copier-process']);
    fill(src, e.uri);
    const throughSeconds = await rebuild(e, 'idle');
    rows.push(['zebu rebuild, no client I/O, through the engine', throughSeconds.toFixed(2), (SIZE_MIB / throughSeconds).toFixed(0), '-', heldMiB(path.join(e.dir, 'idle'))]);
    stopVolume(e);

    // The data in a snapshot, 10% written since (every tenth 4 MiB region).
    const s = await volume(path.join(root, 's'));
    fill(src, s.uri);
    await controlRequest(s.control, 'POST', '/v1/snapshots', { name: 'base' });
    writeTenth(s.uri);
    const snapSeconds = await rebuild(s, 'new');
    rows.push(['zebu rebuild, data in a snapshot + 10% since', snapSeconds.toFixed(2), (SIZE_MIB / snapSeconds).toFixed(0), '-', heldMiB(path.join(s.dir, 'new'))]);
    stopVolume(s);

    // On a backing image holding the data, 10% written.
    let imageRow: string[];
    try {
      const b = await volume(path.join(root, 'b'), ['--backing', src]);
      writeTenth(b.uri);
      const imageSeconds = await rebuild(b, 'new', ['--backing', src]);
      imageRow = ['zebu rebuild, on a backing image + 10% written', imageSeconds.toFixed(2), (SIZE_MIB / imageSeconds).toFixed(0), '-', heldMiB(path.join(b.dir, 'new'))];
      stopVolume(b);
    } catch (err) {
      imageRow = ['zebu rebuild, on a backing image + 10% written', 'refused', '-', '-', (err as Error).message.slice(0, 60)];
    }
    rows.push(imageRow);

    // Resumes: the target SIGKILLed at half its copy, restarted and added again. Past the
    // snapshots (none here) the rest is a delta of the regions not yet copied.
    const live = await resumedRebuild(v, 'resumed', 0.5);
    resumedRows.push(['no snapshot, killed at half the copy', idleSeconds.toFixed(2), live.firstSeconds.toFixed(2), live.restSeconds.toFixed(2), live.restMiB.toFixed(0), '-']);
    // Out again, so that the fio rows below run on 3 replicas as before.
    await controlRequest(v.control, 'DELETE', `/v1/replicas/${encodeURIComponent(live.address)}`);
    // Two snapshots (the data, then 10% written), 10% written since: killed while the second
    // snapshot is copied, the rest goes on over the first, kept after a hash check.
    const two = await volume(path.join(root, 'two'));
    fill(src, two.uri);
    await controlRequest(two.control, 'POST', '/v1/snapshots', { name: 'one' });
    writeTenth(two.uri);
    await controlRequest(two.control, 'POST', '/v1/snapshots', { name: 'two' });
    writeTenth(two.uri);
    const twoFresh = await rebuild(two, 'fresh');
    const overSnapshots = await resumedRebuild(two, 'resumed', 0.4);
    resumedRows.push(['two snapshots, killed in the second', twoFresh.toFixed(2), overSnapshots.firstSeconds.toFixed(2), overSnapshots.restSeconds.toFixed(2), '-', overSnapshots.kept.join(' ') || 'none']);
    stopVolume(two);

    const alone = fioResult(mustSpawn('fio', fioArgs(v.uri, SECONDS)));
    latencyRows.push(['fio 4k randwrite, no rebuild', ...latencyCells(alone), '-', '-', '-', '-']);

    // fio runs while the rebuild does (a rebuild under load is slower than idle), for a bit less.
    const loadSeconds = Math.max(2, Math.floor(idleSeconds * 0.8));
    const leased = await rebuildUnderFio(v, 'loaded', loadSeconds);
    rows.push(['zebu rebuild under fio 4k randwrite', leased.rebuildSeconds.toFixed(2), (SIZE_MIB / leased.rebuildSeconds).toFixed(0), leased.fio.iops.toFixed(0), heldMiB(path.join(v.dir, 'loaded'))]);
    latencyRows.push(loadedRow('fio during a rebuild, 256 KiB chunks under leases', leased, alone));
    // The same under a bandwidth limit, on 3 replicas again (the one just rebuilt goes).
    await controlRequest(v.control, 'DELETE', `/v1/replicas/${encodeURIComponent(lastRebuilt)}`);
    await controlRequest(v.control, 'PUT', '/v1/rebuild-limit', { bytesPerSecond: LIMIT_MIB * 1024 * 1024 });
    const limited = await rebuildUnderFio(v, 'limited', loadSeconds);
    latencyRows.push(loadedRow(`fio during a rebuild limited to ${LIMIT_MIB} MiB/s`, limited, alone));
    stopVolume(v);

    // The same with the copy loop on the engine's event loop (no copier process).
    const inEngineLeased = await rebuildUnderFio(inEngine, 'loaded', loadSeconds);
    latencyRows.push(loadedRow('fio during a rebuild, copy loop in the engine', inEngineLeased, alone));
    stopVolume(inEngine);

    // The same on a volume whose rebuilds hold a whole region while they copy it.
    const w = await volume(path.join(root, 'w'), [], ['--copy-chunk-bytes', '4MiB']);
    fill(src, w.uri);
    const whole = await rebuildUnderFio(w, 'loaded', loadSeconds);
    latencyRows.push(loadedRow('fio during a rebuild, whole 4 MiB regions held', whole, alone));
    stopVolume(w);
  } finally {
    for (const c of children) c.kill('SIGTERM');
    await new Promise((r) => setTimeout(r, 1000));
    fs.rmSync(root, { recursive: true, force: true });
  }
  console.log(`${SIZE_MIB} MiB volume, full of data, 2 replicas -> 3, ${os.cpus().length} cores`);
  printTable(['what', 'seconds', 'MiB/s', 'fio IOPS', 'MiB held'], rows);
  console.log('');
  console.log('client 4k random writes (fio, iodepth 16) with and without a rebuild; latencies in ms; "waited": client writes');
  console.log('that waited for a lease on their range (a whole region held, for the last row), and the longest such wait');
  printTable(['what', 'IOPS', 'p50', 'p99', 'p99 x', 'max', 'rebuild s', 'rebuild MiB/s', 'waited', 'longest wait'], latencyRows);
  console.log('');
  console.log('resumed rebuilds: the new replica SIGKILLed midway, restarted and added again, against a fresh rebuild of the same volume');
  printTable(['what', 'fresh s', 'until the kill s', 'the rest s', 'rest delta MiB', 'snapshots kept'], resumedRows);
}

function printTable(header: string[], rows: string[][]): void {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (cells: string[]) => cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join(' | ');
  console.log(line(header));
  console.log(widths.map((w) => '-'.repeat(w)).join('-|-'));
  for (const r of rows) console.log(line(r));
}

await main();

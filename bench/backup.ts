/**
 * Backup and restore speed, in one run on this machine, through `zebu up` (2 replicas):
 *   - baselines on the same bytes (a file of random data as large as the volume): `cp` to the
 *     target's disk plus sync, `zstd -1` (one thread, and all cores; and all cores followed by
 *     sync, since a backup's blocks are made durable) and SHA-256 on one core — what copying,
 *     compressing and naming them costs here;
 *   - for reference, the block files alone: one file per 2 MiB block written and synced as a
 *     backup writes them, from the page cache, nothing read from the volume and nothing hashed
 *     (the floor the target's format sets on this disk); and nbdcopy reading the volume (the
 *     engine's read path; a backup reads its blocks straight from the replicas instead);
 *   - a full backup of the volume holding those bytes, to a file target;
 *   - an incremental backup after 1% of the volume changed: bytes read and uploaded;
 *   - a restore of the full backup into a new volume.
 * Target (issue 12): the full backup at least half as fast as the baseline compressor; the
 * incremental one reads and uploads at most 2% of the volume.
 * Run on demand: `npm run bench:backup`. BENCH_SIZE_MIB (default 1024), BENCH_CONCURRENCY (the
 * backup-concurrency setting; default its default).
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import { openTarget } from '../src/backup/target.ts';

const MAIN = fileURLToPath(new URL('../src/cli/main.ts', import.meta.url));
const MiB = 1024 * 1024;
const SIZE_MIB = Number(process.env.BENCH_SIZE_MIB ?? 1024);
const SIZE = SIZE_MIB * MiB;

const children: ChildProcess[] = [];
process.on('exit', () => {
  for (const c of children) c.kill('SIGKILL');
});

function mustSpawn(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { maxBuffer: 64 * 1024 * 1024 });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed: ${r.stderr}`);
  return r.stdout.toString();
}

/**
 * On a virtual machine whose free memory is handed back to the host (virtio-balloon free page
 * reporting), the first touch of a page the guest freed costs a fault in the host: writing 1 GiB
 * into the page cache then costs 2-3 CPU seconds instead of 0.4, and each step's time depends on
 * what the steps before it freed. Every measured step, baseline and Zebu alike, starts right
 * after the same amount of memory was touched and freed, so each finds warm pages.
 */
function warmMemory(): void {
  const mib = Math.min(3 * SIZE_MIB, Math.floor((os.freemem() / MiB) * 0.5));
  mustSpawn(process.execPath, ['-e', `const a = []; for (let i = 0; i < ${Math.ceil(mib / 64)}; i++) a.push(Buffer.alloc(${64 * MiB}, 1));`]);
}

function timed(fn: () => void): number {
  warmMemory();
  const started = performance.now();
  fn();
  return (performance.now() - started) / 1000;
}

async function zebuUp(dataDir: string): Promise<{ api: string; token: string; nbd: string; child: ChildProcess }> {
  const child = spawn(process.execPath, [MAIN, 'up', '--data-dir', dataDir, '--api', '127.0.0.1:0', '--nbd', '127.0.0.1:0', '--disks', '2'], { stdio: ['ignore', 'pipe', 'ignore'] });
  children.push(child);
  const ready = await new Promise<Record<string, unknown>>((resolve, reject) => {
    readline.createInterface({ input: child.stdout! }).on('line', (line) => {
      try {
        const msg = JSON.parse(line);
        if (msg.ready) resolve(msg);
      } catch {
        // a log line
      }
    });
    child.once('exit', (code) => reject(new Error(`zebu up exited ${code}`)));
  });
  return { api: String(ready.api), token: fs.readFileSync(String(ready.tokenFile), 'utf8').trim(), nbd: String(ready.nbd), child };
}

/** CPU time of this run's processes (zebu up and the data-path processes under `root`). */
function processCpu(root: string): Map<number, { what: string; user: number; system: number }> {
  const out = new Map<number, { what: string; user: number; system: number }>();
  const tick = 100; // USER_HZ on Linux
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const cmdline = fs.readFileSync(`/proc/${entry}/cmdline`, 'utf8').split('\0');
      if (!cmdline.some((a) => a.includes(root))) continue;
      const what = cmdline.includes('up') ? 'zebu up' : cmdline.includes('replica') ? 'replica' : cmdline.includes('engine') ? 'engine' : cmdline.includes('frontend') ? 'frontend' : 'other';
      const stat = fs.readFileSync(`/proc/${entry}/stat`, 'utf8');
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      out.set(Number(entry), { what, user: Number(fields[11]) / tick, system: Number(fields[12]) / tick });
    } catch {
      // gone meanwhile
    }
  }
  return out;
}

async function main(): Promise<void> {
  for (const tool of ['nbdcopy', 'nbdkit', 'zstd']) {
    if (spawnSync('sh', ['-c', `command -v ${tool}`]).status !== 0) throw new Error(`${tool} is needed (apt-get install ${tool === 'nbdcopy' ? 'libnbd-bin' : tool})`);
  }
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'zb-'));
  const up = await zebuUp(path.join(root, 'data'));
  const call = async <T>(method: string, pathName: string, body?: unknown): Promise<T> => {
    const r = await fetch(`${up.api}${pathName}`, { method, headers: { authorization: `Bearer ${up.token}`, ...(body !== undefined ? { 'content-type': 'application/json' } : {}) }, body: body === undefined ? undefined : JSON.stringify(body) });
    const text = await r.text();
    if (!r.ok) throw new Error(`${method} ${pathName}: ${r.status} ${text}`);
    return JSON.parse(text) as T;
  };
  const poll = async <T>(pathName: string, done: (x: T) => boolean): Promise<T> => {
    for (;;) {
      const x = await call<T>('GET', pathName);
      if (done(x)) return x;
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  };
  try {
    const targetDir = path.join(root, 'target');
    const source = path.join(root, 'random.img');
    process.stderr.write(`writing ${SIZE_MIB} MiB of random data...\n`);
    const fd = fs.openSync(source, 'w');
    for (let off = 0; off < SIZE; off += 64 * MiB) fs.writeSync(fd, crypto.randomBytes(Math.min(64 * MiB, SIZE - off)));
    fs.closeSync(fd);

    // Baselines (the page cache holds the file for all of them, as it does for the volume's replicas).
    const cpSeconds = timed(() => {
      mustSpawn('cp', [source, path.join(root, 'copy.img')]);
      mustSpawn('sync', []);
    });
    fs.rmSync(path.join(root, 'copy.img'));
    const zstd1Seconds = timed(() => mustSpawn('zstd', ['-q', '-1', '-f', source, '-o', path.join(root, 'z1.zst')]));
    const zstdAllSeconds = timed(() => mustSpawn('zstd', ['-q', '-1', '-T0', '-f', source, '-o', path.join(root, 'zt.zst')]));
    fs.rmSync(path.join(root, 'z1.zst'));
    fs.rmSync(path.join(root, 'zt.zst'));
    // A backup's blocks are durable before its manifest is written: the like-for-like baseline
    // makes the compressor's output durable too.
    const zstdSyncSeconds = timed(() => {
      mustSpawn('zstd', ['-q', '-1', '-T0', '-f', source, '-o', path.join(root, 'zs.zst')]);
      mustSpawn('sync', []);
    });
    fs.rmSync(path.join(root, 'zs.zst'));
    const hashSeconds = timed(() => {
      const buf = Buffer.allocUnsafe(2 * MiB);
      const hfd = fs.openSync(source, 'r');
      for (let off = 0; off < SIZE; off += buf.length) crypto.createHash('sha256').update(buf.subarray(0, fs.readSync(hfd, buf, 0, buf.length, off))).digest();
      fs.closeSync(hfd);
    });

    // The floor the target's format sets: the block files alone, written and made durable as a
    // backup writes them (one file per 2 MiB block, each synced), from the page cache, no hashing.
    warmMemory();
    const filesStarted = performance.now();
    {
      const target = openTarget(`file://${path.join(root, 'files-only')}`);
      const ffd = fs.openSync(source, 'r');
      let next = 0;
      await Promise.all(Array.from({ length: 4 }, async () => {
        const buf = Buffer.allocUnsafeSlow(2 * MiB);
        for (let i = next++; i * 2 * MiB < SIZE; i = next++) {
          const n = fs.readSync(ffd, buf, 0, buf.length, i * 2 * MiB);
          const name = i.toString(16).padStart(8, '0');
          await target.put(`blocks/${name.slice(-2)}/${name.slice(-4, -2)}/${name}`, [Buffer.alloc(44), buf.subarray(0, n)], { deferSync: true });
        }
      }));
      await target.flush();
      fs.closeSync(ffd);
    }
    const filesSeconds = (performance.now() - filesStarted) / 1000;
    fs.rmSync(path.join(root, 'files-only'), { recursive: true, force: true });

    await call('PUT', '/v1/backuptargets/default', { url: `file://${targetDir}` });
    if (process.env.BENCH_CONCURRENCY !== undefined) await call('PUT', '/v1/settings/backup-concurrency', { value: process.env.BENCH_CONCURRENCY });
    await call('POST', '/v1/volumes', { name: 'bench', sizeBytes: SIZE, numberOfReplicas: 2 });
    await call('POST', '/v1/volumes/bench/attach', {});
    await poll<{ state: string; endpoint: string | null }>('/v1/volumes/bench', (v) => v.state === 'attached' && v.endpoint !== null);
    const uri = `nbd://${up.nbd}/bench`;
    process.stderr.write('filling the volume...\n');
    mustSpawn('nbdcopy', ['--flush', source, uri]);

    const backup = async (): Promise<{ seconds: number; readBytes: number; uploadedBytes: number }> => {
      warmMemory();
      const started = performance.now();
      const b = await call<{ name: string }>('POST', '/v1/backups', { volume: 'bench' });
      const done = await poll<{ state: string; readBytes: number; uploadedBytes: number; message: string | null }>(`/v1/backups/${b.name}`, (x) => x.state === 'completed' || x.state === 'error');
      if (done.state !== 'completed') throw new Error(`backup failed: ${done.message}`);
      return { seconds: (performance.now() - started) / 1000, readBytes: done.readBytes, uploadedBytes: done.uploadedBytes };
    };
    // What reading the volume through its engine costs (a client's read path; backups skip the engine).
    const nbdReadSeconds = timed(() => mustSpawn('nbdcopy', [uri, 'null:']));
    process.stderr.write('full backup...\n');
    const cpuBefore = processCpu(root);
    const full = await backup();
    const cpuAfter = processCpu(root);

    // 1% of the volume changes: 2 MiB writes at random 2 MiB-aligned places.
    const changed = Math.max(1, Math.round((SIZE * 0.01) / (2 * MiB)));
    const chunk = path.join(root, 'chunk.img');
    for (let i = 0; i < changed; i++) {
      fs.writeFileSync(chunk, crypto.randomBytes(2 * MiB));
      const offset = crypto.randomInt(SIZE / (2 * MiB)) * 2 * MiB;
      mustSpawn('nbdcopy', ['--flush', chunk, '--', '[', 'nbdkit', '--exit-with-parent', '--filter=offset', 'nbd', `uri=${uri}`, `offset=${offset}`, `range=${2 * MiB}`, ']']);
    }
    process.stderr.write('incremental backup...\n');
    const incremental = await backup();

    process.stderr.write('restore...\n');
    const fullName = (await call<{ name: string; base: string | null }[]>('GET', '/v1/backups')).find((b) => b.base === null)!.name;
    warmMemory();
    const restoreStarted = performance.now();
    await call('POST', `/v1/backups/${fullName}/restore`, { name: 'restored', numberOfReplicas: 2 });
    const restored = await poll<{ state: string; restore: { state: string; message: string | null } | null }>('/v1/volumes/restored', (v) => v.restore?.state === 'error' || (v.restore?.state === 'completed' && v.state === 'detached'));
    if (restored.restore?.state !== 'completed') throw new Error(`restore failed: ${restored.restore?.message}`);
    const restoreSeconds = (performance.now() - restoreStarted) / 1000;

    const mbps = (bytes: number, seconds: number): string => (bytes / MiB / seconds).toFixed(0);
    const pct = (bytes: number): string => `${((100 * bytes) / SIZE).toFixed(2)}%`;
    const rows: [string, string, string, string][] = [
      ['baseline: cp + sync', cpSeconds.toFixed(2), mbps(SIZE, cpSeconds), '-'],
      ['baseline: zstd -1, one thread', zstd1Seconds.toFixed(2), mbps(SIZE, zstd1Seconds), '-'],
      ['baseline: zstd -1 -T0 (all cores)', zstdAllSeconds.toFixed(2), mbps(SIZE, zstdAllSeconds), 'output left in the page cache'],
      ['baseline: zstd -1 -T0, then sync', zstdSyncSeconds.toFixed(2), mbps(SIZE, zstdSyncSeconds), 'output durable, as a backup\'s is'],
      ['reference: SHA-256 of the bytes, one core', hashSeconds.toFixed(2), mbps(SIZE, hashSeconds), 'every block is named by it'],
      ['reference: the block files alone', filesSeconds.toFixed(2), mbps(SIZE, filesSeconds), 'written and synced as a backup\'s, no read or hash'],
      ['reference: nbdcopy of the volume to null', nbdReadSeconds.toFixed(2), mbps(SIZE, nbdReadSeconds), 'through NBD and the engine'],
      ['zebu full backup', full.seconds.toFixed(2), mbps(SIZE, full.seconds), `read ${pct(full.readBytes)}, uploaded ${pct(full.uploadedBytes)}`],
      [`zebu incremental backup (${changed} x 2 MiB changed)`, incremental.seconds.toFixed(2), '-', `read ${pct(incremental.readBytes)}, uploaded ${pct(incremental.uploadedBytes)}`],
      ['zebu restore of the full backup', restoreSeconds.toFixed(2), mbps(SIZE, restoreSeconds), '-'],
    ];
    const widths = [0, 1, 2, 3].map((i) => Math.max(...[['what', 'seconds', 'MiB/s', 'notes'], ...rows].map((r) => r[i].length)));
    const line = (r: string[]): string => r.map((c, i) => c.padEnd(widths[i])).join(' | ');
    console.log(`\nbackup bench: ${SIZE_MIB} MiB of random data, file target, 2 replicas, ${os.cpus().length} cores, backup-concurrency ${process.env.BENCH_CONCURRENCY ?? 'default (4)'}`);
    console.log(line(['what', 'seconds', 'MiB/s', 'notes']));
    console.log(widths.map((w) => '-'.repeat(w)).join('-|-'));
    for (const r of rows) console.log(line(r));
    // Where the full backup's CPU time went, by process (user + system seconds).
    const cpuRows = [...cpuAfter].map(([pid, after]) => {
      const before = cpuBefore.get(pid) ?? { user: 0, system: 0, what: after.what };
      return [after.what, (after.user - before.user).toFixed(2), (after.system - before.system).toFixed(2)];
    }).filter((r) => Number(r[1]) + Number(r[2]) > 0.05);
    console.log(`\nCPU seconds during the full backup (${full.seconds.toFixed(2)} s on ${os.cpus().length} cores):`);
    for (const r of [['process', 'user', 'system'], ...cpuRows]) console.log(`  ${r[0].padEnd(12)} ${r[1].padStart(6)} ${r[2].padStart(7)}`);
    console.log(
      `\nfull backup speed / zstd -T0 + sync: ${(zstdSyncSeconds / full.seconds).toFixed(2)}, / zstd -T0 alone: ${(zstdAllSeconds / full.seconds).toFixed(2)} (target >= 0.5);` +
        ` incremental read ${pct(incremental.readBytes)}, uploaded ${pct(incremental.uploadedBytes)} (target <= 2%)`,
    );
  } finally {
    up.child.kill('SIGTERM');
    await new Promise((resolve) => up.child.once('exit', resolve));
    for (const c of children) c.kill('SIGKILL');
    spawnSync('sh', ['-c', `pkill -9 -f ${root} || true`]);
    fs.rmSync(root, { recursive: true, force: true });
  }
}

await main();

/**
 * Memory and scale on one node, through a real `zebu up` (issue 17, items 5 and 6). Run on demand:
 * `npm run bench:scale`. Prints:
 *   1. memory of the data-path processes with two attached 3-replica volumes, at rest, after
 *      256 MiB written to each and 20 s later: RSS, PSS (shared pages split between the processes
 *      that map them: the Node binary is shared by all) and private memory, per role, and per
 *      attached volume; then the same with the native addons off (no memory given back);
 *   2. BENCH_VOLUMES (default 100; 0 skips it) attached volumes of BENCH_REPLICAS (default 1)
 *      replicas: processes, memory, and CPU at rest over 10 s;
 *   3. a 1 TiB sparse volume: create, attach, first 4k write, disk space used;
 *   4. BENCH_SNAPSHOTS (default 250) snapshots of one volume, a 4k write between each: time per
 *      snapshot, then a read of the whole written range and the snapshot list.
 * Baseline in the same run: a bare Node process (`node -e` idle) for memory.
 */
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { renderTable } from '../test/support/fault-table.ts';
import { startZebuUp, stopZebuUp, killAllUnder, processesUnder, type ZebuUp, type ProcessInfo } from '../test/support/zebu-up.ts';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const VOLUMES = Number(process.env.BENCH_VOLUMES ?? 100);
const REPLICAS = Number(process.env.BENCH_REPLICAS ?? 1);
const SNAPSHOTS = Number(process.env.BENCH_SNAPSHOTS ?? 250);

interface Memory {
  rss: number;
  pss: number;
  priv: number;
}

/** RSS, PSS and private (clean + dirty) bytes of a process, from smaps_rollup. */
function memoryOf(pid: number): Memory | null {
  let text: string;
  try {
    text = fs.readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8');
  } catch {
    return null;
  }
  const kb = (key: string): number => Number(new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(text)?.[1] ?? 0) * 1024;
  return { rss: kb('Rss'), pss: kb('Pss'), priv: kb('Private_Clean') + kb('Private_Dirty') };
}

/** CPU ticks (user + system) of a process. */
function ticksOf(pid: number): number {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return Number(f[11]) + Number(f[12]);
  } catch {
    return 0;
  }
}

const mib = (n: number): string => (n / MiB).toFixed(1);

async function api<T>(up: ZebuUp, method: string, url: string, body?: unknown): Promise<T> {
  const res = await fetch(`${up.api}${url}`, {
    method,
    headers: { authorization: `Bearer ${up.token}`, ...(body === undefined ? {} : { 'content-type': 'application/json' }) },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  if (!res.ok) throw new Error(`${method} ${url}: ${res.status} ${text}`);
  return (text === '' ? null : JSON.parse(text)) as T;
}

interface VolumeView {
  state: string;
  robustness: string;
  endpoint: string | null;
}

async function until<T>(what: string, fn: () => Promise<T | undefined>, timeoutMs = 600_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

async function createAttached(up: ZebuUp, name: string, sizeBytes: number, replicas: number): Promise<string> {
  await api(up, 'POST', '/v1/volumes', { name, sizeBytes, numberOfReplicas: replicas });
  await until(`${name} detached`, async () => ((await api<VolumeView>(up, 'GET', `/v1/volumes/${name}`)).state === 'detached' ? true : undefined));
  await api(up, 'POST', `/v1/volumes/${name}/attach`, {});
  return until(`${name} attached`, async () => {
    const v = await api<VolumeView>(up, 'GET', `/v1/volumes/${name}`);
    return v.state === 'attached' && v.robustness === 'healthy' && v.endpoint !== null ? v.endpoint : undefined;
  });
}

/** Memory per role of the processes `zebu up` started (the manager itself apart). */
function byRole(procs: ProcessInfo[]): Map<string, { count: number } & Memory> {
  const out = new Map<string, { count: number } & Memory>();
  for (const p of procs) {
    const m = memoryOf(p.pid);
    if (m === null) continue;
    const row = out.get(p.role) ?? { count: 0, rss: 0, pss: 0, priv: 0 };
    row.count++;
    row.rss += m.rss;
    row.pss += m.pss;
    row.priv += m.priv;
    out.set(p.role, row);
  }
  return out;
}

function qemuIo(uri: string, ...commands: string[]): number {
  const started = process.hrtime.bigint();
  const r = spawnSync('qemu-io', ['-f', 'raw', ...commands.flatMap((c) => ['-c', c]), uri], { encoding: 'utf8' });
  if (r.status !== 0 || /error|fail/i.test(r.stdout + r.stderr)) throw new Error(`qemu-io ${commands.join('; ')}: ${r.stdout}${r.stderr}`);
  return Number(process.hrtime.bigint() - started) / 1e6;
}

function duBytes(dir: string): number {
  return Number(spawnSync('du', ['-s', '--block-size=1', dir], { encoding: 'utf8' }).stdout.split(/\s+/)[0]);
}

async function withUp<T>(label: string, fn: (up: ZebuUp, root: string) => Promise<T>, env: Record<string, string> = {}): Promise<T> {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'zb-'));
  const up = await startZebuUp({ dataDir: path.join(root, 'data'), env });
  try {
    return await fn(up, root);
  } catch (err) {
    throw new Error(`${label}: ${(err as Error).message}`);
  } finally {
    await stopZebuUp(up);
    await killAllUnder(root);
    fs.rmSync(root, { recursive: true, force: true, maxRetries: 3 });
  }
}

async function main(): Promise<void> {
  const cores = os.cpus().length;
  const lines: string[] = [];
  const say = (s: string): void => {
    lines.push(s);
    process.stderr.write(`${s}\n`);
  };

  // Baseline: an idle bare Node process of the same binary.
  const bare = spawn(process.execPath, ['-e', 'setTimeout(() => {}, 60000)'], { stdio: 'ignore' });
  await new Promise((r) => setTimeout(r, 1500));
  const bareMemory = memoryOf(bare.pid!)!;
  bare.kill('SIGKILL');

  // 1. Two attached 3-replica volumes: memory at rest, right after 256 MiB written to each, and
  // once the processes have given back what the load took (they trim malloc's heap after a quiet
  // interval). The same with the native addons off (ZEBU_NO_NATIVE=1): nothing given back.
  const memoryRows: string[][] = [];
  const perVolume: string[][] = [];
  for (const addons of ['on', 'off'] as const) {
    await withUp(`memory, addons ${addons}`, async (up, root) => {
      const uris = [await createAttached(up, 'm1', GiB, 3), await createAttached(up, 'm2', GiB, 3)];
      const measure = (when: string): void => {
        const procs = processesUnder(root).filter((p) => p.role !== 'up' && p.role !== 'other');
        const roles = byRole(procs);
        for (const [role, m] of [...roles].sort()) {
          memoryRows.push([addons, when, role, String(m.count), mib(m.rss / m.count), mib(m.pss / m.count), mib(m.priv / m.count), mib(m.pss)]);
        }
        const total = [...roles.values()].reduce((a, m) => a + m.pss, 0);
        // The frontend serves every volume of the node: each volume carries its share.
        perVolume.push([addons, when, mib(total / 2), mib([...roles.values()].reduce((a, m) => a + m.rss, 0) / 2)]);
      };
      await new Promise((r) => setTimeout(r, 5000));
      measure('at rest');
      for (const uri of uris) qemuIo(uri, `write -P 0x5a 0 ${256 * MiB}`, 'flush');
      await new Promise((r) => setTimeout(r, 2000));
      measure('after 256 MiB');
      await new Promise((r) => setTimeout(r, 20_000));
      measure('20 s later');
    }, addons === 'off' ? { ZEBU_NO_NATIVE: '1' } : {});
  }
  say('memory of the data-path processes, two attached 3-replica volumes (MiB; PSS splits shared pages between the processes mapping them)');
  say(renderTable(['addons', 'when', 'role', 'processes', 'RSS each', 'PSS each', 'private each', 'PSS all'], [
    ['-', 'baseline', 'bare node', '1', mib(bareMemory.rss), mib(bareMemory.pss), mib(bareMemory.priv), mib(bareMemory.pss)],
    ...memoryRows,
  ]));
  say(renderTable(['addons', 'when', 'PSS per attached volume', 'RSS per attached volume (double-counts shared)'], perVolume));
  say('');

  // 2. Many attached volumes.
  if (VOLUMES > 0) await withUp('many volumes', async (up, root) => {
    const started = Date.now();
    for (let i = 0; i < VOLUMES; i++) await createAttached(up, `v${i}`, GiB, REPLICAS);
    const attachSeconds = (Date.now() - started) / 1000;
    await new Promise((r) => setTimeout(r, 5000));
    const procs = processesUnder(root);
    const before = new Map(procs.map((p) => [p.pid, ticksOf(p.pid)]));
    const t0 = Date.now();
    await new Promise((r) => setTimeout(r, 10_000));
    const seconds = (Date.now() - t0) / 1000;
    const hz = 100;
    let cpu = 0;
    for (const p of procs) cpu += (ticksOf(p.pid) - (before.get(p.pid) ?? 0)) / hz;
    const roles = byRole(procs);
    const rows = [...roles].sort().map(([role, m]) => [role, String(m.count), mib(m.pss), mib(m.priv)]);
    const pss = [...roles.values()].reduce((a, m) => a + m.pss, 0);
    say(`${VOLUMES} attached volumes of ${REPLICAS} replica(s), 1 GiB each: attached in ${attachSeconds.toFixed(0)} s; at rest over ${seconds.toFixed(0)} s: ${procs.length} processes, CPU ${(cpu / seconds * 100).toFixed(1)}% of one core (${cores} cores), PSS ${mib(pss)} MiB in all, ${mib(pss / VOLUMES)} MiB per volume`);
    say(renderTable(['role', 'processes', 'PSS MiB', 'private MiB'], rows));
    say('');
  });

  // 3. A 1 TiB sparse volume.
  await withUp('1 TiB', async (up, root) => {
    // Thin provisioning: 3 TiB of replicas on this machine's disks, which are smaller.
    await api(up, 'PUT', '/v1/settings/storage-over-provisioning-percentage', { value: '2000' });
    const t0 = Date.now();
    await api(up, 'POST', '/v1/volumes', { name: 'big', sizeBytes: 1024 * GiB, numberOfReplicas: 3 });
    await until('big detached', async () => ((await api<VolumeView>(up, 'GET', '/v1/volumes/big')).state === 'detached' ? true : undefined));
    const created = Date.now() - t0;
    const t1 = Date.now();
    await api(up, 'POST', '/v1/volumes/big/attach', {});
    const uri = await until('big attached', async () => {
      const v = await api<VolumeView>(up, 'GET', '/v1/volumes/big');
      return v.state === 'attached' && v.endpoint !== null ? v.endpoint : undefined;
    });
    const attached = Date.now() - t1;
    const firstWrite = qemuIo(uri, `write -P 0x11 ${1000 * GiB} 4k`, 'flush');
    const lastWrite = qemuIo(uri, `write -P 0x22 ${1024 * GiB - 4096} 4k`, 'flush', `read -P 0x11 ${1000 * GiB} 4k`);
    const used = duBytes(path.join(root, 'data'));
    const engine = processesUnder(root).find((p) => p.role === 'engine');
    const engineMemory = engine === undefined ? null : memoryOf(engine.pid);
    say('a 1 TiB sparse volume, 3 replicas');
    say(renderTable(['step', 'result'], [
      ['create (replicas placed, files made)', `${created} ms`],
      ['attach (until healthy with an NBD export)', `${attached} ms`],
      ['first 4k write + flush at 1000 GiB (qemu-io, process start included)', `${firstWrite.toFixed(0)} ms`],
      ['4k write + flush at the end, read back', `${lastWrite.toFixed(0)} ms`],
      ['disk used by the data directory (du)', `${mib(used)} MiB`],
      ['engine PSS / private', engineMemory === null ? '-' : `${mib(engineMemory.pss)} / ${mib(engineMemory.priv)} MiB`],
    ]));
    say('');
  });

  // 4. Many snapshots of one volume.
  await withUp('snapshots', async (up) => {
    const uri = await createAttached(up, 's', GiB, 3);
    const times: number[] = [];
    let failed: string | null = null;
    for (let i = 0; i < SNAPSHOTS; i++) {
      qemuIo(uri, `write -P ${i % 251} ${i * 4096} 4k`);
      const t = process.hrtime.bigint();
      try {
        await api(up, 'POST', '/v1/volumes/s/snapshots', { name: `snap-${i}` });
      } catch (err) {
        failed = `snapshot ${i + 1}: ${(err as Error).message}`;
        break;
      }
      times.push(Number(process.hrtime.bigint() - t) / 1e6);
    }
    const sorted = [...times].sort((a, b) => a - b);
    const readMs = qemuIo(uri, `read 0 ${Math.max(1, times.length) * 4096}`);
    const t = Date.now();
    const list = await api<unknown[]>(up, 'GET', '/v1/volumes/s/snapshots');
    const listMs = Date.now() - t;
    say(`${SNAPSHOTS} snapshots of one 3-replica volume, a 4k write before each`);
    say(renderTable(['what', 'result'], [
      ['snapshots made', `${times.length}${failed === null ? '' : ` (then: ${failed})`}`],
      ['snapshot create ms: first / median / p99 / last', times.length === 0 ? '-' : `${times[0].toFixed(0)} / ${sorted[Math.floor(sorted.length / 2)].toFixed(0)} / ${sorted[Math.floor(sorted.length * 0.99)].toFixed(0)} / ${times[times.length - 1].toFixed(0)}`],
      ['read of the written range through every layer (qemu-io)', `${readMs.toFixed(0)} ms`],
      ['snapshot list', `${list.length} in ${listMs} ms`],
    ]));
  });

  process.stdout.write(`${lines.join('\n')}\n`);
}

main().catch((err) => {
  process.stderr.write(`bench:scale failed: ${(err as Error).stack ?? err}\n`);
  process.exit(1);
});

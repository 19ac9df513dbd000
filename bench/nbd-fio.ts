/**
 * fio's nbd engine (iodepth 16) against (a) qemu-nbd serving a pre-filled local raw file,
 * (b) a Zebu volume on 1 replica, (c) on 3 replicas — all on this machine, in one run.
 * Prints IOPS / MiB/s and the ratio to qemu-nbd; queue-depth-1 4k latency (p50, p99); and where
 * the time goes: CPU microseconds and system calls per request in each process (frontend,
 * engine, replicas; qemu-nbd alone for the baseline), read from /proc and `perf stat` while fio
 * runs. Run on demand: `npm run bench:nbd`.
 *   BENCH_SECONDS (default 10), BENCH_SIZE_MIB (default 1024)
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { dataPathMain, DATA_PATH_NODE_FLAGS } from '../src/os/js-build.ts';

// Started as `zebu up` starts the data path: the compiled build when current, with its Node flags.
const MAIN = dataPathMain().main;
const SECONDS = Number(process.env.BENCH_SECONDS ?? 10);
const SIZE_MIB = Number(process.env.BENCH_SIZE_MIB ?? 1024);
const SIZE = SIZE_MIB * 1024 * 1024;

const PATTERNS = [
  { name: '4k randwrite', rw: 'randwrite', bs: '4k', unit: 'IOPS', depth: 16 },
  { name: '4k randread', rw: 'randread', bs: '4k', unit: 'IOPS', depth: 16 },
  { name: '1M seq write', rw: 'write', bs: '1M', unit: 'MiB/s', depth: 16 },
  { name: '1M seq read', rw: 'read', bs: '1M', unit: 'MiB/s', depth: 16 },
] as const;
/** Queue depth 1: what a database waiting on each write sees. */
const LATENCY_PATTERNS = [
  { name: '4k randwrite QD1', rw: 'randwrite', bs: '4k', depth: 1 },
  { name: '4k randread QD1', rw: 'randread', bs: '4k', depth: 1 },
] as const;
const HAS_PERF = spawnSync('perf', ['stat', '-e', 'raw_syscalls:sys_enter', '-x', ',', 'true'], { stdio: 'ignore' }).status === 0;

const children: ChildProcess[] = [];
process.on('exit', () => {
  for (const c of children) c.kill('SIGKILL');
});

function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

function startReady(args: string[]): Promise<Record<string, unknown>> {
  const child = spawn(process.execPath, [...DATA_PATH_NODE_FLAGS, MAIN, ...args], { stdio: ['ignore', 'pipe', 'ignore'] });
  children.push(child);
  return new Promise((resolve, reject) => {
    readline.createInterface({ input: child.stdout! }).on('line', (line) => {
      try {
        const msg = JSON.parse(line);
        if (msg.ready) resolve(msg);
      } catch {
        // ignore
      }
    });
    child.once('exit', (code) => reject(new Error(`${args.slice(0, 2).join(' ')} exited ${code}`)));
  });
}

async function waitPort(port: number): Promise<void> {
  for (let i = 0; i < 100; i++) {
    const ok = await new Promise<boolean>((resolve) => {
      const s = net.connect(port, '127.0.0.1', () => {
        s.destroy();
        resolve(true);
      });
      s.on('error', () => resolve(false));
    });
    if (ok) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`port ${port} never opened`);
}

interface FioResult {
  iops: number;
  mibps: number;
  requests: number;
  p50us: number;
  p99us: number;
}

function fio(uri: string, rw: string, bs: string, depth: number): FioResult {
  const r = spawnSync('fio', [
    '--name=bench', '--ioengine=nbd', `--uri=${uri}`, `--rw=${rw}`, `--bs=${bs}`, `--iodepth=${depth}`, `--size=${SIZE_MIB}M`,
    '--time_based', `--runtime=${SECONDS}`, '--output-format=json',
  ], { maxBuffer: 16 * 1024 * 1024 });
  if (r.status !== 0) throw new Error(`fio failed: ${r.stderr}`);
  const out = r.stdout.toString();
  const job = JSON.parse(out.slice(out.indexOf('{'))).jobs[0];
  const side = rw.includes('write') ? job.write : job.read;
  const pct = side.clat_ns?.percentile ?? {};
  return {
    iops: side.iops, mibps: side.bw_bytes / 1024 / 1024, requests: side.total_ios,
    p50us: (pct['50.000000'] ?? 0) / 1000, p99us: (pct['99.000000'] ?? 0) / 1000,
  };
}

/** The processes a target runs on, by role. */
type Role = 'qemu-nbd' | 'frontend' | 'engine' | 'replicas' | 'supervisor';
const ROLES: Role[] = ['frontend', 'engine', 'replicas', 'supervisor'];

function processesOf(root: string, qemuPid: number | null): Map<number, Role> {
  const out = new Map<number, Role>();
  if (qemuPid !== null) out.set(qemuPid, 'qemu-nbd');
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const args = fs.readFileSync(`/proc/${entry}/cmdline`, 'utf8').split('\0');
      if (!args.some((a) => a.includes(root))) continue;
      const role: Role | null = args.includes('replica') ? 'replicas' : args.includes('engine') ? 'engine' : args.includes('frontend') ? 'frontend' : args.includes('volume') ? 'supervisor' : null;
      if (role !== null) out.set(Number(entry), role);
    } catch {
      // gone meanwhile
    }
  }
  return out;
}

/** User + system CPU seconds of a process so far. */
function cpuSeconds(pid: number): number {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(fields[11]) + Number(fields[12])) / 100; // USER_HZ
  } catch {
    return 0;
  }
}

/** Runs fio while counting each process's CPU time and (with perf) system calls; totals by role. */
function measured(uri: string, procs: Map<number, Role>, rw: string, bs: string, depth: number): { fio: FioResult; cpu: Map<Role, number>; syscalls: Map<Role, number> | null } {
  const before = new Map([...procs.keys()].map((pid) => [pid, cpuSeconds(pid)]));
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'zebu-perf-'));
  const counters = HAS_PERF
    ? [...procs.keys()].map((pid) => {
        const file = path.join(dir, `${pid}.csv`);
        return { pid, file, child: spawn('perf', ['stat', '-e', 'raw_syscalls:sys_enter', '-x', ',', '-o', file, '-p', String(pid)], { stdio: 'ignore' }) };
      })
    : [];
  const result = fio(uri, rw, bs, depth);
  const cpu = new Map<Role, number>();
  for (const [pid, role] of procs) cpu.set(role, (cpu.get(role) ?? 0) + cpuSeconds(pid) - before.get(pid)!);
  let syscalls: Map<Role, number> | null = null;
  if (counters.length > 0) {
    for (const c of counters) c.child.kill('SIGINT');
    const deadline = Date.now() + 5000;
    while (counters.some((c) => c.child.exitCode === null && c.child.signalCode === null) && Date.now() < deadline) spawnSync('sleep', ['0.05']);
    syscalls = new Map();
    for (const c of counters) {
      const line = fs.existsSync(c.file) ? fs.readFileSync(c.file, 'utf8').split('\n').find((l) => l.includes('raw_syscalls:sys_enter')) : undefined;
      const role = procs.get(c.pid)!;
      syscalls.set(role, (syscalls.get(role) ?? 0) + (line !== undefined ? Number(line.split(',')[0]) || 0 : 0));
    }
  }
  fs.rmSync(dir, { recursive: true, force: true });
  return { fio: result, cpu, syscalls };
}

function prefill(uri: string): void {
  const r = spawnSync('fio', ['--name=fill', '--ioengine=nbd', `--uri=${uri}`, '--rw=write', '--bs=1M', '--iodepth=8', `--size=${SIZE_MIB}M`], { maxBuffer: 16 * 1024 * 1024 });
  if (r.status !== 0) throw new Error(`prefill failed: ${r.stderr}`);
}

async function zebuVolume(dir: string, replicas: number): Promise<string> {
  fs.mkdirSync(dir, { recursive: true });
  const secret = path.join(dir, 'secret');
  fs.writeFileSync(secret, 'bench-secret-0123456789abcdef\n');
  const addrs: string[] = [];
  for (let i = 0; i < replicas; i++) {
    const ready = await startReady(['replica', 'serve', '--dir', path.join(dir, `r${i}`), '--size', String(SIZE), '--listen', '127.0.0.1:0', '--secret-file', secret]);
    addrs.push(`127.0.0.1:${ready.port}`);
  }
  const port = await freePort();
  await startReady(['volume', 'serve', '--name', 'bench', '--size', String(SIZE), ...addrs.flatMap((a) => ['--replica', a]),
    '--nbd', `127.0.0.1:${port}`, '--secret-file', secret, '--epoch', '1', '--run-dir', path.join(dir, 'run')]);
  return `nbd://127.0.0.1:${port}/bench`;
}

interface Measurement {
  value: number;
  /** Per request, by role: CPU microseconds, system calls. */
  cpuUs: Map<Role, number>;
  syscalls: Map<Role, number> | null;
}

async function main(): Promise<void> {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'zebu-bench-'));
  const results: Record<string, Record<string, Measurement>> = {};
  const latency: Record<string, Record<string, FioResult>> = {};
  try {
    // (a) qemu-nbd on a pre-filled raw file in the same file system.
    const raw = path.join(root, 'raw.img');
    fs.writeFileSync(raw, Buffer.alloc(0));
    fs.truncateSync(raw, SIZE);
    const qport = await freePort();
    const qemu = spawn('qemu-nbd', ['-f', 'raw', '-x', 'bench', '-b', '127.0.0.1', '-p', String(qport), '-t', '--cache=writeback', '--aio=threads', '--shared=8', raw], { stdio: 'ignore' });
    children.push(qemu);
    await waitPort(qport);
    const targets: [string, string, string][] = [['qemu-nbd', `nbd://127.0.0.1:${qport}/bench`, '']];
    const z1 = path.join(root, 'z1');
    targets.push(['zebu 1 replica', await zebuVolume(z1, 1), z1]);
    const z3 = path.join(root, 'z3');
    targets.push(['zebu 3 replicas', await zebuVolume(z3, 3), z3]);
    for (const [label, uri, dir] of targets) {
      const procs = dir === '' ? new Map<number, Role>([[qemu.pid!, 'qemu-nbd']]) : processesOf(dir, null);
      prefill(uri);
      results[label] = {};
      latency[label] = {};
      for (const p of PATTERNS) {
        const m = measured(uri, procs, p.rw, p.bs, p.depth);
        const perRequest = (n: number): number => n / Math.max(1, m.fio.requests);
        results[label][p.name] = {
          value: p.unit === 'IOPS' ? m.fio.iops : m.fio.mibps,
          cpuUs: new Map([...m.cpu].map(([role, s]) => [role, perRequest(s * 1e6)])),
          syscalls: m.syscalls === null ? null : new Map([...m.syscalls].map(([role, n]) => [role, perRequest(n)])),
        };
        process.stderr.write(`${label} ${p.name}: ${results[label][p.name].value.toFixed(0)} ${p.unit}\n`);
      }
      for (const p of LATENCY_PATTERNS) {
        latency[label][p.name] = fio(uri, p.rw, p.bs, p.depth);
        process.stderr.write(`${label} ${p.name}: p50 ${latency[label][p.name].p50us.toFixed(0)} us, p99 ${latency[label][p.name].p99us.toFixed(0)} us\n`);
      }
    }
  } finally {
    for (const c of children) c.kill('SIGTERM');
    await new Promise((r) => setTimeout(r, 1000));
    fs.rmSync(root, { recursive: true, force: true });
  }
  const table = (header: string[], rows: string[][]): void => {
    const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
    const line = (cells: string[]) => cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join(' | ');
    console.log(line(header));
    console.log(widths.map((w) => '-'.repeat(w)).join('-|-'));
    for (const r of rows) console.log(line(r));
  };
  const base = results['qemu-nbd'];
  console.log(`${SECONDS} s per run, ${SIZE_MIB} MiB volume, ${os.cpus().length} cores`);
  table(['pattern (fio nbd, iodepth 16)', 'unit', 'qemu-nbd', 'zebu 1r', '1r/qemu', 'zebu 3r', '3r/qemu'], PATTERNS.map((p) => {
    const one = results['zebu 1 replica'][p.name].value;
    const three = results['zebu 3 replicas'][p.name].value;
    const q = base[p.name].value;
    return [p.name, p.unit, q.toFixed(0), one.toFixed(0), (one / q).toFixed(2), three.toFixed(0), (three / q).toFixed(2)];
  }));

  console.log('\nqueue depth 1, completion latency in microseconds (p50 / p99):');
  table(['pattern', 'qemu-nbd', 'zebu 1r', 'zebu 3r', '3r p99/qemu'], LATENCY_PATTERNS.map((p) => {
    const cell = (label: string): string => `${latency[label][p.name].p50us.toFixed(0)} / ${latency[label][p.name].p99us.toFixed(0)}`;
    return [p.name, cell('qemu-nbd'), cell('zebu 1 replica'), cell('zebu 3 replicas'), (latency['zebu 3 replicas'][p.name].p99us / latency['qemu-nbd'][p.name].p99us).toFixed(1)];
  }));

  console.log(`\nper request, by process: CPU microseconds${HAS_PERF ? ' / system calls' : ' (perf not found: no system call counts)'} (iodepth 16; "replicas" is all of them together):`);
  const cell = (m: Measurement, role: Role): string => {
    const us = m.cpuUs.get(role);
    if (us === undefined) return '-';
    const calls = m.syscalls?.get(role);
    return calls === undefined ? us.toFixed(1) : `${us.toFixed(1)} / ${calls.toFixed(1)}`;
  };
  const total = (m: Measurement): string => {
    const us = [...m.cpuUs.values()].reduce((a, b) => a + b, 0);
    const calls = m.syscalls === null ? null : [...m.syscalls.values()].reduce((a, b) => a + b, 0);
    return calls === null ? us.toFixed(1) : `${us.toFixed(1)} / ${calls.toFixed(1)}`;
  };
  const rows: string[][] = [];
  for (const p of PATTERNS) {
    rows.push([p.name, 'qemu-nbd', '-', '-', '-', total(base[p.name])]);
    for (const label of ['zebu 1 replica', 'zebu 3 replicas']) {
      const m = results[label][p.name];
      rows.push(['', label.replace('zebu ', ''), ...ROLES.slice(0, 3).map((r) => cell(m, r)), total(m)]);
    }
  }
  table(['pattern', 'target', 'frontend', 'engine', 'replicas', 'total'], rows);
}

await main();

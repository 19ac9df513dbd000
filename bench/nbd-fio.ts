/**
 * fio's nbd engine (iodepth 16) against (a) qemu-nbd serving a pre-filled local raw file,
 * (b) a Zebu volume on 1 replica, (c) on 3 replicas — all on this machine, in one run.
 * Prints IOPS / MiB/s and the ratio to qemu-nbd. Run on demand: `npm run bench:nbd`.
 *   BENCH_SECONDS (default 10), BENCH_SIZE_MIB (default 1024)
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';

const MAIN = fileURLToPath(new URL('../src/cli/main.ts', import.meta.url));
const SECONDS = Number(process.env.BENCH_SECONDS ?? 10);
const SIZE_MIB = Number(process.env.BENCH_SIZE_MIB ?? 1024);
const SIZE = SIZE_MIB * 1024 * 1024;

const PATTERNS = [
  { name: '4k randwrite', rw: 'randwrite', bs: '4k', unit: 'IOPS' },
  { name: '4k randread', rw: 'randread', bs: '4k', unit: 'IOPS' },
  { name: '1M seq write', rw: 'write', bs: '1M', unit: 'MiB/s' },
  { name: '1M seq read', rw: 'read', bs: '1M', unit: 'MiB/s' },
] as const;

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
  const child = spawn(process.execPath, [MAIN, ...args], { stdio: ['ignore', 'pipe', 'ignore'] });
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

function fio(uri: string, rw: string, bs: string): { iops: number; mibps: number } {
  const r = spawnSync('fio', [
    '--name=bench', '--ioengine=nbd', `--uri=${uri}`, `--rw=${rw}`, `--bs=${bs}`, '--iodepth=16', `--size=${SIZE_MIB}M`,
    '--time_based', `--runtime=${SECONDS}`, '--output-format=json',
  ], { maxBuffer: 16 * 1024 * 1024 });
  if (r.status !== 0) throw new Error(`fio failed: ${r.stderr}`);
  const out = r.stdout.toString();
  const job = JSON.parse(out.slice(out.indexOf('{'))).jobs[0];
  const side = rw.includes('write') ? job.write : job.read;
  return { iops: side.iops, mibps: side.bw_bytes / 1024 / 1024 };
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

async function main(): Promise<void> {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'zebu-bench-'));
  const results: Record<string, Record<string, number>> = {};
  try {
    // (a) qemu-nbd on a pre-filled raw file in the same file system.
    const raw = path.join(root, 'raw.img');
    fs.writeFileSync(raw, Buffer.alloc(0));
    fs.truncateSync(raw, SIZE);
    const qport = await freePort();
    const qemu = spawn('qemu-nbd', ['-f', 'raw', '-x', 'bench', '-b', '127.0.0.1', '-p', String(qport), '-t', '--cache=writeback', '--aio=threads', '--shared=8', raw], { stdio: 'ignore' });
    children.push(qemu);
    await waitPort(qport);
    const targets: [string, string][] = [['qemu-nbd', `nbd://127.0.0.1:${qport}/bench`]];
    targets.push(['zebu 1 replica', await zebuVolume(path.join(root, 'z1'), 1)]);
    targets.push(['zebu 3 replicas', await zebuVolume(path.join(root, 'z3'), 3)]);
    for (const [label, uri] of targets) {
      prefill(uri);
      results[label] = {};
      for (const p of PATTERNS) {
        const r = fio(uri, p.rw, p.bs);
        results[label][p.name] = p.unit === 'IOPS' ? r.iops : r.mibps;
        process.stderr.write(`${label} ${p.name}: ${results[label][p.name].toFixed(0)} ${p.unit}\n`);
      }
    }
  } finally {
    for (const c of children) c.kill('SIGTERM');
    await new Promise((r) => setTimeout(r, 1000));
    fs.rmSync(root, { recursive: true, force: true });
  }
  const base = results['qemu-nbd'];
  const rows = PATTERNS.map((p) => {
    const z1 = results['zebu 1 replica'][p.name];
    const z3 = results['zebu 3 replicas'][p.name];
    return [p.name, p.unit, base[p.name].toFixed(0), z1.toFixed(0), (z1 / base[p.name]).toFixed(2), z3.toFixed(0), (z3 / base[p.name]).toFixed(2)];
  });
  const header = ['pattern (fio nbd, iodepth 16)', 'unit', 'qemu-nbd', 'zebu 1r', '1r/qemu', 'zebu 3r', '3r/qemu'];
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (cells: string[]) => cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join(' | ');
  console.log(`${SECONDS} s per run, ${SIZE_MIB} MiB volume, ${os.cpus().length} cores`);
  console.log(line(header));
  console.log(widths.map((w) => '-'.repeat(w)).join('-|-'));
  for (const r of rows) console.log(line(r));
}

await main();

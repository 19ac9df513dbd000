/**
 * `zebu up` as a real process for system tests, with the real CLI to drive it. Everything it
 * starts is found again by its data directory (the data-path processes outlive `zebu up` on
 * purpose), so a test can count, kill and clean up all of them.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ZEBU_MAIN } from './replica-process.ts';
import { watchChildStart } from './child-ready.ts';
import { startEtcd } from './etcd-server.ts';

export interface ZebuUp {
  dataDir: string;
  /** The API's URL (on a node that does not lead, requests there are passed on to the leader). */
  api: string;
  leader: boolean;
  node: string;
  token: string;
  nbd: string;
  child: ChildProcess;
  exited: Promise<number | string>;
  stderr: () => string;
}

export interface ZebuUpOptions {
  dataDir: string;
  disks?: number;
  /** Fixed NBD port (default: any free port; a restart then reuses the first one's). */
  nbdPort?: number;
  apiPort?: number;
  /** Extra environment (e.g. ZEBU_TEST_REPLICA_ARGS). */
  env?: Record<string, string>;
  /** --store (default: the embedded store; ZEBU_TEST_STORE=etcd runs every test on an etcd of its own). */
  store?: string;
  node?: string;
  /** Run inside this network namespace (`ip netns exec`): a node of a multi-node test. */
  netns?: string;
  /** The node's address: its API, NBD and agent listen there, replicas too (default 127.0.0.1). */
  address?: string;
  /** More flags for `zebu up` (e.g. --store-ca FILE). */
  extraArgs?: string[];
}

/** etcd client URLs of the etcds started for ZEBU_TEST_STORE=etcd, by data directory. */
const testEtcds = new Map<string, string>();

/**
 * ZEBU_TEST_STORE=etcd: every `zebu up` of the tests on etcd instead of the embedded store, an
 * etcd per data directory (in it: zebuDataDir's clean-up kills it with the rest).
 */
async function testStore(dataDir: string): Promise<string | undefined> {
  if (process.env.ZEBU_TEST_STORE !== 'etcd') return undefined;
  let endpoint = testEtcds.get(dataDir);
  if (endpoint === undefined) {
    // Beside the data directory (a second cluster in the same test has its own), named so that
    // processesUnder(dataDir) does not count it.
    const dir = path.join(path.dirname(dataDir), `etcd-of-${path.basename(dataDir)}`);
    fs.mkdirSync(dir, { recursive: true });
    endpoint = (await startEtcd({ after: () => {} }, dir)).endpoint;
    testEtcds.set(dataDir, endpoint);
  }
  return `etcd://${new URL(endpoint).host}`;
}

export async function startZebuUp(options: ZebuUpOptions): Promise<ZebuUp> {
  const store = options.store ?? await testStore(options.dataDir);
  const host = options.address ?? '127.0.0.1';
  const args = [
    ZEBU_MAIN, 'up', '--data-dir', options.dataDir, '--api', `${host}:${options.apiPort ?? 0}`, '--nbd', `${host}:${options.nbdPort ?? 0}`,
    '--disks', String(options.disks ?? 3), '--node', options.node ?? 'node-1', ...(store !== undefined ? ['--store', store, '--agent-port', '0'] : []),
    ...(options.address !== undefined ? ['--address', options.address] : []),
    ...(options.extraArgs ?? []),
  ];
  const env = { ...process.env, ...options.env };
  // `ip netns exec` execs the command: the child's pid is zebu up's own.
  const child = options.netns !== undefined
    ? spawn('ip', ['netns', 'exec', options.netns, process.execPath, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env })
    : spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'], env });
  const start = watchChildStart(child, 'zebu up', 60_000, 400_000);
  const { exited, stderr } = start;
  const ready = await start.ready;
  const token = fs.readFileSync(String(ready.tokenFile), 'utf8').trim();
  return { dataDir: options.dataDir, api: typeof ready.api === 'string' ? ready.api : '', leader: ready.leader === true, node: String(ready.node), token, nbd: String(ready.nbd), child, exited, stderr };
}

/** Stops `zebu up` with SIGTERM (a clean stop of everything) and waits. */
export async function stopZebuUp(up: ZebuUp): Promise<number | string> {
  if (up.child.exitCode === null && up.child.signalCode === null) up.child.kill('SIGTERM');
  return up.exited;
}

/** Runs the zebu CLI against `up`; returns its output and exit status. */
export function zebu(up: { api: string; token: string }, args: string[], options: { timeoutMs?: number; cwd?: string } = {}): { stdout: string; stderr: string; status: number | null } {
  const r = spawnSync(process.execPath, [ZEBU_MAIN, ...args], {
    env: { ...process.env, ZEBU_API: up.api, ZEBU_TOKEN: up.token },
    timeout: options.timeoutMs ?? 300_000,
    cwd: options.cwd,
    maxBuffer: 16 * 1024 * 1024,
  });
  return { stdout: r.stdout?.toString() ?? '', stderr: r.stderr?.toString() ?? '', status: r.status };
}

/** Like zebu(), but throws with the output when the command fails; returns stdout. */
export function mustZebu(up: { api: string; token: string }, args: string[], options: { timeoutMs?: number } = {}): string {
  const r = zebu(up, args, options);
  if (r.status !== 0) throw new Error(`zebu ${args.join(' ')} exited ${r.status}:\n${r.stdout}\n${r.stderr}`);
  return r.stdout;
}

export function mustZebuJson<T = any>(up: { api: string; token: string }, args: string[]): T {
  return JSON.parse(mustZebu(up, [...args, '--json'])) as T;
}

export interface ProcessInfo {
  pid: number;
  role: 'replica' | 'engine' | 'frontend' | 'up' | 'copier' | 'other';
  cmdline: string[];
}

/** Every live process whose command line mentions `dir` (zombies excluded). */
export function processesUnder(dir: string): ProcessInfo[] {
  const out: ProcessInfo[] = [];
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const pid = Number(entry);
    if (pid === process.pid) continue;
    let cmdline: string[];
    let stat: string;
    try {
      cmdline = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').filter((x) => x !== '');
      stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    } catch {
      continue;
    }
    if (stat.slice(stat.lastIndexOf(')') + 2).startsWith('Z')) continue;
    if (!cmdline.some((a) => a.includes(dir))) continue;
    // From the sources (main.ts) or from the compiled build (build/js: main.js).
    const sub = cmdline.slice(cmdline.findIndex((a) => /main\.[tj]s$/.test(a)) + 1);
    const role = cmdline.some((a) => /copier-main\.[tj]s$/.test(a)) ? 'copier'
      : sub[0] === 'up' ? 'up' : sub[0] === 'replica' ? 'replica' : sub[0] === 'engine' ? 'engine' : sub[0] === 'frontend' ? 'frontend' : 'other';
    out.push({ pid, role, cmdline });
  }
  return out;
}

/** SIGKILLs everything started for `dir` and waits until it is gone. */
export async function killAllUnder(dir: string): Promise<void> {
  for (let i = 0; i < 50; i++) {
    const procs = processesUnder(dir);
    if (procs.length === 0) return;
    for (const p of procs) {
      try {
        process.kill(p.pid, 'SIGKILL');
      } catch {
        // gone
      }
    }
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** A data directory for `zebu up`, with everything started in it killed and removed at the end. */
export function zebuDataDir(t: { after: (fn: () => void | Promise<void>) => void }): string {
  // Short: engine sockets live under it.
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'zu-'));
  const dataDir = path.join(root, 'data');
  t.after(async () => {
    await killAllUnder(root);
    // ZEBU_FAULT_KEEP=1 keeps the data directory (logs included) for a look after a failure.
    if (process.env.ZEBU_FAULT_KEEP === '1') process.stderr.write(`kept: ${dataDir}\n`);
    else fs.rmSync(root, { recursive: true, force: true, maxRetries: 3 });
  });
  return dataDir;
}

/** Polls `fn` until it returns a value that is not undefined/false, or fails after `timeoutMs`. */
export async function waitFor<T>(what: string, fn: () => T | undefined | false | Promise<T | undefined | false>, timeoutMs = 60_000, intervalMs = 200): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const v = await fn();
      if (v !== undefined && v !== false) return v as T;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${last ? `: ${(last as Error).message}` : ''}`);
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}

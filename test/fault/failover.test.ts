/**
 * The daemon-failover test of the cachefiles on-demand model, Zebu's way: the volume's engine is
 * SIGKILLed (then SIGSTOPped: hung) again and again, at random moments (every 0.2-2 s, seeded),
 * while clients use the volume through real tools; the frontend holds their requests and
 * re-issues them to each new engine. The clients must see no error and no wrong byte.
 *
 * Four phases on one volume of `zebu volume serve` (3 replica processes):
 *   read, SIGKILL   a reader reads a known file through ext4 on nbdfuse + a loop device
 *                   (page cache dropped every pass, so every pass reaches the volume) and checks
 *                   its SHA-256; nbdcopy reads the raw volume and checks its SHA-256
 *   write, SIGKILL  fio with --verify (random writes, each verified by reading it back) on the
 *                   raw volume over NBD
 *   read, SIGSTOP   as the first, the engine stopped instead of killed
 *   write, SIGSTOP  as the second, the engine stopped instead of killed
 * Then the replicas are compared (engine verify): 0 differing regions. A table reports kills,
 * requests re-issued, engines found hung, the longest stall a client saw, errors and wrong bytes.
 *
 * ZEBU_FAULT_SEED replays the schedule; ZEBU_FAULT_FULL=1 runs each phase for 90 s on a 256 MiB
 * file (default: 12 s, 64 MiB); ZEBU_FAILOVER_SECONDS sets the phase length (a phase
 * runs on until it struck 3 times, up to 4x its length). The ext4 reader
 * needs root and /dev/fuse; without them the raw reader runs alone.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { controlRequest } from '../../src/protocol/control-channel.ts';
import { procStat } from '../../src/os/process-identity.ts';
import { Prng, faultSeed, faultFull, envCount } from '../support/fault-prng.ts';
import { renderTable } from '../support/fault-table.ts';
import { startVolume, run, mustRun, type VolumeCluster } from '../support/volume-cluster.ts';
import { waitFor } from '../support/zebu-up.ts';
import { faultRoot } from '../support/fault-cluster.ts';

const MiB = 1024 * 1024;
const HANG_TIMEOUT_MS = 1000;

interface LinkView {
  state: string;
  reopens: number;
  reissued: number;
  hangs: number;
  longestHoldMs: number;
  /** The engine process the link is connected to. */
  engine: { pid: number } | null;
}

interface PhaseRow {
  phase: string;
  faults: number;
  reissued: number;
  hangs: number;
  reopens: number;
  longestStallMs: number;
  longestHoldMs: number;
  clientErrors: number;
  wrongBytes: number;
  readMiB: number;
  writtenMiB: number;
  passes: number;
  seconds: number;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function enginePids(vol: VolumeCluster, dir: string): number[] {
  return spawnSync('pgrep', ['-f', `engine serve --name ${vol.name} .*${dir}`]).stdout.toString().split('\n').filter((x) => x !== '').map(Number);
}

async function link(vol: VolumeCluster): Promise<LinkView> {
  return ((await controlRequest(vol.frontendControlSocket, 'GET', `/v1/exports/${vol.name}`)) as { link: LinkView }).link;
}

/** SHA-256 of a stream, with the longest gap between two chunks (a stall the reader saw). */
function digestStream(stream: NodeJS.ReadableStream): Promise<{ digest: string; bytes: number; longestGapMs: number }> {
  return new Promise((resolve, reject) => {
    const hash = crypto.createHash('sha256');
    let bytes = 0;
    let last = performance.now();
    let longestGapMs = 0;
    stream.on('data', (chunk: Buffer) => {
      const now = performance.now();
      longestGapMs = Math.max(longestGapMs, now - last);
      last = now;
      bytes += chunk.length;
      hash.update(chunk);
    });
    stream.once('error', reject);
    stream.once('end', () => resolve({ digest: hash.digest('hex'), bytes, longestGapMs }));
  });
}

/** nbdcopy of the whole volume to its stdout: the digest, or the error nbdcopy reported. */
async function nbdcopyDigest(uri: string): Promise<{ digest: string; bytes: number; longestGapMs: number; error: string | null }> {
  const child = spawn('nbdcopy', [uri, '-'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  const result = await digestStream(child.stdout);
  const code = await exited;
  return { ...result, error: code === 0 ? null : `nbdcopy exited ${code}: ${stderr.trim()}` };
}

let cachesDroppable = true;

/**
 * Every pass must reach the volume, not the page cache (of the file, or of the loop's backing
 * file). Where the kernel does not let us (a read-only /proc/sys), passes after the first may be
 * served from the cache; the raw reader still reaches the volume every time.
 */
function dropCaches(note: (message: string) => void): void {
  if (!cachesDroppable) return;
  try {
    fs.writeFileSync('/proc/sys/vm/drop_caches', '3');
  } catch (err) {
    cachesDroppable = false;
    note(`cannot drop the page cache (${(err as Error).message}): the ext4 reader may read from it`);
  }
}

test('cachefiles failover: the engine killed or hung every 0.2-2 s under ext4, nbdcopy and fio --verify: no client error, no wrong byte', { timeout: 60 * 60_000 }, async (t) => {
  const seed = faultSeed();
  t.diagnostic(`ZEBU_FAULT_SEED=${seed}`);
  const random = new Prng(seed);
  const full = faultFull();
  const phaseMs = envCount('ZEBU_FAILOVER_SECONDS', full ? 90 : 12) * 1000;
  const MIN_PHASE_FAULTS = 3;
  const fileMiB = full ? 256 : 64;
  const sizeBytes = (fileMiB + 128) * MiB;
  const canMount = process.getuid?.() === 0 && fs.existsSync('/dev/fuse');
  const dir = faultRoot(t);
  const vol = await startVolume(t, { dir, replicas: 3, sizeBytes, extraArgs: ['--hang-timeout-ms', String(HANG_TIMEOUT_MS)] });

  // The known file, written through ext4 before any fault.
  const fuseDir = path.join(dir, 'fuse');
  const mnt = path.join(dir, 'mnt');
  let fuse: ChildProcess | null = null;
  let loop = '';
  let fileDigest = '';
  const cleanupFs = (): void => {
    if (!canMount) return;
    run('umount', [mnt]);
    if (loop !== '') run('losetup', ['-d', loop]);
    loop = '';
    run('fusermount3', ['-u', path.join(fuseDir, 'disk')]);
    fuse?.kill('SIGTERM');
    fuse = null;
  };
  t.after(cleanupFs);
  if (canMount) {
    fs.mkdirSync(fuseDir);
    fs.mkdirSync(mnt);
    fuse = spawn('nbdfuse', [path.join(fuseDir, 'disk'), vol.nbd], { stdio: 'ignore' });
    await waitFor('the nbdfuse file', () => fs.existsSync(path.join(fuseDir, 'disk')), 10_000, 50);
    loop = mustRun('losetup', ['-f', '--show', path.join(fuseDir, 'disk')]).trim();
    mustRun('mkfs.ext4', ['-q', '-F', loop]);
    mustRun('mount', [loop, mnt]);
    const body = Buffer.alloc(fileMiB * MiB);
    const block = crypto.randomBytes(MiB);
    for (let i = 0; i < fileMiB; i++) {
      block.writeUInt32LE(i, 0);
      block.copy(body, i * MiB);
    }
    fileDigest = crypto.createHash('sha256').update(body).digest('hex');
    fs.writeFileSync(path.join(mnt, 'known'), body);
    mustRun('umount', [mnt]);
    // Read-only from now on: the raw volume's bytes stay what they are while it is read.
    mustRun('mount', ['-o', 'ro,noload', loop, mnt]);
  } else {
    t.diagnostic('not root or no /dev/fuse: the raw reader runs without the ext4 reader');
    mustRun('qemu-io', ['-f', 'raw', '-c', `write -P 0x5a 0 ${fileMiB}M`, vol.nbd]);
  }
  const rawReference = await nbdcopyDigest(vol.nbd);
  assert.equal(rawReference.error, null);

  const rows: PhaseRow[] = [];
  const failures: string[] = [];

  /** Kills (or stops) the serving engine at random moments until `done`; returns how many. */
  const faultLoop = async (signal: 'SIGKILL' | 'SIGSTOP', done: () => boolean, injected: { count: number }): Promise<number> => {
    let count = 0;
    while (!done()) {
      await sleep(random.range(200, 2000));
      if (done()) break;
      // A hang of the serving engine, the one the link watches: a pid looked up by name could be a
      // new engine the supervisor just started (the link found the last one hung meanwhile), and
      // one stopped before it is ready is left to the supervisor's ready timeout (minutes).
      let pids = enginePids(vol, dir);
      if (signal === 'SIGSTOP') {
        const view = await link(vol).catch(() => null);
        if (view?.state !== 'OPEN' || view.engine === null) continue;
        pids = [view.engine.pid];
      }
      for (const pid of pids) {
        try {
          process.kill(pid, signal);
          count++;
          injected.count++;
        } catch {
          // gone already
        }
      }
    }
    return count;
  };

  const runPhase = async (name: string, signal: 'SIGKILL' | 'SIGSTOP', work: (done: () => boolean, row: PhaseRow) => Promise<void>): Promise<void> => {
    const before = await link(vol);
    const row: PhaseRow = { phase: name, faults: 0, reissued: 0, hangs: 0, reopens: 0, longestStallMs: 0, longestHoldMs: 0, clientErrors: 0, wrongBytes: 0, readMiB: 0, writtenMiB: 0, passes: 0, seconds: 0 };
    const started = performance.now();
    const deadline = Date.now() + phaseMs;
    // A phase goes on past its length until it struck MIN_PHASE_FAULTS times (a few long hangs
    // can fill a short phase), up to four times its length.
    const hardDeadline = Date.now() + 4 * phaseMs;
    const injected = { count: 0 };
    const done = (): boolean => Date.now() >= hardDeadline || (Date.now() >= deadline && injected.count >= MIN_PHASE_FAULTS);
    const [faults] = await Promise.all([faultLoop(signal, done, injected), work(done, row)]);
    // The last engine must be serving again before the counters are read, and not be one stopped
    // by the last fault: the link finds that one hung only after its heartbeat deadline, and a
    // control call made to it meanwhile is cut off when the supervisor kills it.
    await waitFor('the link OPEN on a running engine', async () => {
      const view = await link(vol);
      return view.state === 'OPEN' && view.engine !== null && procStat(view.engine.pid)?.state !== 'T';
    }, 60_000, 50);
    const after = await link(vol);
    row.faults = faults;
    row.reissued = after.reissued - before.reissued;
    row.hangs = after.hangs - before.hangs;
    row.reopens = after.reopens - before.reopens;
    row.longestHoldMs = after.longestHoldMs;
    row.seconds = (performance.now() - started) / 1000;
    rows.push(row);
    if (faults < MIN_PHASE_FAULTS) failures.push(`${name}: only ${faults} fault(s) injected`);
    if (row.clientErrors > 0) failures.push(`${name}: ${row.clientErrors} client error(s)`);
    if (row.wrongBytes > 0) failures.push(`${name}: ${row.wrongBytes} wrong byte(s) read`);
    if (row.passes === 0) failures.push(`${name}: no pass of the clients completed`);
    if (signal === 'SIGSTOP' && row.hangs === 0) failures.push(`${name}: no hung engine was found`);
  };

  const readers = async (done: () => boolean, row: PhaseRow, errors: string[]): Promise<void> => {
    const fileReader = async (): Promise<void> => {
      while (!done() && canMount) {
        dropCaches((message) => t.diagnostic(message));
        try {
          const r = await digestStream(fs.createReadStream(path.join(mnt, 'known'), { highWaterMark: MiB }));
          row.readMiB += r.bytes / MiB;
          row.longestStallMs = Math.max(row.longestStallMs, r.longestGapMs);
          if (r.digest !== fileDigest) {
            row.wrongBytes += r.bytes;
            errors.push('ext4 file read back with another SHA-256');
          }
          row.passes++;
        } catch (err) {
          row.clientErrors++;
          errors.push(`ext4 read: ${(err as Error).message}`);
        }
      }
    };
    const rawReader = async (): Promise<void> => {
      while (!done()) {
        const r = await nbdcopyDigest(vol.nbd);
        row.readMiB += r.bytes / MiB;
        row.longestStallMs = Math.max(row.longestStallMs, r.longestGapMs);
        if (r.error !== null) {
          row.clientErrors++;
          errors.push(r.error);
        } else if (r.digest !== rawReference.digest) {
          row.wrongBytes += r.bytes;
          errors.push('nbdcopy read the volume with another SHA-256');
        }
        row.passes++;
      }
    };
    await Promise.all([fileReader(), rawReader()]);
  };

  const fio = async (done: () => boolean, row: PhaseRow, errors: string[]): Promise<void> => {
    const runtimeS = Math.max(1, Math.round(phaseMs / 1000));
    const child = spawn('fio', [
      '--name=verify', '--ioengine=nbd', `--uri=${vol.nbd}`, '--rw=randwrite', '--bsrange=4k-256k', `--size=${Math.floor(sizeBytes / MiB)}M`,
      '--iodepth=16', '--verify=crc32c', '--verify_backlog=64', '--verify_fatal=1', '--verify_state_save=0', '--time_based', `--runtime=${runtimeS}`,
      '--output-format=json',
    ], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const code = await new Promise<number | null>((resolve) => child.once('exit', (c) => resolve(c)));
    void done;
    let job: { error: number; write: { io_bytes: number; clat_ns: { max: number } }; read: { io_bytes: number; clat_ns: { max: number } } } | null = null;
    try {
      job = JSON.parse(stdout.slice(stdout.indexOf('{'))).jobs[0];
    } catch {
      // reported below
    }
    if (code !== 0 || job === null || job.error !== 0) {
      row.clientErrors++;
      errors.push(`fio exited ${code} (error ${job?.error}): ${stderr.trim().slice(-500)}`);
      if (/verify/i.test(stderr)) row.wrongBytes++;
      return;
    }
    row.passes++;
    row.writtenMiB += job.write.io_bytes / MiB;
    row.readMiB += job.read.io_bytes / MiB;
    row.longestStallMs = Math.max(row.longestStallMs, job.write.clat_ns.max / 1e6, job.read.clat_ns.max / 1e6);
  };

  const errors: string[] = [];
  await runPhase('read, SIGKILL', 'SIGKILL', (done, row) => readers(done, row, errors));
  cleanupFs(); // fio writes over the file system from here on
  await runPhase('write (fio --verify), SIGKILL', 'SIGKILL', (done, row) => fio(done, row, errors));
  // The read phases again, over what fio left: a new reference.
  if (canMount) {
    fuse = spawn('nbdfuse', [path.join(fuseDir, 'disk'), vol.nbd], { stdio: 'ignore' });
    await waitFor('the nbdfuse file', () => fs.existsSync(path.join(fuseDir, 'disk')), 10_000, 50);
    loop = mustRun('losetup', ['-f', '--show', path.join(fuseDir, 'disk')]).trim();
    mustRun('mkfs.ext4', ['-q', '-F', loop]);
    mustRun('mount', [loop, mnt]);
    const body = crypto.randomBytes(fileMiB * MiB);
    fileDigest = crypto.createHash('sha256').update(body).digest('hex');
    fs.writeFileSync(path.join(mnt, 'known'), body);
    mustRun('umount', [mnt]);
    mustRun('mount', ['-o', 'ro,noload', loop, mnt]);
  }
  const second = await nbdcopyDigest(vol.nbd);
  assert.equal(second.error, null);
  rawReference.digest = second.digest;
  await runPhase('read, SIGSTOP', 'SIGSTOP', (done, row) => readers(done, row, errors));
  cleanupFs();
  await runPhase('write (fio --verify), SIGSTOP', 'SIGSTOP', (done, row) => fio(done, row, errors));

  // The replicas hold the same bytes. A replica the engines left out on the way (one that did not
  // answer an engine in time on a loaded machine) comes back by a rebuild: it is waited for, and
  // said, so that verify compares all three; one that never comes back fails below.
  type ReplicaState = { address: string; mode: string; reason: string | null };
  const notRw = async (): Promise<ReplicaState[]> => ((await controlRequest(vol.controlSocket, 'GET', '/v1/replicas')) as ReplicaState[]).filter((r) => r.mode !== 'RW');
  const outAtEnd = await notRw();
  if (outAtEnd.length > 0) {
    const waitStarted = performance.now();
    await waitFor('every replica RW', async () => (await notRw()).length === 0, 120_000, 200).catch(() => {});
    const note = `at the end of the phases ${outAtEnd.map((r) => `${r.address} was ${r.mode}: ${r.reason}`).join('; ')}; waited ${((performance.now() - waitStarted) / 1000).toFixed(1)} s for every replica to be RW`;
    process.stdout.write(`${note}\n`);
    t.diagnostic(note);
  }
  const verify = (await controlRequest(vol.controlSocket, 'POST', '/v1/verify', {}, { timeoutMs: 600_000 })) as { differing: unknown[]; replicas: string[] };
  if (verify.differing.length > 0) failures.push(`verify found ${verify.differing.length} differing region(s)`);
  if (verify.replicas.length !== 3) {
    const rows = (await controlRequest(vol.controlSocket, 'GET', '/v1/replicas')) as { address: string; mode: string; reason: string | null }[];
    const out = rows.filter((r) => r.mode !== 'RW').map((r) => `${r.address} ${r.mode}: ${r.reason}`);
    failures.push(`verify compared ${verify.replicas.length} replica(s), not 3 (${out.join('; ')})`);
  }

  const table = renderTable(
    ['phase', 'faults', 're-issued', 'hung found', 'reopens', 'longest stall', 'longest hold', 'client errors', 'wrong bytes', 'read MiB', 'written MiB', 'passes', 'seconds'],
    rows.map((r) => [
      r.phase, String(r.faults), String(r.reissued), String(r.hangs), String(r.reopens), `${Math.round(r.longestStallMs)} ms`, `${Math.round(r.longestHoldMs)} ms`,
      String(r.clientErrors), String(r.wrongBytes), r.readMiB.toFixed(0), r.writtenMiB.toFixed(0), String(r.passes), r.seconds.toFixed(1),
    ]),
  );
  const text = `cachefiles failover, ${fileMiB} MiB file, ${(sizeBytes / MiB).toFixed(0)} MiB volume, 3 replicas, verify: ${verify.differing.length} differing region(s) (ZEBU_FAULT_SEED=${seed})\n${table}`;
  process.stdout.write(`\n${text}\n\n`);
  for (const line of text.split('\n')) t.diagnostic(line);
  if (process.env.ZEBU_FAULT_KEEP === '1') fs.writeFileSync(path.join(dir, 'volume.log'), vol.stderr());
  await vol.stop();
  assert.deepEqual([...failures, ...errors.slice(0, 20)], [], `ZEBU_FAULT_SEED=${seed}`);
});

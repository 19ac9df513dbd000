/**
 * Backups and restores under faults, through `zebu up` and real processes:
 * - the target's file system fills up (a small tmpfs): the backup ends in error saying so,
 *   no completed manifest, and once there is room again a new backup succeeds;
 * - SIGKILL of the volume's engine, of a replica, and of `zebu up` itself while a backup runs,
 *   and of the engine, a replica and `zebu up` while a restore runs: each one completes by itself (retried,
 *   or resumed by the next `zebu up`), and restores byte for byte.
 * After each: every completed backup verifies (no manifest refers to a missing block).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import crypto from 'node:crypto';
import { run, mustRun } from '../support/volume-cluster.ts';
import { writeAt, readVolume } from '../support/volume-io.ts';
import { startZebuUp, stopZebuUp, zebu, mustZebu, mustZebuJson, zebuDataDir, waitFor, processesUnder, type ZebuUp } from '../support/zebu-up.ts';

const MiB = 1024 * 1024;

/** GET on the API from this process (async: polling while a job runs). */
async function api<T>(up: ZebuUp, pathName: string, method = 'GET', body?: unknown): Promise<T> {
  const response = await fetch(`${up.api}${pathName}`, {
    method,
    headers: { authorization: `Bearer ${up.token}`, ...(body !== undefined ? { 'content-type': 'application/json' } : {}) },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  if (!response.ok) throw new Error(`${method} ${pathName}: HTTP ${response.status} ${text}`);
  return JSON.parse(text) as T;
}

interface Backup { name: string; state: string; doneBytes: number; totalBytes: number; message: string | null; attempts?: number }
interface Volume { state: string; restore: { state: string; doneBytes: number; applied: string | null; message: string | null } | null }

function killRole(dataDir: string, role: 'engine' | 'replica', volume: string): number {
  const named = (p: { cmdline: string[] }): string => p.cmdline[p.cmdline.indexOf('--name') + 1] ?? '';
  const victim = processesUnder(dataDir).find((p) => p.role === role && (role === 'engine' ? named(p) === volume : named(p).startsWith(`${volume}-r-`)));
  assert.ok(victim !== undefined, `a ${role} process of ${volume}`);
  process.kill(victim.pid, 'SIGKILL');
  return victim.pid;
}

async function waitBackup(up: ZebuUp, name: string, timeoutMs = 180_000): Promise<Backup> {
  return waitFor(`backup ${name} to end`, async () => {
    const b = await api<Backup>(up, `/v1/backups/${name}`);
    return b.state === 'completed' || b.state === 'error' ? b : undefined;
  }, timeoutMs, 200);
}

function verifyTarget(up: ZebuUp): void {
  const r = zebu(up, ['backup-target', 'verify', '--json']);
  assert.equal(r.status, 0, `verify of the target: ${r.stdout}${r.stderr}`);
  const report = JSON.parse(r.stdout);
  assert.equal(report.missingBlocks + report.corruptBlocks, 0);
}

test('backups and restores survive a full target, and SIGKILL of the engine, a replica and zebu up', {
  timeout: 20 * 60_000,
  // A tmpfs for the full target needs root (as CI runs).
  skip: process.getuid?.() !== 0 ? 'needs root (mount -t tmpfs)' : false,
}, async (t) => {
  const dataDir = zebuDataDir(t);
  const root = path.dirname(dataDir);
  const work = path.join(root, 'work');
  fs.mkdirSync(work);
  // A small file system for the target: a full disk on demand.
  const targetDir = fs.mkdtempSync(path.join(os.tmpdir(), 'zebu-target-'));
  mustRun('mount', ['-t', 'tmpfs', '-o', 'size=24m', 'zebu-test-target', targetDir]);
  t.after(() => {
    run('umount', ['-l', targetDir]);
    fs.rmSync(targetDir, { recursive: true, force: true });
  });

  let up = await startZebuUp({ dataDir });
  t.after(() => stopZebuUp(up));
  mustZebu(up, ['setting', 'set', 'backup-concurrency', '1']);
  mustZebu(up, ['backup-target', 'set', `file://${targetDir}`]);
  mustZebu(up, ['volume', 'create', 'v', '--size', '512MiB', '--replicas', '3']);
  const uri = mustZebu(up, ['volume', 'attach', 'v']).trim();
  writeAt(work, uri, 0, crypto.randomBytes(320 * MiB));
  let expected = readVolume(work, uri);

  // 1. The target fills up.
  const full = zebu(up, ['backup', 'create', 'v', '--json']);
  assert.equal(full.status, 1);
  const failed = JSON.parse(full.stdout) as Backup;
  assert.equal(failed.state, 'error');
  assert.match(failed.message ?? '', /ENOSPC|no space/i);
  assert.equal(fs.existsSync(path.join(targetDir, `volumes/v/backups/${failed.name}.json`)), false, 'no completed manifest');
  mustRun('mount', ['-o', 'remount,size=1g', targetDir]);
  mustZebu(up, ['backup', 'delete', failed.name]);

  // 2. The engine SIGKILLed mid-backup: retried, completed.
  const b1 = (await api<Backup>(up, '/v1/backups', 'POST', { volume: 'v' })).name;
  await waitFor('backup 1 under way', async () => (await api<Backup>(up, `/v1/backups/${b1}`)).doneBytes > 0, 60_000, 50);
  killRole(dataDir, 'engine', 'v');
  let done = await waitBackup(up, b1);
  assert.equal(done.state, 'completed', JSON.stringify(done));
  verifyTarget(up);

  // 3. A replica SIGKILLed mid-backup: the other replicas serve the reads.
  await waitFor('volume v healthy again', () => mustZebuJson(up, ['volume', 'get', 'v']).robustness === 'healthy', 120_000);
  writeAt(work, uri, 400 * MiB, crypto.randomBytes(48 * MiB));
  expected = readVolume(work, uri);
  const b2 = (await api<Backup>(up, '/v1/backups', 'POST', { volume: 'v' })).name;
  await waitFor('backup 2 under way', async () => (await api<Backup>(up, `/v1/backups/${b2}`)).doneBytes > 0, 60_000, 50);
  killRole(dataDir, 'replica', 'v');
  done = await waitBackup(up, b2);
  assert.equal(done.state, 'completed', JSON.stringify(done));
  verifyTarget(up);

  // 4. zebu up SIGKILLed mid-backup: the next zebu up resumes it.
  await waitFor('volume v healthy again', () => mustZebuJson(up, ['volume', 'get', 'v']).robustness === 'healthy', 120_000);
  writeAt(work, uri, 100 * MiB, crypto.randomBytes(64 * MiB));
  const expected3 = readVolume(work, uri);
  const b3 = (await api<Backup>(up, '/v1/backups', 'POST', { volume: 'v', labels: { round: 'zebu-up-killed' } })).name;
  await waitFor('backup 3 under way', async () => (await api<Backup>(up, `/v1/backups/${b3}`)).doneBytes > 0, 60_000, 50);
  up.child.kill('SIGKILL');
  await up.exited;
  up = await startZebuUp({ dataDir });
  done = await waitBackup(up, b3);
  assert.equal(done.state, 'completed', JSON.stringify(done));
  verifyTarget(up);

  // 5. A restore with its engine SIGKILLed midway, then 6. one with zebu up SIGKILLed midway.
  const restoreUnder = async (backup: string, to: string, fault: 'engine' | 'replica' | 'zebu-up'): Promise<void> => {
    await api(up, `/v1/backups/${backup}/restore`, 'POST', { name: to, numberOfReplicas: 2 });
    await waitFor(`restore into ${to} under way`, async () => ((await api<Volume>(up, `/v1/volumes/${to}`)).restore?.doneBytes ?? 0) > 0, 120_000, 50);
    if (fault === 'engine' || fault === 'replica') killRole(dataDir, fault, to);
    else {
      up.child.kill('SIGKILL');
      await up.exited;
      up = await startZebuUp({ dataDir });
    }
    const v = await waitFor(`restore into ${to} to end`, async () => {
      const x = await api<Volume>(up, `/v1/volumes/${to}`);
      return (x.restore?.state === 'completed' && x.state === 'detached') || x.restore?.state === 'error' ? x : undefined;
    }, 300_000, 250);
    assert.equal(v.restore?.state, 'completed', JSON.stringify(v.restore));
  };
  await restoreUnder(b2, 'r-engine', 'engine');
  await restoreUnder(b2, 'r-replica', 'replica');
  await restoreUnder(b3, 'r-up', 'zebu-up');
  for (const [volume, want] of [['r-engine', expected], ['r-replica', expected], ['r-up', expected3]] as const) {
    const u = mustZebu(up, ['volume', 'attach', volume]).trim();
    assert.ok(readVolume(work, u).equals(want), `volume ${volume} equals the source at its backup`);
    mustZebu(up, ['volume', 'detach', volume]);
  }
  assert.equal(mustZebuJson(up, ['backup', 'list']).every((b: Backup) => b.state === 'completed'), true);
  verifyTarget(up);
});

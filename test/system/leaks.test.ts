/**
 * 20 volumes created, attached, written, detached and deleted (four at a time) leave nothing
 * behind: no process, no open file descriptor in `zebu up`, no replica directory, socket,
 * process record or log file.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { ZEBU_MAIN } from '../support/replica-process.ts';
import { startZebuUp, stopZebuUp, mustZebu, zebuDataDir, waitFor, processesUnder, type ZebuUp } from '../support/zebu-up.ts';

const execFileAsync = promisify(execFile);

async function zebuAsync(up: ZebuUp, args: string[]): Promise<string> {
  const { stdout } = await execFileAsync(process.execPath, [ZEBU_MAIN, ...args], {
    env: { ...process.env, ZEBU_API: up.api, ZEBU_TOKEN: up.token },
    timeout: 300_000,
  });
  return stdout;
}

function listTree(dir: string): string[] {
  const out: string[] = [];
  const walk = (d: string): void => {
    for (const entry of fs.readdirSync(d, { withFileTypes: true })) {
      const full = path.join(d, entry.name);
      out.push(full);
      if (entry.isDirectory()) walk(full);
    }
  };
  if (fs.existsSync(dir)) walk(dir);
  return out.sort();
}

/** What a volume could leave behind. The store, its WAL and the node's own files are not counted. */
function leftovers(dataDir: string): string[] {
  return [
    ...listTree(path.join(dataDir, 'disks')).filter((p) => p.includes(`${path.sep}replicas${path.sep}`)),
    ...listTree(path.join(dataDir, 'run', 'engines')),
    ...listTree(path.join(dataDir, 'procs')).filter((p) => !p.endsWith('frontend.json')),
    ...listTree(path.join(dataDir, 'logs')).filter((p) => !path.basename(p).startsWith('frontend.')),
  ];
}

function openFds(pid: number): string[] {
  const dir = `/proc/${pid}/fd`;
  return fs.readdirSync(dir).map((fd) => {
    try {
      return fs.readlinkSync(path.join(dir, fd));
    } catch {
      return 'gone';
    }
  });
}

test('20 volumes through their whole life leave no process, open file or directory behind', async (t) => {
  const dataDir = zebuDataDir(t);
  const up = await startZebuUp({ dataDir });
  t.after(() => stopZebuUp(up));
  const upPid = up.child.pid!;

  // One round first, so that what the process opens once (lazily) is in the baseline.
  const cycle = async (name: string): Promise<void> => {
    await zebuAsync(up, ['volume', 'create', name, '--size', '64MiB', '--replicas', '3']);
    const uri = (await zebuAsync(up, ['volume', 'attach', name])).trim();
    const { stdout } = await execFileAsync('qemu-io', ['-f', 'raw', '-c', 'write -P 0x3c 0 4M', '-c', 'flush', '-c', 'read -P 0x3c 0 4M', uri], { timeout: 120_000 });
    assert.doesNotMatch(stdout, /verification failed|error/i);
    await zebuAsync(up, ['volume', 'detach', name]);
    await zebuAsync(up, ['volume', 'delete', name]);
  };
  await cycle('warmup');
  await new Promise((r) => setTimeout(r, 1000));
  const baseProcs = processesUnder(dataDir).map((p) => p.pid).sort();
  const baseFds = openFds(upPid);
  const baseFiles = leftovers(dataDir);
  assert.deepEqual(baseFiles, [], 'nothing left by the warm-up volume');

  for (let round = 0; round < 5; round++) {
    await Promise.all([0, 1, 2, 3].map((i) => cycle(`leak-${round}-${i}`)));
  }
  assert.equal(mustZebu(up, ['volume', 'list', '--json']).trim(), '[]');

  await waitFor('the process list back to its baseline', () => JSON.stringify(processesUnder(dataDir).map((p) => p.pid).sort()) === JSON.stringify(baseProcs), 20_000);
  await waitFor(`open files of zebu up back to ${baseFds.length}`, () => openFds(upPid).length <= baseFds.length, 20_000).catch((err) => {
    throw new Error(`${(err as Error).message}\nbefore: ${baseFds.join(', ')}\nafter: ${openFds(upPid).join(', ')}`);
  });
  assert.deepEqual(leftovers(dataDir), [], 'no replica directory, socket, record or log left');
});

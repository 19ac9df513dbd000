/** Starts `zebu replica serve` as a real child process for tests. */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { watchChildStart } from './child-ready.ts';

export const ZEBU_MAIN = fileURLToPath(new URL('../../src/cli/main.ts', import.meta.url));

export interface ReplicaProcess {
  child: ChildProcess;
  port: number;
  ready: Record<string, unknown>;
  stderr: () => string;
  /** Resolves with the exit code (or signal name) once the process has exited. */
  exited: Promise<number | string>;
}

export function writeSecret(dir: string, secret = 'zebu-test-secret-0123456789abcdef'): { file: string; secret: Buffer } {
  const file = path.join(dir, 'secret');
  fs.writeFileSync(file, secret + '\n', { mode: 0o600 });
  return { file, secret: Buffer.from(secret) };
}

export async function startReplica(options: {
  dir: string;
  sizeBytes: number;
  secretFile: string;
  port?: number;
  extraArgs?: string[];
}): Promise<ReplicaProcess> {
  const args = [
    ZEBU_MAIN, 'replica', 'serve',
    '--dir', options.dir,
    '--size', String(options.sizeBytes),
    '--listen', `127.0.0.1:${options.port ?? 0}`,
    '--secret-file', options.secretFile,
    ...(options.extraArgs ?? []),
  ];
  const child = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  const start = watchChildStart(child, 'replica', 20_000);
  const { exited, stderr } = start;
  const ready = await start.ready;
  return { child, port: ready.port as number, ready, stderr, exited };
}

/**
 * A replica process in its own temporary directory with `secret`; when the test ends it is
 * SIGKILLed, awaited, and only then is the directory removed.
 */
export async function startTestReplica(
  t: { after: (fn: () => void | Promise<void>) => void },
  options: { sizeBytes: number; secret: Buffer; extraArgs?: string[] },
): Promise<ReplicaProcess & { root: string }> {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'zebu-replica-'));
  const secretFile = path.join(root, 'secret');
  fs.writeFileSync(secretFile, options.secret.toString() + '\n', { mode: 0o600 });
  let proc: ReplicaProcess | null = null;
  t.after(async () => {
    if (proc !== null) {
      if (proc.child.exitCode === null && proc.child.signalCode === null) proc.child.kill('SIGKILL');
      await proc.exited;
    }
    fs.rmSync(root, { recursive: true, force: true, maxRetries: 3 });
  });
  proc = await startReplica({ dir: path.join(root, 'replica'), sizeBytes: options.sizeBytes, secretFile, extraArgs: options.extraArgs });
  return { ...proc, root };
}

/** fio's nbd engine with crc32c verification, run in the background. */
import { spawn, type ChildProcess } from 'node:child_process';

export function fioVerifyArgs(uri: string, options: { sizeMiB: number; seed?: number; blockSizes?: string; iodepth?: number }): string[] {
  return [
    '--name=verify', '--ioengine=nbd', `--uri=${uri}`, '--rw=randwrite', `--bsrange=${options.blockSizes ?? '4k-64k'}`, `--size=${options.sizeMiB}M`,
    `--iodepth=${options.iodepth ?? 8}`, '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--verify_state_save=0', '--output-format=json',
    `--randseed=${options.seed ?? 1}`,
  ];
}

export interface FioRun {
  child: ChildProcess;
  exit: Promise<{ code: number | null; stdout: string; stderr: string }>;
}

/** fio in the background; `netns`: inside that network namespace (a node of a multi-node test). */
export function startFio(t: { after: (fn: () => void) => void }, args: string[], netns?: string): FioRun {
  const fio = netns === undefined
    ? spawn('fio', args, { stdio: ['ignore', 'pipe', 'pipe'] })
    : spawn('ip', ['netns', 'exec', netns, 'fio', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  fio.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  fio.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  t.after(() => fio.kill('SIGKILL'));
  return { child: fio, exit: new Promise((resolve) => fio.once('exit', (code) => resolve({ code, stdout, stderr }))) };
}

export function fioFigures(stdout: string): { error: number; writeBytes: number; readBytes: number } {
  const job = JSON.parse(stdout.slice(stdout.indexOf('{'))).jobs[0];
  return { error: job.error, writeBytes: job.write.io_bytes, readBytes: job.read.io_bytes };
}

/** Real processes for end-to-end tests: N replica processes and one `zebu volume serve`. */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import net from 'node:net';
import path from 'node:path';
import readline from 'node:readline';
import { DataClient } from '../../src/protocol/client.ts';
import { controlRequest } from '../../src/protocol/control-channel.ts';
import { startReplica, writeSecret, ZEBU_MAIN, type ReplicaProcess } from './replica-process.ts';

export interface VolumeCluster {
  name: string;
  sizeBytes: number;
  nbd: string;
  nbdUnix: string;
  nbdSocket: string;
  controlSocket: string;
  /** The frontend's control socket (its export, with the engine link's state and counters). */
  frontendControlSocket: string;
  replicas: ReplicaProcess[];
  replicaDirs: string[];
  volume: ChildProcess;
  volumeExited: Promise<number | string>;
  secret: Buffer;
  /** The first engine's epoch; every restarted engine gets the next one (currentEpoch()). */
  epoch: number;
  /** The epoch of the engine serving now. */
  currentEpoch(): Promise<number>;
  /** The tail of the supervisor's stderr (its children's logs included). */
  stderr(): string;
  stop(): Promise<void>;
}

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const port = (srv.address() as net.AddressInfo).port;
      srv.close(() => resolve(port));
    });
  });
}

export async function startVolume(t: { after: (fn: () => unknown) => void }, options: { dir: string; replicas: number; sizeBytes: number; name?: string; epoch?: number; extraArgs?: string[]; replicaArgs?: (index: number) => string[] }): Promise<VolumeCluster> {
  const name = options.name ?? 'vol';
  const epoch = options.epoch ?? 1;
  const { file: secretFile, secret } = writeSecret(options.dir);
  const replicas: ReplicaProcess[] = [];
  const replicaDirs: string[] = [];
  for (let i = 0; i < options.replicas; i++) {
    const dir = path.join(options.dir, `replica-${i}`);
    replicaDirs.push(dir);
    const r = await startReplica({ dir, sizeBytes: options.sizeBytes, secretFile, extraArgs: options.replicaArgs?.(i) });
    replicas.push(r);
    t.after(() => r.child.kill('SIGKILL'));
  }
  const port = await freePort();
  const nbdSocket = path.join(options.dir, 'nbd.sock');
  const volume = spawn(
    process.execPath,
    [
      ZEBU_MAIN, 'volume', 'serve', '--name', name, '--size', String(options.sizeBytes),
      ...replicas.flatMap((r) => ['--replica', `127.0.0.1:${r.port}`]),
      '--nbd', `127.0.0.1:${port}`, '--nbd-socket', nbdSocket, '--secret-file', secretFile, '--epoch', String(epoch),
      '--run-dir', path.join(options.dir, 'run'), '--request-timeout-ms', '3000', ...(options.extraArgs ?? []),
    ],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let stderr = '';
  // Kept for a look after a failure (ZEBU_FAULT_KEEP=1): the whole run's log, not just its end.
  const keepChars = process.env.ZEBU_FAULT_KEEP === '1' ? 64_000_000 : 100_000;
  volume.stderr!.on('data', (d: Buffer) => {
    stderr += d.toString();
    if (stderr.length > 2 * keepChars) stderr = stderr.slice(-keepChars);
  });
  const volumeExited = new Promise<number | string>((resolve) => volume.once('exit', (code, signal) => resolve(code ?? signal ?? -1)));
  t.after(() => {
    volume.kill('SIGKILL');
    // Children of the supervisor die with their process group only if asked: find them by socket dir.
    spawnSync('pkill', ['-9', '-f', path.join(options.dir, 'run')]);
  });
  const ready = await new Promise<Record<string, unknown>>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`volume not ready in 30 s: ${stderr}`)), 30_000);
    readline.createInterface({ input: volume.stdout! }).on('line', (line) => {
      try {
        const msg = JSON.parse(line);
        if (msg.ready === true) {
          clearTimeout(timer);
          resolve(msg);
        }
      } catch {
        // ignore
      }
    });
    void volumeExited.then((code) => reject(new Error(`volume exited ${code}: ${stderr}`)));
  });
  return {
    name,
    sizeBytes: options.sizeBytes,
    nbd: ready.nbd as string,
    nbdUnix: ready.nbdUnix as string,
    nbdSocket,
    controlSocket: ready.controlSocket as string,
    frontendControlSocket: ready.frontendControlSocket as string,
    replicas,
    replicaDirs,
    volume,
    volumeExited,
    secret,
    epoch,
    async currentEpoch() {
      const info = (await controlRequest(ready.controlSocket as string, 'GET', '/v1/info')) as { epoch: number };
      return info.epoch;
    },
    stderr: () => stderr.slice(-keepChars),
    async stop() {
      volume.kill('SIGTERM');
      await volumeExited;
      for (const r of replicas) {
        if (r.child.exitCode === null && r.child.signalCode === null) r.child.kill('SIGTERM');
        await r.exited;
      }
    },
  };
}

/** SHA-256 of a replica's whole volume content (or of one snapshot), read through its protocol. */
export async function replicaDigest(port: number, secret: Buffer, epoch: number, sizeBytes: number, snapshot?: string): Promise<string> {
  const client = await DataClient.connect({ port, secret, epoch, requestTimeoutMs: 30_000 });
  try {
    const hash = crypto.createHash('sha256');
    const chunk = 4 * 1024 * 1024;
    for (let off = 0; off < sizeBytes; off += chunk) {
      const len = Math.min(chunk, sizeBytes - off);
      hash.update(snapshot === undefined ? await client.read(off, len) : await client.readSnapshot(snapshot, off, len));
    }
    return hash.digest('hex');
  } finally {
    client.close();
  }
}

/** Runs a command; returns stdout, throws with stderr on failure. */
export function run(cmd: string, args: string[], options: { timeoutMs?: number; input?: Buffer } = {}): { stdout: string; stderr: string; status: number | null } {
  const r = spawnSync(cmd, args, { timeout: options.timeoutMs ?? 120_000, input: options.input, maxBuffer: 64 * 1024 * 1024 });
  return { stdout: r.stdout?.toString() ?? '', stderr: r.stderr?.toString() ?? '', status: r.status };
}

export function mustRun(cmd: string, args: string[], options: { timeoutMs?: number } = {}): string {
  const r = run(cmd, args, options);
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.status}:\n${r.stdout}\n${r.stderr}`);
  return r.stdout;
}

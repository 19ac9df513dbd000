/** `zebu engine serve` over real replica processes, for the engine tests. */
import { spawn, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import path from 'node:path';
import { controlRequest } from '../../src/protocol/control-channel.ts';
import { DataClient } from '../../src/protocol/client.ts';
import { startReplica, ZEBU_MAIN, type ReplicaProcess } from '../support/replica-process.ts';
import { watchChildStart } from '../support/child-ready.ts';
import type { RecoveryReport, VerifyReport } from '../../src/engine/recovery.ts';

export type After = { after: (fn: () => unknown) => void };

export interface EngineProcess {
  child: ChildProcess;
  ready: Record<string, unknown>;
  exited: Promise<number | string>;
  socket: string;
  control: string;
  stderr: () => string;
}

export interface ReplicaRow {
  address: string;
  key: string;
  mode: 'RW' | 'WO' | 'ERR';
  reason: string | null;
  rebuild: { copiedBytes: number; totalBytes: number; delta: boolean } | null;
}

export interface EngineInfo {
  phase: 'starting' | 'serving';
  waitingForReplicas: string[];
  sizeBytes: number;
  epoch: number;
  faulted: boolean;
  faultedReason: string | null;
  superseded: boolean;
  activeRegions: number;
  maxActiveRegions: number;
  recovery: RecoveryReport | null;
  lastVerify: VerifyReport | null;
  lastRebuild: { replica: string; delta: boolean; copiedBytes: number; totalBytes: number; error: string | null } | null;
  /** The rebuild leases held now. */
  rebuildLeases: { id: number; start: number; end: number; recalled: boolean }[];
  rebuilding: boolean;
  replicas: ReplicaRow[];
  stats: Record<string, number>;
}

/** Spawns `zebu engine serve`; `ready` resolves with its ready line (after its start-up). */
export function spawnEngine(
  dir: string,
  options: { sizeBytes: number; replicas: string[]; epoch: number; secretFile: string; maxActiveRegions?: number; replicaWaitMs?: number; replicaOut?: string[] },
): { child: ChildProcess; ready: Promise<Record<string, unknown>>; exited: Promise<number | string>; socket: string; control: string; stderr: () => string } {
  const socket = path.join(dir, `engine-${options.epoch}.sock`);
  const control = path.join(dir, `control-${options.epoch}.sock`);
  const args = [
    ZEBU_MAIN, 'engine', 'serve', '--name', 'vol', '--size', String(options.sizeBytes), ...options.replicas.flatMap((r) => ['--replica', r]),
    '--socket', socket, '--control-socket', control, '--secret-file', options.secretFile, '--epoch', String(options.epoch),
    '--request-timeout-ms', '3000',
    ...(options.maxActiveRegions !== undefined ? ['--max-active-regions', String(options.maxActiveRegions)] : []),
    ...(options.replicaWaitMs !== undefined ? ['--replica-wait-ms', String(options.replicaWaitMs)] : []),
    ...(options.replicaOut ?? []).flatMap((key) => ['--replica-out', key]),
  ];
  const child = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  const start = watchChildStart(child, 'engine', 30_000);
  return { child, ready: start.ready, exited: start.exited, socket, control, stderr: start.stderr };
}

export async function startEngine(
  t: After,
  dir: string,
  options: { sizeBytes: number; replicas: string[]; epoch: number; secretFile: string; maxActiveRegions?: number; replicaWaitMs?: number; replicaOut?: string[] },
): Promise<EngineProcess> {
  const engine = spawnEngine(dir, options);
  t.after(() => engine.child.kill('SIGKILL'));
  const ready = await engine.ready;
  return { child: engine.child, ready, exited: engine.exited, socket: engine.socket, control: engine.control, stderr: engine.stderr };
}

export function engineInfo(control: string): Promise<EngineInfo> {
  return controlRequest(control, 'GET', '/v1/info') as Promise<EngineInfo>;
}

export function verify(control: string, repair = false): Promise<VerifyReport> {
  return controlRequest(control, 'POST', '/v1/verify', { repair }, { timeoutMs: 600_000 }) as Promise<VerifyReport>;
}

export function engineClient(engine: EngineProcess, secret: Buffer): Promise<DataClient> {
  return DataClient.connect({ path: engine.socket, secret, peerLabel: 'engine', requestTimeoutMs: 60_000 });
}

export async function startReplicas(t: After, dir: string, count: number, sizeBytes: number, secretFile: string): Promise<ReplicaProcess[]> {
  const replicas: ReplicaProcess[] = [];
  for (let i = 0; i < count; i++) replicas.push(await restartReplica(t, dir, i, sizeBytes, secretFile));
  return replicas;
}

/** Starts replica `i` in dir/replica-i (on `port` when given: a replica coming back). */
export async function restartReplica(t: After, dir: string, i: number, sizeBytes: number, secretFile: string, port?: number): Promise<ReplicaProcess> {
  const r = await startReplica({ dir: path.join(dir, `replica-${i}`), sizeBytes, secretFile, port });
  t.after(() => r.child.kill('SIGKILL'));
  return r;
}

/** SHA-256 of each 4 MiB region of a replica's live volume, read through its protocol. */
export async function regionDigests(port: number, secret: Buffer, epoch: number, sizeBytes: number): Promise<string[]> {
  const client = await DataClient.connect({ port, secret, epoch, requestTimeoutMs: 30_000 });
  try {
    const out: string[] = [];
    for (let off = 0; off < sizeBytes; off += 4 << 20) {
      out.push(crypto.createHash('sha256').update(await client.read(off, Math.min(4 << 20, sizeBytes - off))).digest('hex'));
    }
    return out;
  } finally {
    client.close();
  }
}

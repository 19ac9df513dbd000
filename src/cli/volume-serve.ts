/**
 * `zebu volume serve`: starts and supervises one volume's engine and frontend processes.
 * Prints one JSON line with "ready":true and the NBD URI; restarts a crashed child with capped
 * backoff (the frontend holds and re-issues requests while the engine is away); on SIGTERM
 * stops the frontend (draining its clients), then the engine (flushing the replicas).
 *
 * - Every engine process gets a new epoch (--epoch is the first one): the replicas then fence
 *   whatever a killed engine still had on the wire.
 * - The NBD listening sockets are bound here and handed to each frontend process
 *   (kept-listener.ts): while a frontend restarts, new connections wait instead of being refused.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import pino from 'pino';
import { ZebuError, ErrorCode, invalid } from '../errors.ts';
import { readSecretFile } from '../protocol/auth.ts';
import { parseBytes, parseHostPort, parseNonNegativeInt, parsePositiveInt } from './units.ts';
import { dataPathMain, DATA_PATH_NODE_FLAGS } from '../os/js-build.ts';
import { keepTcpListener, keepUnixListener, type KeptListener } from '../frontend/kept-listener.ts';

/**
 * Restart backoff: 100 ms, doubling per failed start in a row (reset once ready), at most 1 s.
 * Short on purpose: while the engine or frontend is down, clients wait; a start that keeps
 * failing costs one attempt a second.
 */
const RESTART_BACKOFF_MS_MAX = 1000;

export interface VolumeServeArgs {
  name: string;
  size: string;
  replica: string[];
  nbd?: string;
  nbdSocket?: string;
  secretFile: string;
  epoch: string;
  runDir?: string;
  requestTimeoutMs?: string;
  maxActiveRegions?: string;
  replicaWaitMs?: string;
  leaseRecallTimeoutMs?: string;
  maxRegionRetries?: string;
  copyChunkBytes?: string;
  rebuildMaxMibPerSecond?: string;
  /** commander's --no-copy-pull. */
  copyPull?: boolean;
  /** commander's --no-copier-process. */
  copierProcess?: boolean;
  holdTimeoutMs?: string;
  hangTimeoutMs?: string;
  stallTimeoutMs?: string;
}

interface Child {
  role: 'engine' | 'frontend';
  /** The arguments of its next start (an engine's change: a new epoch each time). */
  args: () => string[];
  /** Descriptors handed to it as fd 3, 4, ... */
  fds: number[];
  /** Killed (and started again) when not ready this long after a start: hung in its start-up. */
  readyTimeoutMs: number;
  proc: ChildProcess | null;
  ready: Record<string, unknown> | null;
  /** Failed starts in a row (reset once it is ready): the backoff before the next start grows with them. */
  restarts: number;
}

const VOLUME_NAME = /^[a-z0-9][a-z0-9._-]{0,62}$/;

export async function volumeServe(args: VolumeServeArgs): Promise<void> {
  const log = pino({ name: 'zebu-volume', base: { pid: process.pid, volume: args.name } }, pino.destination(2));
  if (!VOLUME_NAME.test(args.name)) throw new ZebuError(ErrorCode.EINVAL, `volume name must be 1-63 of [a-z0-9._-] starting with a letter or digit, got ${JSON.stringify(args.name)}`);
  parseBytes(args.size);
  parsePositiveInt(args.epoch, '--epoch');
  // Checked here as the engine checks it: a bad value must not surface as "engine exited before it was ready".
  if (args.maxActiveRegions !== undefined && parsePositiveInt(args.maxActiveRegions, '--max-active-regions') < 1) {
    throw invalid(`--max-active-regions must be at least 1, got ${JSON.stringify(args.maxActiveRegions)}`);
  }
  if (args.leaseRecallTimeoutMs !== undefined) parseNonNegativeInt(args.leaseRecallTimeoutMs, '--lease-recall-timeout-ms');
  if (args.maxRegionRetries !== undefined) parseNonNegativeInt(args.maxRegionRetries, '--max-region-retries');
  if (args.rebuildMaxMibPerSecond !== undefined) parseNonNegativeInt(args.rebuildMaxMibPerSecond, '--rebuild-max-mib-per-second');
  if (args.copyChunkBytes !== undefined) {
    const chunk = parseBytes(args.copyChunkBytes);
    if (chunk < 4096 || chunk % 4096 !== 0 || chunk > 4 * 1024 * 1024) throw invalid(`--copy-chunk-bytes must be a multiple of 4KiB between 4KiB and 4MiB, got ${JSON.stringify(args.copyChunkBytes)}`);
  }
  readSecretFile(args.secretFile);
  if (args.replica.length === 0) throw new ZebuError(ErrorCode.EINVAL, 'give at least one --replica HOST:PORT');
  if (args.nbd === undefined && args.nbdSocket === undefined) throw new ZebuError(ErrorCode.EINVAL, 'give --nbd HOST:PORT and/or --nbd-socket PATH');

  // UNIX socket paths are limited to 107 bytes: keep the run directory short.
  const runDir = args.runDir ?? fs.mkdtempSync(path.join(os.tmpdir(), `zv-${args.name.slice(0, 16)}-`));
  fs.mkdirSync(runDir, { recursive: true, mode: 0o700 });
  const engineSocket = path.join(runDir, 'engine.sock');
  const controlSocket = path.join(runDir, 'control.sock');

  const firstEpoch = parsePositiveInt(args.epoch, '--epoch');
  let engineStarts = 0;
  const engine: Child = {
    role: 'engine',
    args: () => [
      'engine', 'serve', '--name', args.name, '--size', args.size, '--socket', engineSocket, '--control-socket', controlSocket,
      '--secret-file', args.secretFile, '--epoch', String(firstEpoch + engineStarts++),
      ...args.replica.flatMap((r) => ['--replica', r]),
      ...(args.requestTimeoutMs !== undefined ? ['--request-timeout-ms', args.requestTimeoutMs] : []),
      ...(args.maxActiveRegions !== undefined ? ['--max-active-regions', args.maxActiveRegions] : []),
      ...(args.replicaWaitMs !== undefined ? ['--replica-wait-ms', args.replicaWaitMs] : []),
      ...(args.leaseRecallTimeoutMs !== undefined ? ['--lease-recall-timeout-ms', args.leaseRecallTimeoutMs] : []),
      ...(args.maxRegionRetries !== undefined ? ['--max-region-retries', args.maxRegionRetries] : []),
      ...(args.copyChunkBytes !== undefined ? ['--copy-chunk-bytes', args.copyChunkBytes] : []),
      ...(args.rebuildMaxMibPerSecond !== undefined ? ['--rebuild-max-mib-per-second', args.rebuildMaxMibPerSecond] : []),
      ...(args.copyPull === false ? ['--no-copy-pull'] : []),
      ...(args.copierProcess === false ? ['--no-copier-process'] : []),
    ],
    // Its start-up may wait for replicas (--replica-wait-ms) and then resync regions.
    fds: [], readyTimeoutMs: (args.replicaWaitMs !== undefined ? parsePositiveInt(args.replicaWaitMs, '--replica-wait-ms') : 30_000) + 120_000,
    proc: null, ready: null, restarts: 0,
  };
  // Bound here, once: every frontend process listens on the same sockets.
  const listeners: KeptListener[] = [];
  const frontendControlSocket = path.join(runDir, 'frontend.sock');
  const frontendArgs = [
    'frontend', 'serve', '--name', args.name, '--engine-socket', engineSocket, '--secret-file', args.secretFile,
    '--state-file', path.join(runDir, 'frontend.state'), '--control-socket', frontendControlSocket,
  ];
  for (const [flag, value] of [['--hold-timeout-ms', args.holdTimeoutMs], ['--hang-timeout-ms', args.hangTimeoutMs], ['--stall-timeout-ms', args.stallTimeoutMs]] as const) {
    if (value !== undefined) frontendArgs.push(flag, String(parsePositiveInt(value, flag)));
  }
  try {
    if (args.nbd !== undefined) {
      const { host, port } = parseHostPort(args.nbd);
      const tcp = keepTcpListener(host, port);
      listeners.push(tcp);
      frontendArgs.push('--nbd-fd', String(2 + listeners.length));
    }
    if (args.nbdSocket !== undefined) {
      const unix = keepUnixListener(args.nbdSocket);
      listeners.push(unix);
      frontendArgs.push('--nbd-socket', args.nbdSocket, '--nbd-socket-fd', String(2 + listeners.length));
    }
  } catch (err) {
    for (const l of listeners) l.close();
    throw err;
  }
  const frontend: Child = {
    role: 'frontend',
    args: () => frontendArgs,
    fds: listeners.map((l) => l.fd),
    readyTimeoutMs: 60_000,
    proc: null, ready: null, restarts: 0,
  };
  let stopping = false;
  const { main } = dataPathMain();

  const start = (child: Child): Promise<Record<string, unknown>> =>
    new Promise((resolve, reject) => {
      const proc = spawn(process.execPath, [...DATA_PATH_NODE_FLAGS, main, ...child.args()], { stdio: ['ignore', 'pipe', 'inherit', ...child.fds] });
      child.proc = proc;
      let settled = false;
      const readyTimer = setTimeout(() => {
        if (settled) return;
        log.error({ role: child.role, pid: proc.pid, readyTimeoutMs: child.readyTimeoutMs }, 'not ready in time: killing it');
        proc.kill('SIGKILL');
      }, child.readyTimeoutMs);
      readline.createInterface({ input: proc.stdout! }).on('line', (line) => {
        try {
          const msg = JSON.parse(line) as Record<string, unknown>;
          if (msg.ready === true && !settled) {
            settled = true;
            clearTimeout(readyTimer);
            child.ready = msg;
            // It came up and served: a crash from now on is not a crash loop at start-up.
            child.restarts = 0;
            resolve(msg);
          }
        } catch {
          // not a status line
        }
      });
      proc.once('exit', (code, signal) => {
        child.proc = null;
        clearTimeout(readyTimer);
        if (!settled) {
          settled = true;
          reject(new ZebuError(ErrorCode.EIO, `${child.role} exited (${code ?? signal}) before it was ready`));
          return;
        }
        if (stopping) return;
        scheduleRestart(child, { code, signal });
      });
    });

  /**
   * Starts a child again after a backoff; a restart that fails before the child is ready (killed
   * again during its start-up, say) is retried the same way: the volume must come back.
   */
  const scheduleRestart = (child: Child, why: Record<string, unknown>): void => {
    child.restarts++;
    const delayMs = Math.min(RESTART_BACKOFF_MS_MAX, 50 * 2 ** Math.min(child.restarts, 6));
    log.warn({ role: child.role, ...why, restarts: child.restarts, delayMs }, 'child exited; restarting');
    setTimeout(() => {
      if (stopping) return;
      start(child).catch((err) => {
        log.error({ role: child.role, err: (err as Error).message }, 'restart failed');
        if (!stopping) scheduleRestart(child, { failed: (err as Error).message });
      });
    }, delayMs);
  };

  const stopChild = async (child: Child): Promise<void> => {
    const proc = child.proc;
    if (proc === null) return;
    const exited = new Promise((r) => proc.once('exit', r));
    proc.kill('SIGTERM');
    const timer = setTimeout(() => proc.kill('SIGKILL'), 30_000);
    await exited;
    clearTimeout(timer);
  };

  const stop = async (signal: string): Promise<void> => {
    if (stopping) return;
    stopping = true;
    log.info({ signal }, 'stopping');
    await stopChild(frontend);
    await stopChild(engine);
    for (const l of listeners) l.close();
    if (args.runDir === undefined) fs.rmSync(runDir, { recursive: true, force: true });
    log.info('stopped');
    log.flush();
    process.exit(0);
  };
  process.on('SIGTERM', () => void stop('SIGTERM'));
  process.on('SIGINT', () => void stop('SIGINT'));

  try {
    const engineReady = await start(engine);
    const frontendReady = await start(frontend);
    process.stdout.write(
      JSON.stringify({
        ready: true,
        name: args.name,
        nbd: frontendReady.nbd,
        nbdUnix: frontendReady.nbdUnix,
        controlSocket,
        frontendControlSocket,
        replicas: engineReady.replicas,
        enginePid: engine.proc?.pid,
        frontendPid: frontend.proc?.pid,
        pid: process.pid,
      }) + '\n',
    );
  } catch (err) {
    stopping = true;
    await stopChild(frontend);
    await stopChild(engine);
    for (const l of listeners) l.close();
    throw err;
  }
}

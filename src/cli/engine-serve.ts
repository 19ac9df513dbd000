/** `zebu engine serve`: the volume's engine process (replication over N replicas). */
import pino from 'pino';
import { ZebuError, ErrorCode } from '../errors.ts';
import { Engine } from '../engine/engine.ts';
import { RemoteCopier, forkCopier } from '../engine/copier-process.ts';
import { EngineControlServer } from '../engine/control-server.ts';
import { DataServer } from '../protocol/server.ts';
import { readSecretFile } from '../protocol/auth.ts';
import { parseBytes, parseNonNegativeInt, parsePositiveInt } from './units.ts';
import { selfIdentity } from '../os/process-identity.ts';
import { releaseMemoryAfterLoad } from '../os/memory-release.ts';
import { ioBuffers } from '../protocol/buffer-pool.ts';

export interface EngineServeArgs {
  name: string;
  size: string;
  replica: string[];
  socket: string;
  controlSocket: string;
  secretFile: string;
  epoch: string;
  requestTimeoutMs?: string;
  maxActiveRegions?: string;
  replicaWaitMs?: string;
  leaseRecallTimeoutMs?: string;
  maxRegionRetries?: string;
  copyChunkBytes?: string;
  snapshotCopyFlushMs?: string;
  rebuildMaxMibPerSecond?: string;
  /** commander's --no-copy-pull: false means the rebuild's data passes through the engine. */
  copyPull?: boolean;
  /** commander's --no-copier-process: false means the rebuild's copy loop runs in the engine. */
  copierProcess?: boolean;
  /** Keys of replicas known to be out: start-up does not wait for them. */
  replicaOut?: string[];
}

export async function engineServe(args: EngineServeArgs): Promise<void> {
  const log = pino({ name: 'zebu-engine', base: { pid: process.pid, volume: args.name } }, pino.destination(2));
  const secret = readSecretFile(args.secretFile);
  const requestTimeoutMs = args.requestTimeoutMs !== undefined ? parsePositiveInt(args.requestTimeoutMs, '--request-timeout-ms') : undefined;
  const engine = Engine.create({
    name: args.name,
    sizeBytes: parseBytes(args.size),
    replicas: args.replica,
    secret,
    epoch: parsePositiveInt(args.epoch, '--epoch'),
    requestTimeoutMs,
    maxActiveRegions: args.maxActiveRegions !== undefined ? parsePositiveInt(args.maxActiveRegions, '--max-active-regions') : undefined,
    replicaWaitMs: args.replicaWaitMs !== undefined ? parseNonNegativeInt(args.replicaWaitMs, '--replica-wait-ms') : undefined,
    leaseRecallTimeoutMs: args.leaseRecallTimeoutMs !== undefined ? parseNonNegativeInt(args.leaseRecallTimeoutMs, '--lease-recall-timeout-ms') : undefined,
    maxRegionRetries: args.maxRegionRetries !== undefined ? parseNonNegativeInt(args.maxRegionRetries, '--max-region-retries') : undefined,
    copyChunkBytes: args.copyChunkBytes !== undefined ? parseBytes(args.copyChunkBytes) : undefined,
    copyPull: args.copyPull,
    snapshotCopyFlushMs: args.snapshotCopyFlushMs !== undefined ? parseNonNegativeInt(args.snapshotCopyFlushMs, '--snapshot-copy-flush-ms') : undefined,
    rebuildMaxBytesPerSecond: args.rebuildMaxMibPerSecond !== undefined ? parseNonNegativeInt(args.rebuildMaxMibPerSecond, '--rebuild-max-mib-per-second') * 1024 * 1024 : undefined,
    copier: args.copierProcess === false ? null : new RemoteCopier({ start: forkCopier(['--volume', args.name, '--engine-control-socket', args.controlSocket]), secret, requestTimeoutMs, log: (event) => log.info(event, String(event.event)) }),
    outReplicas: args.replicaOut,
    log: (event) => log.info(event, String(event.event)),
  });
  // The control socket answers during start-up (info; the agent hands over replica addresses).
  const control = new EngineControlServer(engine);
  try {
    await control.listen(args.controlSocket);
  } catch (err) {
    throw new ZebuError(ErrorCode.EINVAL, `cannot listen on ${args.controlSocket}: ${(err as Error).message}`);
  }
  let stopping = false;
  const stopDuringStartUp = (signal: string): void => {
    // Nothing served yet: the replicas keep what they have; the next engine recovers as usual.
    log.info({ signal }, 'stopping during start-up');
    stopping = true;
    control.close();
    void engine.close().finally(() => {
      log.flush();
      process.exit(0);
    });
  };
  process.once('SIGTERM', stopDuringStartUp);
  process.once('SIGINT', stopDuringStartUp);
  try {
    await engine.startUp();
  } catch (err) {
    if (stopping) return; // stopDuringStartUp exits
    throw err;
  }
  process.off('SIGTERM', stopDuringStartUp);
  process.off('SIGINT', stopDuringStartUp);
  if (stopping) return;
  // Its identity lets the frontend kill this process should it hang (see frontend/engine-link.ts).
  // Large write payloads are reused once the replicas' connections let go of them (Engine.writeLent).
  const data = new DataServer(engine, { secret, identity: { process: selfIdentity() }, lendsWritePayloads: true, log: (event) => log.warn(event, String(event.event)) });
  try {
    await data.listenPath(args.socket);
  } catch (err) {
    await engine.close();
    throw new ZebuError(ErrorCode.EINVAL, `cannot listen: ${(err as Error).message}`);
  }
  process.stdout.write(JSON.stringify({ ready: true, socket: args.socket, controlSocket: args.controlSocket, replicas: engine.replicaStatus(), recovery: (engine.info() as { recovery: unknown }).recovery, pid: process.pid }) + '\n');
  releaseMemoryAfterLoad({ emptyCaches: () => ioBuffers.clear() });

  const stop = async (signal: string): Promise<void> => {
    if (stopping) return;
    stopping = true;
    log.info({ signal }, 'stopping');
    await data.close();
    control.close();
    await engine.close();
    log.info('stopped');
    log.flush();
    process.exit(0);
  };
  process.on('SIGTERM', () => void stop('SIGTERM'));
  process.on('SIGINT', () => void stop('SIGINT'));
}

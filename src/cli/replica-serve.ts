/**
 * `zebu replica serve`: one replica process. Creates the replica when DIR is empty, opens it
 * otherwise, serves it, prints one JSON line with "ready":true once listening, and on SIGTERM
 * drains, flushes, marks the replica clean and exits 0.
 */
import fs from 'node:fs';
import pino from 'pino';
import { ZebuError, ErrorCode, assert } from '../errors.ts';
import { Replica } from '../replica/replica.ts';
import { DataServer } from '../protocol/server.ts';
import { NodeDisk, type Disk } from '../replica/disk.ts';
import { FaultyDisk } from '../replica/faulty-disk.ts';
import { PowerLossDisk } from '../replica/power-loss-disk.ts';
import { readSecretFile } from '../protocol/auth.ts';
import { MISSED_KEY } from '../protocol/frames.ts';
import { releaseMemoryAfterLoad } from '../os/memory-release.ts';
import { ioBuffers } from '../protocol/buffer-pool.ts';
import { parseBytes, parseHostPort, parsePositiveInt } from './units.ts';

export interface ReplicaServeArgs {
  dir: string;
  size: string;
  listen: string;
  secretFile: string;
  backing?: string;
  maxLayers?: string;
  faultInjection?: boolean;
  /**
   * 'power-loss' (tests only): unsynced writes stay in memory until datasync, and FAULT_INJECT
   * {"powerLoss": {seed, mode}} loses a seeded part of them and kills the process (exit 137).
   */
  diskMode?: string;
  /** false (--no-intent-log): no write-intent log. Benchmark baseline only. */
  intentLog?: boolean;
  /**
   * The replica's name (the manager's), reported in INFO and OPEN: an engine given NAME=HOST:PORT
   * refuses a process at that address that is another replica (a stale address, a reused port).
   */
  name?: string;
}


export async function replicaServe(args: ReplicaServeArgs): Promise<void> {
  const log = pino({ name: 'zebu-replica', base: { pid: process.pid, dir: args.dir } }, pino.destination(2));
  const sizeBytes = parseBytes(args.size);
  const { host, port } = parseHostPort(args.listen);
  const secret = readSecretFile(args.secretFile);
  if (args.name !== undefined && !MISSED_KEY.test(args.name)) throw new ZebuError(ErrorCode.EINVAL, `--name must be 1..200 of [A-Za-z0-9._:@=-], got ${JSON.stringify(args.name)}`);
  const diskMode = args.diskMode ?? 'normal';
  if (diskMode !== 'normal' && diskMode !== 'power-loss') throw new ZebuError(ErrorCode.EINVAL, `--disk-mode must be normal or power-loss, got ${diskMode}`);
  const powerLossDisk = diskMode === 'power-loss' ? new PowerLossDisk(new NodeDisk()) : undefined;
  const baseDisk: Disk = powerLossDisk ?? new NodeDisk();
  const faultDisk = args.faultInjection ? new FaultyDisk(baseDisk) : undefined;
  const disk: Disk = faultDisk ?? baseDisk;
  const intentLog = args.intentLog ?? true;
  if (!intentLog) log.warn('write-intent log disabled (--no-intent-log): benchmark baseline only, unsafe after a crash');

  const isEmpty = !fs.existsSync(args.dir) || fs.readdirSync(args.dir).filter((f) => !f.startsWith('.')).length === 0;
  let replica: Replica;
  if (isEmpty) {
    replica = await Replica.create(args.dir, {
      sizeBytes,
      disk,
      intentLog,
      backingFile: args.backing,
      maxLayers: args.maxLayers !== undefined ? parsePositiveInt(args.maxLayers, '--max-layers') : undefined,
    });
    log.info({ sizeBytes }, 'replica created');
  } else {
    // A larger --size is an offline volume expansion; a smaller one is refused (never shrink).
    const before = await Replica.expandOnDisk(args.dir, sizeBytes, disk);
    if (before < sizeBytes) log.info({ fromBytes: before, toBytes: sizeBytes }, 'replica expanded');
    replica = await Replica.open(args.dir, { disk, intentLog });
    assert(replica.sizeBytes === sizeBytes, 'replica size after expansion');
    log.info({ info: replica.info() }, 'replica opened');
  }

  const server = new DataServer(replica, {
    secret,
    // A Replica holds no write payload once it answered: large ones are reused (server.ts).
    reusesWritePayloads: true,
    identity: args.name !== undefined ? { name: args.name } : undefined,
    faultDisk,
    powerLoss:
      powerLossDisk === undefined
        ? undefined
        : (seed, mode) => {
            // A power cut: no drain, no flush, no clean mark. 137 = what SIGKILL reports.
            const report = powerLossDisk.powerFail(seed, mode);
            process.stderr.write(JSON.stringify({ event: 'power-loss', seed, mode, ...report }) + '\n');
            process.exit(137);
          },
    log: (event) => log.warn(event, String(event.event)),
  });
  let address;
  try {
    address = await server.listen(host, port);
  } catch (err) {
    await replica.close();
    throw new ZebuError(ErrorCode.EINVAL, `cannot listen on ${args.listen}: ${(err as Error).message}`);
  }
  const info = replica.info();
  process.stdout.write(
    JSON.stringify({
      ready: true,
      listen: `${address.address}:${address.port}`,
      port: address.port,
      dir: args.dir,
      sizeBytes: info.sizeBytes,
      epoch: info.epoch,
      cleanShutdown: info.cleanShutdown,
      pid: process.pid,
    }) + '\n',
  );

  releaseMemoryAfterLoad({ emptyCaches: () => ioBuffers.clear() });

  let stopping = false;
  const stop = async (signal: string): Promise<void> => {
    if (stopping) return;
    stopping = true;
    log.info({ signal }, 'stopping');
    try {
      await server.close();
      await replica.close();
      log.info('stopped cleanly');
      log.flush();
      process.exit(0);
    } catch (err) {
      log.error({ err }, 'clean stop failed');
      log.flush();
      process.exit(1);
    }
  };
  process.on('SIGTERM', () => void stop('SIGTERM'));
  process.on('SIGINT', () => void stop('SIGINT'));
}

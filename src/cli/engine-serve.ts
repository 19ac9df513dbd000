/** `zebu engine serve`: the volume's engine process (replication over N replicas). */
import pino from 'pino';
import { ZebuError, ErrorCode } from '../errors.ts';
import { Engine } from '../engine/engine.ts';
import { EngineControlServer } from '../engine/control-server.ts';
import { DataServer } from '../protocol/server.ts';
import { readSecretFile } from '../protocol/auth.ts';
import { parseBytes, parsePositiveInt } from './units.ts';

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
}

export async function engineServe(args: EngineServeArgs): Promise<void> {
  const log = pino({ name: 'zebu-engine', base: { pid: process.pid, volume: args.name } }, pino.destination(2));
  const secret = readSecretFile(args.secretFile);
  const engine = await Engine.start({
    name: args.name,
    sizeBytes: parseBytes(args.size),
    replicas: args.replica,
    secret,
    epoch: parsePositiveInt(args.epoch, '--epoch'),
    requestTimeoutMs: args.requestTimeoutMs !== undefined ? parsePositiveInt(args.requestTimeoutMs, '--request-timeout-ms') : undefined,
    maxActiveRegions: args.maxActiveRegions !== undefined ? parsePositiveInt(args.maxActiveRegions, '--max-active-regions') : undefined,
    log: (event) => log.info(event, String(event.event)),
  });
  const data = new DataServer(engine, { secret, log: (event) => log.warn(event, String(event.event)) });
  const control = new EngineControlServer(engine);
  try {
    await data.listenPath(args.socket);
    await control.listen(args.controlSocket);
  } catch (err) {
    await engine.close();
    throw new ZebuError(ErrorCode.EINVAL, `cannot listen: ${(err as Error).message}`);
  }
  process.stdout.write(JSON.stringify({ ready: true, socket: args.socket, controlSocket: args.controlSocket, replicas: engine.replicaStatus(), recovery: (engine.info() as { recovery: unknown }).recovery, pid: process.pid }) + '\n');

  let stopping = false;
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

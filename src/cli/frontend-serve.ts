/**
 * `zebu frontend serve`: the node's NBD frontend. One NBD listener serves every volume attached
 * on the node by export name. Exports come from the control socket (the node agent adds and
 * removes them at run time) and/or one static export given on the command line (what
 * `zebu volume serve` uses). The process serves on when whoever started it dies.
 */
import pino from 'pino';
import path from 'node:path';
import { ZebuError, ErrorCode } from '../errors.ts';
import { Frontend } from '../frontend/frontend.ts';
import { FrontendControlServer } from '../frontend/control-server.ts';
import { readSecretFile } from '../protocol/auth.ts';
import { parseHostPort, parsePositiveInt } from './units.ts';
import { releaseMemoryAfterLoad } from '../os/memory-release.ts';
import { ioBuffers } from '../protocol/buffer-pool.ts';

export interface FrontendServeArgs {
  secretFile: string;
  name?: string;
  engineSocket?: string;
  nbd?: string;
  nbdSocket?: string;
  /** An inherited listening TCP socket (kept by the supervisor across frontend restarts). */
  nbdFd?: string;
  /** An inherited listening UNIX socket, bound at --nbd-socket. */
  nbdSocketFd?: string;
  controlSocket?: string;
  holdTimeoutMs?: string;
  hangTimeoutMs?: string;
  stallTimeoutMs?: string;
  /** The export table, kept across restarts (see Frontend.restore). */
  stateFile?: string;
}

function parseFd(text: string, what: string): number {
  const fd = parsePositiveInt(text, what);
  if (fd < 3 || fd > 1023) throw new ZebuError(ErrorCode.EINVAL, `${what} must be an inherited descriptor from 3 to 1023, got ${fd}`);
  return fd;
}

/** The static export's engine may still be starting (its supervisor starts both at once). */
const STATIC_ENGINE_CONNECT_TIMEOUT_MS = 30_000;

export async function frontendServe(args: FrontendServeArgs): Promise<void> {
  const log = pino({ name: 'zebu-frontend', base: { pid: process.pid } }, pino.destination(2));
  if (args.nbd === undefined && args.nbdSocket === undefined && args.nbdFd === undefined) throw new ZebuError(ErrorCode.EINVAL, 'give --nbd HOST:PORT (or --nbd-fd N) and/or --nbd-socket PATH');
  if (args.nbd !== undefined && args.nbdFd !== undefined) throw new ZebuError(ErrorCode.EINVAL, 'give --nbd or --nbd-fd, not both');
  if (args.nbdSocketFd !== undefined && args.nbdSocket === undefined) throw new ZebuError(ErrorCode.EINVAL, '--nbd-socket-fd needs --nbd-socket PATH (where the socket is bound)');
  const nbdFd = args.nbdFd !== undefined ? parseFd(args.nbdFd, '--nbd-fd') : null;
  const nbdSocketFd = args.nbdSocketFd !== undefined ? parseFd(args.nbdSocketFd, '--nbd-socket-fd') : null;
  const linkTimeouts = {
    holdTimeoutMs: args.holdTimeoutMs !== undefined ? parsePositiveInt(args.holdTimeoutMs, '--hold-timeout-ms') : undefined,
    hangTimeoutMs: args.hangTimeoutMs !== undefined ? parsePositiveInt(args.hangTimeoutMs, '--hang-timeout-ms') : undefined,
    stallTimeoutMs: args.stallTimeoutMs !== undefined ? parsePositiveInt(args.stallTimeoutMs, '--stall-timeout-ms') : undefined,
  };
  if ((args.name === undefined) !== (args.engineSocket === undefined)) throw new ZebuError(ErrorCode.EINVAL, 'give --name and --engine-socket together (or neither)');
  if (args.name === undefined && args.controlSocket === undefined) {
    throw new ZebuError(ErrorCode.EINVAL, 'nothing to serve: give --control-socket PATH and/or --name NAME --engine-socket PATH');
  }
  const secret = readSecretFile(args.secretFile);
  // The parent (agent or supervisor) may die and take our stdout/stderr pipes with it: serving
  // must go on. pino stops logging on EPIPE by itself; stdout is only written once, at ready.
  process.stdout.on('error', () => {});
  process.on('SIGHUP', () => log.info('SIGHUP ignored: the frontend outlives its parent'));

  const frontend = new Frontend({ secret, linkTimeouts, stateFile: args.stateFile !== undefined ? path.resolve(args.stateFile) : undefined, log: (event) => log.info(event, String(event.event)) });
  // After a restart: the exports it served, at once (requests wait for their engines).
  frontend.restore();
  releaseMemoryAfterLoad({ emptyCaches: () => ioBuffers.clear() });
  const ready: Record<string, unknown> = { ready: true, pid: process.pid, controlSocket: args.controlSocket ?? null, nbdAddress: null };
  if (args.name !== undefined && args.engineSocket !== undefined) {
    const engineSocket = path.resolve(args.engineSocket);
    const view = await frontend.putExport(args.name, engineSocket, { engineConnectTimeoutMs: STATIC_ENGINE_CONNECT_TIMEOUT_MS });
    ready.name = args.name;
    ready.sizeBytes = view.sizeBytes;
  }
  if (args.nbd !== undefined || nbdFd !== null) {
    let nbdAddress: string;
    if (nbdFd !== null) {
      nbdAddress = await frontend.listenTcpFd(nbdFd);
    } else {
      const { host, port } = parseHostPort(args.nbd!);
      nbdAddress = await frontend.listenTcp(host, port);
    }
    ready.nbdAddress = nbdAddress;
    ready.port = Number(nbdAddress.slice(nbdAddress.lastIndexOf(':') + 1));
    if (args.name !== undefined) ready.nbd = `nbd://${nbdAddress}/${encodeURIComponent(args.name)}`;
  }
  if (args.nbdSocket !== undefined) {
    if (nbdSocketFd !== null) await frontend.listenUnixFd(nbdSocketFd, args.nbdSocket);
    else await frontend.listenUnix(args.nbdSocket);
    ready.nbdSocket = args.nbdSocket;
    if (args.name !== undefined) ready.nbdUnix = `nbd+unix:///${encodeURIComponent(args.name)}?socket=${args.nbdSocket}`;
  }
  const control = args.controlSocket !== undefined ? new FrontendControlServer(frontend) : null;
  if (control !== null) await control.listen(args.controlSocket!);
  process.stdout.write(JSON.stringify(ready) + '\n');

  let stopping = false;
  const stop = async (signal: string): Promise<void> => {
    if (stopping) return;
    stopping = true;
    log.info({ signal }, 'stopping');
    control?.close();
    await frontend.close();
    log.info('stopped');
    log.flush();
    process.exit(0);
  };
  process.on('SIGTERM', () => void stop('SIGTERM'));
  process.on('SIGINT', () => void stop('SIGINT'));
}

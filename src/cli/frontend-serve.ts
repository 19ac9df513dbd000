/** `zebu frontend serve`: the NBD frontend of one volume, joined to its engine by a UNIX socket. */
import pino from 'pino';
import { ZebuError, ErrorCode } from '../errors.ts';
import { EngineLink } from '../frontend/engine-link.ts';
import { NbdServer } from '../frontend/nbd-server.ts';
import { readSecretFile } from '../protocol/auth.ts';
import { parseHostPort } from './units.ts';

export interface FrontendServeArgs {
  name: string;
  engineSocket: string;
  secretFile: string;
  nbd?: string;
  nbdSocket?: string;
}

export async function frontendServe(args: FrontendServeArgs): Promise<void> {
  const log = pino({ name: 'zebu-frontend', base: { pid: process.pid, volume: args.name } }, pino.destination(2));
  if (args.nbd === undefined && args.nbdSocket === undefined) throw new ZebuError(ErrorCode.EINVAL, 'give --nbd HOST:PORT and/or --nbd-socket PATH');
  const secret = readSecretFile(args.secretFile);
  let link: EngineLink | null = null;
  const deadline = Date.now() + 30_000;
  for (;;) {
    try {
      link = await EngineLink.connect({ name: args.name, socketPath: args.engineSocket, secret, log: (e) => log.warn(e, String(e.event)) });
      break;
    } catch (err) {
      if (Date.now() > deadline) throw new ZebuError(ErrorCode.DISCONNECTED, `engine socket ${args.engineSocket}: ${(err as Error).message}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  const exportLink = link;
  const server = new NbdServer({
    registry: { get: (name) => (name === exportLink.name ? exportLink : null), list: () => [exportLink] },
    log: (event) => log.info(event, String(event.event)),
  });
  const ready: Record<string, unknown> = { ready: true, name: args.name, sizeBytes: exportLink.sizeBytes, pid: process.pid };
  if (args.nbd !== undefined) {
    const { host, port } = parseHostPort(args.nbd);
    const address = await server.listenTcp(host, port);
    const shownHost = address.family === 'IPv6' ? `[${address.address}]` : address.address;
    ready.nbd = `nbd://${shownHost}:${address.port}/${encodeURIComponent(args.name)}`;
    ready.port = address.port;
  }
  if (args.nbdSocket !== undefined) {
    await server.listenUnix(args.nbdSocket);
    ready.nbdSocket = args.nbdSocket;
    ready.nbdUnix = `nbd+unix:///${encodeURIComponent(args.name)}?socket=${args.nbdSocket}`;
  }
  process.stdout.write(JSON.stringify(ready) + '\n');

  let stopping = false;
  const stop = async (signal: string): Promise<void> => {
    if (stopping) return;
    stopping = true;
    log.info({ signal }, 'stopping');
    await server.close();
    exportLink.close();
    log.flush();
    process.exit(0);
  };
  process.on('SIGTERM', () => void stop('SIGTERM'));
  process.on('SIGINT', () => void stop('SIGINT'));
}

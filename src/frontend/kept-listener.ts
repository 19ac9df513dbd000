/**
 * The NBD listening socket, kept by the frontend's supervisor (the agent, or `zebu volume serve`)
 * and handed to every frontend process it starts, as the cachefiles daemon keeps its device fd
 * across a crash. The supervisor binds the socket and never accepts on it; the frontend inherits
 * the descriptor (spawn stdio) and listens and accepts. When the frontend dies the socket stays
 * open in the supervisor, still in the LISTEN state: clients that connect meanwhile wait in the
 * kernel's backlog instead of being refused, and the next frontend accepts them.
 *
 * Node offers no public call that binds without starting to accept (listen() accepts in the
 * calling process), so the socket is made with net's server-handle constructor, the one Node's
 * cluster module uses to share a listening socket with its workers.
 */
import fs from 'node:fs';
import net from 'node:net';
import util from 'node:util';
import { ZebuError, ErrorCode } from '../errors.ts';

interface ServerHandle {
  fd: number;
  getsockname?(out: { address?: string; port?: number; family?: string }): number;
  close(): void;
}

type CreateServerHandle = (address: string | null, port: number, addressType: number, fd?: number, flags?: number) => ServerHandle | number;

export interface KeptListener {
  /** The descriptor to hand to a child (stdio) — valid while the listener is open. */
  readonly fd: number;
  /** HOST:PORT actually bound (TCP), or the socket path (UNIX). */
  readonly address: string;
  close(): void;
}

function createHandle(): CreateServerHandle {
  const create = (net as unknown as { _createServerHandle?: CreateServerHandle })._createServerHandle;
  if (typeof create !== 'function') {
    throw new ZebuError(ErrorCode.UNSUPPORTED, 'this Node.js cannot bind a socket for a child process to listen on (net._createServerHandle is missing)');
  }
  return create;
}

function bound(handle: ServerHandle | number, what: string): ServerHandle {
  if (typeof handle === 'number') {
    let name = `error ${handle}`;
    try {
      name = util.getSystemErrorName(handle);
    } catch {
      // not an errno
    }
    throw new ZebuError(name === 'EADDRINUSE' ? ErrorCode.BUSY : ErrorCode.EINVAL, `cannot bind ${what}: ${name}`);
  }
  return handle;
}

/** Binds HOST:PORT (port 0: any free port) for frontends to listen on. */
export function keepTcpListener(host: string, port: number): KeptListener {
  const family = net.isIP(host);
  if (family === 0) throw new ZebuError(ErrorCode.EINVAL, `NBD host must be an IP address, got ${JSON.stringify(host)}`);
  const handle = bound(createHandle()(host, port, family, undefined, 0), `${host}:${port}`);
  const name: { address?: string; port?: number } = {};
  // libuv reports a bind conflict (EADDRINUSE) only at the next call on the socket: this one.
  const err = handle.getsockname?.(name) ?? 0;
  if (err !== 0 || name.port === undefined || name.port === 0) {
    handle.close();
    bound(err !== 0 ? err : -22, `${host}:${port}`);
  }
  const address = family === 6 ? `[${name.address ?? host}]:${name.port ?? port}` : `${name.address ?? host}:${name.port ?? port}`;
  return keep(handle, address);
}

/** Binds a UNIX socket at `socketPath` (a stale socket file there is replaced), mode 0600. */
export function keepUnixListener(socketPath: string): KeptListener {
  try {
    if (fs.statSync(socketPath).isSocket()) fs.unlinkSync(socketPath);
  } catch {
    // nothing there
  }
  const handle = bound(createHandle()(socketPath, -1, -1, undefined, 0), socketPath);
  fs.chmodSync(socketPath, 0o600);
  return keep(handle, socketPath);
}

function keep(handle: ServerHandle, address: string): KeptListener {
  let open = true;
  return {
    fd: handle.fd,
    address,
    close(): void {
      if (!open) return;
      open = false;
      handle.close();
    },
  };
}

/**
 * The data protocol's door to the network. The client and the server use only what
 * `StreamSocket` names (a net.Socket has all of it), and clients connect through a `Transport`,
 * so the simulator (test/sim) can put an engine and its replicas in one process on a simulated
 * network that delays, reorders across connections and cuts links.
 */
import net from 'node:net';

/** net's `onread` option: the socket reads into buffers the receiver lends it. */
export interface ReadInto {
  buffer(): Buffer;
  /** `nread` bytes arrived at the start of the buffer last lent. */
  callback(nread: number, buf: Uint8Array): boolean;
}

/** What the data protocol uses of a connected socket. */
export interface StreamSocket {
  readonly destroyed: boolean;
  readonly remoteAddress?: string;
  readonly remotePort?: number;
  /** `written` runs once the socket is done with the buffer (sent, or failed). */
  write(buf: Uint8Array, written?: (err?: Error | null) => void): boolean;
  cork(): void;
  uncork(): void;
  /** Sends what is queued, then closes the sending side; `done` runs once it has. */
  end(done?: () => void): unknown;
  destroy(): unknown;
  pause(): unknown;
  resume(): unknown;
  on(event: 'data', listener: (chunk: Buffer) => void): unknown;
  on(event: 'error', listener: (err: Error) => void): unknown;
  on(event: 'close', listener: () => void): unknown;
  once(event: 'close', listener: () => void): unknown;
  removeAllListeners(event: 'error' | 'close'): unknown;
}

export interface ConnectTarget {
  host?: string;
  port?: number;
  /** A UNIX socket instead of host and port. */
  path?: string;
}

export interface Transport {
  /** Starts connecting; the socket's bytes go to `readInto`, never to 'data' events. */
  connect(target: ConnectTarget, readInto: ReadInto): StreamSocket;
}

export const netTransport: Transport = {
  connect(target, readInto) {
    return target.path !== undefined
      ? net.createConnection({ path: target.path, onread: readInto })
      : net.createConnection({ host: target.host ?? '127.0.0.1', port: target.port!, noDelay: true, onread: readInto });
  },
};

/**
 * An accepted connection read into buffers the receiver chooses (net's `onread`), as the client
 * side already is. `net.Server` has no `onread` option, so the server is created with
 * `pauseOnConnect` and the accepted socket's handle is moved, before anything was read from it,
 * to a new `net.Socket` made with `onread`; the first socket object is let go without closing the
 * handle (it still counts itself out of the server's connections).
 *
 * Why: read as 'data' events, every socket read is a new 64 KiB buffer and a large WRITE payload
 * is then copied out of them into another new buffer. Both are memory outside V8's heap, and at a
 * few hundred MiB/s that allocation alone starts a full garbage collection many times a second
 * (measured on a replica under 1 MiB writes: about 10 per second). With `onread` the headers land
 * in a reused staging buffer and a large payload goes straight from the kernel into its own.
 *
 * `_handle` is not a documented property; where it is missing (another runtime, a simulator
 * socket) the caller keeps the socket as it is and reads 'data' events.
 */
import net from 'node:net';
import type { ReadInto } from './transport.ts';

interface WithHandle {
  _handle: unknown;
}

/** The socket to use instead of `accepted` (paused on connect), reading through `readInto`; null: keep `accepted`. */
export function adoptAccepted(accepted: net.Socket, readInto: ReadInto): net.Socket | null {
  if (process.env.ZEBU_NO_ONREAD_ACCEPT === '1') return null;
  const holder = accepted as unknown as WithHandle;
  const handle = holder._handle;
  if (handle === null || typeof handle !== 'object' || accepted.destroyed) return null;
  holder._handle = null;
  accepted.destroy(); // no handle: nothing is closed; the server counts the connection out
  return new net.Socket({ handle, onread: readInto, readable: true, writable: true } as net.SocketConstructorOpts);
}

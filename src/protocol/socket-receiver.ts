/**
 * Reads a socket into buffers it chooses (net's `onread` option) instead of one new 64 KiB chunk
 * per read that a large payload is then copied out of:
 * - headers and small payloads land in a staging buffer and are parsed from there through a
 *   FrameReader. The staging buffer is filled front to back and never reused, so the views the
 *   reader hands out stay valid for as long as their holder keeps them;
 * - a large payload whose destination is known (`receiveInto`) is read by the kernel straight
 *   into that destination: no copy, no garbage, and reads as large as the socket has ready.
 *   The destination must be the receiver's caller's own: the socket keeps the buffer it was
 *   lent until its next read completes, whatever happens to the request meanwhile.
 */
import { assert } from '../errors.ts';
import { FrameReader } from './frame-reader.ts';

const STAGING_BYTES = 64 * 1024;
/** A staging buffer with less room than this left is replaced by a new one. */
const STAGING_MIN_ROOM = 4096;

interface DirectReceive {
  dest: Buffer;
  pos: number;
  end: number;
  done: () => void;
}

/**
 * The reader a server connection parses from, and `arrived` called after bytes were added to it:
 * the receiver's when the socket reads through it (accepted-socket.ts), else a reader fed by the
 * socket's 'data' events.
 */
export function connectionReader(socket: { on(event: 'data', listener: (chunk: Buffer) => void): unknown }, receiver: SocketReceiver | null, arrived: () => void): FrameReader {
  if (receiver !== null) {
    receiver.onStaged = arrived;
    return receiver.reader;
  }
  const reader = new FrameReader();
  socket.on('data', (chunk: Buffer) => {
    reader.push(chunk);
    arrived();
  });
  return reader;
}

export class SocketReceiver {
  /** Bytes staged and not yet taken. Parse from it in `onStaged`. */
  readonly reader = new FrameReader();
  /** Called after bytes were staged (not while a direct receive is filling). */
  onStaged: () => void = () => {};
  private staging = Buffer.allocUnsafeSlow(STAGING_BYTES);
  private used = 0;
  private direct: DirectReceive | null = null;
  /** The buffer handed to the socket for its next read. */
  private lent: Buffer = this.staging;

  /** For `net.createConnection({ onread })`. */
  readonly onread = {
    buffer: (): Buffer => this.nextBuffer(),
    callback: (nread: number, buf: Uint8Array): boolean => {
      this.arrived(nread, buf);
      return true; // never pause: flow control is the peer's in-flight limit
    },
  };

  /** Whether a direct receive is under way (the stream's next bytes belong to it). */
  get receiving(): boolean {
    return this.direct !== null;
  }

  /**
   * The stream's next `length` bytes go to `dest` at `offset`: first what is staged, then
   * straight from the socket. `done` runs once all have arrived: at once when they were staged.
   */
  receiveInto(dest: Buffer, offset: number, length: number, done: () => void): void {
    assert(this.direct === null, 'a direct receive is already under way');
    assert(offset >= 0 && length >= 0 && offset + length <= dest.length, 'direct receive outside its buffer');
    let pos = offset;
    const end = offset + length;
    while (pos < end && this.reader.available > 0) {
      const piece = this.reader.take(Math.min(end - pos, this.reader.firstLength))!;
      piece.copy(dest, pos);
      pos += piece.length;
    }
    if (pos === end) {
      done();
      return;
    }
    this.direct = { dest, pos, end, done };
  }

  private nextBuffer(): Buffer {
    const d = this.direct;
    if (d !== null) {
      this.lent = d.dest.subarray(d.pos, d.end);
      return this.lent;
    }
    if (this.staging.length - this.used < STAGING_MIN_ROOM) {
      this.staging = Buffer.allocUnsafeSlow(STAGING_BYTES);
      this.used = 0;
    }
    this.lent = this.staging.subarray(this.used);
    return this.lent;
  }

  private arrived(nread: number, buf: Uint8Array): void {
    assert(buf === this.lent, 'socket read into a buffer it was not lent');
    const d = this.direct;
    if (d !== null && buf.buffer === d.dest.buffer && buf.byteOffset === d.dest.byteOffset + d.pos) {
      d.pos += nread;
      if (d.pos === d.end) {
        this.direct = null;
        d.done();
      }
      return;
    }
    assert(buf.buffer === this.staging.buffer, 'staged read outside the staging buffer');
    this.reader.push(this.staging.subarray(this.used, this.used + nread));
    this.used += nread;
    this.onStaged();
  }
}

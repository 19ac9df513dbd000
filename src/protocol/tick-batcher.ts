/**
 * Coalesces everything written to a socket during one tick of the event loop into one
 * writev: the first write of a tick corks the socket and a nextTick uncorks it. With many
 * requests in flight this turns one syscall per frame into one per tick.
 */
import type { StreamSocket } from './transport.ts';

export class TickBatcher {
  private readonly socket: StreamSocket;
  private corked = false;
  private readonly uncork = (): void => {
    this.corked = false;
    this.socket.uncork();
  };

  constructor(socket: StreamSocket) {
    this.socket = socket;
  }

  /** `written` runs once the socket is done with `buf` (sent, or failed). */
  write(buf: Buffer, written?: () => void): void {
    if (!this.corked) {
      this.corked = true;
      this.socket.cork();
      process.nextTick(this.uncork);
    }
    this.socket.write(buf, written);
  }
}

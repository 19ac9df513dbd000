/**
 * A TCP proxy that can go dark without closing: put between the engine and one replica, it
 * forwards bytes both ways until blackhole() — from then on it drops what it receives in the
 * chosen direction(s) while every socket stays open, the way a dead link or a hung peer looks
 * (no FIN, no RST: only timeouts can tell). restore() forwards again (new data only). When either
 * side of a pair closes, the other is closed too.
 */
import net from 'node:net';

export type BlackholeDirection = 'both' | 'requests' | 'replies';

export class BlackholeProxy {
  readonly port: number;
  private readonly server: net.Server;
  private readonly pairs = new Set<{ down: net.Socket; up: net.Socket }>();
  private dropRequests = false;
  private dropReplies = false;
  /** Bytes dropped while dark, each way. */
  droppedRequestBytes = 0;
  droppedReplyBytes = 0;

  private constructor(server: net.Server, port: number) {
    this.server = server;
    this.port = port;
  }

  /** Listens on 127.0.0.1 (`listenPort`, 0: any) and forwards to 127.0.0.1:`targetPort`. */
  static async start(targetPort: number, listenPort = 0): Promise<BlackholeProxy> {
    let proxy: BlackholeProxy | null = null;
    const server = net.createServer({ noDelay: true }, (down) => proxy!.accept(down, targetPort));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(listenPort, '127.0.0.1', () => resolve());
    });
    proxy = new BlackholeProxy(server, (server.address() as net.AddressInfo).port);
    return proxy;
  }

  get address(): string {
    return `127.0.0.1:${this.port}`;
  }

  get connections(): number {
    return this.pairs.size;
  }

  private accept(down: net.Socket, targetPort: number): void {
    const up = net.connect({ host: '127.0.0.1', port: targetPort, noDelay: true });
    const pair = { down, up };
    this.pairs.add(pair);
    const closeBoth = (): void => {
      this.pairs.delete(pair);
      down.destroy();
      up.destroy();
    };
    down.on('error', closeBoth);
    up.on('error', closeBoth);
    down.on('close', closeBoth);
    up.on('close', closeBoth);
    down.on('data', (d: Buffer) => {
      if (this.dropRequests) this.droppedRequestBytes += d.length;
      else up.write(d);
    });
    up.on('data', (d: Buffer) => {
      if (this.dropReplies) this.droppedReplyBytes += d.length;
      else down.write(d);
    });
  }

  /** Stops forwarding in `direction` without closing anything. */
  blackhole(direction: BlackholeDirection = 'both'): void {
    this.dropRequests = direction === 'both' || direction === 'requests';
    this.dropReplies = direction === 'both' || direction === 'replies';
  }

  restore(): void {
    this.dropRequests = false;
    this.dropReplies = false;
  }

  /** Closes every forwarded connection (the listener stays). */
  dropConnections(): void {
    for (const { down, up } of this.pairs) {
      down.destroy();
      up.destroy();
    }
    this.pairs.clear();
  }

  async close(): Promise<void> {
    this.dropConnections();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}

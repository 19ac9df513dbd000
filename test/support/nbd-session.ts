/**
 * The NBD connection a fault-suite client (the writer, the reader) keeps up: after the connection
 * is lost (a frontend killed) it connects again, waiting 20 ms doubling to 500 ms between
 * attempts, as a client with reconnect does, and counts the losses. `onConnected` runs after
 * every (re)connection, for the client to go on issuing requests.
 */
import type { NbdClient } from './nbd-client.ts';

export class NbdSession {
  /** The live connection; null while reconnecting (or stopped). */
  client: NbdClient | null = null;
  running = false;
  /** Connections lost while running. */
  disconnects = 0;
  private reconnecting = false;
  private readonly connect: () => Promise<NbdClient>;
  private readonly onConnected: () => void;

  constructor(connect: () => Promise<NbdClient>, onConnected: () => void) {
    this.connect = connect;
    this.onConnected = onConnected;
  }

  async start(): Promise<void> {
    this.running = true;
    this.client = await this.connect();
    this.watch(this.client);
    this.onConnected();
  }

  /** Connects again if the connection is gone (after a pause, say). */
  ensure(): void {
    if (this.client === null && this.running) void this.reconnect();
  }

  /** Stops for good and disconnects. */
  async stop(): Promise<void> {
    this.running = false;
    const client = this.client;
    this.client = null;
    if (client !== null) await client.disconnect().catch(() => {});
  }

  private watch(client: NbdClient): void {
    void client.closed.then(() => {
      if (this.client !== client) return;
      this.client = null;
      if (this.running) {
        this.disconnects++;
        void this.reconnect();
      }
    });
  }

  private async reconnect(): Promise<void> {
    if (this.reconnecting) return;
    this.reconnecting = true;
    let delayMs = 20;
    try {
      while (this.running && this.client === null) {
        try {
          const client = await this.connect();
          if (!this.running) {
            client.destroy();
            break;
          }
          this.client = client;
          this.watch(client);
        } catch {
          await new Promise((r) => setTimeout(r, delayMs));
          delayMs = Math.min(500, delayMs * 2);
        }
      }
    } finally {
      this.reconnecting = false;
    }
    this.onConnected();
  }
}

/**
 * A fault-suite client that keeps up to `depth` requests in flight on an NbdSession and can be
 * paused: quiesce() stops new requests and waits for those in flight, resume() goes on.
 * Subclasses issue requests in pump() (counting them in `inflight`) and call settled() as each ends.
 */
export abstract class PausableLoad {
  protected readonly session: NbdSession;
  protected paused = false;
  protected inflight = 0;
  private idleWaiters: (() => void)[] = [];
  private readonly what: string;

  constructor(connect: () => Promise<NbdClient>, what: string) {
    this.what = what;
    this.session = new NbdSession(connect, () => this.pump());
  }

  protected abstract pump(): void;

  /** Stops issuing new requests and waits until every request in flight has settled. */
  async quiesce(timeoutMs = 60_000): Promise<void> {
    this.paused = true;
    if (this.inflight === 0) return;
    let timer: NodeJS.Timeout | undefined;
    const idle = new Promise<void>((resolve) => this.idleWaiters.push(resolve));
    await Promise.race([
      idle,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`${this.what}: ${this.inflight} request(s) still in flight after ${timeoutMs} ms`)), timeoutMs);
      }),
    ]).finally(() => clearTimeout(timer));
  }

  /** Issues new requests again after quiesce(). */
  resume(): void {
    this.paused = false;
    this.session.ensure();
    this.pump();
  }

  /** Stops for good: waits for what is in flight, then disconnects. */
  async stop(): Promise<void> {
    await this.quiesce().catch(() => {});
    await this.session.stop();
  }

  protected settled(): void {
    this.inflight--;
    if (this.inflight === 0 && this.paused) {
      const waiters = this.idleWaiters;
      this.idleWaiters = [];
      for (const w of waiters) w();
    }
    this.pump();
  }
}

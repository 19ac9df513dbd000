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

/**
 * The connections a rebuild target keeps to the replicas it pulls from (COPY_FROM): one per
 * source address and epoch, opened on first use, checked to be the replica the engine named, and
 * dropped when it fails (the next pull connects again). A rebuild's data then goes source →
 * target directly; the engine only sends small requests and keeps the leases.
 */
import { ZebuError, ErrorCode, toZebuError } from '../errors.ts';
import { systemClock, type Clock, type ClockTimer } from '../os/clock.ts';
import { DataClient } from './client.ts';
import type { Transport } from './transport.ts';

export interface CopySourceOptions {
  secret: Buffer;
  transport?: Transport;
  clock?: Clock;
  /** Per-request deadline on the source (a read of one chunk). */
  requestTimeoutMs?: number;
}

const SOURCE_CONNECT_TIMEOUT_MS = 1500;
const SOURCE_REQUEST_TIMEOUT_MS = 2500;

/** A connection to a source not used this long is closed. */
const IDLE_CLOSE_MS = 60_000;

/** `HOST:PORT`, or `[IPV6]:PORT`. */
const SOURCE_ADDRESS = /^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$/;

export function parseSourceAddress(address: string): { host: string; port: number } {
  const m = SOURCE_ADDRESS.exec(address);
  const port = m === null ? NaN : Number(m[1]);
  if (m === null || port < 1 || port > 65535) throw new ZebuError(ErrorCode.EINVAL, `bad source address ${JSON.stringify(address)}: HOST:PORT expected`);
  const host = address.slice(0, address.lastIndexOf(':')).replace(/^\[(.*)\]$/, '$1');
  return { host, port };
}

export class CopySources {
  private readonly options: CopySourceOptions;
  /** By address and epoch: the connection, and the name the source answered with (null: none). */
  private readonly clients = new Map<string, Promise<{ client: DataClient; name: string | null }>>();
  /** When each connection was last used: one idle for IDLE_CLOSE_MS is closed (the rebuild ended). */
  private readonly lastUsedMs = new Map<string, number>();
  private readonly clock: Clock;
  private sweeper: ClockTimer | null = null;
  private closed = false;

  constructor(options: CopySourceOptions) {
    this.options = options;
    this.clock = options.clock ?? systemClock;
  }

  /**
   * Reads [offset, offset+length) of the live volume from the source at `address` with `epoch`;
   * `name`, when given, must be the name the source replica answers with. Any failure on the
   * source's side is SOURCE_FAILED.
   */
  async read(address: string, name: string | null, epoch: number, offset: number, length: number, snapshot: string | null = null): Promise<Buffer> {
    const key = `${address}@${epoch}`;
    this.lastUsedMs.set(key, this.clock.nowMs());
    this.sweeper ??= this.clock.setInterval(() => this.closeIdle(), IDLE_CLOSE_MS / 2).unref();
    let client: DataClient;
    try {
      const source = await this.client(key, address, epoch);
      // Checked at every pull: the engine may name another replica at an address it reused.
      if (name !== null && source.name !== null && source.name !== name) {
        throw new ZebuError(ErrorCode.WRONG_REPLICA, `${address} is replica ${source.name}, not ${name} (a stale address?)`);
      }
      client = source.client;
    } catch (err) {
      throw sourceFailed(address, err);
    }
    try {
      return await (snapshot === null ? client.read(offset, length) : client.readSnapshot(snapshot, offset, length));
    } catch (err) {
      // Dropped: the next pull connects again (the source may have restarted).
      if (this.clients.get(key) !== undefined) {
        this.clients.delete(key);
        client.close();
      }
      throw sourceFailed(address, err);
    }
  }

  private client(key: string, address: string, epoch: number): Promise<{ client: DataClient; name: string | null }> {
    if (this.closed) return Promise.reject(new ZebuError(ErrorCode.CLOSED, 'the replica is closing'));
    const known = this.clients.get(key);
    if (known !== undefined) return known;
    const { host, port } = parseSourceAddress(address);
    const opening = (async () => {
      // Well within the engine's own deadline on COPY_FROM: a source that cannot be reached is
      // reported as SOURCE_FAILED (the chunk then goes through the engine), not as a target that
      // timed out.
      const client = await DataClient.connect({
        host, port, secret: this.options.secret, epoch, peerLabel: 'rebuild source', connectTimeoutMs: SOURCE_CONNECT_TIMEOUT_MS,
        requestTimeoutMs: this.options.requestTimeoutMs ?? SOURCE_REQUEST_TIMEOUT_MS, transport: this.options.transport, clock: this.options.clock,
      });
      let name: string | null;
      try {
        const info = await client.info() as { name?: unknown };
        name = typeof info.name === 'string' ? info.name : null;
      } catch (err) {
        client.close();
        throw err;
      }
      client.onClose(() => {
        if (this.clients.get(key) === opening) this.clients.delete(key);
      });
      return { client, name };
    })();
    this.clients.set(key, opening);
    opening.catch(() => {
      if (this.clients.get(key) === opening) this.clients.delete(key);
    });
    // Connections of older epochs are of no more use: a newer engine fenced them.
    for (const [k, c] of this.clients) {
      if (k.startsWith(`${address}@`) && k !== key) {
        this.clients.delete(k);
        c.then((x) => x.client.close(), () => {});
      }
    }
    return opening;
  }

  private closeIdle(): void {
    const now = this.clock.nowMs();
    for (const [key, c] of this.clients) {
      if (now - (this.lastUsedMs.get(key) ?? 0) < IDLE_CLOSE_MS) continue;
      this.clients.delete(key);
      this.lastUsedMs.delete(key);
      c.then((x) => x.client.close(), () => {});
    }
  }

  close(): void {
    this.closed = true;
    this.clock.clear(this.sweeper);
    for (const c of this.clients.values()) c.then((x) => x.client.close(), () => {});
    this.clients.clear();
  }
}

function sourceFailed(address: string, err: unknown): ZebuError {
  const e = toZebuError(err);
  if (e.code === ErrorCode.SOURCE_FAILED) return e;
  return new ZebuError(ErrorCode.SOURCE_FAILED, `rebuild source ${address}: ${e.message}`, { cause: e });
}

/**
 * Reads a frontend serves from the replicas itself, without the engine hop: its *read view*.
 *
 * The engine gives the view (READ_VIEW: every RW replica, each pinned to the server process the
 * engine holds open) and withdraws a replica from it the moment that replica leaves RW — in a
 * reply written on the frontend's engine connection before the reply of any write acknowledged
 * without it. The frontend handles replies in the order they arrive, so by the time a client has
 * the acknowledgement of a write, no read it sends later goes to a replica that lacks that write.
 * A read already on its way to a withdrawn replica was sent before that acknowledgement: it is
 * concurrent with the write, and either answer is allowed — it is sent again through the engine
 * anyway, since its connection is closed with the withdrawal.
 *
 * What else keeps a direct read right: it carries the engine's epoch (a newer engine's replicas
 * fence it: FENCED); a connection is used only after the replica's INFO names the server instance
 * of the view (a replica restarted at the same address may have lost unflushed writes); and any
 * failure — a refused, failed or unanswered read, a broken connection — sends that read through
 * the engine, which decides about the replica. Without a view (no engine, an engine of an older
 * version, none of its replicas reachable) every read goes through the engine as before.
 */
import { ZebuError, ErrorCode, assert } from '../errors.ts';
import { DataClient } from '../protocol/client.ts';
import { Op } from '../protocol/frames.ts';
import type { ReadView } from '../protocol/backend.ts';
import type { Clock, ClockTimer } from '../os/clock.ts';
import type { Transport } from '../protocol/transport.ts';

const EMPTY = Buffer.alloc(0);
/** A replica whose direct connection failed is tried again after this long (same view). */
const RETRY_MS = 1000;

interface Reader {
  host: string;
  port: number;
  instance: string;
  local: boolean;
  /** Connected and checked; null while connecting or after a failure. */
  client: DataClient | null;
  connecting: boolean;
  retryTimer: ClockTimer | null;
}

export interface ReadViewOptions {
  name: string;
  secret: Buffer;
  transport: Transport | undefined;
  clock: Clock;
  log: (event: Record<string, unknown>) => void;
  /**
   * A replica failed a read itself (its disk, or no answer in time), called before the read goes
   * through the engine: the engine takes it out, as it would after failing that read itself.
   */
  replicaFailed: (replica: { host: string; port: number; instance: string }, err: ZebuError) => void;
}

/** Failures that are the replica's own; others (a closed or fenced connection, a bad request) the engine learns by itself or are not the replica's. */
const REPLICA_FAULTS: ReadonlySet<string> = new Set([ErrorCode.EIO, ErrorCode.ENOSPC, ErrorCode.TIMEOUT, ErrorCode.PROTOCOL]);

/** Reads served here since the last report to the engine (for its counters). */
export interface DirectReadCounts {
  reads: number;
  bytes: number;
  micros: number;
}

/** Parses a READ_VIEW answer; throws PROTOCOL on anything malformed. */
export function parseReadView(data: Buffer): ReadView {
  let v: unknown;
  try {
    v = JSON.parse(data.toString('utf8'));
  } catch {
    throw new ZebuError(ErrorCode.PROTOCOL, 'READ_VIEW answer is not JSON');
  }
  const view = v as ReadView;
  const whole = (n: unknown): boolean => Number.isSafeInteger(n) && (n as number) >= 0;
  if (typeof v !== 'object' || v === null || !whole(view.generation) || !whole(view.epoch) || !whole(view.timeoutMs) || !Array.isArray(view.replicas)) {
    throw new ZebuError(ErrorCode.PROTOCOL, 'READ_VIEW answer is malformed');
  }
  for (const r of view.replicas) {
    if (typeof r !== 'object' || r === null || typeof r.host !== 'string' || !whole(r.port) || r.port > 65535 || typeof r.instance !== 'string' || typeof r.local !== 'boolean') {
      throw new ZebuError(ErrorCode.PROTOCOL, 'READ_VIEW answer names a malformed replica');
    }
  }
  return view;
}

export class DirectReads {
  private readonly options: ReadViewOptions;
  private generation = 0;
  private epoch = 0;
  private timeoutMs = 0;
  private readers: Reader[] = [];
  private closed = false;
  readonly counts: DirectReadCounts = { reads: 0, bytes: 0, micros: 0 };
  /** Reads served here in all (LinkView). */
  total = 0;

  constructor(options: ReadViewOptions) {
    this.options = options;
  }

  /** Replicas of the view connected and checked now. */
  get connected(): number {
    return this.readers.filter((r) => r.client !== null).length;
  }

  /** The generation held (0: none), for the next READ_VIEW. */
  get heldGeneration(): number {
    return this.generation;
  }

  /**
   * Takes the engine's view. Replicas no longer in it are closed at once (their reads in flight go
   * through the engine); new ones are connected at the first read (an export nobody reads from
   * holds no connection to its replicas).
   */
  adopt(view: ReadView): void {
    if (this.closed || view.generation === this.generation) return;
    const keep = new Map<string, Reader>();
    for (const r of this.readers) keep.set(readerKey(r), r);
    const next: Reader[] = [];
    for (const v of view.replicas) {
      const key = readerKey(v);
      const old = keep.get(key);
      if (old !== undefined && view.epoch === this.epoch) {
        keep.delete(key);
        old.local = v.local;
        next.push(old);
      } else {
        next.push({ host: v.host, port: v.port, instance: v.instance, local: v.local, client: null, connecting: false, retryTimer: null });
      }
    }
    for (const r of keep.values()) this.release(r);
    this.readers = next;
    this.generation = view.generation;
    this.epoch = view.epoch;
    this.timeoutMs = Math.max(1, view.timeoutMs);
    this.options.log({ event: 'read-view', generation: view.generation, replicas: view.replicas.map((r) => `${r.host}:${r.port}`) });
  }

  /** No view any more (the engine went, or said nothing usable): every read goes through it. */
  drop(): void {
    const readers = this.readers;
    this.readers = [];
    this.generation = 0;
    for (const r of readers) this.release(r);
  }

  close(): void {
    this.closed = true;
    this.drop();
  }

  /**
   * Sends a read to a replica of the view, when one is connected; false when there is none (the
   * caller goes through the engine). `fallback` gets the read back when the replica does not
   * answer it; `done` gets the data.
   */
  read(offset: number, length: number, done: (data: Buffer) => void, fallback: () => void): boolean {
    const reader = this.pick();
    if (reader === null) {
      for (const r of this.readers) if (r.client === null && !r.connecting && r.retryTimer === null) this.connect(r);
      return false;
    }
    const client = reader.client!;
    const started = this.options.clock.nowMs();
    client.send(Op.READ, 0, offset, length, EMPTY, (err, data) => {
      if (err !== null) {
        // Withdrawn (closed by adopt/drop) or failed: the engine serves it.
        if (reader.client === client) {
          this.failed(reader, err);
          if (REPLICA_FAULTS.has(err.code)) this.options.replicaFailed({ host: reader.host, port: reader.port, instance: reader.instance }, err);
        }
        return fallback();
      }
      assert(data.length === length, `replica returned ${data.length} bytes for a ${length}-byte read`);
      this.counts.reads++;
      this.counts.bytes += length;
      this.counts.micros += Math.round((this.options.clock.nowMs() - started) * 1000);
      this.total++;
      done(data);
    });
    return true;
  }

  /** A connected replica: local first, then the one with the fewest reads in flight. */
  private pick(): Reader | null {
    let best: Reader | null = null;
    for (const r of this.readers) {
      if (r.client === null) continue;
      if (best === null || (r.local && !best.local) || (r.local === best.local && r.client.inflight < best.client!.inflight)) best = r;
    }
    return best;
  }

  private connect(r: Reader): void {
    r.connecting = true;
    const generation = this.generation;
    const stillWanted = (): boolean => !this.closed && this.generation === generation && this.readers.includes(r);
    DataClient.connect({
      host: r.host, port: r.port, secret: this.options.secret, epoch: this.epoch,
      requestTimeoutMs: this.timeoutMs, connectTimeoutMs: this.timeoutMs,
      transport: this.options.transport, clock: this.options.clock,
    }).then(
      (client) => {
        client.info().then(
          (info) => {
            r.connecting = false;
            const instance = (info as { instance?: unknown }).instance;
            if (!stillWanted()) return client.close();
            if (instance !== r.instance) {
              client.close();
              return this.failed(r, new ZebuError(ErrorCode.WRONG_REPLICA, `${r.host}:${r.port} is server instance ${String(instance)}, not ${r.instance} (restarted?)`));
            }
            r.client = client;
            client.onClose((err) => {
              if (r.client === client) this.failed(r, err);
            });
          },
          (err) => {
            r.connecting = false;
            client.close();
            if (stillWanted()) this.failed(r, err);
          },
        );
      },
      (err) => {
        r.connecting = false;
        if (stillWanted()) this.failed(r, err);
      },
    );
  }

  /** A replica did not serve: its reads go through the engine; tried again later, same view only. */
  private failed(r: Reader, err: ZebuError): void {
    const client = r.client;
    r.client = null;
    client?.close();
    if (this.closed || !this.readers.includes(r) || r.retryTimer !== null) return;
    this.options.log({ event: 'direct-read-failed', replica: `${r.host}:${r.port}`, error: err.message });
    r.retryTimer = this.options.clock.setTimeout(() => {
      r.retryTimer = null;
      if (!this.closed && this.readers.includes(r) && r.client === null && !r.connecting) this.connect(r);
    }, RETRY_MS).unref();
  }

  private release(r: Reader): void {
    this.options.clock.clear(r.retryTimer);
    r.retryTimer = null;
    const client = r.client;
    r.client = null;
    client?.close();
  }
}

function readerKey(r: { host: string; port: number; instance: string }): string {
  return `${r.host}:${r.port}/${r.instance}`;
}

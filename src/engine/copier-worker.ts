/**
 * The rebuild copier's side (copier-process.ts is the engine's): runs each region's chunk loop
 * (leased-copy.ts) with its own connections to the source and target replicas, and asks the
 * engine for turns and leases by messages. Transport-free: copier-main.ts runs it in a process of
 * its own over the IPC channel, the simulator over its own network and clock.
 */
import { ZebuError, ErrorCode, toZebuError } from '../errors.ts';
import { DataClient } from '../protocol/client.ts';
import { Op, decodeExtents, type WireExtent } from '../protocol/frames.ts';
import { copyRegionLeased, regionGivenUp, type CopierHost, type LeaseCounters } from './leased-copy.ts';
import type { CopierToEngine, CopyEndpoint, EngineToCopier, LeaseGrant, RegionCopyRequest } from './copier-process.ts';
import type { Transport } from '../protocol/transport.ts';
import type { Clock } from '../os/clock.ts';

export interface CopierWorkerOptions {
  send: (message: CopierToEngine) => void;
  /** How replicas are reached, and time (defaults: the network and the system clock). */
  transport?: Transport;
  clock?: Clock;
}

export class CopierWorker {
  private readonly options: CopierWorkerOptions;
  private secret: Buffer | null = null;
  private requestTimeoutMs: number | undefined;
  private nextAsk = 1;
  private readonly asks = new Map<number, { resolve: (value: unknown) => void; reject: (err: Error) => void }>();
  /** Leases a client write recalled (kept until released: a recall can come before the grant). */
  private readonly recalled = new Set<number>();
  /**
   * Leases the engine revoked (the copier did not give them back in time: it was stopped, or
   * slow). The next copy write with one fails here with LEASE_REVOKED, as the target would
   * refuse it, and the copy replays from its committed offset.
   */
  private readonly revoked = new Set<number>();
  /** Copies under way, and those the engine cancelled with why. */
  private readonly active = new Set<number>();
  private readonly cancelled = new Map<number, ZebuError>();
  /** Connections by address and epoch, checked to reach the replica asked for. */
  private readonly clients = new Map<string, Promise<DataClient>>();
  /** Targets that answered COPY_FROM with UNSUPPORTED: the copier reads and writes for them. */
  private readonly cannotPull = new Set<string>();

  constructor(options: CopierWorkerOptions) {
    this.options = options;
  }

  onMessage(m: EngineToCopier): void {
    switch (m.t) {
      case 'init':
        this.secret = Buffer.from(m.secret, 'base64');
        this.requestTimeoutMs = m.requestTimeoutMs ?? undefined;
        return;
      case 'copy':
        this.runCopy(m.copy, m.request).then(
          (written) => this.options.send({ t: 'done', copy: m.copy, written }),
          (err) => {
            const e = toZebuError(err);
            this.options.send({ t: 'failed', copy: m.copy, code: e.code, message: e.message, gaveUp: regionGivenUp(err) });
          },
        );
        return;
      case 'answer': {
        const waiting = this.asks.get(m.ask);
        if (waiting === undefined) return;
        this.asks.delete(m.ask);
        if (m.error !== undefined) waiting.reject(new ZebuError(m.error.code, m.error.message));
        else waiting.resolve(m.value);
        return;
      }
      case 'recall':
        this.recalled.add(m.lease);
        return;
      case 'revoked':
        this.revoked.add(m.lease);
        return;
      case 'cancel':
        if (this.active.has(m.copy)) this.cancelled.set(m.copy, new ZebuError(m.code, m.message));
        return;
    }
  }

  /** Closes its replica connections (the engine is gone). */
  close(): void {
    for (const client of this.clients.values()) client.then((c) => c.close(), () => {});
    this.clients.clear();
  }

  private checkLease(lease: number): void {
    if (this.revoked.has(lease)) throw new ZebuError(ErrorCode.LEASE_REVOKED, `lease ${lease} was revoked: copy again from the last committed offset`);
  }

  private ask(message: { copy: number; what: 'turn' } | { copy: number; what: 'lease'; start: number; end: number }): Promise<unknown> {
    const id = this.nextAsk++;
    return new Promise((resolve, reject) => {
      this.asks.set(id, { resolve, reject });
      this.options.send({ t: 'ask', ask: id, ...message });
    });
  }

  private connection(endpoint: CopyEndpoint, epoch: number): Promise<DataClient> {
    const key = `${endpoint.address}@${epoch}`;
    let client = this.clients.get(key);
    if (client === undefined) {
      if (this.secret === null) return Promise.reject(new ZebuError(ErrorCode.EINVAL, 'the copier was given no secret'));
      const options = {
        host: endpoint.host, port: endpoint.port, secret: this.secret, epoch, requestTimeoutMs: this.requestTimeoutMs,
        connectTimeoutMs: this.requestTimeoutMs, peerLabel: 'replica', transport: this.options.transport, clock: this.options.clock,
      };
      client = (async () => {
        const c = await DataClient.connect(options);
        try {
          // Data goes to and comes from the replica the engine named, not whoever took its port.
          const name = (await c.info() as { name?: unknown }).name;
          if (endpoint.named && typeof name === 'string' && name !== endpoint.key) {
            throw new ZebuError(ErrorCode.WRONG_REPLICA, `${endpoint.address} is replica ${name}, not ${endpoint.key}`);
          }
        } catch (err) {
          c.close();
          throw err;
        }
        c.onClose(() => {
          if (this.clients.get(key) === client) this.clients.delete(key);
        });
        return c;
      })();
      this.clients.set(key, client);
      client.catch(() => {
        if (this.clients.get(key) === client) this.clients.delete(key);
      });
    }
    return client;
  }

  /** Runs `fn` on the sources in turn until one answers; SOURCE_FAILED when none did. */
  private async fromSource<T>(request: RegionCopyRequest, fn: (client: DataClient) => Promise<T>): Promise<T> {
    let last: ZebuError | null = null;
    for (const source of request.sources) {
      try {
        return await fn(await this.connection(source, request.epoch));
      } catch (err) {
        const e = toZebuError(err);
        if (e.code === ErrorCode.EINVAL || e.code === ErrorCode.NOT_FOUND || e.code === ErrorCode.UNSUPPORTED) throw e;
        last = e;
      }
    }
    throw new ZebuError(ErrorCode.SOURCE_FAILED, `the copier could read no source: ${last?.message ?? 'none given'}`);
  }

  private async runCopy(copy: number, request: RegionCopyRequest): Promise<number> {
    const send = this.options.send;
    const check = (): void => {
      const why = this.cancelled.get(copy);
      if (why !== undefined) throw why;
    };
    let busy = true;
    const target = (): Promise<DataClient> => this.connection(request.target, request.epoch);
    const host: CopierHost = {
      acquireLease: async (start, end) => {
        const grant = (await this.ask({ copy, what: 'lease', start, end })) as LeaseGrant;
        // Read from the sources of the grant: one that left RW since may have missed writes.
        request.sources = grant.sources;
        return grant.lease;
      },
      // A revoked lease is not given back after the chunk: the next write meets the revoke.
      leaseWanted: (id) => this.recalled.has(id) && !this.revoked.has(id),
      releaseLease: (id) => {
        this.recalled.delete(id);
        this.revoked.delete(id);
        send({ t: 'release', copy, lease: id });
      },
      copyTurn: async () => {
        const answer = (await this.ask({ copy, what: 'turn' })) as { turn: number; busy: boolean };
        busy = answer.busy;
        return () => send({ t: 'endTurn', copy, turn: answer.turn });
      },
      clientsBusy: () => busy,
      sourceExtents: (how, at, bytes): Promise<WireExtent[]> => this.fromSource(request, (c) => how.kind === 'status'
        ? c.request(Op.BLOCK_STATUS, 0, at, bytes).then(decodeExtents)
        : c.snapshotChanges(null, how.kind === 'since' ? how.snapshot : null, at, bytes, how.kind === 'image')),
      readSource: (at, bytes) => this.fromSource(request, (c) => c.read(at, bytes)),
      writeTarget: async (lease, at, data, bytes) => {
        check();
        this.checkLease(lease);
        await (await target()).copyWrite(lease, at, data, bytes);
      },
      pullChunk: !request.pull ? null : async (lease, at, bytes, zeros) => {
        if (this.cannotPull.has(request.target.address)) return false;
        const source = request.sources[0];
        if (source === undefined) throw new ZebuError(ErrorCode.SOURCE_FAILED, 'the copier was given no source');
        check();
        this.checkLease(lease);
        try {
          await (await target()).copyFrom(lease, `${source.host}:${source.port}`, source.named ? source.key : null, at, bytes, zeros);
          return true;
        } catch (err) {
          const e = toZebuError(err);
          if (e.code === ErrorCode.UNSUPPORTED) {
            this.cannotPull.add(request.target.address);
            return false;
          }
          // The target could not read the first source: this chunk is read here, from any source.
          if (e.code === ErrorCode.SOURCE_FAILED) return false;
          throw e;
        }
      },
      check,
      regionCopied: (at, bytes) => send({ t: 'copied', copy, at, bytes }),
      chunkCopied: (end) => send({ t: 'chunk', copy, end }),
      counters: replayReporter(send, copy),
      maxRetries: request.maxRetries,
      chunkBytes: request.chunkBytes,
    };
    this.active.add(copy);
    try {
      return await copyRegionLeased(host, request.offset, request.length, request.how);
    } finally {
      this.active.delete(copy);
      this.cancelled.delete(copy);
    }
  }
}

/** Counters whose replays reach the engine as they happen (grants and the rest are counted there). */
function replayReporter(send: (message: CopierToEngine) => void, copy: number): LeaseCounters {
  let replays = 0;
  return {
    grants: 0, recalls: 0, revokes: 0, copiersLost: 0,
    get replays() { return replays; },
    set replays(n: number) {
      for (; replays < n; replays++) send({ t: 'replayed', copy });
    },
  };
}

/**
 * The rebuild copier process (forked by the engine, see copier-process.ts): runs each region's
 * chunk loop (leased-copy.ts) with its own connections to the source and target replicas; asks
 * the engine over the IPC channel for turns and leases. It exits when the engine's channel
 * closes, so it never outlives its engine.
 */
import { ZebuError, ErrorCode, toZebuError } from '../errors.ts';
import { DataClient } from '../protocol/client.ts';
import { Op, decodeExtents, type WireExtent } from '../protocol/frames.ts';
import { copyRegionLeased, regionGivenUp, type CopierHost, type LeaseCounters } from './leased-copy.ts';
import type { CopierToEngine, CopyEndpoint, EngineToCopier, RegionCopyRequest } from './copier-process.ts';

let secret: Buffer | null = null;
let requestTimeoutMs: number | undefined;
let nextAsk = 1;
const asks = new Map<number, { resolve: (value: unknown) => void; reject: (err: Error) => void }>();
/** Leases a client write recalled (kept until released: a recall can come before the grant). */
const recalled = new Set<number>();
/** Copies under way, and those the engine cancelled with why. */
const active = new Set<number>();
const cancelled = new Map<number, ZebuError>();
/** Connections by address and epoch, checked to reach the replica asked for. */
const clients = new Map<string, Promise<DataClient>>();
/** Targets that answered COPY_FROM with UNSUPPORTED: the copier reads and writes for them. */
const cannotPull = new Set<string>();

function send(message: CopierToEngine): void {
  if (process.connected) process.send!(message);
}

function ask(message: { copy: number; what: 'turn' } | { copy: number; what: 'lease'; start: number; end: number }): Promise<unknown> {
  const id = nextAsk++;
  return new Promise((resolve, reject) => {
    asks.set(id, { resolve, reject });
    send({ t: 'ask', ask: id, ...message });
  });
}

function connection(endpoint: CopyEndpoint, epoch: number): Promise<DataClient> {
  const key = `${endpoint.address}@${epoch}`;
  let client = clients.get(key);
  if (client === undefined) {
    client = (async () => {
      const c = await DataClient.connect({ host: endpoint.host, port: endpoint.port, secret: secret!, epoch, requestTimeoutMs, connectTimeoutMs: requestTimeoutMs, peerLabel: 'replica' });
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
        if (clients.get(key) === client) clients.delete(key);
      });
      return c;
    })();
    clients.set(key, client);
    client.catch(() => {
      if (clients.get(key) === client) clients.delete(key);
    });
  }
  return client;
}

/** Runs `fn` on the sources in turn until one answers; SOURCE_FAILED when none did. */
async function fromSource<T>(request: RegionCopyRequest, fn: (client: DataClient, source: CopyEndpoint) => Promise<T>): Promise<T> {
  let last: ZebuError | null = null;
  for (const source of request.sources) {
    try {
      return await fn(await connection(source, request.epoch), source);
    } catch (err) {
      const e = toZebuError(err);
      if (e.code === ErrorCode.EINVAL || e.code === ErrorCode.NOT_FOUND || e.code === ErrorCode.UNSUPPORTED) throw e;
      last = e;
    }
  }
  throw new ZebuError(ErrorCode.SOURCE_FAILED, `the copier could read no source: ${last?.message ?? 'none given'}`);
}

async function runCopy(copy: number, request: RegionCopyRequest): Promise<number> {
  const check = (): void => {
    const why = cancelled.get(copy);
    if (why !== undefined) throw why;
  };
  let busy = true;
  const target = (): Promise<DataClient> => connection(request.target, request.epoch);
  const host: CopierHost = {
    acquireLease: async (start, end) => (await ask({ copy, what: 'lease', start, end })) as number,
    leaseWanted: (id) => recalled.has(id),
    releaseLease: (id) => {
      recalled.delete(id);
      send({ t: 'release', copy, lease: id });
    },
    copyTurn: async () => {
      const answer = (await ask({ copy, what: 'turn' })) as { turn: number; busy: boolean };
      busy = answer.busy;
      return () => send({ t: 'endTurn', copy, turn: answer.turn });
    },
    clientsBusy: () => busy,
    sourceExtents: (how, at, bytes): Promise<WireExtent[]> => fromSource(request, (c) => how.kind === 'status'
      ? c.request(Op.BLOCK_STATUS, 0, at, bytes).then(decodeExtents)
      : c.snapshotChanges(null, how.kind === 'since' ? how.snapshot : null, at, bytes, how.kind === 'image')),
    readSource: (at, bytes) => fromSource(request, (c) => c.read(at, bytes)),
    writeTarget: async (lease, at, data, bytes) => {
      check();
      await (await target()).copyWrite(lease, at, data, bytes);
    },
    pullChunk: !request.pull ? null : async (lease, at, bytes, zeros) => {
      if (cannotPull.has(request.target.address)) return false;
      const source = request.sources[0];
      if (source === undefined) throw new ZebuError(ErrorCode.SOURCE_FAILED, 'the copier was given no source');
      check();
      try {
        await (await target()).copyFrom(lease, `${source.host}:${source.port}`, source.named ? source.key : null, at, bytes, zeros);
        return true;
      } catch (err) {
        const e = toZebuError(err);
        if (e.code === ErrorCode.UNSUPPORTED) {
          cannotPull.add(request.target.address);
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
    counters: replayReporter(copy),
    maxRetries: request.maxRetries,
    chunkBytes: request.chunkBytes,
  };
  active.add(copy);
  try {
    return await copyRegionLeased(host, request.offset, request.length, request.how);
  } finally {
    active.delete(copy);
    cancelled.delete(copy);
  }
}

/** Counters whose replays reach the engine as they happen (grants and the rest are counted there). */
function replayReporter(copy: number): LeaseCounters {
  let replays = 0;
  return {
    grants: 0, recalls: 0, revokes: 0,
    get replays() { return replays; },
    set replays(n: number) {
      for (; replays < n; replays++) send({ t: 'replayed', copy });
    },
  };
}

function onMessage(m: EngineToCopier): void {
  switch (m.t) {
    case 'init':
      secret = Buffer.from(m.secret, 'base64');
      requestTimeoutMs = m.requestTimeoutMs ?? undefined;
      return;
    case 'copy':
      runCopy(m.copy, m.request).then(
        (written) => send({ t: 'done', copy: m.copy, written }),
        (err) => {
          const e = toZebuError(err);
          send({ t: 'failed', copy: m.copy, code: e.code, message: e.message, gaveUp: regionGivenUp(err) });
        },
      );
      return;
    case 'answer': {
      const waiting = asks.get(m.ask);
      if (waiting === undefined) return;
      asks.delete(m.ask);
      if (m.error !== undefined) waiting.reject(new ZebuError(m.error.code, m.error.message));
      else waiting.resolve(m.value);
      return;
    }
    case 'recall':
      recalled.add(m.lease);
      return;
    case 'cancel':
      if (active.has(m.copy)) cancelled.set(m.copy, new ZebuError(m.code, m.message));
      return;
  }
}

process.on('message', (m) => onMessage(m as EngineToCopier));
// The engine is gone (or closed the channel): nothing here may outlive it.
process.on('disconnect', () => process.exit(0));

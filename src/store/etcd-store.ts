/**
 * The cluster state store on etcd (the `etcd3` client), for Zebu on several machines. Semantics:
 * store.ts — the same contract as the embedded store, mapped onto etcd's own model:
 *
 * - An object is one key, `<prefix>o/<kind>/<name>`, whose value is the object's JSON. Its
 *   resourceVersion is the key's mod_revision and its createdRevision the key's create_revision;
 *   the store revision is etcd's (it counts every write to the etcd cluster, this prefix's or not:
 *   it only grows, as the contract asks).
 * - create, update and delete are single transactions that compare the key's revisions first, so
 *   optimistic concurrency is etcd's own; an update keeps the key's lease (ignore_lease).
 * - Leases are etcd leases (TTL in whole seconds, rounded up; etcd may raise a very short one to
 *   its minimum); an object put with a lease is deleted by etcd when it expires, with a delete event.
 * - A watch is an etcd watch on the prefix from afterRevision + 1, with the previous value for
 *   deletes. The client resumes a watch whose connection dropped from the last revision it saw;
 *   history etcd compacted away ends the watch with COMPACTED. A watch without afterRevision starts
 *   after the last revision this store has seen in an answer (it may so deliver a change made by
 *   another client just before; never does it miss one made after the call).
 * - Durability is etcd's: a write is answered once the cluster has committed it.
 *
 * Several members: losing one of three stops nothing. A call that could not be sent (the member
 * refuses connections) is tried on another member at once. A member that does not answer (its
 * machine gone: nothing refuses, calls wait) gets each call for ATTEMPT_MS only, then the call is
 * tried on another member, and the silent member is skipped until it answers again
 * (etcd-members.ts). Writes are tried again only when they compare revisions (a create; an
 * update or delete with the resourceVersion read), so at most one try applies; the first may
 * have been applied though its answer was lost: when the later try finds its compare
 * failed and the object holding exactly what it wrote (a create or an update) or gone (a delete),
 * the write is answered as done. The last try gets what is left of the call's deadline, so a
 * slow but working etcd is waited for as with one member. Failures left over are DISCONNECTED or
 * TIMEOUT, and the caller decides, as the controllers do with any failed reconcile.
 */
import { Etcd3, EtcdLeaseInvalidError, GRPCDeadlineExceededError, GRPCUnavailableError, GRPCUnauthenticatedError, EtcdAuthenticationFailedError, EtcdPermissionDeniedError, type IKeyValue, type IOptions, type Watcher as EtcdWatcher } from 'etcd3';
import { AsyncLocalStorage } from 'node:async_hooks';
import { ConstantBackoff, handleWhen, isBrokenCircuitError, noop, retry } from 'cockatiel';
import { ErrorCode, ZebuError, invalid } from '../errors.ts';
import type { Lease, ListResult, Store, StoreObject, Watch, WatchEvent, WatchHandlers, WatchOptions, WriteGuard } from './store.ts';
import { EtcdMembers, memberFailure } from './etcd-members.ts';
import { checkGuard, checkKeyPart, checkLeaseId, checkLeaseTtl, checkRevision, fencedBy, serializeValue } from './validate.ts';

export interface EtcdStoreOptions {
  /** Client URLs of the etcd members: http://HOST:PORT (https:// with `tls`). */
  endpoints: string[];
  /** Keys of this store start with it (several Zebu clusters may share one etcd); default "zebu/". */
  prefix?: string;
  /** etcd authentication (a user with read and write on the prefix). */
  auth?: { username: string; password: string };
  /** Client TLS: the CA that signed the members' certificates, and a client certificate if etcd asks for one. */
  tls?: { ca: Buffer; cert?: Buffer; key?: Buffer };
  /** Deadline of each call (default 10 s): with etcd unreachable, calls fail after it. */
  callTimeoutMs?: number;
  /** Members found not answering, and back (several members only). */
  log?: (message: string) => void;
}

const DEFAULT_PREFIX = 'zebu/';
const DEFAULT_CALL_TIMEOUT_MS = 10_000;
/**
 * With several members, how long one try of a call waits for its member before another member is
 * tried. A working member answers in milliseconds (a write: one quorum round and an fsync).
 */
const ATTEMPT_MS = 2000;
/**
 * The same for a lease renewal, shorter: a leader steps down when half its lease's TTL passed
 * without one, and a renewal is one message its member forwards to etcd's leader (no disk write).
 */
const RENEWAL_ATTEMPT_MS = 1000;
/**
 * gRPC pings on a connection with calls open (a watch): a member gone silent fails its streams
 * instead of holding them forever. etcd accepts pings no more often than every 5 s by default.
 */
const KEEPALIVE_PING_MS = 10_000;
const KEEPALIVE_TIMEOUT_MS = 5_000;

/** The deadline of the try under way (several members): set per try, read by the client's call options. */
const attemptDeadline = new AsyncLocalStorage<number>();
/** A lease id as etcd gives it: a positive 64-bit integer, in decimal. */
const LEASE_ID = /^[1-9][0-9]{0,18}$/;

export class EtcdStore implements Store {
  private readonly client: Etcd3;
  private readonly objectsPrefix: string;
  private readonly callTimeoutMs: number;
  /** How many members the client knows (how often a call that could not be sent is tried). */
  private readonly members: number;
  /** Which members answer (several members only). */
  private readonly health: EtcdMembers | null;
  private readonly watches = new Set<EtcdWatch>();
  /** The highest store revision seen in an answer (where a watch without afterRevision starts). */
  private seenRevision = 0;
  private closed = false;

  /** Connects, and checks that etcd answers (DISCONNECTED, TIMEOUT or AUTH when it does not). */
  static async open(options: EtcdStoreOptions): Promise<EtcdStore> {
    if (!Array.isArray(options.endpoints) || options.endpoints.length === 0 || options.endpoints.some((e) => typeof e !== 'string' || !/^https?:\/\/[^/\s]+$/.test(e))) {
      throw invalid(`endpoints ${JSON.stringify(options.endpoints)}: one or more http://HOST:PORT (https:// with TLS)`, 'endpoints');
    }
    const prefix = options.prefix ?? DEFAULT_PREFIX;
    if (typeof prefix !== 'string' || !/^[A-Za-z0-9._/-]{0,100}$/.test(prefix)) throw invalid(`prefix ${JSON.stringify(prefix)}: up to 100 of [A-Za-z0-9._/-]`, 'prefix');
    const callTimeoutMs = options.callTimeoutMs ?? DEFAULT_CALL_TIMEOUT_MS;
    if (!Number.isSafeInteger(callTimeoutMs) || callTimeoutMs < 1) throw invalid(`callTimeoutMs ${callTimeoutMs}: an integer >= 1`, 'callTimeoutMs');
    const connection: Omit<IOptions, 'hosts'> = {
      dialTimeout: callTimeoutMs,
      grpcOptions: { 'grpc.keepalive_time_ms': KEEPALIVE_PING_MS, 'grpc.keepalive_timeout_ms': KEEPALIVE_TIMEOUT_MS },
    };
    if (options.auth !== undefined) connection.auth = { username: options.auth.username, password: options.auth.password };
    if (options.tls !== undefined) connection.credentials = { rootCertificate: options.tls.ca, certChain: options.tls.cert, privateKey: options.tls.key };
    // A probe of a silent member: a read that needs a quorum, on a new connection to that member
    // alone (nothing left over from the one that went silent: no broken stream, no backoff).
    const members = options.endpoints.length < 2 ? null : new EtcdMembers({
      endpoints: options.endpoints,
      log: options.log,
      probe: async (endpoint) => {
        const probe = new Etcd3({ ...connection, hosts: [endpoint], faultHandling: { host: () => noop, global: noop }, defaultCallOptions: () => ({ deadline: Date.now() + ATTEMPT_MS }) });
        try {
          await probe.kv.range({ key: Buffer.from(prefix), count_only: true });
        } finally {
          probe.close();
        }
      },
    });
    const clientOptions: IOptions = {
      ...connection,
      hosts: options.endpoints,
      // Streams (watch, keep-alive) live on; single calls have a deadline: the try's, else the call's.
      defaultCallOptions: (context) => (context.isStream ? {} : { deadline: attemptDeadline.getStore() ?? Date.now() + callTimeoutMs }),
      faultHandling: {
        // Another member at once for a call that could not be sent (see call() for the others).
        global: retry(handleWhen(neverSent), { maxAttempts: options.endpoints.length - 1, backoff: new ConstantBackoff(20) }),
        ...(members === null ? {} : { host: (endpoint: string) => members.policyFor(endpoint) }),
      },
    };
    const store = new EtcdStore(new Etcd3(clientOptions), prefix, callTimeoutMs, options.endpoints.length, members);
    try {
      await store.revision();
    } catch (err) {
      store.client.close();
      throw err;
    }
    return store;
  }

  private constructor(client: Etcd3, prefix: string, callTimeoutMs: number, members: number, health: EtcdMembers | null) {
    this.client = client;
    this.callTimeoutMs = callTimeoutMs;
    this.members = members;
    this.health = health;
    this.objectsPrefix = `${prefix}o/`;
  }

  async get<T = unknown>(kind: string, name: string): Promise<StoreObject<T> | null> {
    this.enter();
    checkKeyPart(kind, 'kind');
    checkKeyPart(name, 'name');
    const res = await this.call(() => this.client.kv.range({ key: this.key(kind, name) }), { again: true });
    this.saw(res.header.revision);
    return res.kvs.length === 0 ? null : this.toObject<T>(res.kvs[0]);
  }

  async list<T = unknown>(kind: string): Promise<ListResult<T>> {
    this.enter();
    checkKeyPart(kind, 'kind');
    const from = this.kindPrefix(kind);
    // Keys sort by byte, as names do in the embedded store.
    const res = await this.call(() => this.client.kv.range({ key: Buffer.from(from), range_end: prefixEnd(from) }), { again: true });
    const revision = this.saw(res.header.revision);
    return { items: res.kvs.map((kv) => this.toObject<T>(kv)), revision };
  }

  async create<T = unknown>(kind: string, name: string, value: T, options: { leaseId?: string; guard?: WriteGuard } = {}): Promise<StoreObject<T>> {
    this.enter();
    checkKeyPart(kind, 'kind');
    checkKeyPart(name, 'name');
    const text = serializeValue(value);
    const leaseId = options.leaseId === undefined ? null : this.leaseNumber(options.leaseId);
    const guard = checkGuard(options.guard);
    const key = this.key(kind, name);
    const tries = { count: 0 };
    const res = await this.call(() => this.client.kv.txn({
      compare: [{ key, target: 'Create', result: 'Equal', create_revision: 0 }, ...this.guardCompare(guard)],
      success: [{ request_put: { key, value: Buffer.from(text), lease: leaseId ?? 0 } }],
      failure: [{ request_range: { key } }, ...this.guardRange(guard)],
    }), { lease: `lease ${options.leaseId}`, again: true, tries });
    const revision = this.saw(res.header.revision);
    if (!res.succeeded) {
      this.checkGuardHeld(guard, res.responses[1]);
      const kv = res.responses[0]?.response_range?.kvs?.[0];
      // An earlier try of this create was applied (its answer lost): done.
      if (tries.count > 1 && kv !== undefined && kv.value.toString() === text && String(kv.lease ?? '0') === String(leaseId ?? '0')) return this.toObject<T>(kv);
      throw new ZebuError(ErrorCode.EXISTS, `${kind} ${name} already exists`);
    }
    return { kind, name, resourceVersion: revision, createdRevision: revision, value: JSON.parse(text) as T, leaseId: leaseId === null ? null : options.leaseId! };
  }

  async update<T = unknown>(kind: string, name: string, value: T, options: { resourceVersion?: number; guard?: WriteGuard } = {}): Promise<StoreObject<T>> {
    this.enter();
    checkKeyPart(kind, 'kind');
    checkKeyPart(name, 'name');
    const expected = options.resourceVersion === undefined ? null : checkRevision(options.resourceVersion, 'resourceVersion', 1);
    const guard = checkGuard(options.guard);
    const text = serializeValue(value);
    const key = this.key(kind, name);
    const tries = { count: 0 };
    const res = await this.call(() => this.client.kv.txn({
      compare: [expected === null
        ? { key, target: 'Create', result: 'Greater', create_revision: 0 }
        : { key, target: 'Mod', result: 'Equal', mod_revision: expected }, ...this.guardCompare(guard)],
      success: [{ request_put: { key, value: Buffer.from(text), ignore_lease: true, prev_kv: true } }],
      failure: [{ request_range: { key } }, ...this.guardRange(guard)],
      // Tried again only when it compares the revision it read: a try applied late then cannot undo a newer write.
    }), { again: expected !== null, tries });
    const revision = this.saw(res.header.revision);
    if (!res.succeeded) {
      this.checkGuardHeld(guard, res.responses[1]);
      const kvs = res.responses[0]?.response_range?.kvs ?? [];
      // An earlier try of this update was applied (its answer lost): the object holds what it wrote.
      if (tries.count > 1 && kvs.length === 1 && kvs[0].value.toString() === text && (expected === null || Number(kvs[0].mod_revision) > expected)) return this.toObject<T>(kvs[0]);
      throw this.refusal(kind, name, kvs, expected);
    }
    const prev = res.responses[0].response_put.prev_kv;
    return {
      kind, name, resourceVersion: revision, createdRevision: Number(prev.create_revision), value: JSON.parse(text) as T,
      leaseId: prev.lease === '0' || prev.lease === undefined ? null : String(prev.lease),
    };
  }

  async delete(kind: string, name: string, options: { resourceVersion?: number; guard?: WriteGuard } = {}): Promise<void> {
    this.enter();
    checkKeyPart(kind, 'kind');
    checkKeyPart(name, 'name');
    const expected = options.resourceVersion === undefined ? null : checkRevision(options.resourceVersion, 'resourceVersion', 1);
    const guard = checkGuard(options.guard);
    const key = this.key(kind, name);
    const tries = { count: 0 };
    const res = await this.call(() => this.client.kv.txn({
      compare: [expected === null
        ? { key, target: 'Create', result: 'Greater', create_revision: 0 }
        : { key, target: 'Mod', result: 'Equal', mod_revision: expected }, ...this.guardCompare(guard)],
      success: [{ request_delete_range: { key } }],
      failure: [{ request_range: { key } }, ...this.guardRange(guard)],
      // Tried again only when it compares the revision it read: a try applied late then cannot undo a newer write.
    }), { again: expected !== null, tries });
    this.saw(res.header.revision);
    if (!res.succeeded) {
      this.checkGuardHeld(guard, res.responses[1]);
      const kvs = res.responses[0]?.response_range?.kvs ?? [];
      // An earlier try of this delete was applied (its answer lost): gone, as asked.
      if (tries.count > 1 && kvs.length === 0) return;
      throw this.refusal(kind, name, kvs, expected);
    }
  }

  /** The compare that makes a write hold only while its guard object is the one created at its revision. */
  private guardCompare(guard: WriteGuard | null): { key: Buffer; target: 'Create'; result: 'Equal'; create_revision: number }[] {
    return guard === null ? [] : [{ key: this.key(guard.kind, guard.name), target: 'Create', result: 'Equal', create_revision: guard.createdRevision }];
  }

  /** Reads the guard object when a write failed, to tell a guard that no longer holds from another refusal. */
  private guardRange(guard: WriteGuard | null): { request_range: { key: Buffer } }[] {
    return guard === null ? [] : [{ request_range: { key: this.key(guard.kind, guard.name) } }];
  }

  private checkGuardHeld(guard: WriteGuard | null, response: { response_range?: { kvs: IKeyValue[] } } | undefined): void {
    if (guard === null) return;
    const kv = response?.response_range?.kvs?.[0];
    if (kv === undefined || Number(kv.create_revision) !== guard.createdRevision) throw fencedBy(guard);
  }

  watch<T = unknown>(options: WatchOptions, handlers: WatchHandlers<T>): Watch {
    this.enter();
    const kind = options?.kind === undefined ? null : checkKeyPart(options.kind, 'kind');
    const after = options?.afterRevision === undefined ? this.seenRevision : checkRevision(options.afterRevision, 'afterRevision', 0);
    if (typeof handlers?.onEvent !== 'function') throw invalid('handlers.onEvent must be a function', 'onEvent');
    const watch = new EtcdWatch(this, kind === null ? this.objectsPrefix : this.kindPrefix(kind), after, handlers as WatchHandlers);
    this.watches.add(watch);
    void watch.start();
    return { close: () => watch.close(null) };
  }

  async revision(): Promise<number> {
    this.enter();
    const res = await this.call(() => this.client.kv.range({ key: Buffer.from(this.objectsPrefix), count_only: true }), { again: true });
    return this.saw(res.header.revision);
  }

  async grantLease(ttlMs: number): Promise<Lease> {
    this.enter();
    checkLeaseTtl(ttlMs);
    // A lease granted by a try whose answer was lost is never renewed: it expires on its own.
    const res = await this.call(() => this.client.leaseClient.leaseGrant({ TTL: Math.ceil(ttlMs / 1000), ID: 0 }), { again: true });
    return { id: String(res.ID), ttlMs: Number(res.TTL) * 1000 };
  }

  async keepAlive(leaseId: string): Promise<void> {
    this.enter();
    checkLeaseId(leaseId);
    const id = this.leaseNumber(leaseId);
    const end = Date.now() + this.callTimeoutMs;
    let ttl: string;
    for (let attempt = 1; ; attempt++) {
      // Renewing twice is harmless: a try that failed or got no answer soon goes to another member.
      const last = this.members < 2 || attempt >= this.members || end - Date.now() < 2 * RENEWAL_ATTEMPT_MS;
      try {
        ttl = await this.renewOnce(id, leaseId, last ? end : Date.now() + RENEWAL_ATTEMPT_MS);
        break;
      } catch (err) {
        const failure = etcdError(err, `lease ${leaseId}`);
        if (last || (failure.code !== ErrorCode.TIMEOUT && failure.code !== ErrorCode.DISCONNECTED)) throw failure;
      }
    }
    if (Number(ttl) <= 0) throw new ZebuError(ErrorCode.NOT_FOUND, `lease ${leaseId} has expired or was never granted`);
  }

  /**
   * One renewal on a keep-alive stream, answered by `until`. A stream has no call deadline: without
   * one of its own, a renewal over a dead network would wait forever, and a leader would never
   * learn that its term may be over.
   */
  private async renewOnce(id: string, leaseId: string, until: number): Promise<string> {
    let timer: NodeJS.Timeout | undefined;
    let stream: Awaited<ReturnType<Etcd3['leaseClient']['leaseKeepAlive']>> | null = null;
    let timedOut = false;
    const giveUp = (): void => {
      if (stream === null) return;
      this.health?.streamTimedOut(stream);
      stream.cancel();
    };
    const deadline = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        timedOut = true;
        giveUp();
        reject(new ZebuError(ErrorCode.TIMEOUT, `etcd did not renew lease ${leaseId} in time`));
      }, Math.max(0, until - Date.now()));
    });
    const renewal = (async (): Promise<string> => {
      stream = await this.client.leaseClient.leaseKeepAlive();
      if (timedOut) {
        giveUp();
        return '';
      }
      const open = stream;
      try {
        return await new Promise<string>((resolve, reject) => {
          open.on('data', (res: { TTL: string }) => resolve(String(res.TTL)));
          open.on('error', reject);
          open.on('end', () => reject(new ZebuError(ErrorCode.DISCONNECTED, 'etcd ended the keep-alive stream')));
          open.write({ ID: id });
        });
      } finally {
        open.end();
      }
    })();
    renewal.catch(() => {});
    try {
      return await Promise.race([renewal, deadline]);
    } finally {
      clearTimeout(timer);
    }
  }

  async revokeLease(leaseId: string): Promise<void> {
    this.enter();
    checkLeaseId(leaseId);
    if (!LEASE_ID.test(leaseId)) return; // never an etcd lease: nothing to end
    try {
      await this.call(() => this.client.leaseClient.leaseRevoke({ ID: leaseId }), { again: true });
    } catch (err) {
      if (err instanceof ZebuError && err.code === ErrorCode.NOT_FOUND) return;
      throw err;
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const watch of [...this.watches]) watch.close(new ZebuError(ErrorCode.CLOSED, 'the store is closed'));
    this.health?.close();
    this.client.close();
  }

  // --- for EtcdWatch ---

  /** An etcd watcher on keys under `prefix` from `fromRevision`, with previous values. */
  watcher(prefix: string, fromRevision: number): Promise<EtcdWatcher> {
    return this.client.watch().prefix(prefix).startRevision(String(fromRevision)).withPreviousKV().create();
  }

  /** Whether history after `afterRevision` is still kept (COMPACTED when it is not). */
  async checkHistory(afterRevision: number): Promise<void> {
    const current = await this.revision();
    if (afterRevision >= current) return;
    await this.call(() => this.client.kv.range({ key: Buffer.from(this.objectsPrefix), count_only: true, revision: afterRevision + 1 }), { again: true });
  }

  forget(watch: EtcdWatch): void {
    this.watches.delete(watch);
  }

  toEvent(type: 'Put' | 'Delete', kv: IKeyValue, prev: IKeyValue | undefined): WatchEvent {
    const revision = Number(kv.mod_revision);
    this.saw(kv.mod_revision);
    if (type === 'Put') {
      const object = this.toObject(kv);
      return { type: 'put', kind: object.kind, name: object.name, revision, object };
    }
    const object = prev !== undefined && prev !== null ? this.toObject(prev) : { ...this.toObject({ ...kv, value: Buffer.from('null') }), resourceVersion: revision };
    return { type: 'delete', kind: object.kind, name: object.name, revision, object };
  }

  // --- inside ---

  private enter(): void {
    if (this.closed) throw new ZebuError(ErrorCode.CLOSED, 'the store is closed');
  }

  private key(kind: string, name: string): Buffer {
    return Buffer.from(`${this.kindPrefix(kind)}${name}`);
  }

  private kindPrefix(kind: string): string {
    return `${this.objectsPrefix}${kind}/`;
  }

  private toObject<T>(kv: IKeyValue): StoreObject<T> {
    const key = kv.key.toString();
    const rest = key.slice(this.objectsPrefix.length);
    const slash = rest.indexOf('/');
    let value: T;
    try {
      value = JSON.parse(kv.value.toString()) as T;
    } catch {
      throw new ZebuError(ErrorCode.EIO, `the value of ${key} in etcd is not JSON (written by something else than Zebu?)`);
    }
    return {
      kind: rest.slice(0, slash), name: rest.slice(slash + 1), value,
      resourceVersion: Number(kv.mod_revision), createdRevision: Number(kv.create_revision),
      leaseId: kv.lease === undefined || String(kv.lease) === '0' ? null : String(kv.lease),
    };
  }

  /** NOT_FOUND when the object is gone, CONFLICT when it changed since `expected`. */
  private refusal(kind: string, name: string, kvs: IKeyValue[], expected: number | null): ZebuError {
    if (kvs.length === 0) return new ZebuError(ErrorCode.NOT_FOUND, `${kind} ${name} not found`);
    return new ZebuError(ErrorCode.CONFLICT, `${kind} ${name} changed since it was read (resourceVersion ${Number(kvs[0].mod_revision)}, not ${expected})`);
  }

  /** A lease id of ours as etcd's number; one etcd never gave is NOT_FOUND. */
  private leaseNumber(leaseId: string): string {
    checkLeaseId(leaseId);
    if (!LEASE_ID.test(leaseId)) throw new ZebuError(ErrorCode.NOT_FOUND, `lease ${leaseId} has expired or was never granted`);
    return leaseId;
  }

  private saw(revision: string | number): number {
    const n = Number(revision);
    if (n > this.seenRevision) this.seenRevision = n;
    return n;
  }

  /** Runs an etcd call, its failures as ZebuErrors (`lease` names the lease a NOT_FOUND is about). */
  private async call<R>(fn: () => Promise<R>, options: CallOptions = {}): Promise<R> {
    const end = Date.now() + this.callTimeoutMs;
    for (let attempt = 1; ; attempt++) {
      // With several members, a try that gets no answer soon goes to another member; the last
      // try has what is left of the deadline.
      const last = options.again !== true || this.members < 2 || attempt >= this.members || end - Date.now() < 2 * ATTEMPT_MS;
      if (options.tries !== undefined) options.tries.count = attempt;
      try {
        return last ? await attemptDeadline.run(end, fn) : await attemptDeadline.run(Date.now() + ATTEMPT_MS, fn);
      } catch (err) {
        if (last || !memberFailure(err)) throw etcdError(err, options.lease);
      }
    }
  }
}

interface CallOptions {
  /** The lease a NOT_FOUND is about. */
  lease?: string;
  /** The call may be tried again on another member (a read, or a write that compares revisions). */
  again?: boolean;
  /** Counts the tries made (a write tells its own earlier try from another writer by it). */
  tries?: { count: number };
}

/** One watch: catches up from its revision, then follows; ends on close, on error, or when a handler throws. */
class EtcdWatch {
  private readonly store: EtcdStore;
  private readonly prefix: string;
  private readonly after: number;
  private readonly handlers: WatchHandlers;
  private watcher: EtcdWatcher | null = null;
  private ended = false;

  constructor(store: EtcdStore, prefix: string, after: number, handlers: WatchHandlers) {
    this.store = store;
    this.prefix = prefix;
    this.after = after;
    this.handlers = handlers;
  }

  async start(): Promise<void> {
    try {
      await this.store.checkHistory(this.after);
      if (this.ended) return;
      const watcher = await this.store.watcher(this.prefix, this.after + 1);
      if (this.ended) {
        void watcher.cancel().catch(() => {});
        return;
      }
      this.watcher = watcher;
      watcher.on('data', (res: { events: { type: 'Put' | 'Delete'; kv: IKeyValue; prev_kv?: IKeyValue }[] }) => {
        for (const e of res.events) {
          if (this.ended) return;
          let event: WatchEvent;
          try {
            event = this.store.toEvent(e.type, e.kv, e.prev_kv);
          } catch (err) {
            this.close(err as Error);
            return;
          }
          try {
            this.handlers.onEvent(event);
          } catch (err) {
            this.close(err instanceof Error ? err : new Error(String(err)));
            return;
          }
        }
      });
      watcher.on('error', (err: Error) => this.close(etcdError(err)));
    } catch (err) {
      this.close(etcdError(err));
    }
  }

  /** Ends the watch; with an error, the handler hears of it (once). */
  close(err: Error | null): void {
    if (this.ended) return;
    this.ended = true;
    this.store.forget(this);
    if (this.watcher !== null) void this.watcher.cancel().catch(() => {});
    if (err !== null) {
      try {
        this.handlers.onError?.(err);
      } catch {
        // the handler's own failure has nowhere to go
      }
    }
  }
}

/** The first key after every key that starts with `prefix`. */
function prefixEnd(prefix: string): Buffer {
  const end = Buffer.from(prefix);
  for (let i = end.length - 1; i >= 0; i--) {
    if (end[i] < 0xff) {
      end[i]++;
      return end.subarray(0, i + 1);
    }
  }
  return Buffer.from([0]);
}

/** Whether a call failed before any member had it: no connection to the member it picked. */
function neverSent(err: Error): boolean {
  const unavailable = err instanceof GRPCUnavailableError || /\bUNAVAILABLE\b/.test(err.message);
  return unavailable && /No connection established|ECONNREFUSED|ENETUNREACH|EHOSTUNREACH/.test(err.message);
}

function etcdError(err: unknown, lease?: string): ZebuError {
  if (err instanceof ZebuError) return err;
  const message = err instanceof Error ? err.message : String(err);
  if (err instanceof EtcdLeaseInvalidError || /requested lease not found/.test(message)) {
    return new ZebuError(ErrorCode.NOT_FOUND, `${lease ?? 'the lease'} has expired or was never granted`);
  }
  if (/compacted/.test(message)) return new ZebuError(ErrorCode.COMPACTED, `etcd no longer keeps that history (${message}): list again, then watch`);
  if (err instanceof GRPCDeadlineExceededError) return new ZebuError(ErrorCode.TIMEOUT, `etcd did not answer in time: ${message}`);
  // TLS handshakes that failed on a certificate: no retry helps, the configuration must change.
  if (/alert (bad certificate|certificate required|unknown ca|certificate unknown)/i.test(message)) {
    return new ZebuError(ErrorCode.AUTH, `etcd refused this node's TLS client certificate (none given, or not signed by a CA etcd trusts: see --store-cert and --store-key): ${message}`);
  }
  if (/certificate verify failed|self[- ]signed certificate|unable to (get local issuer|verify)|Hostname\/IP does not match|ERR_TLS_CERT_ALTNAME_INVALID/i.test(message)) {
    return new ZebuError(ErrorCode.AUTH, `etcd's TLS certificate is not trusted (not signed by the CA given with --store-ca, or not for this address): ${message}`);
  }
  if (err instanceof GRPCUnavailableError) return new ZebuError(ErrorCode.DISCONNECTED, `etcd is unreachable: ${message}`);
  // The client stops calling a member for a while after calls to it kept failing.
  if (err instanceof Error && isBrokenCircuitError(err)) return new ZebuError(ErrorCode.DISCONNECTED, 'etcd is unreachable: every member failed the last calls; trying again shortly');
  if (err instanceof GRPCUnauthenticatedError || err instanceof EtcdAuthenticationFailedError || err instanceof EtcdPermissionDeniedError) {
    return new ZebuError(ErrorCode.AUTH, `etcd refused the credentials: ${message}`);
  }
  return new ZebuError(ErrorCode.EIO, `etcd: ${message}`);
}

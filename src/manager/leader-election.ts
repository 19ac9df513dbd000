/**
 * Which node runs the cluster's controllers: the one whose manager holds the Leader object
 * ("manager"), created under a store lease of its own. Every `zebu up` campaigns; one wins, the
 * others wait until the object is gone (its holder resigned, or stopped renewing and its lease
 * expired) and campaign again. On one machine the only node wins at once.
 *
 * - Elected: the lease is renewed every ttl/4 (counted from when a renewal was sent: the lease
 *   runs at least the TTL from then). A renewal refused (the lease expired: this node was
 *   cut off from the store for longer than the TTL) ends the term at once. Renewals that fail for
 *   other reasons (the store unreachable) end it once half the TTL has passed since the last good
 *   one: the node can no longer be sure it leads, and steps down before another node can have
 *   taken over (which needs the whole TTL to pass first).
 * - A Leader object naming this node is a term of an earlier run of it (killed, restarted): it is
 *   taken over at once rather than waited out. Two runs on one node never overlap (`zebu up`
 *   locks its data directory).
 * - onElected runs before the node acts as leader, onDeposed before it campaigns again; a failed
 *   onElected (the API port taken, say) resigns the term.
 */
import { ErrorCode, ZebuError } from '../errors.ts';
import { Kind, type LeaderValue } from '../cluster/objects.ts';
import type { Lease, Store, WriteGuard } from '../store/store.ts';

export const LEADER_NAME = 'manager';
const DEFAULT_TTL_MS = 10_000;

export interface LeaderElectionOptions {
  store: Store;
  nodeId: string;
  ttlMs?: number;
  onElected: () => Promise<void>;
  onDeposed: (why: string) => Promise<void>;
  log?: (event: Record<string, unknown>) => void;
}

export class LeaderElection {
  private readonly options: LeaderElectionOptions;
  private readonly ttlMs: number;
  private readonly log: (event: Record<string, unknown>) => void;
  private lease: Lease | null = null;
  private leading = false;
  private stopped = false;
  private running: Promise<void> | null = null;
  private wake: (() => void) | null = null;

  constructor(options: LeaderElectionOptions) {
    this.options = options;
    this.ttlMs = options.ttlMs ?? DEFAULT_TTL_MS;
    this.log = options.log ?? (() => {});
  }

  get isLeader(): boolean {
    return this.leading;
  }

  private termGuard: WriteGuard | null = null;

  /**
   * The guard of this node's term: the Leader object as this node created it. Writes of the
   * term's manager and API carry it, so that none of them lands after another node took over.
   */
  get guard(): WriteGuard {
    if (this.termGuard === null) throw new ZebuError(ErrorCode.EINVAL, 'no term has started: there is no guard yet');
    return this.termGuard;
  }

  /** Why the last term could not start (onElected failed), if it could not. */
  lastStartError: Error | null = null;

  /**
   * Campaigns once now and, when this node wins, runs onElected before it resolves (with whether
   * this node leads); then goes on in the background.
   */
  async start(): Promise<boolean> {
    const won = await this.campaign().catch((err) => {
      this.log({ event: 'leader-campaign-failed', error: (err as Error).message });
      return false;
    });
    if (won) await this.elected();
    this.running = this.loop();
    return this.leading;
  }

  /** Says where the leader's API serves, in the Leader object (while this node leads). */
  async announce(api: string): Promise<void> {
    if (!this.leading) return;
    const store = this.options.store;
    for (let attempt = 0; attempt < 5; attempt++) {
      const current = await store.get<LeaderValue>(Kind.Leader, LEADER_NAME);
      if (current === null || current.value.nodeId !== this.options.nodeId) return;
      try {
        await store.update<LeaderValue>(Kind.Leader, LEADER_NAME, { ...current.value, api }, { resourceVersion: current.resourceVersion });
        return;
      } catch (err) {
        if ((err as ZebuError).code !== ErrorCode.CONFLICT) throw err;
      }
    }
  }

  /** Ends the term (if any) and the campaign; the Leader object goes with the lease. */
  async stop(): Promise<void> {
    this.stopped = true;
    this.wake?.();
    await this.running;
    if (this.leading) {
      this.leading = false;
      await this.options.onDeposed('stopping').catch(() => {});
    }
    if (this.lease !== null) await this.options.store.revokeLease(this.lease.id).catch(() => {});
    this.lease = null;
  }

  private async loop(): Promise<void> {
    let lastRenewedMs = Date.now();
    while (!this.stopped) {
      // Leading: a renewal a quarter of the TTL after the last one began, so that one that must go
      // to another etcd member (the first did not answer) still lands before half the TTL.
      await this.sleep(this.leading ? Math.max(100, Math.floor(lastRenewedMs + this.ttlMs / 4 - Date.now())) : Math.max(200, Math.floor(this.ttlMs / 5)));
      if (this.stopped) break;
      if (this.leading) {
        // A renewal that hangs (a dead network) must not keep this node leading: past half the
        // TTL without one, it steps down whether or not the renewal has answered.
        const leftMs = Math.max(0, lastRenewedMs + this.ttlMs / 2 - Date.now());
        // Counted from when it was sent: the lease runs at least the TTL from then.
        const sentMs = Date.now();
        const renewal = this.options.store.keepAlive(this.lease!.id).then(() => null, (err: unknown) => err as ZebuError);
        const outcome = await Promise.race([renewal, this.delay(leftMs).then(() => 'late' as const)]);
        if (outcome === null) {
          lastRenewedMs = sentMs;
        } else if (outcome === 'late') {
          await this.deposed(`the leader lease was not renewed for ${Date.now() - lastRenewedMs} ms (the store does not answer)`);
        } else if (outcome.code === ErrorCode.NOT_FOUND) {
          await this.deposed('the leader lease expired (this node was cut off from the store)');
        } else if (Date.now() - lastRenewedMs > this.ttlMs / 2) {
          await this.deposed(`the leader lease could not be renewed for ${Date.now() - lastRenewedMs} ms: ${outcome.message}`);
        }
        continue;
      }
      try {
        if (await this.campaign()) {
          lastRenewedMs = Date.now();
          await this.elected();
        }
      } catch (err) {
        this.log({ event: 'leader-campaign-failed', error: (err as Error).message });
      }
    }
  }

  /** Tries to become leader; false when another node is. */
  private async campaign(): Promise<boolean> {
    const store = this.options.store;
    const current = await store.get<LeaderValue>(Kind.Leader, LEADER_NAME);
    if (current !== null) {
      if (current.value.nodeId !== this.options.nodeId) return false;
      // An earlier run of this node: its term is over.
      await store.delete(Kind.Leader, LEADER_NAME, { resourceVersion: current.resourceVersion }).catch((err) => {
        if ((err as ZebuError).code !== ErrorCode.NOT_FOUND && (err as ZebuError).code !== ErrorCode.CONFLICT) throw err;
      });
      if (current.leaseId !== null) await store.revokeLease(current.leaseId).catch(() => {});
    }
    if (this.lease === null) this.lease = await store.grantLease(this.ttlMs);
    try {
      const created = await store.create<LeaderValue>(Kind.Leader, LEADER_NAME, { nodeId: this.options.nodeId, since: new Date().toISOString() }, { leaseId: this.lease.id });
      this.termGuard = { kind: Kind.Leader, name: LEADER_NAME, createdRevision: created.createdRevision };
      return true;
    } catch (err) {
      const code = (err as ZebuError).code;
      if (code === ErrorCode.EXISTS) return false;
      // Our lease ran out while we waited: a new one next time.
      if (code === ErrorCode.NOT_FOUND) this.lease = null;
      throw err;
    }
  }

  private async elected(): Promise<void> {
    this.leading = true;
    this.log({ event: 'leader-elected', node: this.options.nodeId });
    try {
      await this.options.onElected();
      this.lastStartError = null;
    } catch (err) {
      this.lastStartError = err as Error;
      this.log({ event: 'leader-start-failed', error: (err as Error).message });
      const lease = this.lease;
      await this.deposed(`could not start as leader: ${(err as Error).message}`);
      // Let another node (or a later try of this one) lead: the Leader object goes with the lease.
      if (lease !== null) await this.options.store.revokeLease(lease.id).catch(() => {});
    }
  }

  private async deposed(why: string): Promise<void> {
    if (!this.leading) return;
    this.leading = false;
    this.log({ event: 'leader-deposed', node: this.options.nodeId, why });
    this.lease = null;
    await this.options.onDeposed(why).catch((err) => this.log({ event: 'leader-stop-failed', error: (err as Error).message }));
  }

  /** A plain timer (not woken by stop(): a renewal's wait ends on its own). */
  private delay(ms: number): Promise<void> {
    return new Promise((resolve) => setTimeout(resolve, ms).unref());
  }

  private sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.wake = null;
        resolve();
      }, ms);
      timer.unref();
      this.wake = () => {
        clearTimeout(timer);
        this.wake = null;
        resolve();
      };
    });
  }
}

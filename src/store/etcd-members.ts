/**
 * Which etcd members answer, for a client of several. A member whose machine is gone (powered
 * off, cut from the network) refuses nothing: a call to it waits for its deadline. The client
 * picks a member at random per call, so without this one member lost of three would make a third
 * of all calls wait seconds and fail, and a leader whose renewal went there would lose its term.
 *
 * A member whose call timed out or whose connection failed is "down": calls skip it (they go to
 * the others) while a probe (a linearizable read, which needs the member to reach a quorum) asks
 * it every second; the first answer makes it usable again. When every member is down, none is
 * skipped: calls try them all, as without this (etcd itself is out, and calls should say so).
 */
import { BrokenCircuitError, noop, type IDefaultPolicyContext, type IPolicy } from 'cockatiel';
import { GRPCDeadlineExceededError, GRPCUnavailableError } from 'etcd3';

const PROBE_EVERY_MS = 1000;

interface MemberState {
  down: boolean;
  /** Since when it has been down (for the log line when it is back). */
  downSince: number;
  probing: NodeJS.Timeout | null;
}

export interface EtcdMembersOptions {
  /** The members' client URLs, as the client was given them. */
  endpoints: string[];
  /** Resolves when the member answers a call that needs a quorum. */
  probe: (endpoint: string) => Promise<void>;
  /** A member found down, or back. */
  log?: (message: string) => void;
}

export class EtcdMembers {
  private readonly members = new Map<string, MemberState>();
  private readonly probe: (endpoint: string) => Promise<void>;
  private readonly log: (message: string) => void;
  /** The member each open stream (watch, lease keep-alive) went to. */
  private readonly streams = new WeakMap<object, string>();
  private closed = false;

  constructor(options: EtcdMembersOptions) {
    for (const endpoint of options.endpoints) this.members.set(endpoint, { down: false, downSince: 0, probing: null });
    this.probe = options.probe;
    this.log = options.log ?? (() => {});
  }

  /** The policy the etcd client runs every call to `endpoint` through (its `faultHandling.host`). */
  policyFor(endpoint: string): IPolicy<IDefaultPolicyContext> {
    const member = this.members.get(endpoint);
    if (member === undefined) throw new Error(`etcd member ${endpoint} is not one of ${[...this.members.keys()].join(', ')}`);
    return {
      _altReturn: undefined as never,
      onSuccess: noop.onSuccess,
      onFailure: noop.onFailure,
      execute: async <T>(fn: (context: IDefaultPolicyContext) => PromiseLike<T> | T): Promise<T> => {
        // Thrown before the call: the client takes the next member.
        if (member.down && !this.allDown()) throw new BrokenCircuitError(`etcd member ${endpoint} is not answering`);
        try {
          const result = await fn({ signal: new AbortController().signal });
          if (isStream(result)) this.streams.set(result, endpoint);
          return result;
        } catch (err) {
          if (memberFailure(err)) this.markDown(endpoint, err instanceof Error ? err.message : String(err));
          throw err;
        }
      },
    };
  }

  /** A stream's member gave no answer in time (a stream has no call deadline of its own). */
  streamTimedOut(stream: object): void {
    const endpoint = this.streams.get(stream);
    if (endpoint !== undefined) this.markDown(endpoint, 'no answer on a stream in time');
  }

  /** Whether `endpoint` is skipped now (for tests and status). */
  isDown(endpoint: string): boolean {
    return this.members.get(endpoint)?.down ?? false;
  }

  close(): void {
    this.closed = true;
    for (const member of this.members.values()) {
      if (member.probing !== null) clearTimeout(member.probing);
      member.probing = null;
    }
  }

  private allDown(): boolean {
    for (const member of this.members.values()) if (!member.down) return false;
    return true;
  }

  private markDown(endpoint: string, why: string): void {
    const member = this.members.get(endpoint)!;
    if (member.down || this.closed || this.members.size < 2) return;
    member.down = true;
    member.downSince = Date.now();
    this.log(`etcd member ${endpoint} is not answering (${why}): calls go to the other members until it does`);
    this.scheduleProbe(endpoint, member);
  }

  private scheduleProbe(endpoint: string, member: MemberState): void {
    member.probing = setTimeout(() => {
      member.probing = null;
      if (this.closed) return;
      this.probe(endpoint).then(() => {
        if (this.closed) return;
        member.down = false;
        this.log(`etcd member ${endpoint} answers again after ${Date.now() - member.downSince} ms`);
      }, () => {
        if (!this.closed) this.scheduleProbe(endpoint, member);
      });
    }, PROBE_EVERY_MS);
    member.probing.unref();
  }
}

/** A failure that says the member (or the way to it) is not working, not that the request was refused. */
export function memberFailure(err: unknown): boolean {
  if (err instanceof GRPCDeadlineExceededError || err instanceof GRPCUnavailableError) return true;
  return err instanceof Error && /\b(DEADLINE_EXCEEDED|UNAVAILABLE)\b/.test(err.message);
}

function isStream(value: unknown): value is object {
  return typeof value === 'object' && value !== null && typeof (value as { on?: unknown }).on === 'function' && typeof (value as { write?: unknown }).write === 'function';
}

/**
 * When a request sent to the write set (write, trim, write-zeroes, flush) may be acknowledged:
 * pure accounting, one per request, no I/O.
 *
 * The rule: every replica it was sent to (each RW and WO replica of the write set) has answered,
 * and at least one RW replica applied it. A replica that failed it was taken out (ERR) before the
 * acknowledgement — so a replica that stays in the set holds every acknowledged write. A replica
 * that called the request invalid (EINVAL) while a RW replica applied it no longer holds the same
 * bytes and is taken out too; when no RW replica applied it, the refusal is the answer.
 */
import { assert, type ZebuError } from '../errors.ts';

export type WriteVerdict<M> =
  /** Acknowledge; take out the replicas that refused what the others applied. */
  | { kind: 'ack'; refusedBy: { member: M; err: ZebuError }[] }
  /** The request itself is bad: answer with the replicas' refusal. */
  | { kind: 'refused'; err: ZebuError }
  /** No RW replica applied it. */
  | { kind: 'failed' };

const NONE: { member: never; err: ZebuError }[] = [];

export class WriteAck<M> {
  private readonly targets: number;
  private answered = 0;
  private appliedByRw = 0;
  /** Error path only: allocated on first use. */
  private refused: { member: M; err: ZebuError }[] | null = null;
  private failed: M[] | null = null;

  constructor(targets: number) {
    assert(Number.isInteger(targets) && targets > 0, 'a request goes to at least one replica');
    this.targets = targets;
  }

  /** A target applied it; `rw`: the target is RW (on the same link). True once every target answered. */
  applied(rw: boolean): boolean {
    if (rw) this.appliedByRw++;
    return this.answer();
  }

  /** A target refused it as invalid; decided once every target answered. */
  refusedBy(member: M, err: ZebuError): boolean {
    (this.refused ??= []).push({ member, err });
    return this.answer();
  }

  /** A target failed it; the caller takes that replica out now (before any acknowledgement). */
  failedOn(member: M): boolean {
    (this.failed ??= []).push(member);
    return this.answer();
  }

  /** The verdict, once every target answered; `isOut(m)`: m is ERR now. */
  verdict(isOut: (member: M) => boolean): WriteVerdict<M> {
    assert(this.answered === this.targets, `a verdict after ${this.answered} of ${this.targets} answers`);
    if (this.appliedByRw > 0) {
      for (const m of this.failed ?? []) assert(isOut(m), 'a write is acknowledged while a replica that failed it is still in the set');
      return { kind: 'ack', refusedBy: this.refused ?? NONE };
    }
    if (this.refused !== null) return { kind: 'refused', err: this.refused[0].err };
    return { kind: 'failed' };
  }

  private answer(): boolean {
    this.answered++;
    assert(this.answered <= this.targets, `${this.answered} answers to a request sent to ${this.targets} replicas`);
    return this.answered === this.targets;
  }
}

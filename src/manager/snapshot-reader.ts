/**
 * How a backup reads a volume's snapshot: straight from the replicas the engine has in sync (RW),
 * with the engine as the fallback for every read a replica cannot serve.
 *
 * A snapshot is immutable, and every RW replica holds the same bytes for it (the engine's own
 * snapshot reads pick any RW replica for the same reason). Reading it through the engine costs
 * a second hop: each block crosses two sockets and is copied in the engine, which on a small
 * machine is a quarter of a full backup's CPU. So the engine is asked once which replicas are
 * RW and at which epoch, and blocks are read from those replicas over their data protocol.
 *
 * Nothing here decides correctness: a replica that fails a read, cannot be reached, answers with
 * another name than the engine knows it by, or says after a read that it is being rebuilt or at
 * another epoch (a newer engine) is dropped for the rest of the job, and its reads (and every later one, when no replica is left) go through the
 * engine, which answers as it always did. Change lists (SNAPSHOT_CHANGES) always come from the
 * engine: they are small, and the engine is where they are decided.
 */
import { toZebuError } from '../errors.ts';
import { ioBuffers } from '../protocol/buffer-pool.ts';
import type { DataClient } from '../protocol/client.ts';
import type { ReplicaInfo } from '../replica/replica.ts';
import type { SnapshotReader } from '../backup/backup-job.ts';

/** Opens a data connection to a replica at `address` (HOST:PORT) with `epoch`. */
export type ReplicaOpener = (address: string, epoch: number) => Promise<DataClient>;

interface DirectReplica {
  address: string;
  /** The engine's key for it: its name, or its address when it has none. */
  key: string;
  client: Promise<DataClient> | null;
  inflight: number;
  dropped: string | null;
}

export interface SnapshotReadCounts {
  /** Bytes read straight from replicas. */
  directBytes: number;
  /** Bytes read through the engine (no replica could serve them). */
  engineBytes: number;
  /** Replicas dropped during the job, with the reason. */
  dropped: { address: string; reason: string }[];
}

export class ReplicaSnapshotReader implements SnapshotReader {
  readonly counts: SnapshotReadCounts = { directBytes: 0, engineBytes: 0, dropped: [] };
  private readonly engine: DataClient;
  private readonly open: ReplicaOpener | undefined;
  private readonly epoch: number;
  private readonly replicas: DirectReplica[];
  private readonly log: (event: Record<string, unknown>) => void;
  private closed = false;

  private constructor(engine: DataClient, open: ReplicaOpener | undefined, epoch: number, replicas: { address: string; key: string }[], log: (event: Record<string, unknown>) => void) {
    this.engine = engine;
    this.open = open;
    this.epoch = epoch;
    this.replicas = replicas.map((r) => ({ ...r, client: null, inflight: 0, dropped: null }));
    this.log = log;
  }

  /**
   * Asks the engine for its epoch and RW replicas. Without `open` (a manager that cannot reach
   * replicas), every read goes through the engine.
   */
  static async create(engine: DataClient, open: ReplicaOpener | undefined, log: (event: Record<string, unknown>) => void = () => {}): Promise<ReplicaSnapshotReader> {
    if (open === undefined) return new ReplicaSnapshotReader(engine, open, 0, [], log);
    const info = (await engine.info()) as { epoch?: unknown; replicas?: unknown };
    const epoch = typeof info.epoch === 'number' && Number.isSafeInteger(info.epoch) && info.epoch >= 0 ? info.epoch : null;
    const rows = Array.isArray(info.replicas) ? (info.replicas as { address?: unknown; key?: unknown; mode?: unknown }[]) : [];
    const rw = epoch === null
      ? []
      : rows.filter((r) => r.mode === 'RW' && typeof r.address === 'string' && typeof r.key === 'string').map((r) => ({ address: r.address as string, key: r.key as string }));
    return new ReplicaSnapshotReader(engine, open, epoch ?? 0, rw, log);
  }

  /** How many replicas reads may still go to directly. */
  get usableReplicas(): number {
    return this.replicas.filter((r) => r.dropped === null).length;
  }

  async readSnapshot(name: string, offset: number, length: number): Promise<Buffer> {
    const replica = this.pick();
    if (replica !== null) {
      replica.inflight++;
      try {
        const client = await this.connect(replica);
        const data = await client.readSnapshot(name, offset, length);
        // Asked after the read: a replica being rebuilt in place (its layers incomplete, or
        // taken over by a newer engine) since the engine named it is not to be trusted, and a
        // rebuild cannot start and finish between the read and this answer.
        const problem = data.length !== length ? `answered ${data.length} bytes for a ${length}-byte read` : stateProblem(await client.info(), this.epoch);
        if (problem === null) {
          this.counts.directBytes += length;
          return data;
        }
        ioBuffers.release(data);
        this.drop(replica, problem);
      } catch (err) {
        this.drop(replica, toZebuError(err).message);
      } finally {
        replica.inflight--;
      }
    }
    const data = await this.engine.readSnapshot(name, offset, length);
    this.counts.engineBytes += length;
    return data;
  }

  snapshotChanges(name: string, base: string | null, offset: number, length: number) {
    return this.engine.snapshotChanges(name, base, offset, length);
  }

  release(data: Buffer): void {
    ioBuffers.release(data);
  }

  close(): void {
    this.closed = true;
    for (const r of this.replicas) this.closeClient(r);
  }

  /** The usable replica with the fewest reads in flight. */
  private pick(): DirectReplica | null {
    if (this.closed) return null;
    let best: DirectReplica | null = null;
    for (const r of this.replicas) {
      if (r.dropped === null && (best === null || r.inflight < best.inflight)) best = r;
    }
    return best;
  }

  private connect(replica: DirectReplica): Promise<DataClient> {
    replica.client ??= (async () => {
      const client = await this.open!(replica.address, this.epoch);
      try {
        // The engine may know the replica by name: the address must still be that replica.
        const info = (await client.info()) as ReplicaInfo & { name?: unknown };
        if (replica.key !== replica.address && typeof info.name === 'string' && info.name !== replica.key) {
          throw new Error(`${replica.address} is replica ${info.name}, not ${replica.key}`);
        }
        const problem = stateProblem(info, this.epoch);
        if (problem !== null) throw new Error(problem);
      } catch (err) {
        client.close();
        throw err;
      }
      client.onClose(() => {
        if (replica.dropped === null && !this.closed) this.drop(replica, 'its connection closed');
      });
      return client;
    })();
    return replica.client;
  }

  private drop(replica: DirectReplica, reason: string): void {
    if (replica.dropped !== null) return;
    replica.dropped = reason;
    this.counts.dropped.push({ address: replica.address, reason });
    this.log({ event: 'backup-replica-dropped', address: replica.address, reason });
    this.closeClient(replica);
  }

  private closeClient(replica: DirectReplica): void {
    const client = replica.client;
    replica.client = null;
    client?.then((c) => c.close(), () => {});
  }
}

/** Why a replica's own state rules it out as a snapshot source (null: it does not). */
function stateProblem(info: ReplicaInfo, epoch: number): string | null {
  if (info.rebuilding) return 'it is being rebuilt';
  if (info.epoch !== epoch) return `its epoch is ${info.epoch}, not the engine's ${epoch}`;
  return null;
}

/**
 * The running volume's small control interface: HTTP/JSON on a UNIX socket, used by
 * `zebu engine …` commands and by the node agent. Errors: {"error": message, "code": ErrorCode}
 * with 400 EINVAL, 404 NOT_FOUND, 409 EXISTS/BUSY/CONFLICT, 507 ENOSPC, 500 otherwise.
 *
 *   GET    /v1/info               {name, sizeBytes, epoch, faulted, faultedReason, superseded, rebuilding,
 *                                  verifying, activeRegions, maxActiveRegions, recovery, lastVerify,
 *                                  replicas: [ReplicaRow], stats: {reads, writes, zeroes, flushes,
 *                                  readBytes, writeBytes, errors, readLatencyMsTotal, writeLatencyMsTotal,
 *                                  heldWrites, boundFlushes, idleFlushes, claimWaits, claimWaitLongestMs,
 *                                  rebuildLeaseGrants, rebuildLeaseRecalls, rebuildLeaseRevokes,
 *                                  rebuildLeaseReplays, rebuildCopiersLost}}
 *                                 superseded: a newer engine (epoch) fenced this one; it serves nothing.
 *                                 recovery (null before start-up ends): {at, clean, source, regions,
 *                                  bytes, durationMs, deltaReplicas: [address], erredReplicas:
 *                                  [{address, reason}]}; lastVerify: the last verify report or null.
 *                                 ReplicaRow = {address, key, mode: RW|WO|ERR, reason, inflight, local,
 *                                  revision, rebuild: {copiedBytes, totalBytes, delta} | null}
 *   GET    /v1/replicas           [ReplicaRow]
 *   POST   /v1/replicas           {"address": "HOST:PORT" | "KEY=HOST:PORT", "key"?: KEY} -> [ReplicaRow]:
 *                                 adds a replica (a smaller one is grown first) as WO and rebuilds it
 *                                 in the background; returns at once, progress in `rebuild`. An empty
 *                                 replica gets a full copy; a non-empty one a delta rebuild (rebuild.delta
 *                                 true) when a RW replica holds a missed-write map for KEY and its
 *                                 snapshot chain is the volume's. An ERR entry of the same address or
 *                                 key is replaced. 409 EXISTS: already in the set (not ERR); 409 BUSY:
 *                                 a rebuild, snapshot or expansion runs; 400 EINVAL: "not empty and no
 *                                 delta rebuild is possible: why", larger than the volume, bad address
 *   DELETE /v1/replicas/ADDRESS   (URL-encoded HOST:PORT or KEY) -> [ReplicaRow]: takes a replica out
 *                                 (stops its rebuild if it is the target); 409 BUSY for the last
 *                                 RW replica; 404 if not in the set
 *   POST   /v1/expand             {"sizeBytes": N} -> the /v1/info body: drains I/O, grows every
 *                                 RW/WO replica, then the volume (multiple of 4096, never shrinks;
 *                                 the same size is a no-op); 409 BUSY during a rebuild
 *   POST   /v1/verify             {"repair"?: bool} -> {at, repair, regions, replicas: [address], source,
 *                                  differing: [{region, offset, length, hashes: {address: hex}}],
 *                                  repaired, durationMs}: compares the RW replicas region by region
 *                                  (4 MiB) under live I/O; with repair, copies each differing region
 *                                  from the source into the replicas that differ. 409 BUSY: a verify
 *                                  runs already; 500 FENCED/EIO when faulted
 *   GET    /v1/stats              the stats object of /v1/info
 *   PUT    /v1/rebuild-limit      {"bytesPerSecond": N} -> {rebuildMaxBytesPerSecond}: what a rebuild may
 *                                 write to its target per second (0: no limit); a rebuild under way
 *                                 takes it from its next region. Shown in /v1/info as rebuildMaxBytesPerSecond
 *   GET    /v1/snapshots          [SnapshotInfo] of a RW replica
 *   POST   /v1/snapshots          {"name": "..."} -> SnapshotInfo: drains, flushes, snapshots every replica
 *   DELETE /v1/snapshots/NAME     -> {"deleted": NAME}
 *   POST   /v1/snapshots/NAME/revert   -> {"reverted": NAME}: drains, reverts every replica
 *   Snapshot create, delete and revert are 409 BUSY while a rebuild runs.
 */
import http from 'node:http';
import { httpStatusFor } from '../error-status.ts';
import { ZebuError, ErrorCode, toZebuError } from '../errors.ts';
import type { Engine } from './engine.ts';
import { listenOnUnixSocket } from '../protocol/unix-socket.ts';
import { readJsonBody, sendJson } from '../protocol/http-json.ts';

const MAX_BODY_BYTES = 64 * 1024;

/** A URL path segment, decoded; a malformed escape is the caller's error, not ours. */
function pathArg(segment: string): string {
  try {
    return decodeURIComponent(segment);
  } catch {
    throw new ZebuError(ErrorCode.EINVAL, `bad escape in URL path segment ${JSON.stringify(segment)}`);
  }
}

export class EngineControlServer {
  private readonly server: http.Server;
  private readonly engine: Engine;

  constructor(engine: Engine) {
    this.engine = engine;
    this.server = http.createServer((req, res) => {
      this.handle(req).then(
        (body) => sendJson(res, 200, body),
        (err) => {
          const e = toZebuError(err);
          sendJson(res, httpStatusFor(e.code), { error: e.message, code: e.code });
        },
      );
    });
  }

  private async handle(req: http.IncomingMessage): Promise<unknown> {
    const url = new URL(req.url ?? '/', 'http://engine');
    const route = `${req.method} ${url.pathname}`;
    if (route === 'GET /v1/info') return this.engine.info();
    if (route === 'POST /v1/startup/addresses') {
      const body = (await readJsonBody(req, MAX_BODY_BYTES)) as { addresses?: unknown };
      const addresses = body.addresses;
      if (addresses === null || typeof addresses !== 'object' || Array.isArray(addresses) || Object.values(addresses).some((a) => typeof a !== 'string')) {
        throw new ZebuError(ErrorCode.EINVAL, 'body field "addresses" must be an object of replica key -> "HOST:PORT"');
      }
      return this.engine.setStartupAddresses(addresses as Record<string, string>);
    }
    if (route === 'PUT /v1/rebuild-limit') {
      // Also while starting: a start-up recovery may copy regions too.
      const body = (await readJsonBody(req, MAX_BODY_BYTES)) as { bytesPerSecond?: unknown };
      const rate = body.bytesPerSecond;
      if (typeof rate !== 'number' || !Number.isSafeInteger(rate) || rate < 0) throw new ZebuError(ErrorCode.EINVAL, 'body field "bytesPerSecond" must be a whole number >= 0 (0: no limit)');
      return this.engine.setRebuildLimit(rate);
    }
    if (this.engine.currentPhase !== 'serving') throw new ZebuError(ErrorCode.BUSY, `volume ${this.engine.name}: the engine is starting (${route} is served once it runs)`);
    if (route === 'GET /v1/replicas') return this.engine.replicaStatus();
    if (route === 'GET /v1/stats') return (this.engine.info() as { stats: unknown }).stats;
    if (route === 'GET /v1/snapshots') return this.engine.snapshotList();
    if (route === 'POST /v1/snapshots') {
      const body = (await readJsonBody(req, MAX_BODY_BYTES)) as { name?: unknown };
      if (typeof body.name !== 'string') throw new ZebuError(ErrorCode.EINVAL, 'body field "name" must be a string');
      return this.engine.snapshotCreate(body.name);
    }
    if (route === 'POST /v1/replicas') {
      const body = (await readJsonBody(req, MAX_BODY_BYTES)) as { address?: unknown; key?: unknown };
      if (typeof body.address !== 'string') throw new ZebuError(ErrorCode.EINVAL, 'body field "address" must be a string HOST:PORT or KEY=HOST:PORT');
      if (body.key !== undefined && typeof body.key !== 'string') throw new ZebuError(ErrorCode.EINVAL, 'body field "key" must be a string');
      return this.engine.addReplica(body.key !== undefined ? `${body.key}=${body.address}` : body.address);
    }
    if (route === 'POST /v1/verify') {
      const body = (await readJsonBody(req, MAX_BODY_BYTES)) as { repair?: unknown };
      if (body.repair !== undefined && typeof body.repair !== 'boolean') throw new ZebuError(ErrorCode.EINVAL, 'body field "repair" must be a boolean');
      return this.engine.verify({ repair: body.repair === true });
    }
    const removeReplica = /^DELETE \/v1\/replicas\/([^/]+)$/.exec(route);
    if (removeReplica) return this.engine.removeReplica(pathArg(removeReplica[1]));
    if (route === 'POST /v1/expand') {
      const body = (await readJsonBody(req, MAX_BODY_BYTES)) as { sizeBytes?: unknown };
      if (typeof body.sizeBytes !== 'number') throw new ZebuError(ErrorCode.EINVAL, 'body field "sizeBytes" must be a number');
      return this.engine.expand(body.sizeBytes);
    }
    const revert = /^POST \/v1\/snapshots\/([^/]+)\/revert$/.exec(route);
    if (revert) {
      const name = pathArg(revert[1]);
      await this.engine.snapshotRevert(name);
      return { reverted: name };
    }
    const del = /^DELETE \/v1\/snapshots\/([^/]+)$/.exec(route);
    if (del) {
      const name = pathArg(del[1]);
      await this.engine.snapshotDelete(name);
      return { deleted: name };
    }
    throw new ZebuError(ErrorCode.NOT_FOUND, `no route ${route}`);
  }

  listen(socketPath: string): Promise<void> {
    return listenOnUnixSocket(this.server, socketPath);
  }

  close(): void {
    this.server.close();
    this.server.closeAllConnections();
  }
}

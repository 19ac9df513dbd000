/**
 * The engine's pure decision modules, without any process or socket: the replica set and its
 * modes, write acknowledgement, flush numbering and active regions, rebuild planning, verify.
 * Each test drives the module as the engine does and checks the invariant it guards.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ErrorCode, ZebuError } from '../../src/errors.ts';
import { ReplicaSet, ReplicaMode, type EngineReplica } from '../../src/engine/replica-set.ts';
import { WriteAck } from '../../src/engine/write-ack.ts';
import { ActiveRegions, FlushSequence } from '../../src/engine/active-regions.ts';
import { deltaRefusal, deltaRegions, joinKind, liveRegionCopy, imageMismatch } from '../../src/engine/rebuild-plan.ts';
import { differingFromSource, verifySource, VerifyTally, MAX_REPORTED_DIFFERENCES } from '../../src/engine/verify.ts';
import { furthestAhead } from '../../src/engine/startup.ts';
import { regionMayLeave } from '../../src/replica/intent-log.ts';
import type { ReplicaInfo } from '../../src/replica/replica.ts';
import { assertInvariantFails } from '../support/assertions.ts';

interface FakeLink {
  inflight: number;
}

function member(key: string, mode: ReplicaMode, options: { local?: boolean; inflight?: number; inWriteSet?: boolean; rebuilding?: boolean } = {}): EngineReplica<FakeLink> {
  return {
    address: `127.0.0.1:${key.charCodeAt(0)}`, key, named: false, host: '127.0.0.1', port: 1, local: options.local ?? false,
    client: { inflight: options.inflight ?? 0 }, mode, reason: null, info: null,
    rebuild: options.rebuilding ? { copiedBytes: 0, totalBytes: 1, delta: false } : null, inWriteSet: options.inWriteSet ?? true,
  };
}

function info(fields: Partial<ReplicaInfo> = {}): ReplicaInfo {
  return {
    sizeBytes: 1 << 30, blockSizeBytes: 4096, epoch: 3, revision: 0, flushedRevision: 0, cleanShutdown: true, headId: 'L1', chain: ['L1'], layerCount: 1,
    maxLayers: 250, hasBase: false, rebuilding: false, rebuildKind: null, activeRegions: 0, intentRegionBytes: 4 << 20, writeEpoch: 0, ...fields,
  };
}

function servingSet(...members: EngineReplica<FakeLink>[]): ReplicaSet<FakeLink> {
  const set = new ReplicaSet<FakeLink>([], 3);
  for (const m of members) {
    set.members.push(m);
    if (m.mode === ReplicaMode.RW) set.startRw(m);
  }
  set.startServing();
  return set;
}

const eio = (message = 'disk gone'): ZebuError => new ZebuError(ErrorCode.EIO, message);

test('replica set: reads go to a RW replica only — local first, then least busy; never a WO or rebuilding one', () => {
  const a = member('a', ReplicaMode.RW, { inflight: 5 });
  const b = member('b', ReplicaMode.RW, { inflight: 1 });
  const c = member('c', ReplicaMode.WO, { inflight: 0, inWriteSet: true, rebuilding: true });
  const set = servingSet(a, b, c);
  assert.equal(set.pickReader(null), b);
  a.local = true;
  assert.equal(set.pickReader(null), a);
  assert.equal(set.pickReader(new Set([a])), b);
  assert.equal(set.pickReader(new Set([a, b])), null, 'the WO replica being rebuilt is never read from');
  assert.deepEqual(set.writeTargets(), [a, b, c], 'it takes the writes');
});

test('replica set: a RW replica lost starts a missed-write map for it; the last one lost faults the volume', () => {
  const a = member('a', ReplicaMode.RW);
  const b = member('b', ReplicaMode.RW);
  const set = servingSet(a, b);
  const linkA = a.client;
  const first = set.fail(a, eio(), { missed: true, closing: false })!;
  assert.equal(first.close, linkA, 'the shell closes its link');
  assert.equal(first.startMapFor, 'a');
  assert.equal(first.faulted, null);
  assert.equal(a.mode, ReplicaMode.ERR);
  assert.equal(set.fail(a, eio(), { missed: true, closing: false }), null, 'out once');
  assert.deepEqual(set.writeTargets(), [b]);
  const last = set.fail(b, eio('cable'), { missed: true, closing: false })!;
  assert.match(last.faulted ?? '', /no healthy replica left/);
  assert.match(set.faultedReason ?? '', /cable/);
});

test('replica set: a removed replica, or one lost while closing, starts no map; a fenced engine is superseded', () => {
  const a = member('a', ReplicaMode.RW);
  const b = member('b', ReplicaMode.RW);
  const c = member('c', ReplicaMode.RW);
  const set = servingSet(a, b, c);
  assert.equal(set.fail(a, eio(), { missed: false, closing: false })!.startMapFor, null);
  assert.equal(set.fail(b, eio(), { missed: true, closing: true })!.startMapFor, null);
  const fenced = set.fail(c, new ZebuError(ErrorCode.FENCED, 'epoch 4 > 3'), { missed: true, closing: false })!;
  assert.equal(fenced.superseded, true);
  assert.equal(set.superseded, true);
  assert.match(set.faultedReason ?? '', /superseded/);
});

test('replica set: a rebuilt replica joins the write set, then turns RW; never RW from outside the write set', () => {
  const a = member('a', ReplicaMode.RW);
  const set = servingSet(a);
  const t = member('t', ReplicaMode.WO, { inWriteSet: false, rebuilding: true });
  set.add(t, undefined);
  assert.deepEqual(set.writeTargets(), [a]);
  assertInvariantFails(() => set.promote(t), /only from WO in the write set/);
  set.join(t);
  assert.deepEqual(set.writeTargets(), [a, t]);
  set.promote(t);
  assert.equal(t.mode, ReplicaMode.RW);
  assert.equal(set.pickReader(new Set([a])), t);
  assert.equal(set.isLastRw(a), false);
});

test('replica set: epochs never go down, nor below the engine\'s; no replica wrote in an epoch above its own', () => {
  const a = member('a', ReplicaMode.RW);
  const set = servingSet(a);
  assertInvariantFails(() => set.noteInfo(a, info({ epoch: 2 })), /below the epoch 3 it was opened with/);
  set.noteInfo(a, info({ epoch: 5, writeEpoch: 3 }));
  assertInvariantFails(() => set.noteInfo(a, info({ epoch: 4 })), /epochs never go down/);
  assertInvariantFails(() => set.noteInfo(a, info({ epoch: 5, writeEpoch: 6 })), /above its epoch/);
});

test('write ack: acknowledged only once every target answered and a RW one applied it', () => {
  const ack = new WriteAck<string>(3);
  assert.equal(ack.applied(true), false);
  assertInvariantFails(() => ack.verdict(() => true), /after 1 of 3/);
  assert.equal(ack.failedOn('b'), false);
  assert.equal(ack.applied(false), true);
  assert.deepEqual(ack.verdict((m) => m === 'b'), { kind: 'ack', refusedBy: [] });
  assertInvariantFails(() => ack.applied(true), /4 answers to a request sent to 3/);
});

test('write ack: never acknowledged while a replica that failed it is still in the set', () => {
  const ack = new WriteAck<string>(2);
  ack.applied(true);
  ack.failedOn('b');
  assertInvariantFails(() => ack.verdict(() => false), /still in the set/);
});

test('write ack: a refusal is the answer when no RW replica applied it, else the refusing replica goes', () => {
  const refused = new WriteAck<string>(2);
  refused.refusedBy('a', new ZebuError(ErrorCode.EINVAL, 'bad offset'));
  refused.refusedBy('b', new ZebuError(ErrorCode.EINVAL, 'bad offset'));
  const v = refused.verdict(() => false);
  assert.equal(v.kind, 'refused');
  const split = new WriteAck<string>(2);
  split.applied(true);
  split.refusedBy('b', new ZebuError(ErrorCode.EINVAL, 'odd'));
  const w = split.verdict(() => false);
  assert.equal(w.kind, 'ack');
  assert.deepEqual(w.kind === 'ack' ? w.refusedBy.map((x) => x.member) : [], ['b']);
  const none = new WriteAck<string>(1);
  none.applied(false);
  assert.equal(none.verdict(() => false).kind, 'failed', 'a WO replica alone does not make a write acknowledged');
});

test('flush numbers: confirmed is the highest number below which every flush completed, and never goes down', () => {
  const f = new FlushSequence();
  const [one, two, three] = [f.next(), f.next(), f.next()];
  f.completed(two);
  assert.equal(f.confirmed, 0, 'flush 1 is still out');
  f.completed(one);
  assert.equal(f.confirmed, 2);
  f.completed(three);
  assert.equal(f.confirmed, 3);
  assertInvariantFails(() => f.completed(three), /completed twice/);
  assertInvariantFails(() => f.completed(4), /but 3 were sent/);
});

test('active regions: bounded; a region leaves only by the replicas\' rule (no write in flight, confirmed after its last write, idle)', () => {
  const R = 4 << 20;
  const regions = new ActiveRegions(R, 2, 16 * R);
  assert.equal(regions.fits(0, 4096), true);
  regions.started(0, 4096);
  regions.started(R, 4096);
  assert.equal(regions.size, 2);
  assert.equal(regions.fits(R + 8192, 4096), true, 'an active region is always writable');
  assert.equal(regions.fits(2 * R, 4096), false, 'a third region is over the bound');
  regions.written(0, 4096, 5, 1000);
  regions.prune(6, Infinity);
  assert.equal(regions.size, 1, 'region 0 left (flush 6 confirmed after its write); region 1 has a write in flight');
  regions.written(R, 4096, 7, 2000);
  regions.prune(7, Infinity);
  assert.equal(regions.size, 1, 'flush 7 was sent before the write completed: it does not cover it');
  regions.prune(8, 1999);
  assert.equal(regions.size, 1, 'not idle long enough');
  regions.prune(8, 2000);
  assert.equal(regions.size, 0);
  assertInvariantFails(() => regions.written(3 * R, 1, 8, 0), /without being started/);
  // The replicas' log uses the very same rule.
  assert.equal(regionMayLeave(0, 6, 6, 1000, 1000), true);
  assert.equal(regionMayLeave(1, 6, 6, 1000, 1000), false);
  assert.equal(regionMayLeave(0, 0, 6, 1000, 1000), false);
});

test('active regions: an expansion keeps the active regions; start-up marks the resynced ones active at stamp 0', () => {
  const R = 4 << 20;
  const regions = new ActiveRegions(R, 8, 2 * R);
  regions.markActive(1, 0);
  regions.resize(4 * R);
  assert.equal(regions.regionCount, 4);
  assert.equal(regions.size, 1);
  regions.prune(1, Infinity);
  assert.equal(regions.size, 0, 'a flush confirming #1 lets a stamp-0 region go');
});

test('rebuild plan: empty, served, delta refusals, delta regions and how the live volume is copied', () => {
  assert.deepEqual(joinKind(info()), { empty: true, served: false });
  assert.deepEqual(joinKind(info({ writeEpoch: 2 })), { empty: true, served: true }, 'it lost all its writes before its first flush: still a delta');
  assert.deepEqual(joinKind(info({ revision: 4 })), { empty: false, served: false });
  assert.equal(deltaRefusal(info(), ['s1'], ['s1'], false), null);
  assert.match(deltaRefusal(info(), ['s1', 's2'], ['s1'], false) ?? '', /chain \[s1\] is not the volume's \[s1, s2\]/);
  assert.match(deltaRefusal(info({ rebuilding: true, rebuildKind: 'full' }), [], [], false) ?? '', /full\) rebuild stopped midway/);
  assert.equal(deltaRefusal(info({ rebuilding: true, rebuildKind: 'delta' }), [], [], false), null, 'a delta that stopped is done again');
  assert.match(deltaRefusal(info({ hasBase: true }), [], [], false) ?? '', /backing image differs/);
  assert.deepEqual(deltaRegions([5, 1], [1, 9], [2, 99], 10), [1, 2, 5, 9]);
  assert.deepEqual(liveRegionCopy('s1', true, true), { kind: 'since', snapshot: 's1' });
  assert.deepEqual(liveRegionCopy(null, true, false), { kind: 'image', zeroIfEmpty: false });
  assert.deepEqual(liveRegionCopy(null, false, true), { kind: 'status', zeroIfEmpty: true });
  assert.match(imageMismatch(info({ hasBase: true }), info()) ?? '', /has a backing image and the volume has none/);
  assert.equal(imageMismatch(info({ hasBase: true }), null), null);
});

test('verify: differences from the source are found and reported (bounded); a failed source fails the verify', () => {
  const a = { address: 'a', reason: null };
  const b = { address: 'b', reason: null };
  const c = { address: 'c', reason: 'gone' };
  assert.deepEqual(differingFromSource([a, b, c], ['h1', 'h2', null], a), [b], 'a replica that failed is not compared');
  assert.deepEqual(differingFromSource([a, b], ['h1', 'h1'], b), []);
  assert.throws(() => differingFromSource([a, c], ['h1', null], c), /verify source c failed: gone/);
  // A source that failed hands over to the first replica still compared; none left fails.
  const rw = member('r', ReplicaMode.RW);
  const other = member('o', ReplicaMode.RW);
  const failed = { ...member('f', ReplicaMode.ERR), reason: 'disk died' };
  assert.equal(verifySource(rw, [rw, other]), rw, 'a serving source stays');
  assert.equal(verifySource(failed, [failed, other]), other);
  assert.equal(verifySource({ ...rw, client: null }, [other]), other, 'a source whose connection went is out too');
  assert.throws(() => verifySource(failed, [failed]), /verify source .* failed: disk died/);
  const tally = new VerifyTally();
  for (let region = MAX_REPORTED_DIFFERENCES + 4; region >= 0; region--) tally.differs(region, region * 10, 10, [a, b], ['x', 'y']);
  tally.repaired = 2;
  const report = tally.report(new Date(0), true, 2000, ['a', 'b'], 'a', 5);
  assert.equal(tally.differingCount, MAX_REPORTED_DIFFERENCES + 5);
  assert.equal(report.differing.length, MAX_REPORTED_DIFFERENCES);
  assert.ok(report.differing.every((d, i) => i === 0 || d.region > report.differing[i - 1].region), 'sorted by region');
});

test('recovery source hand-over uses the start-up order: writeEpoch, then revision, then flushed revision', () => {
  const live = { info: info({ writeEpoch: 3, revision: 620, flushedRevision: 617 }) };
  const flushedMore = { info: info({ writeEpoch: 3, revision: 618, flushedRevision: 618 }) };
  assert.equal(furthestAhead([flushedMore, live]), live);
  assert.equal(furthestAhead([{ info: null }]), null);
});

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { planStartup, chooseSource, mapHolders, NO_MISSED, type MissedStatus, type StartupCandidate } from '../../src/engine/startup.ts';
import type { ReplicaInfo } from '../../src/replica/replica.ts';

const SIZE = 64 << 20;
const REGION = 4 << 20;

function info(revision: number, options: { flushed?: number; writeEpoch?: number; sizeBytes?: number; rebuilding?: boolean; rebuildKind?: 'full' | 'delta'; clean?: boolean } = {}): ReplicaInfo {
  return {
    sizeBytes: options.sizeBytes ?? SIZE, blockSizeBytes: 4096, epoch: 1, revision, flushedRevision: options.flushed ?? revision,
    cleanShutdown: options.clean ?? true, headId: 'L00000001', chain: ['L00000001'], layerCount: 1, maxLayers: 250, hasBase: false,
    rebuilding: options.rebuilding ?? options.rebuildKind !== undefined, rebuildKind: options.rebuildKind ?? (options.rebuilding === true ? 'full' : null), writeEpoch: options.writeEpoch ?? 1,
  } as ReplicaInfo;
}

function c(key: string, i: ReplicaInfo | null, options: { active?: number[] | null; chain?: string[]; error?: string } = {}): StartupCandidate {
  return { key, info: i, error: options.error ?? (i === null ? 'down' : null), chain: i === null ? null : options.chain ?? [], active: options.active === undefined ? [] : options.active };
}

const noMaps = (): MissedStatus => NO_MISSED;

test('equal replicas all start RW; a clean shutdown with nothing active is "clean" with nothing to resync', () => {
  const plan = planStartup(SIZE, REGION, [c('a', info(5)), c('b', info(5)), c('c', info(5))], noMaps);
  assert.deepEqual(plan.decisions.map((x) => x.mode), ['RW', 'RW', 'RW']);
  assert.equal(plan.source, 0);
  assert.equal(plan.clean, true);
  assert.deepEqual(plan.resyncRegions, []);
});

test('the source is chosen by writeEpoch first, then revision, then flushed revision', () => {
  assert.equal(chooseSource(SIZE, [c('a', info(9, { writeEpoch: 2 })), c('b', info(3, { writeEpoch: 3 }))]), 1);
  // A live replica with unflushed writes wins over one that flushed more and then lost power.
  assert.equal(chooseSource(SIZE, [c('a', info(618, { flushed: 618 })), c('b', info(620, { flushed: 617 }))]), 1);
  assert.equal(chooseSource(SIZE, [c('a', info(6, { flushed: 5 })), c('b', info(8, { flushed: 5 }))]), 1);
  assert.equal(chooseSource(SIZE, [c('a', info(8, { flushed: 6 })), c('b', info(8, { flushed: 7 }))]), 1);
  assert.equal(chooseSource(SIZE, [c('a', null), c('b', info(1, { rebuilding: true })), c('c', info(1, { sizeBytes: 2 * SIZE }))]), null);
});

test('of replicas with equal counters, one that another holds a missed-write map for is not the source', () => {
  // b went out (a holds a map for it); a took a snapshot meanwhile, which counts no write.
  const a = { ...c('a', info(25, { writeEpoch: 2 }), { chain: ['s1'] }), mapsFor: ['b'] };
  const b = { ...c('b', info(25, { writeEpoch: 2 }), { chain: [] }), mapsFor: [] };
  assert.equal(chooseSource(SIZE, [b, a]), 1);
  const plan = planStartup(SIZE, REGION, [b, a], (i) => (i === 0 ? { invalid: true, regions: null } : NO_MISSED));
  assert.equal(plan.source, 1);
  assert.deepEqual(plan.decisions.map((x) => x.mode), ['ERR', 'RW']);
  // Counters still come first: a replica ahead is the source even when named in a map.
  assert.equal(chooseSource(SIZE, [{ ...c('a', info(26)), mapsFor: [] }, { ...c('b', info(27)), mapsFor: [] }, { ...c('c', info(25)), mapsFor: ['b'] }]), 1);
  // Each named by the other (stale maps): the first, as before.
  assert.equal(chooseSource(SIZE, [{ ...c('a', info(5)), mapsFor: ['b'] }, { ...c('b', info(5)), mapsFor: ['a'] }]), 0);
});

test('unflushed differences (revision) are covered by the union of active regions: RW, resynced, not clean', () => {
  const plan = planStartup(SIZE, REGION, [c('a', info(7, { flushed: 5 }), { active: [3, 1] }), c('b', info(6, { flushed: 5 }), { active: [1, 9, 99] })], noMaps);
  assert.deepEqual(plan.decisions.map((x) => x.mode), ['RW', 'RW']);
  assert.equal(plan.source, 0);
  assert.deepEqual(plan.resyncRegions, [1, 3, 9], 'regions past the end of the volume are dropped');
  assert.equal(plan.clean, false);
});

test('without a write-intent log the revision must match too', () => {
  const plan = planStartup(SIZE, REGION, [c('a', info(7, { flushed: 5 }), { active: null }), c('b', info(6, { flushed: 5 }), { active: null })], noMaps);
  assert.deepEqual(plan.decisions.map((x) => x.mode), ['RW', 'ERR']);
  assert.match(plan.decisions[1].reason, /behind/);
});

test('a replica behind the source: delta when a replica holds a map for it, ERR when a map was invalidated or it missed an epoch without one', () => {
  const candidates = [
    c('a', info(10, { writeEpoch: 3 }), { active: [2], chain: ['s1'] }),
    c('b', info(4, { writeEpoch: 2 }), { active: [7], chain: ['s1'] }),
    c('c', info(4, { writeEpoch: 2 }), { active: [], chain: ['s1'] }),
    c('d', info(4, { writeEpoch: 2 }), { active: [], chain: ['s0', 's1'] }),
    c('e', info(4, { writeEpoch: 3 }), { active: [], chain: ['s1'] }),
    c('f', info(4, { writeEpoch: 3 }), { active: [], chain: ['s1'] }),
  ];
  const maps: Record<string, MissedStatus> = { b: { invalid: false, regions: [5, 2] }, d: { invalid: false, regions: [1] }, f: { invalid: true, regions: null } };
  const plan = planStartup(SIZE, REGION, candidates, (i) => maps[candidates[i].key] ?? NO_MISSED);
  assert.deepEqual(plan.decisions.map((x) => x.mode), ['RW', 'DELTA', 'ERR', 'ERR', 'RW', 'ERR']);
  assert.deepEqual(plan.decisions[1].regions, [2, 5, 7], 'map ∪ its active ∪ the source\'s active');
  // Only the replicas that serve are resynced: b's active region 7 is in its delta, not compared
  // at every start while b waits (a kill storm once compared 71 regions at each of 50 starts).
  assert.deepEqual(plan.resyncRegions, [2]);
  assert.match(plan.decisions[2].reason, /missed epoch 3 and no replica kept a missed-write map/);
  assert.match(plan.decisions[3].reason, /chain differs/);
  assert.match(plan.decisions[4].reason, /resynced from the write-intent logs/, 'same epoch, no map: never left, only the unflushed tail differs');
  assert.match(plan.decisions[5].reason, /invalidated/);
  assert.equal(plan.clean, false);
  // Only a full rebuild brings back those with another chain or an invalidated map: they get an
  // invalid mark at this start-up, not a map (the next start-up would take it for a complete record).
  assert.deepEqual(plan.decisions.map((x) => x.fullRebuildOnly === true), [false, false, false, true, false, true]);
});

test('a replica that never held the volume\'s data (writeEpoch 0: a new replica whose first rebuild never began) is for a full rebuild only', () => {
  const candidates = [c('a', info(10, { writeEpoch: 3 }), { active: [2] }), c('b', info(0, { writeEpoch: 0 }), { active: [] }), c('c', info(4, { writeEpoch: 2 }), { active: [] })];
  const plan = planStartup(SIZE, REGION, candidates, () => NO_MISSED);
  assert.deepEqual(plan.decisions.map((x) => x.mode), ['RW', 'ERR', 'ERR']);
  assert.equal(plan.decisions[1].fullRebuildOnly, true, 'a map started for it now would later pass for all it lacks');
  assert.equal(plan.decisions[2].fullRebuildOnly, false, 'one that served gets a map from this start-up on');
});

test('equal counters but a map held for it (it went out after the last flush): delta, not RW', () => {
  const candidates = [c('a', info(5), { active: [1] }), c('b', info(5), { active: [] })];
  const plan = planStartup(SIZE, REGION, candidates, (i) => (i === 1 ? { invalid: false, regions: [4] } : NO_MISSED));
  assert.deepEqual(plan.decisions.map((x) => x.mode), ['RW', 'DELTA']);
  assert.deepEqual(plan.decisions[1].regions, [1, 4]);
});

test('equal counters but another snapshot chain is ERR (a snapshot that reached only some replicas)', () => {
  const plan = planStartup(SIZE, REGION, [c('a', info(5), { chain: ['s1'] }), c('b', info(5), { chain: [] })], noMaps);
  assert.deepEqual(plan.decisions.map((x) => x.mode), ['RW', 'ERR']);
  assert.match(plan.decisions[1].reason, /chain differs/);
});

test('unreachable, wrong-size and half-rebuilt replicas start ERR and are never the source; none usable: all ERR', () => {
  const plan = planStartup(SIZE, REGION, [c('a', null, { error: 'ECONNREFUSED' }), c('b', info(1, { sizeBytes: 2 * SIZE })), c('c', info(900, { rebuilding: true })), c('d', info(0))], noMaps);
  assert.deepEqual(plan.decisions.map((x) => x.mode), ['ERR', 'ERR', 'ERR', 'RW']);
  assert.match(plan.decisions[0].reason, /ECONNREFUSED/);
  assert.match(plan.decisions[1].reason, /size/);
  assert.match(plan.decisions[2].reason, /incomplete rebuild/);
  assert.equal(plan.decisions[0].fullRebuildOnly, undefined, 'one not reached gets a map: it may have been in sync when it went');
  const none = planStartup(SIZE, REGION, [c('a', null)], noMaps);
  assert.equal(none.source, null);
  assert.deepEqual(none.decisions.map((x) => x.mode), ['ERR']);
});

test('a delta rebuild that stopped midway is done again from the maps (never a source); a full one, or one without its map, is ERR', () => {
  const candidates = [
    c('a', info(10, { writeEpoch: 3 }), { active: [2], chain: ['s1'] }),
    // Ahead of the source by its counters (it took writes while WO): still no source.
    c('b', info(50, { writeEpoch: 4, rebuildKind: 'delta' }), { active: [7], chain: ['s1'] }),
    c('c', info(4, { writeEpoch: 3, rebuildKind: 'delta' }), { active: [], chain: ['s1'] }),
    c('d', info(4, { writeEpoch: 3, rebuildKind: 'full' }), { active: [], chain: ['s1'] }),
    c('e', info(4, { writeEpoch: 3, rebuildKind: 'delta' }), { active: [], chain: ['s0'] }),
    c('f', info(4, { writeEpoch: 3, rebuildKind: 'delta' }), { active: [], chain: ['s1'] }),
  ];
  assert.equal(chooseSource(SIZE, candidates), 0);
  assert.deepEqual(mapHolders(SIZE, candidates), [0]);
  const maps: Record<string, MissedStatus> = { b: { invalid: false, regions: [9, 1] }, d: { invalid: false, regions: [1] }, e: { invalid: false, regions: [1] }, f: { invalid: true, regions: null } };
  const plan = planStartup(SIZE, REGION, candidates, (i) => maps[candidates[i].key] ?? NO_MISSED);
  assert.deepEqual(plan.decisions.map((x) => x.mode), ['RW', 'DELTA', 'ERR', 'ERR', 'ERR', 'ERR']);
  assert.deepEqual(plan.decisions[1].regions, [1, 2, 7, 9], 'map ∪ its active ∪ the source\'s active');
  assert.match(plan.decisions[1].reason, /incomplete delta rebuild; delta rebuild of 4 region\(s\) again/);
  assert.match(plan.decisions[2].reason, /no replica holds its missed-write map/);
  assert.match(plan.decisions[3].reason, /^incomplete rebuild/);
  assert.match(plan.decisions[4].reason, /chain differs/);
  assert.match(plan.decisions[5].reason, /invalidated/);
  // Alone, it is no volume.
  const alone = planStartup(SIZE, REGION, [c('b', info(50, { rebuildKind: 'delta' }))], () => ({ invalid: false, regions: [1] }));
  assert.equal(alone.source, null);
  assert.deepEqual(alone.decisions.map((x) => x.mode), ['ERR']);
});

test('only the source and the replicas in sync with it hold maps that count: a replica behind may hold stale ones', () => {
  const candidates = [
    c('a', info(10, { writeEpoch: 3 }), { chain: ['s1'] }),
    c('b', info(10, { writeEpoch: 3 }), { chain: ['s1'] }),
    // Behind: out since epoch 2 (its maps are from then).
    c('c', info(6, { writeEpoch: 2 }), { chain: ['s1'] }),
    // Same counters, other chain: not in sync.
    c('d', info(10, { writeEpoch: 3 }), { chain: ['s0'] }),
    c('e', null),
    c('f', info(10, { writeEpoch: 3, rebuilding: true }), { chain: ['s1'] }),
  ];
  assert.deepEqual(mapHolders(SIZE, candidates), [0, 1]);
  assert.deepEqual(mapHolders(SIZE, [c('x', null)]), []);
});

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { chooseStartupModes, type StartupCandidate } from '../../src/engine/startup.ts';
import type { ReplicaInfo } from '../../src/replica/replica.ts';

function info(revision: number, flushedRevision = revision, sizeBytes = 1 << 20, rebuilding = false): ReplicaInfo {
  return {
    sizeBytes, blockSizeBytes: 4096, epoch: 1, revision, flushedRevision, cleanShutdown: true,
    headId: 'L00000001', chain: ['L00000001'], layerCount: 1, maxLayers: 250, hasBase: false, rebuilding,
  };
}
const c = (address: string, i: ReplicaInfo | null, error: string | null = null): StartupCandidate => ({ address, info: i, error });

test('equal replicas all start RW', () => {
  const d = chooseStartupModes(1 << 20, [c('a', info(5)), c('b', info(5)), c('c', info(5))]);
  assert.deepEqual(d.map((x) => x.mode), ['RW', 'RW', 'RW']);
});

test('a replica behind the best starts ERR, with the reason', () => {
  const d = chooseStartupModes(1 << 20, [c('a', info(5)), c('b', info(7)), c('c', info(7, 6))]);
  assert.deepEqual(d.map((x) => x.mode), ['ERR', 'RW', 'ERR']);
  assert.match(d[0].reason, /behind/);
});

test('unreachable and wrong-size replicas start ERR; none usable means all ERR', () => {
  const d = chooseStartupModes(1 << 20, [c('a', null, 'ECONNREFUSED'), c('b', info(1, 1, 2 << 20)), c('c', info(0))]);
  assert.deepEqual(d.map((x) => x.mode), ['ERR', 'ERR', 'RW']);
  assert.match(d[0].reason, /ECONNREFUSED/);
  assert.match(d[1].reason, /size/);
  const none = chooseStartupModes(1 << 20, [c('a', null, 'down')]);
  assert.deepEqual(none.map((x) => x.mode), ['ERR']);
});

test('a replica whose rebuild stopped midway starts ERR and is never the source, whatever its counters', () => {
  // Copy writes count too: a half-copied replica can have the highest revision.
  const d = chooseStartupModes(1 << 20, [c('a', info(5)), c('b', info(900, 900, 1 << 20, true)), c('c', info(5))]);
  assert.deepEqual(d.map((x) => x.mode), ['RW', 'ERR', 'RW']);
  assert.match(d[1].reason, /incomplete rebuild/);
  const alone = chooseStartupModes(1 << 20, [c('b', info(900, 900, 1 << 20, true))]);
  assert.deepEqual(alone.map((x) => x.mode), ['ERR']);
});

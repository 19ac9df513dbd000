/**
 * The backing-image rules: input checks (exactly one source, each bad field named), files that
 * become unknown with their disk or node, and the controller's next step — the first fetch, copies
 * from a ready file (never the source again), and fetching again when every file is failed or
 * unknown for longer than the wait (Longhorn #10569: unknown files left images stuck), from the
 * URL or the image's backup, with backoff and a limit.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ZebuError, ErrorCode } from '../../src/errors.ts';
import {
  REFETCH_MAX_ATTEMPTS, imagePlacement, observeFiles, planBackingImage, refetchWaitMs, validateBackingImage,
  type BackingImageFile, type DiskForImage, type PlanInput,
} from '../../src/manager/backing-images.ts';

function refused(field: string, pattern: RegExp): (err: unknown) => boolean {
  return (err) => err instanceof ZebuError && err.code === ErrorCode.EINVAL && err.field === field && pattern.test(err.message);
}

const SUM = 'ab'.repeat(64);

test('backing images: a valid image gets its defaults; bad input names the field', () => {
  const spec = validateBackingImage({ url: 'https://images.example/debian.qcow2', checksum: SUM.toUpperCase() });
  assert.deepEqual(spec, { source: { type: 'download', url: 'https://images.example/debian.qcow2' }, expectedChecksum: SUM, minCopies: 2, nodeSelector: [], diskSelector: [] });
  assert.deepEqual(validateBackingImage({ fromVolume: 'v1', snapshot: 's1', minCopies: 3, diskSelector: ['d2', 'd1', 'd2'] }).diskSelector, ['d1', 'd2']);
  assert.equal(validateBackingImage({ upload: true }).source.type, 'upload');
  assert.deepEqual(validateBackingImage({ fromBackup: 'backup-1' }).source, { type: 'restore', backup: 'backup-1' });

  assert.throws(() => validateBackingImage({}), refused('source', /exactly one source/));
  assert.throws(() => validateBackingImage({ url: 'https://x/y', upload: true }), refused('source', /got url, upload/));
  assert.throws(() => validateBackingImage({ url: 'ftp://x/y' }), refused('url', /only http/));
  assert.throws(() => validateBackingImage({ url: 'not a url' }), refused('url', /not a URL/));
  assert.throws(() => validateBackingImage({ fromVolume: 'v1' }), refused('snapshot', /give snapshot/));
  assert.throws(() => validateBackingImage({ url: 'https://x/y', snapshot: 's' }), refused('snapshot', /goes with fromVolume/));
  assert.throws(() => validateBackingImage({ url: 'https://x/y', checksum: 'abc' }), refused('checksum', /SHA-512/));
  assert.throws(() => validateBackingImage({ url: 'https://x/y', minCopies: 0 }), refused('minCopies', /1 to 10/));
  assert.throws(() => validateBackingImage({ url: 'https://x/y', minCopies: 1000 }), refused('minCopies', /1 to 10/));
  assert.throws(() => validateBackingImage({ url: 'https://x/y', nodeSelector: 'n1' }), refused('nodeSelector', /list of names/));
});

const now = new Date('2026-06-01T12:00:00Z');
const ago = (s: number): string => new Date(now.getTime() - s * 1000).toISOString();
const disk = (name: string, nodeId: string, extra: Partial<DiskForImage> = {}): DiskForImage => ({ name, nodeId, usable: true, problem: null, allowScheduling: true, availableBytes: 10 * 2 ** 30, ...extra });
const file = (diskId: string, nodeId: string, state: BackingImageFile['state'], transitionAt = ago(60)): BackingImageFile => ({ diskId, nodeId, state, progress: state === 'ready' ? 1 : 0, message: null, transitionAt, from: 'source' });
const disks = [disk('n1-d1', 'n1'), disk('n1-d2', 'n1'), disk('n2-d1', 'n2'), disk('n3-d1', 'n3')];

function plan(files: BackingImageFile[], extra: Partial<PlanInput> = {}) {
  return planBackingImage({
    spec: validateBackingImage({ url: 'https://x/img.raw' }), files, disks, sizeBytes: 2 ** 30, refetch: { attempts: 0, notBefore: null, message: null },
    hasBackup: false, recoveryWaitSeconds: 300, now, ...extra,
  });
}

test('the first file is fetched from the source; further copies come from a ready file, spread over nodes', () => {
  assert.deepEqual(plan([]), { action: 'fetch', disk: 'n1-d1', from: 'source' });
  assert.deepEqual(plan([file('n1-d1', 'n1', 'in-progress')]).action, 'wait');
  assert.deepEqual(plan([file('n1-d1', 'n1', 'ready')]), { action: 'copy', from: 'n1-d1', to: 'n2-d1' }, 'another node first');
  assert.deepEqual(plan([file('n1-d1', 'n1', 'ready'), file('n2-d1', 'n2', 'ready')]), { action: 'wait', reason: null }, 'minCopies reached');
  // A disk a replica needs the image on comes first, copied from the same node when it can.
  assert.deepEqual(plan([file('n1-d1', 'n1', 'ready'), file('n2-d1', 'n2', 'ready')], { neededOn: ['n1-d2'] }), { action: 'copy', from: 'n1-d1', to: 'n1-d2' });
  // Selectors and room.
  assert.deepEqual(plan([], { spec: validateBackingImage({ url: 'https://x/i', nodeSelector: ['n3'] }) }), { action: 'fetch', disk: 'n3-d1', from: 'source' });
  const full = disks.map((d) => ({ ...d, availableBytes: 1 }));
  assert.match((plan([], { disks: full }) as { reason: string }).reason, /no usable disk has room/);
  // An upload with no file yet waits for its bytes; an export is fetched from its source.
  assert.match((plan([], { spec: validateBackingImage({ upload: true }) }) as { reason: string }).reason, /waiting for the upload/);
  assert.deepEqual(plan([], { spec: validateBackingImage({ fromVolume: 'v1', snapshot: 's1' }), fetchNode: 'n2' }), { action: 'fetch', disk: 'n2-d1', from: 'source' }, 'on the manager\'s node');
  assert.deepEqual(plan([], { spec: validateBackingImage({ fromBackup: 'backup-1' }) }), { action: 'fetch', disk: 'n1-d1', from: 'source' });
});

test('files of a disk or node that is gone become unknown; every file failed or unknown past the wait: cleaned up and fetched again', () => {
  const observed = observeFiles([file('n1-d1', 'n1', 'ready'), file('n2-d1', 'n2', 'ready')], [disk('n1-d1', 'n1', { usable: false, problem: 'node n1 is down' })], now);
  assert.deepEqual(observed.map((f) => [f.diskId, f.state]), [['n1-d1', 'unknown'], ['n2-d1', 'unknown']]);
  assert.match(observed[0].message!, /node n1 is down \(the file was ready\)/);
  assert.match(observed[1].message!, /disk n2-d1 is gone/);
  assert.equal(observed[0].transitionAt, now.toISOString());

  // Both disks removed (the Longhorn #10569 case): unknown for less than the wait -> wait; longer -> fetched again.
  assert.match((plan([file('a', 'n1', 'unknown', ago(100)), file('b', 'n2', 'unknown', ago(100))]) as { reason: string }).reason, /may come back/);
  assert.deepEqual(plan([file('a', 'n1', 'unknown', ago(400)), file('b', 'n2', 'unknown', ago(400))]), {
    action: 'refetch', cleanup: ['a', 'b'], from: 'source', reason: 'no file is ready: a unknown; b unknown',
  });
  // One failed and one unknown: again.
  assert.equal(plan([file('a', 'n1', 'failed'), file('b', 'n2', 'unknown', ago(400))]).action, 'refetch');
  // A failed file next to a ready one is removed (its disk then gets a copy of the ready one).
  assert.deepEqual(plan([file('n1-d1', 'n1', 'ready'), { ...file('n2-d1', 'n2', 'failed'), message: 'changed on disk' }]), { action: 'clean', disks: ['n2-d1'], reason: 'n2-d1: changed on disk' });
  // Not while a replica still reads it there (it is replaced first).
  assert.equal(plan([file('n1-d1', 'n1', 'ready'), { ...file('n2-d1', 'n2', 'failed'), message: 'changed on disk' }], { neededOn: ['n2-d1'] }).action, 'copy');
  // One ready, the others unknown: copied from the ready one, nothing fetched.
  assert.deepEqual(plan([file('n1-d1', 'n1', 'ready'), file('x', 'n2', 'unknown', ago(4000))]), { action: 'copy', from: 'n1-d1', to: 'n2-d1' });
  // An upload with every file lost: from its backup when there is one, else it says why not.
  const upload = validateBackingImage({ upload: true });
  assert.equal((plan([file('a', 'n1', 'failed')], { spec: upload, hasBackup: true }) as { from: string }).from, 'backup');
  const stuck = plan([file('a', 'n1', 'failed')], { spec: upload });
  assert.equal(stuck.action, 'refetch');
  assert.equal((stuck as { from: null }).from, null);
  assert.match((stuck as { reason: string }).reason, /cannot be fetched again: the image was uploaded and no copy of it is kept in the backup target/);
});

test('fetching again backs off, doubling to a cap, and gives up after the limit', () => {
  assert.equal(refetchWaitMs(1), 10_000);
  assert.equal(refetchWaitMs(2), 20_000);
  assert.equal(refetchWaitMs(20), 600_000);
  const later = new Date(now.getTime() + 5000).toISOString();
  assert.match((plan([], { refetch: { attempts: 2, notBefore: later, message: null } }) as { reason: string }).reason, /fetching again at .* \(attempt 3 of 10\)/);
  assert.deepEqual(plan([], { refetch: { attempts: 2, notBefore: ago(1), message: null } }), { action: 'fetch', disk: 'n1-d1', from: 'source' });
  assert.match((plan([], { refetch: { attempts: REFETCH_MAX_ATTEMPTS, notBefore: null, message: null } }) as { reason: string }).reason, /gave up after 10 attempts/);
});

test('replicas of a volume on an image go where its selectors allow, disks holding a ready file first', () => {
  const spec = validateBackingImage({ url: 'https://x/i', nodeSelector: ['n1', 'n2'], diskSelector: ['n1-d1', 'n1-d2', 'n2-d1'] });
  const rules = imagePlacement('base', spec, [file('n1-d2', 'n1', 'ready'), file('n2-d1', 'n2', 'failed')]);
  assert.deepEqual([...rules.preferred], ['n1-d2']);
  assert.equal(rules.refusal('n1-d1', 'n1'), null);
  assert.match(rules.refusal('n3-d1', 'n3')!, /node n3 is not in backing image base's node selector/);
  assert.match(rules.refusal('n2-d2', 'n2')!, /disk n2-d2 is not in backing image base's disk selector/);
});

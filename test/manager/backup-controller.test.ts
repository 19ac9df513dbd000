/**
 * The backup controller resuming a backup a crash interrupted: its partial manifest lists a
 * block that never reached the target (the crash came between listing and uploading). The
 * resumed backup must upload it, not trust the list — else a completed manifest would name a
 * missing block. The data comes from a real replica process (snapshot reads over the protocol).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import crypto from 'node:crypto';
import { SqliteStore } from '../../src/store/sqlite-store.ts';
import { Kind, Objects } from '../../src/cluster/objects.ts';
import { Settings } from '../../src/cluster/settings.ts';
import { EventRecorder } from '../../src/manager/events.ts';
import { BackupController, TARGET_NAME } from '../../src/manager/backup-controller.ts';
import { DataClient } from '../../src/protocol/client.ts';
import { openTarget } from '../../src/backup/target.ts';
import { BackupRepository } from '../../src/backup/repository.ts';
import { BACKUP_BLOCK_BYTES, FORMAT, sha256 } from '../../src/backup/format.ts';
import { verifyTarget } from '../../src/backup/verify-target.ts';
import { startTestReplica } from '../support/replica-process.ts';
import { tempDir } from '../support/tmp.ts';
import { waitFor } from '../support/zebu-up.ts';

const MiB = 1024 * 1024;
const SIZE = 16 * MiB;

test('a backup resumed after a crash uploads the blocks its partial manifest listed but the target lacks', async (t) => {
  const root = tempDir(t);
  const secret = Buffer.from('zebu-test-secret-0123456789abcdef');
  const replica = await startTestReplica(t, { sizeBytes: SIZE, secret });
  const writer = await DataClient.connect({ port: replica.port, secret });
  const data = crypto.randomBytes(6 * MiB);
  await writer.write(0, data);
  await writer.snapshotCreate('s1');
  writer.close();

  const url = `file://${path.join(root, 'target')}`;
  const repo = new BackupRepository(openTarget(url));
  await repo.init();
  // What the crashed run left: a partial manifest naming block 1, whose upload never happened.
  const lost = sha256(data.subarray(BACKUP_BLOCK_BYTES, 2 * BACKUP_BLOCK_BYTES));
  const requestedAt = new Date().toISOString();
  await repo.writePartial({
    format: FORMAT, name: 'b-crashed', volume: 'vol', sizeBytes: SIZE, blockBytes: BACKUP_BLOCK_BYTES, snapshot: 's1', createdAt: requestedAt, completedAt: null,
    labels: {}, compression: 'zstd', base: null, stats: { readBytes: 0, uploadedBytes: 0, uploadedBlocks: 0, reusedBlocks: 0, blocks: 0 }, blocks: [[1, lost]],
  });
  assert.equal(await repo.hasBlock(lost), false);

  const store = SqliteStore.open(':memory:');
  t.after(() => store.close());
  const objects = new Objects(store);
  await objects.create(Kind.BackupTarget, TARGET_NAME, {
    spec: { url, endpoint: null, region: null, hasCredentials: false, generation: 1 },
    status: { available: true, message: null, checkedAt: null, lastSyncAt: null, lastGcAt: null, lastGc: null },
  });
  await objects.create(Kind.Volume, 'vol', {
    spec: { sizeBytes: SIZE, numberOfReplicas: 1, nodeId: 'n1', maintenance: false },
    status: { state: 'attached', robustness: 'healthy', epoch: 1, currentNodeId: 'n1', attachStartedAt: null, endpoint: null, message: null, snapshots: [] },
    createdAt: requestedAt, deletionRequestedAt: null,
  });
  await objects.create(Kind.Engine, 'vol', {
    spec: { volumeName: 'vol', nodeId: 'n1', epoch: 1, sizeBytes: SIZE, replicas: {}, desireState: 'running', frontend: true },
    status: { state: 'running', pid: null, epoch: 1, sizeBytes: SIZE, endpoint: null, faulted: false, faultedReason: null, replicas: {}, rebuilding: false, stats: null, restarts: 0, message: null },
  });
  await objects.create(Kind.Backup, 'b-crashed', {
    spec: { volume: 'vol', snapshot: 's1', labels: {}, targetUrl: url, requestedAt, deletionRequestedAt: null },
    status: { state: 'in-progress', doneBytes: 0, totalBytes: 0, bytesPerSecond: 0, startedAt: requestedAt, completedAt: null, message: null, attempts: 0, sizeBytes: SIZE, base: null, stats: null },
  });

  const controller = new BackupController({
    objects,
    settings: new Settings(objects),
    events: new EventRecorder(objects),
    // The replica stands in for the engine: it serves the same snapshot reads.
    engines: { openEngineData: () => DataClient.connect({ port: replica.port, secret }) },
    defaultNodeId: 'n1',
    pollMs: 50,
  });
  controller.start();
  t.after(() => controller.stop());
  const done = await waitFor('the resumed backup to end', async () => {
    const b = await objects.get(Kind.Backup, 'b-crashed');
    return b !== null && (b.value.status.state === 'completed' || b.value.status.state === 'error') ? b : undefined;
  }, 30_000, 50);
  assert.equal(done.value.status.state, 'completed', done.value.status.message ?? '');
  assert.equal(await repo.hasBlock(lost), true, 'the block the crash cut off was uploaded');
  const report = await verifyTarget(repo);
  assert.equal(report.missingBlocks + report.corruptBlocks, 0, JSON.stringify(report.backups));
  assert.equal(report.backups[0].blocks, 3);
});

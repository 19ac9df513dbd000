/**
 * The rebuild copier process, forked by the engine (copier-process.ts): a CopierWorker
 * (copier-worker.ts) on the IPC channel. It exits when the channel closes, so it never outlives
 * its engine.
 */
import type { EngineToCopier } from './copier-process.ts';
import { CopierWorker } from './copier-worker.ts';

const worker = new CopierWorker({
  send: (message) => {
    if (process.connected) process.send!(message);
  },
});
process.on('message', (m) => worker.onMessage(m as EngineToCopier));
process.on('disconnect', () => process.exit(0));

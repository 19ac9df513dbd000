// The simulator's default run, first block of seeds (volume-b and volume-c run beside it),
// with confirmed regions leaving the write-intent logs at once instead of after their idle time:
// the replicas' active sets then differ, and the start-up resync of their union is put to work.
import '../support/intent-idle-zero.ts';
import { simulateSeeds } from './seeds.ts';

simulateSeeds(1, 120);

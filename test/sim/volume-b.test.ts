// The simulator's default run, second block of seeds (beside volume-a and volume-c),
// with the write-intent logs' default idle time.
import { simulateSeeds } from './seeds.ts';

simulateSeeds(121, 120);
// Found by a long run: a copy asked for while a replica was RW read from it after it had left
// (it had missed writes since), and the target's copy overwrote a client write with older bytes.
simulateSeeds(5363, 1, 3000);

// The simulator's default run, second block of seeds (beside volume-a and volume-c),
// with the write-intent logs' default idle time.
import { simulateSeeds } from './seeds.ts';

simulateSeeds(121, 120);

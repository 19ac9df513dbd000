// Seeds the long mode found failing, kept as regressions (each replays the run that failed).
import { simulateSeeds } from './seeds.ts';

// A full rebuild left the target's stale missed-write maps in place: a map made invalid by the
// recreated snapshots later denied a replica that had come and gone its delta rebuild (step 1952).
simulateSeeds(3289223067, 1, 3000);

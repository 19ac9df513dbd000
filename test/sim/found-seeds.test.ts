// Seeds the long mode found failing, kept as regressions (each replays the run that failed).
import { simulateSeeds } from './seeds.ts';

// A full rebuild left the target's stale missed-write maps in place: a map made invalid by the
// recreated snapshots later denied a replica that had come and gone its delta rebuild (step 1952).
simulateSeeds(3289223067, 1, 3000);

// Writes of a connection the engine had given up (a link stalled past the request timeout) were
// still on the way when the replica was rebuilt through a new connection, and arrived after it:
// old data over new. An OPEN now closes the older connections of its epoch (src/protocol/server.ts).
simulateSeeds(222, 1, 3000);

// A verify whose source replica failed midway (its link stalled past the request timeout) failed
// as a whole; the region is now compared against another replica that was compared.
simulateSeeds(160, 1, 3000);

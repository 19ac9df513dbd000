// Seeds that found bugs, kept as regressions: each fails with its fix taken out (checked when the
// simulator's workload or faults change, since the same seed then explores another run).
import { simulateSeeds } from './seeds.ts';

// A verify whose source replica failed midway (it hung past the request timeout) failed as a
// whole; the region is now compared against another replica that was compared.
simulateSeeds(160, 1, 3000);

// A frontend restarted while a hung engine, whose kill had not yet taken effect, still listened
// at the engine socket: the new link connected to it and the client's requests failed with
// FENCED. The link now holds them for the next engine (src/frontend/engine-link.ts).
simulateSeeds(117, 1, 3000);

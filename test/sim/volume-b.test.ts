// The simulator's default run, second half of the seeds (the first half runs beside it: volume-a),
// with the write-intent logs' default idle time.
import { simulateSeeds } from './seeds.ts';

simulateSeeds(121, 120);

// The simulator's default run, second half of the seeds (the first half runs beside it: volume-a).
import { simulateSeeds } from './seeds.ts';

simulateSeeds(121, 120);

// The simulator's default run, first half of the seeds (the other half runs beside it: volume-b).
import { simulateSeeds } from './seeds.ts';

simulateSeeds(1, 120);

// The simulator's default run, third block of seeds, again with confirmed regions leaving the
// write-intent logs at once (as volume-a): the rarer start-up races need many such seeds.
import '../support/intent-idle-zero.ts';
import { simulateSeeds } from './seeds.ts';

simulateSeeds(241, 80);

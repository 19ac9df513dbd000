/**
 * Loads one of Zebu's native addons (build/NAME.node, built at install time by
 * scripts/build-native.sh). Every addon is optional: without it Zebu runs, and the caller says
 * what is missing with the reason returned here. ZEBU_NO_NATIVE=1 turns them all off (to compare,
 * or to run as a machine without a C compiler would).
 */
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';
import { PROJECT_ROOT } from './js-build.ts';

const BUILD_DIR = path.join(PROJECT_ROOT, 'build');

export type AddonLoad<T> = { addon: T; reason: null } | { addon: null; reason: string };

export function loadAddon<T>(name: string): AddonLoad<T> {
  const file = path.join(BUILD_DIR, `${name}.node`);
  if (process.env.ZEBU_NO_NATIVE === '1') return { addon: null, reason: 'turned off by ZEBU_NO_NATIVE=1' };
  if (!fs.existsSync(file)) return { addon: null, reason: `${file} is not built (scripts/build-native.sh needs a C compiler)` };
  try {
    return { addon: createRequire(import.meta.url)(file) as T, reason: null };
  } catch (err) {
    return { addon: null, reason: `${file} does not load: ${(err as Error).message}` };
  }
}

/**
 * The data path run from JavaScript compiled at install time instead of the TypeScript sources.
 *
 * Node runs `.ts` files by stripping their types as it loads them, and the stripper it loads for
 * that costs every process about 10 MiB of private memory; a node with many attached volumes runs
 * a replica process per replica and an engine per volume. `scripts/build-js.ts` (run by npm
 * install, scripts/test.sh and scripts/run.sh) compiles src/ into build/js/src/ with tsc and
 * writes beside it a stamp: the hash of every source file it compiled. The agent starts the
 * data-path processes from that build only when the stamp matches the sources present, so an
 * edited source never runs stale; otherwise (or with ZEBU_NO_JS_BUILD=1) from the sources.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';

/** The directory holding package.json: the same from src/os and from build/js/src/os. */
function findProjectRoot(from: string): string {
  for (let dir = from; ; dir = path.dirname(dir)) {
    if (fs.existsSync(path.join(dir, 'package.json'))) return dir;
    if (path.dirname(dir) === dir) throw new Error(`no package.json above ${from}`);
  }
}

export const PROJECT_ROOT = findProjectRoot(import.meta.dirname);
export const JS_BUILD_DIR = path.join(PROJECT_ROOT, 'build', 'js');

function sourceFiles(dir: string, out: string[]): string[] {
  for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
    const full = path.join(dir, entry.name);
    if (entry.isDirectory()) sourceFiles(full, out);
    else if (entry.name.endsWith('.ts')) out.push(full);
  }
  return out;
}

/** A hash of every TypeScript file under src/ (names and contents), and tsconfig.json. */
export function sourceStamp(): string {
  const hash = crypto.createHash('sha256');
  const files = sourceFiles(path.join(PROJECT_ROOT, 'src'), []).sort();
  for (const file of [...files, path.join(PROJECT_ROOT, 'tsconfig.json')]) {
    hash.update(path.relative(PROJECT_ROOT, file)).update('\0').update(fs.readFileSync(file)).update('\0');
  }
  return hash.digest('hex');
}

/** The CLI entry of the sources. */
export const SOURCE_MAIN = path.join(PROJECT_ROOT, 'src', 'cli', 'main.ts');

/**
 * Node.js flags of the data-path processes. A young generation of 2 MiB per semi-space (V8's
 * default grows to 16): after a load the processes keep 10-20 MiB less, and a 4k request costs
 * less CPU (the young objects stay in the CPU's caches); bench:nbd measured both. Garbage
 * collection on the main thread only (`--single-threaded-gc`): a node runs five or more of these
 * small-heaped processes per attached volume, so V8's helper threads do not find idle cores, they
 * compete with the other data-path processes for them; measured on 2 cores, 4k random writes to a
 * 3-replica volume at iodepth 16, 7 runs each way: 14% less CPU per request (194 -> 167 us over
 * all processes) and 8% more IOPS, queue-depth-1 latency unchanged within the noise. And gc() for
 * memory-release.ts: one full collection before memory is given back after a load.
 */
export const DATA_PATH_NODE_FLAGS: readonly string[] = ['--max-semi-space-size=2', '--single-threaded-gc', '--expose-gc'];

/** The CLI entry data-path processes are started from: the compiled build when it matches the sources. */
export function dataPathMain(): { main: string; compiledUnavailable: string | null } {
  const compiled = compiledMain();
  return compiled.main !== null ? { main: compiled.main, compiledUnavailable: null } : { main: SOURCE_MAIN, compiledUnavailable: compiled.reason };
}

/** The CLI entry of the compiled build when it matches the sources, else why not. */
export function compiledMain(): { main: string; reason: null } | { main: null; reason: string } {
  if (process.env.ZEBU_NO_JS_BUILD === '1') return { main: null, reason: 'turned off by ZEBU_NO_JS_BUILD=1' };
  return compiledMainIn(JS_BUILD_DIR, sourceStamp);
}

/** compiledMain for the build in `buildDir`, against the stamp of the sources `stamp` returns. */
export function compiledMainIn(buildDir: string, stamp: () => string): { main: string; reason: null } | { main: null; reason: string } {
  const main = path.join(buildDir, 'src', 'cli', 'main.js');
  let built: string;
  try {
    built = fs.readFileSync(path.join(buildDir, 'source-stamp'), 'utf8').trim();
  } catch {
    return { main: null, reason: `${buildDir} is not built (scripts/build-js.ts)` };
  }
  if (!fs.existsSync(main)) return { main: null, reason: `${main} is missing` };
  if (built !== stamp()) return { main: null, reason: `${buildDir} was compiled from other sources than those in src/ (run scripts/build-js.ts)` };
  return { main, reason: null };
}

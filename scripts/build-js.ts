/**
 * Compiles src/ into build/js/src/ (tsc, tsconfig.build.json) and stamps the build with the hash
 * of the sources it came from (src/os/js-build.ts says why and when the build is used). Does
 * nothing when the stamp already matches. Without tsc (an install without dev dependencies) the
 * data path runs from the sources, as before.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { JS_BUILD_DIR, PROJECT_ROOT, sourceStamp, compiledMain } from '../src/os/js-build.ts';

if (compiledMain().main !== null) process.exit(0);
const tsc = path.join(PROJECT_ROOT, 'node_modules', 'typescript', 'bin', 'tsc');
if (!fs.existsSync(tsc)) {
  process.stderr.write(`build-js: ${tsc} is missing; the data path runs from the TypeScript sources (about 10 MiB more per process)\n`);
  process.exit(0);
}
const stamp = sourceStamp();
// Built beside and swapped in whole: processes running from build/js (an engine forks its copier
// from there) never see it half-written or gone.
const next = `${JS_BUILD_DIR}.next-${process.pid}`;
const old = `${JS_BUILD_DIR}.old-${process.pid}`;
fs.rmSync(next, { recursive: true, force: true });
const r = spawnSync(process.execPath, [tsc, '-p', path.join(PROJECT_ROOT, 'tsconfig.build.json'), '--outDir', path.join(next, 'src')], { stdio: ['ignore', 'ignore', 'inherit'] });
// Type errors are the typecheck's business (npm test); the emitted JavaScript is what matters here.
if (!fs.existsSync(path.join(next, 'src', 'cli', 'main.js'))) {
  fs.rmSync(next, { recursive: true, force: true });
  process.stderr.write(`build-js: tsc emitted nothing (exit ${r.status}); the data path runs from the TypeScript sources\n`);
  process.exit(0);
}
fs.writeFileSync(path.join(next, 'source-stamp'), `${stamp}\n`);
if (fs.existsSync(JS_BUILD_DIR)) fs.renameSync(JS_BUILD_DIR, old);
fs.renameSync(next, JS_BUILD_DIR);
fs.rmSync(old, { recursive: true, force: true });

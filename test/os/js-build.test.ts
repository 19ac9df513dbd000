/**
 * The compiled data path (build/js): used only when it was compiled from the sources present;
 * it runs the same CLI as the sources. On CI (and after scripts/test.sh) the build must be there
 * and current: every zebu-up test then runs its data-path processes from it.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync, type SpawnSyncReturns } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { tempDir } from '../support/tmp.ts';
import { compiledMain, compiledMainIn, dataPathMain, sourceStamp, JS_BUILD_DIR, SOURCE_MAIN } from '../../src/os/js-build.ts';

test('the source stamp is stable and names every source', () => {
  const stamp = sourceStamp();
  assert.match(stamp, /^[0-9a-f]{64}$/);
  assert.equal(sourceStamp(), stamp);
});

test('ZEBU_NO_JS_BUILD=1 runs the data path from the sources, and says so', () => {
  const saved = process.env.ZEBU_NO_JS_BUILD;
  process.env.ZEBU_NO_JS_BUILD = '1';
  try {
    assert.deepEqual(compiledMain(), { main: null, reason: 'turned off by ZEBU_NO_JS_BUILD=1' });
    assert.deepEqual(dataPathMain(), { main: SOURCE_MAIN, compiledUnavailable: 'turned off by ZEBU_NO_JS_BUILD=1' });
  } finally {
    if (saved === undefined) delete process.env.ZEBU_NO_JS_BUILD;
    else process.env.ZEBU_NO_JS_BUILD = saved;
  }
});

test('a build is used only when its stamp is that of the sources present', (t) => {
  const dir = tempDir(t);
  assert.match(String(compiledMainIn(dir, () => 'a').reason), /is not built/);
  fs.writeFileSync(path.join(dir, 'source-stamp'), 'a\n');
  assert.match(String(compiledMainIn(dir, () => 'a').reason), /main\.js is missing/);
  fs.mkdirSync(path.join(dir, 'src', 'cli'), { recursive: true });
  fs.writeFileSync(path.join(dir, 'src', 'cli', 'main.js'), '');
  assert.deepEqual(compiledMainIn(dir, () => 'a'), { main: path.join(dir, 'src', 'cli', 'main.js'), reason: null });
  assert.match(String(compiledMainIn(dir, () => 'b').reason), /compiled from other sources/);
});

test('the compiled CLI is current and runs as the sources do', { skip: process.env.CI !== 'true' && compiledMain().main === null ? 'no current build here (scripts/build-js.ts)' : false }, () => {
  const compiled = compiledMain();
  assert.equal(compiled.reason, null, 'scripts/test.sh builds it');
  for (const args of [['replica', 'serve', '--help'], ['engine', 'serve', '--help'], ['frontend', 'serve', '--help']]) {
    const fromJs: SpawnSyncReturns<string> = spawnSync(process.execPath, [compiled.main!, ...args], { encoding: 'utf8' });
    const fromTs: SpawnSyncReturns<string> = spawnSync(process.execPath, [SOURCE_MAIN, ...args], { encoding: 'utf8' });
    assert.equal(fromJs.status, 0, fromJs.stderr);
    assert.equal(fromJs.stdout, fromTs.stdout);
  }
});

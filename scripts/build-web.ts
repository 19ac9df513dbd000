/**
 * Builds the web UI: web/*.ts with their types stripped (Node's own stripper: the browser gets
 * the same lines, nothing bundled or minified) and web/*.html|css copied, into build/web/, which
 * the manager serves at / and /ui/. Run at install (postinstall) and by the test command; the
 * types are checked by `tsc -p web` there.
 */
import fs from 'node:fs';
import path from 'node:path';
import { stripTypeScriptTypes } from 'node:module';
import { PROJECT_ROOT } from '../src/os/js-build.ts';

const from = path.join(PROJECT_ROOT, 'web');
const to = path.join(PROJECT_ROOT, 'build', 'web');
const next = `${to}.next-${process.pid}`;
fs.rmSync(next, { recursive: true, force: true });
fs.mkdirSync(next, { recursive: true });
for (const name of fs.readdirSync(from)) {
  const source = path.join(from, name);
  if (name.endsWith('.ts')) {
    fs.writeFileSync(path.join(next, name.replace(/\.ts$/, '.js')), stripTypeScriptTypes(fs.readFileSync(source, 'utf8'), { mode: 'strip' }));
  } else if (/\.(html|css)$/.test(name)) {
    fs.copyFileSync(source, path.join(next, name));
  }
}
// Swapped in whole: a manager serving the old build never sees it half-written.
const old = `${to}.old-${process.pid}`;
if (fs.existsSync(to)) fs.renameSync(to, old);
fs.renameSync(next, to);
fs.rmSync(old, { recursive: true, force: true });

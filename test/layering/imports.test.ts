/**
 * The layering of src/, checked on the source: what may import what. A module map drawn by hand
 * goes stale; these rules fail the build instead.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';

const ROOT = path.resolve(import.meta.dirname, '../..');
const SRC = path.join(ROOT, 'src');

function filesUnder(dir: string, suffixes: string[]): string[] {
  const out: string[] = [];
  for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, entry.name);
    if (entry.isDirectory()) {
      if (entry.name !== 'node_modules' && !entry.name.startsWith('.')) out.push(...filesUnder(p, suffixes));
    } else if (suffixes.some((s) => entry.name.endsWith(s))) out.push(p);
  }
  return out;
}

interface Module {
  /** Path relative to src/, e.g. `engine/engine.ts`. */
  name: string;
  text: string;
  /** Modules of src/ it imports (relative to src/), type-only imports included. */
  imports: string[];
  /** Imports that are not type-only (they load the module at run time). */
  runtimeImports: string[];
  /** Node built-ins and packages it imports. */
  external: string[];
}

const IMPORT = /(?:^|\n)\s*(import|export)\s+(type\s+)?(?:[^'";]*?\sfrom\s+)?['"]([^'"]+)['"]/g;
const DYNAMIC_IMPORT = /\bimport\(\s*['"]([^'"]+)['"]\s*\)/g;

function load(): Map<string, Module> {
  const modules = new Map<string, Module>();
  for (const file of filesUnder(SRC, ['.ts'])) {
    const name = path.relative(SRC, file);
    const text = fs.readFileSync(file, 'utf8');
    const imports: string[] = [];
    const runtimeImports: string[] = [];
    const external: string[] = [];
    const add = (spec: string, typeOnly: boolean): void => {
      if (!spec.startsWith('.')) {
        external.push(spec);
        return;
      }
      const target = path.relative(SRC, path.resolve(path.dirname(file), spec));
      imports.push(target);
      if (!typeOnly) runtimeImports.push(target);
    };
    for (const m of text.matchAll(IMPORT)) add(m[3], m[2] !== undefined);
    for (const m of text.matchAll(DYNAMIC_IMPORT)) add(m[1], false);
    modules.set(name, { name, text, imports, runtimeImports, external });
  }
  return modules;
}

const modules = load();
const folderOf = (name: string): string => (name.includes('/') ? name.slice(0, name.indexOf('/')) : '.');

test('the import map is read: every relative import names a file that exists', () => {
  assert.ok(modules.size > 50, `only ${modules.size} modules found under src/`);
  for (const m of modules.values()) {
    for (const target of m.imports) assert.ok(modules.has(target), `${m.name} imports ${target}, which is not a module of src/`);
  }
});

test('no import cycle between modules', () => {
  const state = new Map<string, 'open' | 'done'>();
  const stack: string[] = [];
  const visit = (name: string): void => {
    state.set(name, 'open');
    stack.push(name);
    for (const next of modules.get(name)!.imports) {
      if (state.get(next) === 'open') assert.fail(`import cycle: ${[...stack.slice(stack.indexOf(next)), next].join(' -> ')}`);
      if (!state.has(next)) visit(next);
    }
    stack.pop();
    state.set(name, 'done');
  };
  for (const name of modules.keys()) if (!state.has(name)) visit(name);
});

/** Folder -> the folders it must not import from. */
const FORBIDDEN: Record<string, string[]> = {
  // The protocol serves the replica; the replica knows nothing of networks, engines or the cluster.
  replica: ['protocol', 'engine', 'frontend', 'cluster', 'manager', 'agent', 'backup', 'api', 'cli', 'store'],
  protocol: ['engine', 'frontend', 'cluster', 'manager', 'agent', 'backup', 'api', 'cli', 'store'],
  engine: ['frontend', 'cluster', 'manager', 'agent', 'api', 'cli', 'store'],
  frontend: ['engine', 'cluster', 'manager', 'agent', 'api', 'cli', 'store'],
  store: ['replica', 'protocol', 'engine', 'frontend', 'cluster', 'manager', 'agent', 'backup', 'api', 'cli'],
  // The object model is shared by the manager and the agents: it depends on neither.
  cluster: ['manager', 'agent', 'api', 'cli'],
  'backing-image': ['manager', 'agent', 'api', 'cli'],
  // An agent runs on every node; it reads and writes objects, it does not reach into the manager.
  agent: ['manager', 'api', 'cli'],
  manager: ['api', 'cli'],
  backup: ['manager', 'agent', 'api', 'cli'],
  api: ['cli'],
};

test('each folder imports only from the layers below it', () => {
  const broken: string[] = [];
  for (const m of modules.values()) {
    const forbidden = FORBIDDEN[folderOf(m.name)] ?? [];
    for (const target of m.imports) if (forbidden.includes(folderOf(target))) broken.push(`${m.name} imports ${target}`);
  }
  assert.deepEqual(broken, []);
});

/** The engine's decisions: pure modules, no I/O, no clock, no randomness. */
const ENGINE_DECISIONS = ['replica-set.ts', 'write-ack.ts', 'active-regions.ts', 'startup.ts', 'rebuild-plan.ts', 'verify.ts'];

test("the engine's decision modules hold no socket, read no clock and draw no random number", () => {
  for (const file of ENGINE_DECISIONS) {
    const m = modules.get(`engine/${file}`);
    assert.ok(m !== undefined, `engine/${file} exists`);
    assert.deepEqual(m.external.filter((e) => e !== 'node:assert' && e !== 'node:assert/strict'), [], `engine/${file} imports only other modules of src/`);
    const code = m.text.replace(/\/\*[\s\S]*?\*\//g, '').replace(/\/\/.*$/gm, '');
    for (const impure of ['Date.now', 'new Date', 'Math.random', 'setTimeout', 'setInterval', 'setImmediate', 'process.', 'performance.now']) {
      assert.ok(!code.includes(impure), `engine/${file} uses ${impure}`);
    }
    for (const target of m.runtimeImports) {
      assert.ok(target.startsWith('engine/') || target.startsWith('replica/intent-log') || target === 'errors.ts' || target.startsWith('protocol/wire') || target.startsWith('protocol/frames'),
        `engine/${file} loads ${target} at run time`);
    }
  }
});

test('nothing in the repository points outside it', () => {
  const files = [...filesUnder(SRC, ['.ts']), ...filesUnder(path.join(ROOT, 'test'), ['.ts']), ...filesUnder(path.join(ROOT, 'docs'), ['.md']),
    ...filesUnder(path.join(ROOT, 'bench'), ['.ts']), path.join(ROOT, 'README.md')];
  const outside = /\.\.\/shared|DESIGN\.md|STYLE\.md|\/work\/|\/home\/[a-z]/;
  const self = path.join(ROOT, 'test', 'layering', 'imports.test.ts');
  for (const file of files) {
    if (file === self) continue;
    const hit = outside.exec(fs.readFileSync(file, 'utf8'));
    assert.equal(hit, null, `${path.relative(ROOT, file)} points outside the repository: ${hit?.[0]}`);
  }
});

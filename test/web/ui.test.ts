/**
 * The web UI in a real browser (Debian's chromium, driven by playwright-core; never a downloaded
 * browser) against a real `zebu up`: sign in (a wrong token refused in words), the dashboard's
 * counts follow volumes created and attached meanwhile without a reload, a replica process
 * SIGKILLed shows as degraded, then rebuilding, then healthy on the volume's page without a
 * reload, the volumes list filters and sorts, with 200 volumes too. Screenshots of every view go
 * to build/screenshots/ for a person to look at.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { chromium, type Page } from 'playwright-core';
import { PROJECT_ROOT } from '../../src/os/js-build.ts';
import { spawnSync } from 'node:child_process';
import { startZebuUp, stopZebuUp, mustZebu, mustZebuJson, zebuDataDir, waitFor } from '../support/zebu-up.ts';

const CHROMIUM = '/usr/bin/chromium';
const SCREENSHOTS = path.join(PROJECT_ROOT, 'build', 'screenshots');
const unavailable = !fs.existsSync(CHROMIUM) ? `no ${CHROMIUM} (apt-get install chromium)` : !fs.existsSync(path.join(PROJECT_ROOT, 'build', 'web', 'app.js')) ? 'the web UI is not built (scripts/build-web.ts)' : null;

async function shot(page: Page, name: string): Promise<void> {
  fs.mkdirSync(SCREENSHOTS, { recursive: true });
  await page.screenshot({ path: path.join(SCREENSHOTS, `${name}.png`), fullPage: true });
}

/** The text of the element `selector` once it matches `expected` (the page updates itself). */
async function seeText(page: Page, selector: string, expected: RegExp, timeoutMs = 30_000): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  let last = '';
  for (;;) {
    last = (await page.locator(selector).first().textContent({ timeout: 1000 }).catch(() => null)) ?? '';
    if (expected.test(last)) return last;
    if (Date.now() > deadline) throw new Error(`${selector}: expected ${expected}, last saw ${JSON.stringify(last)}`);
    await page.waitForTimeout(100);
  }
}

test('the web UI in chromium: sign in, live dashboard, a killed replica seen degraded → rebuilding → healthy without reloading, volumes filtered and sorted (200 of them)', { skip: unavailable ?? false, timeout: 300_000 }, async (t) => {
  const dataDir = zebuDataDir(t);
  const up = await startZebuUp({ dataDir, disks: 3 });
  t.after(() => stopZebuUp(up));
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox'] });
  t.after(() => browser.close());
  const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  const pageErrors: string[] = [];
  page.on('pageerror', (err) => pageErrors.push(err.message));

  // Sign in: a wrong token is refused in words; the right one opens the dashboard.
  await page.goto(`${up.api}/`);
  await page.getByLabel(/API token/).fill('not-the-token');
  await page.getByRole('button', { name: 'Sign in' }).click();
  await seeText(page, '#problem', /That token was refused/);
  await shot(page, 'sign-in');
  await page.getByLabel(/API token/).fill(up.token);
  await page.getByRole('button', { name: 'Sign in' }).click();
  await seeText(page, 'h1', /Dashboard/);
  await seeText(page, '[data-count="all"]', /^0volumes$/);

  // Volumes made meanwhile arrive on the open dashboard by themselves.
  mustZebu(up, ['volume', 'create', 'uv', '--size', '256MiB', '--replicas', '3']);
  mustZebu(up, ['volume', 'create', 'spare', '--size', '16MiB', '--replicas', '1']);
  const uri = mustZebu(up, ['volume', 'attach', 'uv']).trim();
  await seeText(page, '[data-count="all"]', /^2volumes$/);
  await seeText(page, '[data-count="healthy"]', /^1healthy$/);
  await shot(page, 'dashboard');

  // The volume's page, and a replica killed under it: degraded, rebuilding (a replacement, copied
  // slowly enough to be watched), healthy — live.
  mustZebu(up, ['setting', 'set', 'replica-replenishment-wait-seconds', '0']);
  mustZebu(up, ['setting', 'set', 'rebuild-max-mib-per-second', '32']);
  const written = spawnSync('qemu-io', ['-f', 'raw', '-c', 'write -P 0x3c 0 192M', '-c', 'flush', uri], { encoding: 'utf8' });
  assert.equal(written.status, 0, written.stderr);
  await page.goto(`${up.api}/#/volumes/uv`);
  await seeText(page, '[data-field="robustness"]', /^healthy$/);
  const [victim] = mustZebuJson<{ name: string; pid: number }[]>(up, ['replica', 'list', '--volume', 'uv']);
  const url = page.url();
  process.kill(victim.pid, 'SIGKILL');
  const seen = new Set<string>();
  await waitFor('degraded, then rebuilding, then healthy on the open page', async () => {
    const robustness = (await page.locator('[data-field="robustness"]').textContent()) ?? '';
    seen.add(robustness);
    if (robustness.includes('rebuilding') && (await page.locator('progress').count()) > 0) {
      seen.add('progress bar');
      if (!fs.existsSync(path.join(SCREENSHOTS, 'volume-rebuilding.png'))) await shot(page, 'volume-rebuilding');
    }
    return robustness === 'healthy' && [...seen].some((s) => s.startsWith('degraded')) ? true : undefined;
  }, 180_000, 50);
  assert.equal(page.url(), url, 'never reloaded');
  assert.ok([...seen].some((s) => s.startsWith('degraded')), `seen: ${[...seen].join(', ')}`);
  assert.ok(seen.has('progress bar'), `a rebuild's progress bar was shown: ${[...seen].join(', ')}`);
  await shot(page, 'volume');

  // 200 volumes: listed, filtered by name and robustness, sorted — quickly.
  const api = async (method: string, p: string, body?: unknown): Promise<Response> => fetch(`${up.api}${p}`, {
    method, headers: { authorization: `Bearer ${up.token}`, 'content-type': 'application/json' }, body: body === undefined ? undefined : JSON.stringify(body),
  });
  for (let i = 0; i < 200; i += 20) {
    await Promise.all(Array.from({ length: 20 }, async (_, j) => {
      const r = await api('POST', '/v1/volumes', { name: `bulk-${String(i + j).padStart(3, '0')}`, sizeBytes: 16 * 1024 * 1024, numberOfReplicas: 1 });
      assert.equal(r.status, 201, await r.text());
    }));
  }
  await page.goto(`${up.api}/#/volumes`);
  await seeText(page, '.count', /^202 of 202 volumes$/, 60_000);
  const started = Date.now();
  await page.getByLabel('Name contains').fill('bulk-19');
  await seeText(page, '.count', /^10 of 202 volumes$/);
  const filterMs = Date.now() - started;
  assert.ok(filterMs < 2000, `filtering 202 volumes took ${filterMs} ms`);
  assert.deepEqual(await page.locator('tbody tr').evaluateAll((rows) => rows.map((r) => r.getAttribute('data-volume'))), Array.from({ length: 10 }, (_, i) => `bulk-19${i}`));
  await page.getByRole('button', { name: /^Name/ }).click(); // descending
  assert.equal(await page.locator('tbody tr').first().getAttribute('data-volume'), 'bulk-199');
  await page.getByLabel('Name contains').fill('');
  await page.getByLabel('Robustness').selectOption('healthy');
  await seeText(page, '.count', /^1 of 202 volumes$/);
  assert.match(page.url(), /#\/volumes\?robustness=healthy$/, 'the filter is in the URL (a link to it works)');
  await shot(page, 'volumes');

  await page.goto(`${up.api}/#/nodes`);
  await seeText(page, 'tbody', /leader/);
  await shot(page, 'nodes');
  await page.goto(`${up.api}/#/events`);
  await seeText(page, 'tbody', /Created|Attached|Rebuild/i);
  await shot(page, 'events');

  // Signing out forgets the token; the API's refusal of a stale one sends the user to sign in.
  await page.getByRole('button', { name: 'Sign out' }).click();
  await seeText(page, 'h1', /Sign in/);
  assert.deepEqual(pageErrors, [], 'no script error in the page');
});

/**
 * The web UI in a real browser (Debian's chromium, driven by playwright-core; never a downloaded
 * browser) against a real `zebu up`: sign in (a wrong token refused in words), the dashboard's
 * counts follow volumes created and attached meanwhile without a reload, a replica process
 * SIGKILLed shows as degraded, then rebuilding, then healthy on the volume's page without a
 * reload, the volumes list filters and sorts, with 200 volumes too; a setting with a bad value
 * refused in words; a volume created from the form (bad size and name refused), attached,
 * its I/O charted live while fio writes, snapshotted, backed up and restored from the UI (the
 * data read back), deleted only after a
 * confirmation; the read-only token shows everything and offers no action (the API refuses
 * them too). Screenshots of every view go to build/screenshots/ for a person to look at.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { chromium, type Page } from 'playwright-core';
import { PROJECT_ROOT } from '../../src/os/js-build.ts';
import { spawnSync } from 'node:child_process';
import { startFio } from '../support/fio.ts';
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

test('the web UI in chromium: sign in (API and read-only tokens), live views, a killed replica seen degraded → rebuilding → healthy without reloading, every action with its bad input refused in words, 200 volumes filtered and sorted', { skip: unavailable ?? false, timeout: 300_000 }, async (t) => {
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
  // Its events too, and the nodes card, all without a reload.
  await seeText(page, 'main', /Volume uv/);
  await seeText(page, '[data-count="nodes"]', /^1 \/ 1nodes up$/);
  await seeText(page, '[data-count="schedulable"]', /^\d[\d.]* [KMGT]iB$/);
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

  // Actions, each with the API's answer in words. Settings: a bad value refused, a good one kept.
  await page.goto(`${up.api}/#/settings`);
  await page.getByLabel('replica-replenishment-wait-seconds', { exact: true }).fill('soon');
  await page.getByRole('button', { name: 'Save replica-replenishment-wait-seconds' }).click();
  await seeText(page, '#problem', /replica-replenishment-wait-seconds.*(integer|whole number)/i);
  await shot(page, 'settings-error');
  await page.getByLabel('replica-replenishment-wait-seconds', { exact: true }).fill('7');
  await page.getByRole('button', { name: 'Save replica-replenishment-wait-seconds' }).click();
  await seeText(page, '#status', /replica-replenishment-wait-seconds is now 7/);
  assert.equal(mustZebuJson<{ value: string }>(up, ['setting', 'get', 'replica-replenishment-wait-seconds']).value, '7');

  // A volume made from the form: a bad size and a bad name said in words, then made.
  await page.goto(`${up.api}/#/volumes`);
  await page.getByLabel('Name', { exact: true }).fill('from-ui');
  await page.getByLabel('Size (e.g. 10GiB)').fill('lots');
  await page.getByRole('button', { name: 'Create volume' }).click();
  await seeText(page, '#problem', /"lots" is not a size/);
  await page.getByLabel('Size (e.g. 10GiB)').fill('32MiB');
  await page.getByLabel('Replicas').fill('2');
  await page.getByLabel('Name', { exact: true }).fill('Bad Name!');
  await page.getByRole('button', { name: 'Create volume' }).click();
  await seeText(page, '#problem', /name/i);
  await page.getByLabel('Name', { exact: true }).fill('from-ui');
  await page.getByRole('button', { name: 'Create volume' }).click();
  await seeText(page, '#status', /Volume from-ui created/);
  await seeText(page, '.count', /of 203 volumes$/);

  // Its page: attach, write, snapshot, back up (to a target set in the Backups view), restore.
  const backups = path.join(dataDir, '..', 'ui-backups');
  await page.goto(`${up.api}/#/backups`);
  await page.getByRole('textbox', { name: /^Backup target/ }).fill('ftp://nowhere/backups');
  await page.getByRole('button', { name: 'Set target' }).click();
  await seeText(page, '#problem', /unsupported scheme ftp/);
  await page.getByRole('textbox', { name: /^Backup target/ }).fill(`file://${backups}`);
  await page.getByRole('button', { name: 'Set target' }).click();
  await seeText(page, '#status', /backup target is now/);
  await page.goto(`${up.api}/#/volumes/from-ui`);
  await page.getByRole('button', { name: 'Attach' }).click();
  await seeText(page, '[data-field="state"]', /^attached$/, 90_000); // a busy machine (other clusters of the suite beside it) takes a while
  const fromUi = mustZebuJson<{ endpoint: string }>(up, ['volume', 'get', 'from-ui']).endpoint;
  const wrote = spawnSync('qemu-io', ['-f', 'raw', '-c', 'write -P 0x7e 0 4M', '-c', 'flush', fromUi], { encoding: 'utf8' });
  assert.equal(wrote.status, 0, wrote.stderr);
  // Its I/O, live: fio writing for a while shows in the charts.
  const load = startFio(t, ['--name=load', '--ioengine=nbd', `--uri=${fromUi}`, '--rw=randwrite', '--bs=4k', '--iodepth=4', '--size=8M', '--time_based', '--runtime=8', '--offset=8M']);
  const busy = await seeText(page, '[data-io="IOPS"]', /^[1-9][\d.]* ops\/s$/, 30_000);
  await seeText(page, '[data-io="Mean latency"]', /^\d[\d.]* ms$/);
  await shot(page, 'volume-io');
  assert.equal((await load.exit).code, 0);
  process.stderr.write(`the UI showed ${busy} while fio wrote\n`);
  await page.getByLabel('Snapshot name (optional)').fill('ui-snap');
  await page.getByRole('button', { name: 'Take snapshot' }).click();
  await seeText(page, '#snapshots', /ui-snap/);
  await page.getByRole('button', { name: 'Back up' }).click();
  await seeText(page, '#status', /Backup of from-ui started/);
  const backup = await waitFor('the backup completed', () => mustZebuJson<{ name: string; state: string }[]>(up, ['backup', 'list', '--volume', 'from-ui']).find((b) => b.state === 'completed'), 60_000, 500);
  await page.goto(`${up.api}/#/backups`);
  await seeText(page, `[data-backup="${backup.name}"] [data-field="state"]`, /^completed$/);
  await page.getByRole('button', { name: 'Restore' }).click();
  await seeText(page, '#problem', /Name the new volume to restore into/);
  await page.getByLabel(`name of the volume to restore ${backup.name} into`).fill('uv');
  await page.getByRole('button', { name: 'Restore' }).click();
  await seeText(page, '#problem', /uv.*exists/);
  await page.getByLabel(`name of the volume to restore ${backup.name} into`).fill('ui-restored');
  await page.getByRole('button', { name: 'Restore' }).click();
  await seeText(page, '#status', /Restoring .* into volume ui-restored/);
  await shot(page, 'backups');
  await waitFor('the restore done', () => mustZebuJson(up, ['volume', 'get', 'ui-restored']).restore?.state === 'completed' || undefined, 60_000, 500);
  await waitFor('ui-restored detached', () => mustZebuJson(up, ['volume', 'get', 'ui-restored']).state === 'detached' || undefined, 60_000, 200);
  const restoredUri = mustZebu(up, ['volume', 'attach', 'ui-restored']).trim();
  const readBack = spawnSync('qemu-io', ['-f', 'raw', '-c', 'read -P 0x7e 0 4M', restoredUri], { encoding: 'utf8' });
  assert.equal(readBack.status, 0, readBack.stderr);
  assert.doesNotMatch(readBack.stdout, /verification failed/);

  // The volume's own backups (linked from its page), and one deleted after a confirmation.
  await page.goto(`${up.api}/#/volumes/from-ui`);
  await page.getByRole('link', { name: 'Backups of from-ui' }).click();
  await seeText(page, 'h1', /^Backups of from-ui$/);
  page.once('dialog', (d) => void d.accept());
  await page.getByRole('button', { name: `Delete backup ${backup.name}` }).click();
  await seeText(page, '#status', new RegExp(`Backup ${backup.name} deleted`));
  await waitFor('the backup gone', () => !mustZebuJson<{ name: string }[]>(up, ['backup', 'list', '--volume', 'from-ui']).some((b) => b.name === backup.name) || undefined, 60_000, 500);

  // More on its page: verify, expand (a bad size said in words), the snapshot tree and a delete.
  await page.goto(`${up.api}/#/volumes/from-ui`);
  await seeText(page, `section[aria-label="Events of from-ui"]`, /Volume from-ui/);
  await page.getByRole('button', { name: 'Verify replicas' }).click();
  await seeText(page, '#status', /Verify of from-ui: \d+ regions of 2 replicas compared .*all identical/);
  await page.getByLabel('New size (e.g. 20GiB)').fill('big');
  await page.getByRole('button', { name: 'Expand' }).click();
  await seeText(page, '#problem', /"big" is not a size/);
  await page.getByLabel('New size (e.g. 20GiB)').fill('16MiB');
  await page.getByRole('button', { name: 'Expand' }).click();
  await seeText(page, '#problem', /size|smaller|shrink|larger/i);
  await page.getByLabel('New size (e.g. 20GiB)').fill('64MiB');
  await page.getByRole('button', { name: 'Expand' }).click();
  await seeText(page, '#status', /being expanded to 64 MiB/);
  await waitFor('from-ui at 64 MiB', () => mustZebuJson(up, ['volume', 'get', 'from-ui']).sizeBytes === 64 * 2 ** 20 || undefined, 60_000, 200);
  await page.getByLabel('Snapshot name (optional)').fill('ui-snap-2');
  await page.getByRole('button', { name: 'Take snapshot' }).click();
  await seeText(page, '[data-snapshot="ui-snap-2"]', /└ ui-snap-2/);
  await shot(page, 'volume-snapshots');
  page.once('dialog', (d) => void d.accept());
  await page.getByRole('button', { name: 'Delete snapshot ui-snap-2' }).click();
  await seeText(page, '#status', /Snapshot ui-snap-2 deleted/);
  assert.equal(await page.locator('[data-snapshot="ui-snap-2"]').count(), 0);

  // Nodes and disks: tags and scheduling changed from the UI.
  await page.goto(`${up.api}/#/nodes`);
  await page.getByLabel('tags of node-1 (comma-separated)').fill('ssd, rack-a');
  await page.getByRole('button', { name: 'Save tags of node-1', exact: true }).click();
  await seeText(page, '[data-node="node-1"] [data-field="tags"]', /^rack-a, ssd$|^ssd, rack-a$/);
  await page.getByLabel('tags of node-1 (comma-separated)').fill('Not A Tag!');
  await page.getByRole('button', { name: 'Save tags of node-1', exact: true }).click();
  await seeText(page, '#problem', /tag/i);
  const disk = mustZebuJson<{ name: string }[]>(up, ['disk', 'list'])[0].name;
  await page.getByRole('button', { name: `Stop scheduling on ${disk}`, exact: true }).click();
  await seeText(page, '#status', new RegExp(`Scheduling on ${disk} is off`));
  assert.equal(mustZebuJson<{ name: string; allowScheduling: boolean }[]>(up, ['disk', 'list']).find((d) => d.name === disk)?.allowScheduling, false);
  await page.getByRole('button', { name: `Allow scheduling on ${disk}`, exact: true }).click();
  await seeText(page, '#status', new RegExp(`Scheduling on ${disk} is on`));
  await shot(page, 'nodes');

  // Recurring jobs: a bad schedule said in words, a good one listed; backing images (none yet).
  await page.goto(`${up.api}/#/jobs`);
  await page.getByLabel('Name', { exact: true }).fill('nightly');
  await page.getByLabel('Schedule (cron)').fill('every night');
  await page.getByRole('button', { name: 'Create job' }).click();
  await seeText(page, '#problem', /cron/i);
  await page.getByLabel('Schedule (cron)').fill('0 3 * * *');
  await page.getByRole('button', { name: 'Create job' }).click();
  await seeText(page, '[data-job="nightly"]', /nightly.*snapshot.*0 3 \* \* \*/);
  await shot(page, 'recurring-jobs');
  await page.goto(`${up.api}/#/images`);
  await seeText(page, 'main', /No backing images/);
  await shot(page, 'backing-images');

  // Delete asks first: dismissed, nothing happens; accepted, the volume goes (it must be detached).
  await page.goto(`${up.api}/#/volumes/from-ui`);
  page.once('dialog', (d) => void d.dismiss());
  await page.getByRole('button', { name: 'Delete volume' }).click();
  await seeText(page, '#status', /was not deleted/);
  page.once('dialog', (d) => void d.accept());
  await page.getByRole('button', { name: 'Delete volume' }).click();
  await seeText(page, '#problem', /attached.*detach it first/);
  await page.getByRole('button', { name: 'Detach' }).click();
  await seeText(page, '[data-field="state"]', /^detached$/, 90_000);
  page.once('dialog', (d) => void d.accept());
  await page.getByRole('button', { name: 'Delete volume' }).click();
  await waitFor('from-ui gone', () => !mustZebuJson<{ name: string }[]>(up, ['volume', 'list']).some((v) => v.name === 'from-ui') || undefined, 60_000, 500);

  await page.goto(`${up.api}/#/events`);
  await seeText(page, 'tbody', /Created|Attached|Rebuild/i);
  await shot(page, 'events');

  // Signing out forgets the token. The read-only token: everything to see, nothing to change.
  await page.getByRole('button', { name: 'Sign out' }).click();
  await seeText(page, 'h1', /Sign in/);
  await page.getByLabel(/API token/).fill(fs.readFileSync(path.join(dataDir, 'token-readonly'), 'utf8').trim());
  await page.getByRole('button', { name: 'Sign in' }).click();
  await seeText(page, '#access', /^read-only$/);
  await page.goto(`${up.api}/#/volumes`);
  await seeText(page, '.count', /of 203 volumes$/);
  assert.equal(await page.getByRole('button', { name: 'Create volume' }).isVisible(), false);
  await page.goto(`${up.api}/#/volumes/uv`);
  await seeText(page, '[data-field="robustness"]', /^healthy$/);
  assert.equal(await page.getByRole('button', { name: 'Delete volume' }).isVisible(), false);
  await shot(page, 'read-only');
  const refused = await page.evaluate(async () => {
    const r = await fetch('/v1/volumes/uv/detach', { method: 'POST', headers: { authorization: `Bearer ${sessionStorage.getItem('zebu-token')}` } });
    return { status: r.status, body: await r.json() as { error: { message: string } } };
  });
  assert.equal(refused.status, 403);
  assert.match(refused.body.error.message, /read-only/);
  assert.equal(mustZebuJson(up, ['volume', 'get', 'uv']).state, 'attached');
  await page.getByRole('button', { name: 'Sign out' }).click();
  await seeText(page, 'h1', /Sign in/);
  assert.deepEqual(pageErrors, [], 'no script error in the page');
});

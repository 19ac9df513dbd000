/**
 * Zebu's web UI: sign-in with the API token, then views routed by the URL's hash —
 * `#/` dashboard, `#/volumes?robustness=degraded&q=text` volumes, `#/volumes/NAME` one volume,
 * `#/nodes`, `#/events`. Volumes arrive live from the manager's stream (a snapshot, then one
 * object at a time as it changes); the rest is read from the REST API when a view opens.
 * Every element is built with textContent (never HTML from data).
 */
import { ApiError, call, follow, saveToken, savedToken } from './api.js';

interface ReplicaSummary { name: string; nodeId: string; mode: string | null; failedAt: string | null; rebuildProgress?: number | null }
interface Volume {
  name: string; sizeBytes: number; currentSizeBytes: number | null; numberOfReplicas: number; state: string; robustness: string;
  nodeId: string | null; endpoint: string | null; replicas: ReplicaSummary[]; rebuilding: boolean; message: string | null;
  lastBackup: string | null; recoveryPointAt: string | null; createdAt: string;
  recurringJobs: { name: string; task: string; nextRunAt: string | null; result: string | null; message: string | null }[];
}
interface NodeRow { name: string; address: string; ready: boolean; leader: boolean; allowScheduling: boolean; evict: boolean; replicaCount: number; disks: string[]; tags: string[] }
interface Disk { name: string; nodeId: string; storageMaximumBytes: number; storageAvailableBytes: number; storageReservedBytes: number; storageScheduledBytes: number; ready: boolean; allowScheduling: boolean }
interface EventRow { time: string; type: string; reason: string; message: string; kind: string; object: string; volume: string | null }

const ROBUSTNESS = ['healthy', 'degraded', 'faulted', 'unknown'] as const;

/** Signed in with the read-only token: controls that change things are hidden (the API refuses them anyway). */
let readOnly = false;

/** The volumes as the stream last said, by name. */
const volumes = new Map<string, Volume>();
let volumesKnown = false;
let stopFollowing: (() => void) | null = null;
/** Redraws the open view when volumes change (set by views that show volumes). */
let onVolumesChanged: (() => void) | null = null;

const main = (): HTMLElement => document.getElementById('main')!;

function el<K extends keyof HTMLElementTagNameMap>(tag: K, attrs: Record<string, string> = {}, ...children: (Node | string | null)[]): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const child of children) if (child !== null) node.append(typeof child === 'string' ? document.createTextNode(child) : child);
  return node;
}

function showProblem(message: string | null): void {
  document.getElementById('problem')!.textContent = message ?? '';
}

function showStatus(message: string): void {
  document.getElementById('status')!.textContent = message;
}

/** An API failure in words; a refused token sends the user back to sign in. */
function failed(err: unknown): void {
  if (err instanceof ApiError && err.status === 401) {
    saveToken(null);
    route();
    showProblem('The token was refused: sign in again.');
    return;
  }
  showProblem(err instanceof Error ? err.message : String(err));
}

export function bytes(n: number | null): string {
  if (n === null) return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v >= 10 || i === 0 ? Math.round(v) : v.toFixed(1)} ${units[i]}`;
}

export function age(seconds: number | null): string {
  if (seconds === null) return 'never';
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  if (seconds < 172800) return `${Math.round(seconds / 3600)} h`;
  return `${Math.round(seconds / 86400)} d`;
}

/** "64MiB", "1 GiB", "4096": bytes; null when it is not a size. */
export function parseSize(text: string): number | null {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|TiB)?\s*$/i.exec(text);
  if (m === null) return null;
  const unit = (m[2] ?? 'B').toLowerCase();
  const factor = { b: 1, kib: 2 ** 10, mib: 2 ** 20, gib: 2 ** 30, tib: 2 ** 40 }[unit]!;
  return Math.round(Number(m[1]) * factor);
}

/**
 * Runs an action the user asked for: its button waits meanwhile, success is said in the status
 * line, a failure in the alert line (the API's words).
 */
async function act<T>(button: HTMLButtonElement | null, done: string | ((result: T) => string), action: () => Promise<T>): Promise<boolean> {
  showProblem(null);
  if (button !== null) button.disabled = true;
  try {
    const result = await action();
    showStatus(typeof done === 'string' ? done : done(result));
    return true;
  } catch (err) {
    failed(err);
    return false;
  } finally {
    if (button !== null) button.disabled = false;
  }
}

/** A labelled input. */
function field(id: string, label: string, attrs: Record<string, string> = {}): { label: HTMLLabelElement; input: HTMLInputElement } {
  const input = el('input', { id, name: id, ...attrs });
  return { label: el('label', { for: id }, label, input), input };
}

// ---- sign-in ---------------------------------------------------------------------------------

function signInView(): void {
  document.getElementById('nav')!.hidden = true;
  const input = el('input', { id: 'token', name: 'token', type: 'password', autocomplete: 'current-password', required: '' });
  const form = el('form', { class: 'sign-in', 'aria-labelledby': 'sign-in-title' },
    el('h1', { id: 'sign-in-title' }, 'Sign in'),
    el('label', { for: 'token' }, 'API token (the file "token" in the data directory of zebu up; "token-readonly" to only look)'),
    input,
    el('button', { type: 'submit' }, 'Sign in'));
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    const token = input.value.trim();
    if (token === '') {
      showProblem('Enter the API token.');
      return;
    }
    call<{ access: string }>('GET', '/v1/access', undefined, token).then((answer) => {
      saveToken(token);
      sessionStorage.setItem('zebu-access', answer.access);
      showProblem(null);
      route();
    }, (err: unknown) => showProblem(err instanceof ApiError && err.status === 401 ? 'That token was refused: check it and try again.' : (err as Error).message));
  });
  main().replaceChildren(form);
  input.focus();
}

// ---- live volumes ----------------------------------------------------------------------------

/** Nodes, disks and the newest events, as their streams last said (for the dashboard and the events view). */
const lists = {
  nodes: new Map<string, NodeRow>(),
  disks: new Map<string, Disk>(),
  events: new Map<string, EventRow>(),
};
let stopLists: (() => void)[] = [];
/** Redraws the open view when nodes, disks or events change. */
let onListsChanged: (() => void) | null = null;

export function eventKey(e: EventRow): string {
  return `${e.time}|${e.kind}|${e.object}|${e.reason}|${e.message}`;
}

function followLists(): void {
  if (stopLists.length > 0) return;
  const keyed = <T>(map: Map<string, T>, key: (item: T) => string) => ({
    onSnapshot: (items: T[]) => {
      map.clear();
      for (const item of items) map.set(key(item), item);
      onListsChanged?.();
    },
    onPut: (item: T) => {
      map.set(key(item), item);
      onListsChanged?.();
    },
    onDelete: (name: string) => {
      map.delete(name);
      onListsChanged?.();
    },
    onBroken: (why: string) => showStatus(`Live updates interrupted (${why}); reconnecting…`),
  });
  stopLists = [
    follow<NodeRow>('nodes', keyed(lists.nodes, (n) => n.name)),
    follow<Disk>('disks', keyed(lists.disks, (d) => d.name)),
    follow<EventRow>('events', keyed(lists.events, eventKey)),
  ];
}

function byTimeNewestFirst(a: EventRow, b: EventRow): number {
  return a.time < b.time ? 1 : a.time > b.time ? -1 : 0;
}

function newestEvents(): EventRow[] {
  return [...lists.events.values()].sort(byTimeNewestFirst);
}

/** The streamed newest events and `older` ones read once, each event once, newest first. */
function mergedEvents(older: EventRow[], keep: (e: EventRow) => boolean = () => true): EventRow[] {
  const byKey = new Map<string, EventRow>();
  for (const e of [...newestEvents(), ...older]) if (keep(e)) byKey.set(eventKey(e), e);
  return [...byKey.values()].sort(byTimeNewestFirst);
}

function startFollowing(): void {
  followLists();
  if (stopFollowing !== null) return;
  stopFollowing = follow<Volume>('volumes', {
    onSnapshot: (items) => {
      volumes.clear();
      for (const v of items) volumes.set(v.name, v);
      volumesKnown = true;
      showStatus('');
      onVolumesChanged?.();
    },
    onPut: (v) => {
      volumes.set(v.name, v);
      onVolumesChanged?.();
    },
    onDelete: (name) => {
      volumes.delete(name);
      onVolumesChanged?.();
    },
    onBroken: (why) => showStatus(`Live updates interrupted (${why}); reconnecting…`),
  });
}

// ---- dashboard -------------------------------------------------------------------------------

async function dashboardView(): Promise<void> {
  const counts = el('div', { class: 'cards', 'aria-label': 'Volumes by robustness' });
  const capacity = el('div', { class: 'cards', 'aria-label': 'Capacity and nodes' });
  const warnings = el('section', { 'aria-label': 'Recovery point warnings' });
  const events = el('section', {});
  main().replaceChildren(el('h1', {}, 'Dashboard'), counts, capacity, warnings, events);
  const drawVolumes = (): void => {
    const by = new Map<string, number>(ROBUSTNESS.map((r) => [r, 0]));
    for (const v of volumes.values()) by.set(v.robustness, (by.get(v.robustness) ?? 0) + 1);
    counts.replaceChildren(...[['all', volumes.size] as const, ...ROBUSTNESS.map((r) => [r, by.get(r) ?? 0] as const)].map(([r, n]) =>
      el('div', { class: `card ${r}` }, el('a', { href: r === 'all' ? '#/volumes' : `#/volumes?robustness=${r}`, 'data-count': r },
        el('span', { class: 'value' }, volumesKnown ? String(n) : '…'), `${r === 'all' ? 'volumes' : r}`))));
    const stale = [...volumes.values()].filter((v) => v.lastBackup !== null && (recoveryPointAge(v) ?? 0) > 86400);
    warnings.replaceChildren(...(stale.length === 0 ? [] : [el('h2', {}, 'Recovery points older than a day'),
      el('ul', {}, ...stale.map((v) => el('li', {}, el('a', { href: `#/volumes/${encodeURIComponent(v.name)}` }, v.name), ` — recovery point ${age(recoveryPointAge(v))} old`)))]));
  };
  onVolumesChanged = drawVolumes;
  drawVolumes();
  const drawLists = (): void => {
    const disks = [...lists.disks.values()];
    const nodes = [...lists.nodes.values()];
    const total = disks.reduce((s, d) => s + d.storageMaximumBytes, 0);
    const available = disks.reduce((s, d) => s + d.storageAvailableBytes, 0);
    const reserved = disks.reduce((s, d) => s + d.storageReservedBytes, 0);
    const scheduled = disks.reduce((s, d) => s + d.storageScheduledBytes, 0);
    // Room for new replicas: disks that are ready and take replicas, less what they reserve and what is placed there.
    const schedulable = disks.filter((d) => d.ready && d.allowScheduling)
      .reduce((s, d) => s + Math.max(0, d.storageMaximumBytes - d.storageReservedBytes - d.storageScheduledBytes), 0);
    const up = nodes.filter((n) => n.ready).length;
    capacity.replaceChildren(
      el('div', { class: 'card' }, el('span', { class: 'value' }, bytes(total - available)), `used of ${bytes(total)}`),
      el('div', { class: 'card' }, el('span', { class: 'value', 'data-count': 'schedulable' }, bytes(schedulable)), 'schedulable'),
      el('div', { class: 'card' }, el('span', { class: 'value' }, bytes(scheduled)), 'scheduled to replicas'),
      el('div', { class: 'card' }, el('span', { class: 'value' }, bytes(reserved)), 'reserved'),
      el('div', { class: `card ${up === nodes.length ? 'healthy' : 'degraded'}` }, el('a', { href: '#/nodes', 'data-count': 'nodes' }, el('span', { class: 'value' }, `${up} / ${nodes.length}`), 'nodes up')));
    events.replaceChildren(el('h2', {}, 'Recent events'), eventsTable(newestEvents().slice(0, 10)));
  };
  onListsChanged = drawLists;
  drawLists();
}

// ---- volumes ---------------------------------------------------------------------------------

type VolumeColumn = 'name' | 'sizeBytes' | 'currentSizeBytes' | 'state' | 'robustness' | 'replicas' | 'nodeId' | 'lastBackup' | 'recoveryPointAge';
const VOLUME_COLUMNS: [VolumeColumn, string][] = [
  ['name', 'Name'], ['sizeBytes', 'Size'], ['currentSizeBytes', 'Actual size'], ['state', 'State'], ['robustness', 'Robustness'],
  ['replicas', 'Replicas'], ['nodeId', 'Attached on'], ['lastBackup', 'Last backup'], ['recoveryPointAge', 'Recovery point age'],
];

/** Seconds since the volume's recovery point (its last backup, or when a job found it unchanged since). */
function recoveryPointAge(v: Volume): number | null {
  return v.recoveryPointAt === null ? null : Math.max(0, (Date.now() - Date.parse(v.recoveryPointAt)) / 1000);
}

function sortKey(v: Volume, column: VolumeColumn): string | number {
  if (column === 'replicas') return v.replicas.filter((r) => r.failedAt === null).length;
  if (column === 'recoveryPointAge') return recoveryPointAge(v) ?? Infinity;
  const value = v[column];
  return value === null ? '' : value;
}

function volumesView(query: URLSearchParams): void {
  let sortBy: VolumeColumn = 'name';
  let descending = false;
  const text = el('input', { id: 'filter', type: 'search', value: query.get('q') ?? '' });
  const robustness = el('select', { id: 'robustness' }, el('option', { value: '' }, 'any'), ...ROBUSTNESS.map((r) => el('option', { value: r }, r)));
  robustness.value = query.get('robustness') ?? '';
  const count = el('p', { class: 'count', 'aria-live': 'polite' });
  const table = el('table', {});
  const name = field('new-name', 'Name', { required: '', autocomplete: 'off' });
  const size = field('new-size', 'Size (e.g. 10GiB)', { required: '', value: '1GiB' });
  const replicas = field('new-replicas', 'Replicas', { type: 'number', min: '1', max: '16', value: '3' });
  const create = el('button', { type: 'submit' }, 'Create volume');
  const form = el('form', { class: 'filters writes', 'aria-label': 'Create a volume' }, name.label, size.label, replicas.label, create);
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    const sizeBytes = parseSize(size.input.value);
    if (sizeBytes === null) {
      showProblem(`"${size.input.value}" is not a size: write a number with a unit, like 512MiB or 10GiB.`);
      size.input.focus();
      return;
    }
    const volume = name.input.value.trim();
    void act(create, `Volume ${volume} created.`, () => call('POST', '/v1/volumes', { name: volume, sizeBytes, numberOfReplicas: Number(replicas.input.value) }))
      .then((ok) => {
        if (ok) name.input.value = '';
      });
  });
  main().replaceChildren(el('h1', {}, 'Volumes'), form,
    el('div', { class: 'filters' }, el('label', { for: 'filter' }, 'Name contains', text), el('label', { for: 'robustness' }, 'Robustness', robustness)),
    count, table);
  const draw = (): void => {
    const q = text.value.trim().toLowerCase();
    const shown = [...volumes.values()]
      .filter((v) => (q === '' || v.name.toLowerCase().includes(q)) && (robustness.value === '' || v.robustness === robustness.value))
      .sort((a, b) => {
        const x = sortKey(a, sortBy);
        const y = sortKey(b, sortBy);
        const order = x < y ? -1 : x > y ? 1 : a.name < b.name ? -1 : 1;
        return descending ? -order : order;
      });
    count.textContent = volumesKnown ? `${shown.length} of ${volumes.size} volumes` : 'Loading…';
    const head = el('tr', {}, ...VOLUME_COLUMNS.map(([key, label]) => {
      const button = el('button', { type: 'button' }, label + (sortBy === key ? (descending ? ' ▼' : ' ▲') : ''));
      button.addEventListener('click', () => {
        descending = sortBy === key ? !descending : false;
        sortBy = key;
        draw();
      });
      return el('th', { scope: 'col', 'aria-sort': sortBy === key ? (descending ? 'descending' : 'ascending') : 'none' }, button);
    }));
    table.replaceChildren(el('caption', {}, 'Volumes'), el('thead', {}, head), el('tbody', {}, ...shown.map((v) => el('tr', { 'data-volume': v.name },
      el('td', {}, el('a', { href: `#/volumes/${encodeURIComponent(v.name)}` }, v.name)),
      el('td', {}, bytes(v.sizeBytes)), el('td', {}, bytes(v.currentSizeBytes)), el('td', {}, v.state),
      el('td', { class: v.robustness }, v.robustness + (v.rebuilding ? ' (rebuilding)' : '')),
      el('td', {}, `${v.replicas.filter((r) => r.failedAt === null).length} / ${v.numberOfReplicas}`),
      el('td', {}, v.nodeId ?? '—'), el('td', {}, v.lastBackup ?? '—'), el('td', {}, v.lastBackup === null ? '—' : age(recoveryPointAge(v)))))));
  };
  const remember = (): void => {
    const params = new URLSearchParams();
    if (text.value !== '') params.set('q', text.value);
    if (robustness.value !== '') params.set('robustness', robustness.value);
    history.replaceState(null, '', `#/volumes${params.size > 0 ? `?${params}` : ''}`);
    draw();
  };
  text.addEventListener('input', remember);
  robustness.addEventListener('change', remember);
  onVolumesChanged = draw;
  draw();
}

interface Snapshot { name: string; createdAt: string; parent: string | null; sizeBytesUsed: number; inChain: boolean }

function volumeActions(name: string): HTMLElement {
  const path = `/v1/volumes/${encodeURIComponent(name)}`;
  const node = el('select', { id: 'attach-node' });
  void call<NodeRow[]>('GET', '/v1/nodes').then((nodes) => node.replaceChildren(...nodes.map((n) => el('option', { value: n.name }, `${n.name}${n.ready ? '' : ' (down)'}`))), failed);
  const attach = el('button', { type: 'button' }, 'Attach');
  attach.addEventListener('click', () => void act(attach, `Attaching ${name} on ${node.value}.`, () => call('POST', `${path}/attach`, { nodeId: node.value })));
  const detach = el('button', { type: 'button' }, 'Detach');
  detach.addEventListener('click', () => void act(detach, `Detaching ${name}.`, () => call('POST', `${path}/detach`)));
  const snapshotName = field('snapshot-name', 'Snapshot name (optional)', { autocomplete: 'off' });
  const snapshot = el('button', { type: 'button' }, 'Take snapshot');
  snapshot.addEventListener('click', () => {
    const body = snapshotName.input.value.trim() === '' ? {} : { name: snapshotName.input.value.trim() };
    void act(snapshot, `Snapshot of ${name} taken.`, async () => {
      await call('POST', `${path}/snapshots`, body);
      snapshotName.input.value = '';
      await drawSnapshots(name);
    });
  });
  const backup = el('button', { type: 'button' }, 'Back up');
  backup.addEventListener('click', () => void act(backup, `Backup of ${name} started: see Backups.`, () => call('POST', '/v1/backups', { volume: name })));
  const remove = el('button', { type: 'button', class: 'danger' }, 'Delete volume');
  remove.addEventListener('click', () => {
    if (!confirm(`Delete volume ${name} and all its data? This cannot be undone.`)) {
      showStatus(`Volume ${name} was not deleted.`);
      return;
    }
    void act(remove, `Deleting volume ${name}.`, async () => {
      await call('DELETE', path);
      location.hash = '#/volumes';
    });
  });
  const newSize = field('expand-size', 'New size (e.g. 20GiB)', { autocomplete: 'off' });
  const expand = el('button', { type: 'button' }, 'Expand');
  expand.addEventListener('click', () => {
    const sizeBytes = parseSize(newSize.input.value);
    if (sizeBytes === null) {
      showProblem(`"${newSize.input.value}" is not a size: write a number with a unit, like 20GiB.`);
      newSize.input.focus();
      return;
    }
    void act(expand, `Volume ${name} is being expanded to ${bytes(sizeBytes)}.`, () => call('POST', `${path}/expand`, { sizeBytes }));
  });
  const verify = el('button', { type: 'button' }, 'Verify replicas');
  verify.addEventListener('click', () => {
    showStatus(`Verifying ${name}…`);
    void act(verify,
      (r) => `Verify of ${name}: ${r.regions} regions of ${r.replicas.length} replicas compared in ${r.durationMs} ms; ${r.differing.length === 0 ? 'all identical' : `${r.differing.length} differ`}.`,
      () => call<{ regions: number; replicas: string[]; differing: unknown[]; durationMs: number }>('POST', `${path}/verify`, {}));
  });
  const salvage = el('button', { type: 'button' }, 'Salvage');
  salvage.addEventListener('click', () => {
    if (!confirm(`Salvage volume ${name}: restart its engine on every replica, taking the newest data among them?`)) return;
    void act(salvage, `Salvaging ${name}.`, () => call('POST', `${path}/salvage`, {}));
  });
  return el('section', { 'aria-label': 'Actions', class: 'writes' },
    el('div', { class: 'filters' }, el('label', { for: 'attach-node' }, 'Node', node), attach, detach),
    el('div', { class: 'filters' }, snapshotName.label, snapshot, backup),
    el('div', { class: 'filters' }, newSize.label, expand, verify, salvage, remove));
}

async function drawSnapshots(name: string): Promise<void> {
  const table = document.getElementById('snapshots');
  if (table === null) return;
  const snapshots = await call<Snapshot[]>('GET', `/v1/volumes/${encodeURIComponent(name)}/snapshots`);
  const path = `/v1/volumes/${encodeURIComponent(name)}/snapshots`;
  // The tree: each snapshot under its parent, indented.
  const children = new Map<string | null, Snapshot[]>();
  for (const x of snapshots) children.set(x.parent, [...(children.get(x.parent) ?? []), x]);
  const ordered: { snapshot: Snapshot; depth: number }[] = [];
  const walk = (parent: string | null, depth: number): void => {
    for (const x of (children.get(parent) ?? []).sort((a, b) => (a.createdAt < b.createdAt ? -1 : 1))) {
      ordered.push({ snapshot: x, depth });
      walk(x.name, depth + 1);
    }
  };
  walk(null, 0);
  for (const x of snapshots) if (!ordered.some((o) => o.snapshot === x)) ordered.push({ snapshot: x, depth: 0 });
  table.replaceChildren(el('caption', {}, 'Snapshots (a tree: each under its parent)'),
    el('thead', {}, el('tr', {}, ...['Name', 'Taken', 'Size', 'In the current data', 'Actions'].map((h) => el('th', { scope: 'col' }, h)))),
    el('tbody', {}, ...ordered.map(({ snapshot: x, depth }) => {
      const revert = el('button', { type: 'button', 'aria-label': `Revert to ${x.name}` }, 'Revert');
      revert.addEventListener('click', () => {
        if (!confirm(`Revert volume ${name} to snapshot ${x.name}? Everything written since is lost. (The volume must be attached in maintenance mode.)`)) return;
        void act(revert, `Volume ${name} reverted to ${x.name}.`, async () => {
          await call('POST', `${path}/${encodeURIComponent(x.name)}/revert`);
          await drawSnapshots(name);
        });
      });
      const remove = el('button', { type: 'button', 'aria-label': `Delete snapshot ${x.name}` }, 'Delete');
      remove.addEventListener('click', () => {
        if (!confirm(`Delete snapshot ${x.name} of volume ${name}?`)) return;
        void act(remove, `Snapshot ${x.name} deleted.`, async () => {
          await call('DELETE', `${path}/${encodeURIComponent(x.name)}`);
          await drawSnapshots(name);
        });
      });
      return el('tr', { 'data-snapshot': x.name },
        el('td', { style: `padding-left: ${0.6 + depth * 1.2}rem` }, depth > 0 ? `└ ${x.name}` : x.name),
        el('td', {}, new Date(x.createdAt).toLocaleString()), el('td', {}, bytes(x.sizeBytesUsed)), el('td', {}, x.inChain ? 'yes' : 'no'),
        el('td', {}, el('span', { class: 'writes' }, revert, remove)));
    })));
}

// ---- a volume's I/O, from the engine's counters in /metrics -----------------------------------

const IO_COUNTERS = ['reads', 'writes', 'read_bytes', 'write_bytes', 'read_latency_seconds', 'write_latency_seconds'] as const;
type IoSample = Record<(typeof IO_COUNTERS)[number], number> & { at: number };
const IO_SAMPLE_MS = 2000;
const IO_KEEP = 60;

/** The volume's I/O counters in a Prometheus text exposition, or null when it has none (detached). */
export function ioCounters(metricsText: string, volume: string): IoSample | null {
  const out: Partial<IoSample> = { at: Date.now() };
  for (const line of metricsText.split('\n')) {
    const m = /^zebu_volume_(\w+)_total\{volume="((?:[^"\\]|\\.)*)"\} (\S+)$/.exec(line);
    if (m === null || m[2] !== volume) continue;
    const key = m[1] as (typeof IO_COUNTERS)[number];
    if ((IO_COUNTERS as readonly string[]).includes(key)) out[key] = Number(m[3]);
  }
  return IO_COUNTERS.every((k) => typeof out[k] === 'number') ? out as IoSample : null;
}

interface IoRates { iops: number; mibPerSecond: number; latencyMs: number }

function rates(a: IoSample, b: IoSample): IoRates {
  const seconds = Math.max(0.001, (b.at - a.at) / 1000);
  const ops = b.reads - a.reads + (b.writes - a.writes);
  const latency = b.read_latency_seconds - a.read_latency_seconds + (b.write_latency_seconds - a.write_latency_seconds);
  return {
    iops: ops / seconds,
    mibPerSecond: (b.read_bytes - a.read_bytes + (b.write_bytes - a.write_bytes)) / seconds / 2 ** 20,
    latencyMs: ops > 0 ? (latency / ops) * 1000 : 0,
  };
}

/** A small line chart of `values` (newest last), labelled for screen readers with the latest. */
function chart(title: string, values: number[], unit: string): HTMLElement {
  const width = 240;
  const height = 60;
  const max = Math.max(1e-9, ...values);
  const points = values.map((v, i) => `${(i / Math.max(1, IO_KEEP - 1)) * width},${height - (v / max) * (height - 4) - 2}`).join(' ');
  const latest = values.at(-1) ?? 0;
  const text = `${latest >= 100 ? Math.round(latest) : latest.toFixed(1)} ${unit}`;
  const svg = document.createElementNS('http://www.w3.org/2000/svg', 'svg');
  svg.setAttribute('viewBox', `0 0 ${width} ${height}`);
  svg.setAttribute('width', String(width));
  svg.setAttribute('height', String(height));
  svg.setAttribute('aria-hidden', 'true');
  const line = document.createElementNS('http://www.w3.org/2000/svg', 'polyline');
  line.setAttribute('points', points);
  line.setAttribute('fill', 'none');
  line.setAttribute('stroke', '#2f6fdf');
  line.setAttribute('stroke-width', '2');
  svg.append(line);
  return el('figure', { class: 'card', 'aria-label': `${title}: ${text}` }, el('figcaption', {}, `${title}: `, el('strong', { 'data-io': title }, text)), svg);
}

/** Samples the volume's counters every 2 s while its page is open; draws IOPS, MiB/s and latency. */
function followIo(name: string, into: HTMLElement): void {
  const history: IoRates[] = [];
  let last: IoSample | null = null;
  const tick = async (): Promise<void> => {
    if (!into.isConnected) return;
    try {
      const sample = ioCounters(await call<string>('GET', '/metrics'), name);
      if (sample === null) {
        into.replaceChildren(el('p', {}, 'No I/O figures: the volume is not attached.'));
        last = null;
      } else {
        if (last !== null && sample.reads >= last.reads && sample.writes >= last.writes) {
          history.push(rates(last, sample));
          if (history.length > IO_KEEP) history.shift();
        }
        last = sample;
        into.replaceChildren(
          chart('IOPS', history.map((r) => r.iops), 'ops/s'),
          chart('Throughput', history.map((r) => r.mibPerSecond), 'MiB/s'),
          chart('Mean latency', history.map((r) => r.latencyMs), 'ms'));
      }
    } catch (err) {
      failed(err);
    }
    if (into.isConnected) setTimeout(() => void tick(), IO_SAMPLE_MS);
  };
  void tick();
}

function volumeView(name: string): void {
  const body = el('div', {});
  const io = el('section', { class: 'cards', 'aria-label': 'I/O' });
  const events = el('section', { 'aria-label': `Events of ${name}` });
  main().replaceChildren(el('h1', {}, `Volume ${name}`), volumeActions(name), io, body, el('table', { id: 'snapshots' }), events);
  void drawSnapshots(name).catch(failed);
  followIo(name, io);
  // Its events: the older ones once, the newest as they come.
  void call<EventRow[]>('GET', `/v1/events?volume=${encodeURIComponent(name)}&limit=50`).then((older) => {
    const draw = (): void => {
      events.replaceChildren(el('h2', {}, 'Events'), eventsTable(mergedEvents(older, (e) => e.volume === name).slice(0, 50)));
    };
    onListsChanged = draw;
    draw();
  }, failed);
  const draw = (): void => {
    const v = volumes.get(name);
    if (v === undefined) {
      body.replaceChildren(el('p', {}, volumesKnown ? `There is no volume ${name}.` : 'Loading…'));
      return;
    }
    body.replaceChildren(
      el('dl', {},
        el('dt', {}, 'State'), el('dd', { 'data-field': 'state' }, v.state),
        el('dt', {}, 'Robustness'), el('dd', { class: v.robustness, 'data-field': 'robustness' }, v.robustness + (v.rebuilding ? ' (rebuilding)' : '')),
        el('dt', {}, 'Size'), el('dd', {}, bytes(v.sizeBytes)),
        el('dt', {}, 'Attached on'), el('dd', {}, v.nodeId ?? 'detached'),
        el('dt', {}, 'Export'), el('dd', {}, v.endpoint ?? '—'),
        el('dt', {}, 'Message'), el('dd', { 'data-field': 'message' }, v.message ?? '—')),
      el('table', {}, el('caption', {}, 'Replicas'),
        el('thead', {}, el('tr', {}, ...['Name', 'Node', 'Mode', 'Rebuild'].map((h) => el('th', { scope: 'col' }, h)))),
        el('tbody', {}, ...v.replicas.filter((r) => r.failedAt === null).map((r) => el('tr', { 'data-replica': r.name },
          el('td', {}, r.name), el('td', {}, r.nodeId), el('td', { 'data-field': 'mode' }, r.mode ?? '—'),
          el('td', {}, typeof r.rebuildProgress === 'number' && r.mode === 'WO'
            ? el('progress', { max: '100', value: String(Math.round(r.rebuildProgress * 100)), 'aria-label': `rebuild of ${r.name}` }, `${Math.round(r.rebuildProgress * 100)}%`)
            : '—'))))),
      el('table', {}, el('caption', {}, 'Recurring jobs'),
        el('thead', {}, el('tr', {}, ...['Job', 'Task', 'Next run', 'Last result'].map((h) => el('th', { scope: 'col' }, h)))),
        el('tbody', {}, ...v.recurringJobs.map((j) => el('tr', { 'data-job': j.name },
          el('td', {}, j.name), el('td', {}, j.task), el('td', {}, j.nextRunAt === null ? '—' : new Date(j.nextRunAt).toLocaleString()),
          el('td', { class: j.result === 'error' ? 'faulted' : '', style: 'white-space: normal' }, j.result === null ? 'not run yet' : `${j.result}${j.message !== null ? `: ${j.message}` : ''}`))))),
      el('p', {}, el('a', { href: `#/backups?volume=${encodeURIComponent(v.name)}` }, `Backups of ${v.name}`), v.lastBackup !== null ? ` (last: ${v.lastBackup}, recovery point ${age(recoveryPointAge(v))} old)` : ' (none yet)'));
  };
  onVolumesChanged = draw;
  draw();
}

// ---- nodes and events ------------------------------------------------------------------------

interface DiskRow extends Disk { path: string; evict: boolean; tags: string[]; replicaCount: number; message: string | null }

/** Scheduling on/off, eviction on/off and tags of a node or a disk, each a PATCH of its own. */
function placementControls(kind: 'nodes' | 'disks', name: string, current: { allowScheduling: boolean; evict: boolean; tags: string[] }, redraw: () => Promise<void>): HTMLElement {
  const path = `/v1/${kind}/${encodeURIComponent(name)}`;
  const scheduling = el('button', { type: 'button', 'aria-label': `${current.allowScheduling ? 'Stop' : 'Allow'} scheduling on ${name}` }, current.allowScheduling ? 'Stop scheduling' : 'Allow scheduling');
  scheduling.addEventListener('click', () => void act(scheduling, `Scheduling on ${name} is ${current.allowScheduling ? 'off' : 'on'}.`, async () => {
    await call('PATCH', path, { allowScheduling: !current.allowScheduling });
    await redraw();
  }));
  const evict = el('button', { type: 'button', 'aria-label': `${current.evict ? 'Stop evicting' : 'Evict'} ${name}` }, current.evict ? 'Stop evicting' : 'Evict');
  evict.addEventListener('click', () => {
    if (!current.evict && !confirm(`Move every replica off ${name}? Each is rebuilt elsewhere first.`)) return;
    void act(evict, current.evict ? `Eviction of ${name} stopped.` : `Evicting ${name}.`, async () => {
      await call('PATCH', path, { evict: !current.evict });
      await redraw();
    });
  });
  const tags = el('input', { id: `tags-${kind}-${name}`, value: current.tags.join(', '), 'aria-label': `tags of ${name} (comma-separated)`, size: '16' });
  const saveTags = el('button', { type: 'button', 'aria-label': `Save tags of ${name}` }, 'Save tags');
  saveTags.addEventListener('click', () => void act(saveTags, `Tags of ${name} saved.`, async () => {
    await call('PATCH', path, { tags: tags.value.split(',').map((x) => x.trim()).filter((x) => x !== '') });
    await redraw();
  }));
  return el('span', { class: 'writes' }, scheduling, evict, tags, saveTags);
}

async function nodesView(): Promise<void> {
  const [nodes, disks] = await Promise.all([call<NodeRow[]>('GET', '/v1/nodes'), call<DiskRow[]>('GET', '/v1/disks')]);
  const redraw = (): Promise<void> => nodesView();
  main().replaceChildren(el('h1', {}, 'Nodes and disks'), el('table', {}, el('caption', {}, 'Nodes'),
    el('thead', {}, el('tr', {}, ...['Name', 'Address', 'State', 'Leader', 'Scheduling', 'Replicas', 'Disks', 'Tags', 'Change'].map((h) => el('th', { scope: 'col' }, h)))),
    el('tbody', {}, ...nodes.map((n) => el('tr', { 'data-node': n.name },
      el('td', {}, n.name), el('td', {}, n.address), el('td', { class: n.ready ? 'healthy' : 'faulted' }, n.ready ? 'up' : 'down'),
      el('td', {}, n.leader ? 'leader' : ''), el('td', {}, n.allowScheduling ? 'on' : 'off'), el('td', {}, String(n.replicaCount)),
      el('td', {}, String(n.disks.length)), el('td', { 'data-field': 'tags' }, n.tags.join(', ')),
      el('td', {}, placementControls('nodes', n.name, n, redraw)))))),
  el('table', {}, el('caption', {}, 'Disks'),
    el('thead', {}, el('tr', {}, ...['Name', 'Node', 'Path', 'State', 'Used', 'Scheduled', 'Reserved', 'Replicas', 'Scheduling', 'Tags', 'Change'].map((h) => el('th', { scope: 'col' }, h)))),
    el('tbody', {}, ...disks.map((d) => el('tr', { 'data-disk': d.name },
      el('td', {}, d.name), el('td', {}, d.nodeId), el('td', {}, d.path),
      el('td', { class: d.ready ? 'healthy' : 'faulted' }, d.ready ? (d.evict ? 'evicting' : 'ready') : `not ready${d.message !== null ? `: ${d.message}` : ''}`),
      el('td', {}, `${bytes(d.storageMaximumBytes - d.storageAvailableBytes)} of ${bytes(d.storageMaximumBytes)}`),
      el('td', {}, bytes(d.storageScheduledBytes)), el('td', {}, bytes(d.storageReservedBytes)), el('td', {}, String(d.replicaCount)),
      el('td', {}, d.allowScheduling ? 'on' : 'off'), el('td', { 'data-field': 'tags' }, d.tags.join(', ')),
      el('td', {}, placementControls('disks', d.name, d, redraw)))))));
}

function eventsTable(events: EventRow[]): HTMLTableElement {
  return el('table', {}, el('caption', {}, 'Events, newest first'),
    el('thead', {}, el('tr', {}, ...['Time', 'Type', 'Reason', 'Object', 'Message'].map((h) => el('th', { scope: 'col' }, h)))),
    el('tbody', {}, ...events.map((e) => el('tr', {},
      el('td', {}, new Date(e.time).toLocaleString()), el('td', { class: e.type === 'Warning' ? 'degraded' : '' }, e.type), el('td', {}, e.reason),
      el('td', {}, `${e.kind} ${e.object}`), el('td', { style: 'white-space: normal' }, e.message)))));
}

async function eventsView(): Promise<void> {
  // The older ones once; the newest follow live.
  const older = await call<EventRow[]>('GET', '/v1/events?limit=200');
  const draw = (): void => {
    main().replaceChildren(el('h1', {}, 'Events'), eventsTable(mergedEvents(older).slice(0, 200)));
  };
  onListsChanged = draw;
  draw();
}

interface JobRow {
  name: string; task: string; cron: string; retain: number; concurrency: number; groups: string[]; members: string[];
  lastRunAt: string | null; nextRunAt: string | null; results: { volume: string; result: string; message: string | null; at: string }[];
}

async function jobsView(): Promise<void> {
  const jobs = await call<JobRow[]>('GET', '/v1/recurringjobs');
  const name = field('job-name', 'Name', { autocomplete: 'off' });
  const task = el('select', { id: 'job-task' }, ...['snapshot', 'backup', 'snapshot-cleanup', 'snapshot-delete', 'backup-force-create'].map((x) => el('option', { value: x }, x)));
  const cron = field('job-cron', 'Schedule (cron)', { value: '0 3 * * *' });
  const retain = field('job-retain', 'Keep', { type: 'number', min: '1', max: '250', value: '7' });
  const groups = field('job-groups', 'Groups (comma-separated)', { value: 'default' });
  const create = el('button', { type: 'submit' }, 'Create job');
  const form = el('form', { class: 'filters writes', 'aria-label': 'Create a recurring job' }, name.label, el('label', { for: 'job-task' }, 'Task', task), cron.label, retain.label, groups.label, create);
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    const body = {
      name: name.input.value.trim(), task: task.value, cron: cron.input.value.trim(), retain: Number(retain.input.value),
      groups: groups.input.value.split(',').map((x) => x.trim()).filter((x) => x !== ''),
    };
    void act(create, `Recurring job ${body.name} created.`, async () => {
      await call('POST', '/v1/recurringjobs', body);
      await jobsView();
    });
  });
  main().replaceChildren(el('h1', {}, 'Recurring jobs'), form, el('table', {}, el('caption', {}, 'Recurring jobs'),
    el('thead', {}, el('tr', {}, ...['Name', 'Task', 'Schedule', 'Keep', 'Volumes', 'Next run', 'Last result per volume', ''].map((h) => el('th', { scope: 'col' }, h)))),
    el('tbody', {}, ...jobs.map((j) => {
      const remove = el('button', { type: 'button', class: 'writes', 'aria-label': `Delete job ${j.name}` }, 'Delete');
      remove.addEventListener('click', () => {
        if (!confirm(`Delete recurring job ${j.name}? What it made stays.`)) return;
        void act(remove, `Recurring job ${j.name} deleted.`, async () => {
          await call('DELETE', `/v1/recurringjobs/${encodeURIComponent(j.name)}`);
          await jobsView();
        });
      });
      return el('tr', { 'data-job': j.name },
        el('td', {}, j.name), el('td', {}, j.task), el('td', {}, j.cron), el('td', {}, String(j.retain)), el('td', {}, j.members.join(', ') || '—'),
        el('td', {}, j.nextRunAt === null ? '—' : new Date(j.nextRunAt).toLocaleString()),
        el('td', { style: 'white-space: normal' }, ...(j.results.length === 0 ? ['—'] : j.results.map((r) => el('div', { class: r.result === 'error' ? 'faulted' : '' }, `${r.volume}: ${r.result}${r.message !== null ? ` (${r.message})` : ''}`)))),
        el('td', {}, remove));
    }))));
}

interface ImageRow {
  name: string; state: string; sizeBytes: number; checksum: string | null; minCopies: number; readyCopies: number;
  files: { disk: string; node: string; state: string; progress: number; message: string | null; from: string }[];
}

async function imagesView(): Promise<void> {
  const images = await call<ImageRow[]>('GET', '/v1/backingimages');
  main().replaceChildren(el('h1', {}, 'Backing images'), ...(images.length === 0 ? [el('p', {}, 'No backing images (zebu backing-image create NAME --url URL, or --upload FILE).')] : images.map((b) =>
    el('section', { 'data-image': b.name }, el('h2', {}, `${b.name} — ${b.state}, ${bytes(b.sizeBytes)}, ${b.readyCopies} of ${b.minCopies} copies ready`),
      el('table', {}, el('caption', {}, `Files of ${b.name}`),
        el('thead', {}, el('tr', {}, ...['Disk', 'Node', 'State', 'Progress', 'From', 'Message'].map((h) => el('th', { scope: 'col' }, h)))),
        el('tbody', {}, ...b.files.map((f) => el('tr', {},
          el('td', {}, f.disk), el('td', {}, f.node), el('td', {}, f.state),
          el('td', {}, el('progress', { max: '100', value: String(Math.round(f.progress * 100)), 'aria-label': `copy of ${b.name} on ${f.disk}` })),
          el('td', {}, f.from), el('td', { style: 'white-space: normal' }, f.message ?? '—')))))))));
}

interface SettingRow { name: string; value: string; default: string; type: string; description: string }

async function settingsView(): Promise<void> {
  const settings = await call<SettingRow[]>('GET', '/v1/settings');
  main().replaceChildren(el('h1', {}, 'Settings'), el('table', {}, el('caption', {}, 'Settings'),
    el('thead', {}, el('tr', {}, ...['Name', 'Value', 'Default', 'What it does'].map((h) => el('th', { scope: 'col' }, h)))),
    el('tbody', {}, ...settings.map((x) => {
      const id = `setting-${x.name}`;
      const input = el('input', { id, value: x.value, 'aria-describedby': `${id}-about` });
      const save = el('button', { type: 'button', class: 'writes', 'aria-label': `Save ${x.name}` }, 'Save');
      if (readOnly) input.readOnly = true;
      save.addEventListener('click', () => void act(save, `Setting ${x.name} is now ${input.value}.`, () => call('PUT', `/v1/settings/${x.name}`, { value: input.value })));
      return el('tr', { 'data-setting': x.name },
        el('td', {}, el('label', { for: id }, x.name)), el('td', {}, input, save), el('td', {}, x.default),
        el('td', { id: `${id}-about`, style: 'white-space: normal' }, x.description));
    }))));
}

interface BackupRow { name: string; volume: string; state: string; progress: number; message: string | null; requestedAt: string; sizeBytes: number }

async function backupsView(query: URLSearchParams): Promise<void> {
  const volume = query.get('volume');
  const [target, backups] = await Promise.all([
    call<{ url: string | null; available?: boolean; message?: string | null }>('GET', '/v1/backuptargets/default').catch(() => ({ url: null })),
    call<BackupRow[]>('GET', volume === null ? '/v1/backups' : `/v1/backups?volume=${encodeURIComponent(volume)}`),
  ]);
  const url = field('target-url', 'Backup target (file:///DIR or s3://BUCKET/PREFIX)', { value: target.url ?? '', size: '50' });
  const setTarget = el('button', { type: 'submit' }, 'Set target');
  const form = el('form', { class: 'filters writes', 'aria-label': 'Backup target' }, url.label, setTarget);
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    void act(setTarget, `The backup target is now ${url.input.value}.`, async () => {
      await call('PUT', '/v1/backuptargets/default', { url: url.input.value.trim() });
      await backupsView(query);
    });
  });
  main().replaceChildren(el('h1', {}, volume === null ? 'Backups' : `Backups of ${volume}`), form, el('table', {}, el('caption', {}, 'Backups, newest first'),
    el('thead', {}, el('tr', {}, ...['Name', 'Volume', 'State', 'Size', 'Requested', 'Restore', ''].map((h) => el('th', { scope: 'col' }, h)))),
    el('tbody', {}, ...backups.sort((a, b) => (a.requestedAt < b.requestedAt ? 1 : -1)).map((b) => {
      const to = el('input', { id: `restore-${b.name}`, 'aria-label': `name of the volume to restore ${b.name} into`, placeholder: 'new volume name' });
      const remove = el('button', { type: 'button', class: 'writes', 'aria-label': `Delete backup ${b.name}` }, 'Delete');
      remove.addEventListener('click', () => {
        if (!confirm(`Delete backup ${b.name} of ${b.volume} from the backup target? Its blocks that no other backup uses are removed.`)) return;
        void act(remove, `Backup ${b.name} deleted.`, async () => {
          await call('DELETE', `/v1/backups/${encodeURIComponent(b.name)}`);
          await backupsView(query);
        });
      });
      const restore = el('button', { type: 'button' }, 'Restore');
      restore.addEventListener('click', () => {
        const name = to.value.trim();
        if (name === '') {
          showProblem('Name the new volume to restore into.');
          to.focus();
          return;
        }
        void act(restore, `Restoring ${b.name} into volume ${name}.`, () => call('POST', `/v1/backups/${encodeURIComponent(b.name)}/restore`, { name }));
      });
      return el('tr', { 'data-backup': b.name },
        el('td', {}, b.name), el('td', {}, b.volume),
        el('td', { 'data-field': 'state', class: b.state === 'error' ? 'faulted' : '' }, b.state === 'in-progress' ? `in progress (${Math.round(b.progress * 100)}%)` : b.state + (b.message !== null ? `: ${b.message}` : '')),
        el('td', {}, bytes(b.sizeBytes)), el('td', {}, new Date(b.requestedAt).toLocaleString()),
        el('td', {}, b.state === 'completed' ? el('span', { class: 'writes' }, to, restore) : '—'),
        el('td', {}, remove));
    }))));
}

// ---- routing ---------------------------------------------------------------------------------

function route(): void {
  onVolumesChanged = null;
  onListsChanged = null;
  if (savedToken() === null) {
    stopFollowing?.();
    stopFollowing = null;
    for (const stop of stopLists) stop();
    stopLists = [];
    volumesKnown = false;
    signInView();
    return;
  }
  document.getElementById('nav')!.hidden = false;
  readOnly = sessionStorage.getItem('zebu-access') === 'read-only';
  document.body.classList.toggle('read-only', readOnly);
  document.getElementById('access')!.textContent = readOnly ? 'read-only' : '';
  startFollowing();
  const [path, search] = (location.hash.replace(/^#/, '') || '/').split('?');
  const query = new URLSearchParams(search ?? '');
  for (const a of document.querySelectorAll('nav a')) {
    const href = a.getAttribute('href')!.slice(1);
    if (href === path || (href !== '/' && path.startsWith(href))) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  const parts = path.split('/').filter((p) => p !== '');
  let view: Promise<void> | void = undefined;
  if (parts.length === 0) view = dashboardView();
  else if (parts[0] === 'volumes' && parts.length === 1) view = volumesView(query);
  else if (parts[0] === 'volumes' && parts.length === 2) view = volumeView(decodeURIComponent(parts[1]));
  else if (parts[0] === 'nodes') view = nodesView();
  else if (parts[0] === 'events') view = eventsView();
  else if (parts[0] === 'settings') view = settingsView();
  else if (parts[0] === 'jobs') view = jobsView();
  else if (parts[0] === 'images') view = imagesView();
  else if (parts[0] === 'backups') view = backupsView(query);
  else main().replaceChildren(el('h1', {}, 'Not found'), el('p', {}, `There is no view ${path}.`));
  if (view instanceof Promise) view.catch(failed);
}

window.addEventListener('hashchange', () => {
  showProblem(null);
  route();
});
document.getElementById('sign-out')!.addEventListener('click', () => {
  saveToken(null);
  location.hash = '#/';
  route();
});
route();

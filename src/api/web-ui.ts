/**
 * The web UI on the API's address: its files at `/` and `/ui/NAME` (built from web/ into
 * build/web/ at install; no token needed to load them — every call the UI then makes is an API
 * call with the user's token), and the live feeds it follows, `GET /v1/stream/KIND` for volumes,
 * nodes, disks and events (server-sent events, token required): `snapshot` with every object as
 * the API lists it (volumes less recoveryPointAgeSeconds, which grows by itself: the UI counts it
 * from recoveryPointAt; the newest 50 events), then `put` with one object each time it changed (or
 * a new event) and `delete` with the name of one that is gone (for events: one that is no longer
 * among the newest). Each list is read once a second while someone follows it (one reading shared
 * by every follower), so an object is sent at most once a second, and only when it changed.
 */
import fs from 'node:fs';
import path from 'node:path';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import type { ServerResponse } from 'node:http';
import { PROJECT_ROOT } from '../os/js-build.ts';
import type { VolumeView } from '../manager/types.ts';
import { errorBody } from './http-errors.ts';
import { ErrorCode } from '../errors.ts';

const WEB_DIR = path.join(PROJECT_ROOT, 'build', 'web');
const CONTENT_TYPES: Record<string, string> = { '.js': 'text/javascript; charset=utf-8', '.css': 'text/css; charset=utf-8', '.html': 'text/html; charset=utf-8' };
const FEED_EVERY_MS = 1000;
/** A comment line now and then: a follower that went away is found, and nothing in between times out. */
const KEEPALIVE_MS = 15_000;

/** The routes that need no token (the UI's own files). */
export const WEB_UI_OPEN_ROUTES = ['GET /', 'GET /ui/:file'];

/** What the feeds read: each a list whose items have a key (a name, or for events their fields). */
export interface FeedSources {
  volumes: () => Promise<VolumeView[]>;
  nodes: () => Promise<{ name: string }[]>;
  disks: () => Promise<{ name: string }[]>;
  /** The newest events (at most FEED_EVENTS). */
  events: () => Promise<{ time: string; kind: string; object: string; reason: string; message: string }[]>;
}

/** How many of the newest events the event feed follows. */
const FEED_EVENTS = 50;

export function registerWebUi(app: FastifyInstance, sources: FeedSources): { close: () => void } {
  // Ages that grow by themselves would send a volume every second for nothing: the UI counts them from the times.
  const feeds = new Map<string, Feed>([
    ['volumes', new Feed(async () => (await sources.volumes()).map((v) => ({ key: v.name, item: { ...v, recoveryPointAgeSeconds: undefined } })))],
    ['nodes', new Feed(async () => (await sources.nodes()).map((n) => ({ key: n.name, item: n })))],
    ['disks', new Feed(async () => (await sources.disks()).map((d) => ({ key: d.name, item: d })))],
    ['events', new Feed(async () => (await sources.events()).slice(0, FEED_EVENTS).map((e) => ({ key: `${e.time}|${e.kind}|${e.object}|${e.reason}|${e.message}`, item: e })))],
  ]);
  app.get('/', async (_request, reply) => sendFile(reply, 'index.html'));
  app.get<{ Params: { file: string } }>('/ui/:file', async (request, reply) => sendFile(reply, request.params.file));
  app.get<{ Params: { kind: string } }>('/v1/stream/:kind', (request, reply: FastifyReply) => {
    const feed = feeds.get(request.params.kind);
    if (feed === undefined) {
      return reply.code(404).type('application/json').send(errorBody(ErrorCode.NOT_FOUND, `no stream of ${request.params.kind}: one of ${[...feeds.keys()].join(', ')}`));
    }
    reply.hijack();
    const res = reply.raw;
    res.writeHead(200, { 'content-type': 'text/event-stream; charset=utf-8', 'cache-control': 'no-store', connection: 'keep-alive' });
    const unsubscribe = feed.subscribe(res);
    const keepalive = setInterval(() => res.write(': keep-alive\n\n'), KEEPALIVE_MS);
    request.raw.on('close', () => {
      clearInterval(keepalive);
      unsubscribe();
    });
    return reply;
  });
  return {
    close: () => {
      for (const feed of feeds.values()) feed.close();
    },
  };
}

function sendFile(reply: FastifyReply, name: string): FastifyReply {
  const type = CONTENT_TYPES[path.extname(name)];
  // Only plain names of the built files: no paths, nothing else on the disk.
  if (type === undefined || !/^[a-z0-9-]+\.[a-z]+$/.test(name)) return reply.code(404).type('application/json').send(errorBody(ErrorCode.NOT_FOUND, `no such file of the web UI: ${name}`));
  let body: Buffer;
  try {
    body = fs.readFileSync(path.join(WEB_DIR, name));
  } catch {
    if (!fs.existsSync(WEB_DIR)) {
      return reply.code(503).type('application/json').send(errorBody(ErrorCode.UNSUPPORTED, 'the web UI is not built: run `node --disable-warning=ExperimentalWarning scripts/build-web.ts` (npm install does it)'));
    }
    return reply.code(404).type('application/json').send(errorBody(ErrorCode.NOT_FOUND, `no such file of the web UI: ${name}`));
  }
  return reply.code(200).type(type).header('cache-control', 'no-cache').send(body);
}

/** One reading of a list shared by every follower; each follower gets what changed. */
class Feed {
  private readonly source: () => Promise<{ key: string; item: unknown }[]>;
  private readonly followers = new Set<ServerResponse>();
  /** Each volume as last sent, as JSON. */
  private last = new Map<string, string>();
  private known = false;
  private timer: NodeJS.Timeout | null = null;
  private reading = false;
  private closed = false;

  constructor(read: () => Promise<{ key: string; item: unknown }[]>) {
    this.source = read;
  }

  subscribe(res: ServerResponse): () => void {
    this.followers.add(res);
    if (this.known) res.write(`event: snapshot\ndata: [${[...this.last.values()].join(',')}]\n\n`);
    else void this.read(); // the first follower: its snapshot comes with the first reading
    this.schedule();
    return () => {
      this.followers.delete(res);
      if (this.followers.size === 0) {
        if (this.timer !== null) clearTimeout(this.timer);
        this.timer = null;
        // Nobody follows: the next follower starts from a fresh reading.
        this.known = false;
        this.last = new Map();
      }
    };
  }

  close(): void {
    this.closed = true;
    if (this.timer !== null) clearTimeout(this.timer);
    for (const res of this.followers) res.end();
    this.followers.clear();
  }

  private schedule(): void {
    if (this.timer !== null || this.closed || this.followers.size === 0) return;
    this.timer = setTimeout(() => {
      this.timer = null;
      void this.read().finally(() => this.schedule());
    }, FEED_EVERY_MS);
  }

  private async read(): Promise<void> {
    if (this.reading) return;
    this.reading = true;
    try {
      let items: { key: string; item: unknown }[];
      try {
        items = await this.source();
      } catch (err) {
        // The store is out for now (an election, etcd down): followers keep what they have.
        this.broadcast(`: could not be read: ${(err as Error).message.replace(/\n/g, ' ')}\n\n`);
        return;
      }
      const now = new Map(items.map((x) => [x.key, JSON.stringify(x.item)]));
      if (!this.known) {
        this.known = true;
        this.last = now;
        this.broadcast(`event: snapshot\ndata: [${[...now.values()].join(',')}]\n\n`);
        return;
      }
      let out = '';
      for (const [name, json] of now) if (this.last.get(name) !== json) out += `event: put\ndata: ${json}\n\n`;
      for (const key of this.last.keys()) if (!now.has(key)) out += `event: delete\ndata: ${JSON.stringify({ name: key })}\n\n`;
      this.last = now;
      if (out !== '') this.broadcast(out);
    } finally {
      this.reading = false;
    }
  }

  private broadcast(text: string): void {
    for (const res of this.followers) res.write(text);
  }
}

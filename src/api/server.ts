/**
 * The REST API (fastify): HTTP onto ManagerService. Routes are in routes.ts, their schemas in
 * schemas.ts, the OpenAPI document is generated from the same table (openapi.ts).
 *
 * - Every route but GET /healthz and the web UI's files (web-ui.ts) needs `Authorization: Bearer
 *   <token>` (compared in constant time): the API token, or the read-only token, which may only
 *   look (GET, HEAD; anything else is 403 FORBIDDEN).
 * - Inputs are checked by JSON schema before the service sees them; a failure is a 400 naming the
 *   field. The service checks again (state-dependent rules) and its ZebuErrors map onto statuses:
 *   EINVAL 400, UNAUTHORIZED 401, NOT_FOUND 404, EXISTS/CONFLICT/BUSY 409, ENOSPC 507, else 500.
 * - Every error, fastify's own included (unknown route, bad JSON, body too large), has one shape:
 *   {"error": {"code", "message", "field"?}}.
 */
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import Fastify, { type FastifyError, type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import { ErrorCode, ZebuError } from '../errors.ts';
import type { ManagerService } from '../manager/types.ts';
import type { BackupService } from '../manager/backup-types.ts';
import { errorBody, statusForCode, validationError, type SchemaError } from './http-errors.ts';
import { createMetricsExporter } from './metrics.ts';
import { PROJECT_ROOT } from '../os/js-build.ts';
import { openapiDocument } from './openapi.ts';
import { registerWebUi, WEB_UI_OPEN_ROUTES } from './web-ui.ts';
import { apiRoutes, type BackingImageService, type RecurringJobService, type RouteSpec, type TokenAccess } from './routes.ts';

export interface ApiServerOptions {
  service: ManagerService;
  /** Backup targets and backups (absent: those routes answer 404). */
  backups?: BackupService;
  /** Recurring jobs (absent: those routes answer 404). */
  recurringJobs?: RecurringJobService;
  /** Backing images (absent: those routes answer 404). */
  backingImages?: BackingImageService;
  /** The bearer token every request but /healthz must present. */
  token: string;
  /** A second token that may only look: GET and HEAD requests (absent: none). */
  readOnlyToken?: string;
  /** fastify's request log (pino, to stdout). Off by default. */
  logger?: boolean;
}

/** Requests are small JSON documents; anything bigger is a mistake or an attack. */
const BODY_LIMIT_BYTES = 64 * 1024;

function packageVersion(): string {
  try {
    const pkg = JSON.parse(fs.readFileSync(path.join(PROJECT_ROOT, 'package.json'), 'utf8')) as { version?: unknown };
    return typeof pkg.version === 'string' ? pkg.version : '0.0.0';
  } catch {
    return '0.0.0';
  }
}

function digest(text: string): Buffer {
  return crypto.createHash('sha256').update(text).digest();
}

/**
 * What the Authorization header's token allows, or why it is refused; the comparison time does not
 * depend on the token's bytes.
 */
function tokenAccess(header: string | undefined, tokenDigest: Buffer, readOnlyDigest: Buffer | null): TokenAccess | ZebuError {
  const missing = 'missing API token: send "Authorization: Bearer <token>" (zebu up writes the token to the token file of its data directory)';
  if (header === undefined || header === '') return new ZebuError(ErrorCode.UNAUTHORIZED, missing);
  const m = /^Bearer[ \t]+(\S+)[ \t]*$/i.exec(header);
  if (m === null) return new ZebuError(ErrorCode.UNAUTHORIZED, `malformed Authorization header: ${missing.replace('missing API token: ', '')}`);
  const presented = digest(m[1]);
  const full = crypto.timingSafeEqual(presented, tokenDigest);
  const readOnly = readOnlyDigest !== null && crypto.timingSafeEqual(presented, readOnlyDigest);
  if (full) return 'read-write';
  if (readOnly) return 'read-only';
  return new ZebuError(ErrorCode.UNAUTHORIZED, 'invalid API token');
}

/** fastify's own client errors (bad JSON, body too large, wrong content type) keep their status. */
function clientErrorFromFastify(err: FastifyError): { status: number; message: string } | null {
  const status = err.statusCode;
  if (status === undefined || status < 400 || status >= 500) return null;
  if (err.code === 'FST_ERR_CTP_BODY_TOO_LARGE') return { status, message: `request body over ${BODY_LIMIT_BYTES} bytes` };
  if (err.code === 'FST_ERR_CTP_INVALID_MEDIA_TYPE') return { status, message: 'unsupported content type: send application/json' };
  return { status, message: err.message };
}

function sendError(reply: FastifyReply, err: ZebuError, status = statusForCode(err.code)): FastifyReply {
  return reply.code(status).type('application/json').send(errorBody(err.code, err.message, err.field));
}

export async function buildApiServer(options: ApiServerOptions): Promise<FastifyInstance> {
  if (typeof options.token !== 'string' || options.token.trim() === '') throw new ZebuError(ErrorCode.EINVAL, 'the API token must not be empty');
  const tokenDigest = digest(options.token);
  if (options.readOnlyToken !== undefined && (options.readOnlyToken.trim() === '' || options.readOnlyToken === options.token)) {
    throw new ZebuError(ErrorCode.EINVAL, 'the read-only token must not be empty, nor the API token');
  }
  const readOnlyDigest = options.readOnlyToken === undefined ? null : digest(options.readOnlyToken);
  const app = Fastify({
    logger: options.logger ?? false,
    bodyLimit: BODY_LIMIT_BYTES,
    ajv: {
      // No coercion or silent stripping: "4096" is not a number and an unknown field is an
      // error, not ignored. verbose: errors carry the offending value and schema for messages.
      customOptions: { coerceTypes: false, removeAdditional: false, useDefaults: false, verbose: true, allErrors: false },
    },
    // Validation failures go to the error handler with the ajv errors (see below).
    schemaErrorFormatter: (errors, dataVar) => {
      const err = validationError(errors as SchemaError[], dataVar);
      return err as unknown as Error;
    },
  });

  const metrics = createMetricsExporter(options.service, options.backups);
  let document: Record<string, unknown> | null = null;
  const routes: RouteSpec[] = apiRoutes(options.service, options.backups ?? null, {
    metrics: () => metrics.scrape(),
    metricsContentType: metrics.contentType,
    openapi: () => (document ??= openapiDocument(routes, { version: packageVersion() })),
  }, options.recurringJobs ?? null, options.backingImages ?? null);
  const open = new Set([...routes.filter((r) => !r.auth).map((r) => `${r.method} ${r.url}`), ...WEB_UI_OPEN_ROUTES]);

  const accessOf = new WeakMap<FastifyRequest, TokenAccess>();
  app.addHook('onRequest', async (request: FastifyRequest, reply: FastifyReply) => {
    const routeUrl = request.routeOptions.url;
    if (routeUrl !== undefined && open.has(`${request.method} ${routeUrl}`)) return;
    if (request.method === 'HEAD' && routeUrl !== undefined && open.has(`GET ${routeUrl}`)) return;
    const access = tokenAccess(request.headers.authorization, tokenDigest, readOnlyDigest);
    if (access instanceof ZebuError) return sendError(reply, access);
    if (access === 'read-only' && request.method !== 'GET' && request.method !== 'HEAD') {
      return sendError(reply, new ZebuError(ErrorCode.FORBIDDEN, `this token is read-only: it may look (GET) but not ${request.method} ${request.url.split('?')[0]}; use the API token (the file "token" of zebu up's data directory)`));
    }
    accessOf.set(request, access);
  });

  app.setErrorHandler((error: FastifyError | ZebuError | Error, request, reply) => {
    if (error instanceof ZebuError) return sendError(reply, error);
    const fastifyError = error as FastifyError;
    if (fastifyError.validation !== undefined) {
      // Normally already a ZebuError (schemaErrorFormatter); kept for safety.
      return sendError(reply, validationError(fastifyError.validation as unknown as SchemaError[], fastifyError.validationContext ?? 'body'));
    }
    const client = clientErrorFromFastify(fastifyError);
    if (client !== null) {
      const code = client.status === 404 ? ErrorCode.NOT_FOUND : ErrorCode.EINVAL;
      return reply.code(client.status).type('application/json').send(errorBody(code, client.message));
    }
    request.log.error({ err: error }, 'request failed');
    return sendError(reply, new ZebuError(ErrorCode.EIO, `internal error: ${error.message}`), 500);
  });

  app.setNotFoundHandler((request, reply) => {
    sendError(reply, new ZebuError(ErrorCode.NOT_FOUND, `no such route: ${request.method} ${request.url.split('?')[0]}`));
  });

  // Raw bytes (an image upload): handed to the route as a stream, never buffered; only routes
  // that declare `consumes` take them (any other route then fails its body validation).
  app.addContentTypeParser('application/octet-stream', (_request, payload, done) => done(null, payload));

  for (const r of routes) {
    const schema: Record<string, unknown> = {};
    if (r.params !== undefined) schema.params = r.params;
    if (r.querystring !== undefined) schema.querystring = r.querystring;
    if (r.body !== undefined) schema.body = r.body;
    app.route({
      method: r.method,
      url: r.url,
      schema,
      // An optional body may be left out: validate {} instead of undefined.
      preValidation: r.bodyOptional === true
        ? async (request: FastifyRequest) => {
          if (request.body === undefined || request.body === null) request.body = {};
        }
        : undefined,
      handler: async (request, reply) => {
        const raw = r.consumes !== undefined;
        const length = Number(request.headers['content-length']);
        if (raw && request.headers['content-type']?.split(';')[0].trim() !== r.consumes) {
          throw new ZebuError(ErrorCode.EINVAL, `send the body as ${r.consumes}`);
        }
        const result = await r.handler({
          access: accessOf.get(request),
          params: (request.params ?? {}) as Record<string, string>,
          query: (request.query ?? {}) as Record<string, string | undefined>,
          body: raw ? {} : (request.body ?? {}) as Record<string, unknown>,
          ...(raw ? { stream: request.body as AsyncIterable<Buffer>, contentLength: Number.isSafeInteger(length) && length >= 0 ? length : null } : {}),
        });
        reply.code(r.status);
        if (r.status === 204) return reply.send();
        if (r.produces !== undefined) return reply.type(r.produces).send(result);
        return reply.type('application/json').send(JSON.stringify(result));
      },
    });
  }
  const webUi = registerWebUi(app, {
    volumes: () => options.service.listVolumes(),
    nodes: () => options.service.listNodes(),
    disks: () => options.service.listDisks(),
    events: () => options.service.listEvents({ limit: 50 }),
  });
  // Before the server closes: a followed stream would keep it open.
  app.addHook('preClose', async () => webUi.close());
  await app.ready();
  return app;
}

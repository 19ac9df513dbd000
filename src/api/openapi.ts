/** The OpenAPI 3.1 document of the REST API, generated from the route table (routes.ts). */
import type { RouteSpec } from './routes.ts';
import { views, ref, type JsonSchema } from './schemas.ts';

const ERROR_STATUSES: Record<string, string> = {
  400: 'Invalid input: error.field names the request field at fault',
  401: 'Missing or wrong bearer token',
  404: 'No such object (or route)',
  409: 'The request clashes with the current state; nothing changed',
  500: 'Internal error',
};

/** /v1/volumes/:name -> /v1/volumes/{name} */
function openapiPath(url: string): string {
  return url.replace(/:([A-Za-z0-9_]+)/g, '{$1}');
}

function parameters(schema: JsonSchema | undefined, location: 'path' | 'query'): unknown[] {
  if (schema === undefined) return [];
  const properties = (schema.properties ?? {}) as Record<string, JsonSchema>;
  const required = new Set((schema.required ?? []) as string[]);
  return Object.entries(properties).map(([name, s]) => ({
    name,
    in: location,
    required: location === 'path' || required.has(name),
    description: s.description,
    schema: s,
  }));
}

function errorResponse(description: string): unknown {
  return { description, content: { 'application/json': { schema: ref('Error') } } };
}

export function openapiDocument(routes: RouteSpec[], info: { version: string }): Record<string, unknown> {
  const paths: Record<string, Record<string, unknown>> = {};
  for (const r of routes) {
    const responses: Record<string, unknown> = {};
    const success = r.status === 201 ? 'Created' : r.status === 204 ? 'Done (no content)' : 'OK';
    responses[String(r.status)] = r.status === 204
      ? { description: success }
      : { description: success, content: { [r.produces?.split(';')[0] ?? 'application/json']: { schema: r.response ?? {} } } };
    const errors = r.auth ? ['400', '401', '404', '409', '500'] : ['500'];
    for (const status of errors) {
      if (status === '400' && r.body === undefined && r.params === undefined && r.querystring === undefined) continue;
      responses[status] = errorResponse(ERROR_STATUSES[status]);
    }
    const operation: Record<string, unknown> = {
      operationId: r.operationId,
      summary: r.summary,
      tags: [r.tag],
      parameters: [...parameters(r.params, 'path'), ...parameters(r.querystring, 'query')],
      responses,
    };
    if (r.body !== undefined) {
      operation.requestBody = { required: r.bodyOptional !== true, content: { 'application/json': { schema: r.body } } };
    }
    if (r.consumes !== undefined) operation.requestBody = { required: true, content: { [r.consumes]: { schema: { type: 'string', format: 'binary' } } } };
    if (!r.auth) operation.security = [];
    (paths[openapiPath(r.url)] ??= {})[r.method.toLowerCase()] = operation;
  }
  // The live feeds (web-ui.ts): served beside the route table, as they stream rather than answer once.
  paths['/v1/stream/{kind}'] = {
    get: {
      operationId: 'stream', summary: 'Follow a list live (server-sent events): snapshot, then put/delete per changed object, at most once a second', tags: ['system'],
      parameters: [{ name: 'kind', in: 'path', required: true, schema: { type: 'string', enum: ['volumes', 'nodes', 'disks', 'events'] } }],
      responses: {
        200: { description: 'The stream: `event: snapshot|put|delete` with `data:` a JSON list, object, or `{"name"}`', content: { 'text/event-stream': { schema: { type: 'string' } } } },
        401: errorResponse(ERROR_STATUSES['401']), 404: errorResponse(ERROR_STATUSES['404']),
      },
    },
  };
  return {
    openapi: '3.1.0',
    info: {
      title: 'Zebu API',
      version: info.version,
      description: 'Control plane of Zebu, replicated block storage served over NBD. Every route but /healthz needs `Authorization: Bearer <token>` (the token file is in the data directory of `zebu up`; the read-only token, token-readonly, may only GET).',
    },
    paths,
    components: {
      schemas: views,
      securitySchemes: { bearer: { type: 'http', scheme: 'bearer' } },
    },
    security: [{ bearer: [] }],
  };
}

/**
 * The CLI's view of the REST API: where it is (--api, ZEBU_API, default http://127.0.0.1:9500),
 * the bearer token (--token, --token-file, ZEBU_TOKEN, else ./zebu-data/token), and requests that
 * turn every failure into one ZebuError whose message is fit for one line on a terminal.
 */
import fs from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import path from 'node:path';
import { ErrorCode, ZebuError } from '../../errors.ts';

export const DEFAULT_API_URL = 'http://127.0.0.1:9500';
export const DEFAULT_TOKEN_FILE = `.${path.sep}${path.join('zebu-data', 'token')}`;
/** One request; waiting commands poll with many short requests instead of one long one. */
const REQUEST_TIMEOUT_MS = 60_000;

export interface ConnectionOptions {
  api?: string;
  token?: string;
  tokenFile?: string;
}

const CODE_BY_SHORT: Record<string, ErrorCode> = Object.fromEntries(
  Object.values(ErrorCode).map((code) => [code.replace(/^ZEBU_ERR_/, ''), code]),
);

/** An error answer of the API, with its HTTP status. */
export class ApiError extends ZebuError {
  readonly status: number;
  constructor(status: number, code: ErrorCode, message: string, field?: string) {
    super(code, message, { field });
    this.name = 'ApiError';
    this.status = status;
  }
}

/** "127.0.0.1:9500" or "http://host:9500/" -> "http://host:9500". */
export function normalizeApiUrl(text: string): string {
  const withScheme = /^[a-z][a-z0-9+.-]*:\/\//i.test(text) ? text : `http://${text}`;
  let url: URL;
  try {
    url = new URL(withScheme);
  } catch {
    throw new ZebuError(ErrorCode.EINVAL, `not an API URL: ${JSON.stringify(text)} (expected e.g. ${DEFAULT_API_URL})`);
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:') throw new ZebuError(ErrorCode.EINVAL, `the API URL must be http:// or https://, got ${JSON.stringify(text)}`);
  return url.toString().replace(/\/+$/, '');
}

function readToken(file: string, how: string): string {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    const code = (err as { code?: string }).code;
    if (code === 'ENOENT' && how === 'default') {
      throw new ZebuError(ErrorCode.UNAUTHORIZED, `no API token: pass --token TOKEN or set ZEBU_TOKEN (the default, ${file}, does not exist here; zebu up writes it in its data directory)`);
    }
    throw new ZebuError(ErrorCode.UNAUTHORIZED, `cannot read the API token file ${file}: ${(err as Error).message} (pass --token TOKEN or set ZEBU_TOKEN)`);
  }
  const token = text.trim();
  if (token === '') throw new ZebuError(ErrorCode.UNAUTHORIZED, `the API token file ${file} is empty (pass --token TOKEN or set ZEBU_TOKEN)`);
  return token;
}

export function resolveToken(options: ConnectionOptions, env: NodeJS.ProcessEnv = process.env): string {
  if (options.token !== undefined) {
    if (options.token.trim() === '') throw new ZebuError(ErrorCode.EINVAL, '--token must not be empty');
    return options.token.trim();
  }
  if (options.tokenFile !== undefined) return readToken(options.tokenFile, '--token-file');
  const fromEnv = env.ZEBU_TOKEN?.trim();
  if (fromEnv !== undefined && fromEnv !== '') return fromEnv;
  return readToken(DEFAULT_TOKEN_FILE, 'default');
}

export class ApiClient {
  readonly baseUrl: string;
  private readonly options: ConnectionOptions;
  private token: string | null = null;

  constructor(options: ConnectionOptions, env: NodeJS.ProcessEnv = process.env) {
    this.options = options;
    const api = options.api ?? env.ZEBU_API;
    this.baseUrl = normalizeApiUrl(api !== undefined && api.trim() !== '' ? api.trim() : DEFAULT_API_URL);
  }

  get<T>(pathName: string): Promise<T> {
    return this.request<T>('GET', pathName);
  }

  post<T>(pathName: string, body?: unknown, options: { timeoutMs?: number } = {}): Promise<T> {
    return this.request<T>('POST', pathName, body, options);
  }

  patch<T>(pathName: string, body: unknown): Promise<T> {
    return this.request<T>('PATCH', pathName, body);
  }

  put<T>(pathName: string, body: unknown): Promise<T> {
    return this.request<T>('PUT', pathName, body);
  }

  delete<T>(pathName: string): Promise<T> {
    return this.request<T>('DELETE', pathName);
  }

  /** `timeoutMs`: for the few requests that answer only when long work is done (verify). */
  async request<T>(method: string, pathName: string, body?: unknown, options: { timeoutMs?: number } = {}): Promise<T> {
    const timeoutMs = options.timeoutMs ?? REQUEST_TIMEOUT_MS;
    this.token ??= resolveToken(this.options);
    const url = `${this.baseUrl}${pathName}`;
    const headers: Record<string, string> = { authorization: `Bearer ${this.token}`, accept: 'application/json' };
    if (body !== undefined) headers['content-type'] = 'application/json';
    let response: Response;
    try {
      response = await fetch(url, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: AbortSignal.timeout(timeoutMs),
      });
    } catch (err) {
      throw this.transportError(err, timeoutMs);
    }
    let text: string;
    try {
      text = await response.text();
    } catch (err) {
      throw this.transportError(err, timeoutMs);
    }
    if (response.status === 204) return undefined as T;
    let parsed: unknown;
    try {
      parsed = text === '' ? undefined : JSON.parse(text);
    } catch {
      parsed = undefined;
    }
    if (!response.ok) throw errorFromAnswer(response.status, parsed, text, url);
    if (parsed === undefined) throw new ZebuError(ErrorCode.PROTOCOL, `unexpected answer from ${url} (HTTP ${response.status}): not JSON`);
    return parsed as T;
  }

  /**
   * Sends a file as the raw body (application/octet-stream) of a PUT, streamed from disk with its
   * length; `onProgress` gets the bytes sent so far. Answers as `request` does.
   */
  async uploadFile<T>(pathName: string, file: string, options: { timeoutMs: number; onProgress?: (sent: number, total: number) => void }): Promise<T> {
    this.token ??= resolveToken(this.options);
    const url = new URL(`${this.baseUrl}${pathName}`);
    let size: number;
    try {
      size = fs.statSync(file).size;
    } catch (err) {
      throw new ZebuError(ErrorCode.NOT_FOUND, `cannot read ${file}: ${(err as Error).message}`);
    }
    const transport = url.protocol === 'https:' ? https : http;
    const { status, text } = await new Promise<{ status: number; text: string }>((resolve, reject) => {
      const req = transport.request(url, {
        method: 'PUT',
        headers: { authorization: `Bearer ${this.token}`, accept: 'application/json', 'content-type': 'application/octet-stream', 'content-length': String(size) },
        timeout: options.timeoutMs,
      }, (res) => {
        let body = '';
        res.setEncoding('utf8');
        res.on('data', (d: string) => (body += d));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, text: body }));
        res.on('error', (err) => reject(this.transportError(err, options.timeoutMs)));
      });
      req.on('timeout', () => req.destroy(Object.assign(new Error('timeout'), { name: 'TimeoutError' })));
      req.on('error', (err) => reject(this.transportError(err, options.timeoutMs)));
      const source = fs.createReadStream(file, { highWaterMark: 1 << 20 });
      let sent = 0;
      source.on('data', (chunk) => {
        sent += chunk.length;
        options.onProgress?.(sent, size);
      });
      source.on('error', (err) => req.destroy(err));
      source.pipe(req);
    });
    let parsed: unknown;
    try {
      parsed = text === '' ? undefined : JSON.parse(text);
    } catch {
      parsed = undefined;
    }
    if (status < 200 || status >= 300) throw errorFromAnswer(status, parsed, text, url.href);
    if (parsed === undefined) throw new ZebuError(ErrorCode.PROTOCOL, `unexpected answer from ${url.href} (HTTP ${status}): not JSON`);
    return parsed as T;
  }

  private transportError(err: unknown, timeoutMs: number): ZebuError {
    const e = err as Error & { cause?: { code?: string; message?: string } };
    if (e.name === 'TimeoutError' || e.name === 'AbortError') {
      return new ZebuError(ErrorCode.TIMEOUT, `the Zebu API at ${this.baseUrl} did not answer within ${timeoutMs / 1000} s`);
    }
    const why = e.cause?.code ?? e.cause?.message ?? e.message;
    return new ZebuError(
      ErrorCode.DISCONNECTED,
      `cannot reach the Zebu API at ${this.baseUrl} (${why}): is \`zebu up\` running? (--api URL or ZEBU_API selects another address)`,
      { cause: err },
    );
  }
}

function errorFromAnswer(status: number, parsed: unknown, text: string, url: string): ApiError {
  const error = (parsed as { error?: { code?: unknown; message?: unknown; field?: unknown } } | undefined)?.error;
  if (error !== undefined && typeof error.message === 'string') {
    const code = CODE_BY_SHORT[String(error.code)] ?? ErrorCode.EIO;
    const field = typeof error.field === 'string' ? error.field : undefined;
    const hint = status === 401 ? ' (check --token or ZEBU_TOKEN: the token is in the token file of the data directory of zebu up)' : '';
    return new ApiError(status, code, `${error.message}${hint}`, field);
  }
  const snippet = text.replace(/\s+/g, ' ').trim().slice(0, 200);
  return new ApiError(status, ErrorCode.EIO, `HTTP ${status} from ${url}${snippet !== '' ? `: ${snippet}` : ''}`);
}

export function isNotFound(err: unknown): boolean {
  return err instanceof ApiError && err.status === 404 && err.code === ErrorCode.NOT_FOUND;
}

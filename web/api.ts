/**
 * The browser's side of the REST API: every call the UI makes goes through here, with the token
 * the user signed in with, and every failure becomes an ApiError whose message a person can read
 * (the API's own words when it answered, else what went wrong on the way).
 */

const TOKEN_KEY = 'zebu-token';

export class ApiError extends Error {
  readonly status: number;
  readonly code: string;
  readonly field: string | null;

  constructor(status: number, code: string, message: string, field: string | null = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.field = field;
  }
}

export function savedToken(): string | null {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function saveToken(token: string | null): void {
  if (token === null) {
    sessionStorage.removeItem(TOKEN_KEY);
    sessionStorage.removeItem('zebu-access');
  } else {
    sessionStorage.setItem(TOKEN_KEY, token);
  }
}

/** Calls the API; resolves with the parsed answer (null for 204), rejects with an ApiError. */
export async function call<T>(method: string, path: string, body?: unknown, token = savedToken()): Promise<T> {
  const headers: Record<string, string> = {};
  if (token !== null) headers.authorization = `Bearer ${token}`;
  if (body !== undefined) headers['content-type'] = 'application/json';
  let answer: Response;
  try {
    answer = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (err) {
    throw new ApiError(0, 'NETWORK', `the manager could not be reached (${(err as Error).message}); is zebu up running?`);
  }
  if (answer.status === 204) return null as T;
  const text = await answer.text();
  // Prometheus text (/metrics) is handed over as it is.
  if (answer.ok && (answer.headers.get('content-type') ?? '').startsWith('text/plain')) return text as T;
  let parsed: unknown;
  try {
    parsed = text === '' ? null : JSON.parse(text);
  } catch {
    throw new ApiError(answer.status, 'PROTOCOL', `the manager answered ${answer.status} with something that is not JSON`);
  }
  if (!answer.ok) {
    const e = (parsed as { error?: { code?: string; message?: string; field?: string } } | null)?.error;
    throw new ApiError(answer.status, e?.code ?? 'UNKNOWN', e?.message ?? `the manager answered ${answer.status}`, e?.field ?? null);
  }
  return parsed as T;
}

export interface StreamHandlers<T> {
  /** Everything as it is now (first, and again after a reconnect). */
  onSnapshot: (items: T[]) => void;
  onPut: (item: T) => void;
  onDelete: (name: string) => void;
  /** The stream broke; it is opened again after a pause. */
  onBroken: (why: string) => void;
}

/**
 * Follows `/v1/stream/KIND` (server-sent events, read with fetch so the token goes in a header).
 * Returns a function that stops it.
 */
export function follow<T>(kind: string, handlers: StreamHandlers<T>): () => void {
  const controller = new AbortController();
  let stopped = false;
  const run = async (): Promise<void> => {
    while (!stopped) {
      try {
        const answer = await fetch(`/v1/stream/${kind}`, { headers: { authorization: `Bearer ${savedToken() ?? ''}`, accept: 'text/event-stream' }, signal: controller.signal });
        if (!answer.ok || answer.body === null) throw new Error(`the manager answered ${answer.status}`);
        const reader = answer.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = '';
        for (;;) {
          const { value, done } = await reader.read();
          if (done) throw new Error('the manager ended the stream');
          buffer += value;
          let end: number;
          while ((end = buffer.indexOf('\n\n')) >= 0) {
            dispatch(buffer.slice(0, end), handlers);
            buffer = buffer.slice(end + 2);
          }
        }
      } catch (err) {
        if (stopped) return;
        handlers.onBroken((err as Error).message);
        await new Promise((resolve) => setTimeout(resolve, 2000));
      }
    }
  };
  void run();
  return () => {
    stopped = true;
    controller.abort();
  };
}

function dispatch<T>(message: string, handlers: StreamHandlers<T>): void {
  let event = 'message';
  let data = '';
  for (const line of message.split('\n')) {
    if (line.startsWith('event: ')) event = line.slice(7);
    else if (line.startsWith('data: ')) data += line.slice(6);
  }
  if (data === '') return;
  const payload = JSON.parse(data) as unknown;
  if (event === 'snapshot') handlers.onSnapshot(payload as T[]);
  else if (event === 'put') handlers.onPut(payload as T);
  else if (event === 'delete') handlers.onDelete((payload as { name: string }).name);
}

// The API, called with the signed-in token. Every refusal becomes an `ApiProblem` carrying the
// API's own problem document (status, title, detail), which the page shows as it is.

export class ApiProblem extends Error {
  constructor(
    readonly status: number,
    readonly title: string,
    readonly detail: string,
  ) {
    super(status ? `${status} ${title}: ${detail}` : `${title}: ${detail}`);
  }

  /** The token is not accepted (401), or the role may not do this (403). */
  get refused(): boolean {
    return this.status === 401 || this.status === 403;
  }
}

export async function problemOf(response: Response): Promise<ApiProblem> {
  const text = await response.text().catch(() => '');
  try {
    const problem = JSON.parse(text) as { title?: string; detail?: string };
    return new ApiProblem(response.status, problem.title ?? response.statusText, problem.detail ?? text);
  } catch {
    return new ApiProblem(response.status, response.statusText || 'Error', text || 'no details');
  }
}

type Query = Record<string, string | number | null | undefined>;

/** A fresh Idempotency-Key (crypto.randomUUID needs a secure context; this does not). */
function idempotencyKey(): string {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return `console-${Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('')}`;
}

export class Api {
  /** `base`: the API's root (the console is served at `<base>/console/`). */
  constructor(
    readonly base: URL,
    readonly token: string,
    private readonly onRefused: (problem: ApiProblem) => void,
  ) {}

  url(path: string, query: Query = {}): string {
    const url = new URL(path.replace(/^\//, ''), this.base);
    for (const [name, value] of Object.entries(query)) {
      if (value !== null && value !== undefined && value !== '') url.searchParams.set(name, String(value));
    }
    return url.toString();
  }

  get authorization(): Record<string, string> {
    return { authorization: `Bearer ${this.token}` };
  }

  get<T>(path: string, query: Query = {}): Promise<T> {
    return this.send<T>('GET', this.url(path, query));
  }

  post<T>(path: string, body?: unknown): Promise<T> {
    return this.send<T>('POST', this.url(path), body);
  }

  private async send<T>(method: string, url: string, body?: unknown): Promise<T> {
    const headers: Record<string, string> = { ...this.authorization, accept: 'application/json' };
    if (method !== 'GET') headers['idempotency-key'] = idempotencyKey();
    if (body !== undefined) headers['content-type'] = 'application/json';
    let response: Response;
    try {
      response = await fetch(url, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: 'no-store',
      });
    } catch (e) {
      throw new ApiProblem(0, 'The API cannot be reached', String(e));
    }
    if (!response.ok) {
      const problem = await problemOf(response);
      if (problem.status === 401) this.onRefused(problem);
      throw problem;
    }
    return (await response.json()) as T;
  }
}

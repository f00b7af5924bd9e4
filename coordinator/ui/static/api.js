// Reads of the coordinator's HTTP API (same origin as the page), with the
// API token and the stale-read flag every request needs.

const TOKEN_KEY = 'coordflow.api-token';

// TIMEOUT_MS bounds one request: a coordinator that stopped answering must
// not hold the refresh loop.
const TIMEOUT_MS = 5000;

// ApiError is a request that failed: status is the HTTP status, 0 when no
// answer came.
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
  }
}

// session is what the requests of one refresh share.
export const session = {
  // stale adds stale=true to reads: set while the coordinator serving the
  // page says it serves no fresh reads (no leader, or catching up), so
  // that the pages keep showing its local state instead of 503s.
  stale: false,
  // authProblem is the first 401 or 403 since it was last cleared:
  // {status, message}, or null.
  authProblem: null,
};

// memoryToken is the token when local storage refuses it.
let memoryToken = '';

// token returns the stored API token, or ''.
export function token() {
  try {
    return localStorage.getItem(TOKEN_KEY) || '';
  } catch {
    return ''; // storage disabled: no token
  }
}

// setToken stores the API token; '' forgets it.
export function setToken(value) {
  try {
    if (value) localStorage.setItem(TOKEN_KEY, value);
    else localStorage.removeItem(TOKEN_KEY);
  } catch {
    // Storage disabled: the token lasts until the page reloads.
  }
  memoryToken = value;
}

// get reads path and returns its decoded JSON, or throws an ApiError.
// fresh: false leaves out stale=true (for /v1/status, which is never
// refused).
export async function get(path, {fresh = false} = {}) {
  let url = path;
  if (session.stale && !fresh) url += (url.includes('?') ? '&' : '?') + 'stale=true';
  const headers = {Accept: 'application/json'};
  const t = token() || memoryToken;
  if (t) headers.Authorization = `Bearer ${t}`;
  let resp;
  try {
    resp = await fetch(url, {headers, cache: 'no-store', signal: AbortSignal.timeout(TIMEOUT_MS)});
  } catch (e) {
    const why = e.name === 'TimeoutError' ? `no answer within ${TIMEOUT_MS / 1000} s` : e.message;
    throw new ApiError(0, `GET ${path}: ${why}`);
  }
  const text = await resp.text().catch(() => '');
  let body;
  let decoded = false;
  try {
    body = JSON.parse(text);
    decoded = true;
  } catch {
    // Not JSON: an error from a proxy, or a truncated answer.
  }
  if (!resp.ok) {
    const message = decoded && body && typeof body.error === 'string' ? body.error : text.trim() || resp.statusText;
    if ((resp.status === 401 || resp.status === 403) && !session.authProblem) {
      session.authProblem = {status: resp.status, message};
    }
    throw new ApiError(resp.status, `GET ${path}: ${resp.status} ${message}`);
  }
  if (!decoded) throw new ApiError(resp.status, `GET ${path}: the answer is not JSON`);
  return body;
}

// list is get for an endpoint that answers a JSON array (which Go writes
// as null when empty).
export async function list(path) {
  const v = await get(path);
  return Array.isArray(v) ? v : [];
}

// settle runs the given promises and returns each one's value or its
// error, as {value} or {error}: one failed request spoils only its own
// section of a page.
export async function settle(promises) {
  const results = await Promise.allSettled(promises);
  return results.map(r => (r.status === 'fulfilled' ? {value: r.value} : {error: r.reason}));
}

// eachLimited calls fn for every item, at most limit at a time, and
// returns the results in order (as settle does).
export async function eachLimited(items, limit, fn) {
  const out = new Array(items.length);
  let next = 0;
  async function worker() {
    while (next < items.length) {
      const i = next++;
      try {
        out[i] = {value: await fn(items[i])};
      } catch (error) {
        out[i] = {error};
      }
    }
  }
  await Promise.all(Array.from({length: Math.min(limit, items.length)}, worker));
  return out;
}

// kvern's JSON endpoints, asked with the admin key the page keeps in this browser.

const KEY_NAME = "kvern.adminKey";
const TIMEOUT_MS = 15000;

/** The admin key is needed (none stored) or the stored one was refused. */
export class AuthRequired extends Error {}

/** kvern answered with an error; ``status`` and kvern's own message. */
export class ApiError extends Error {
  constructor(status, message) {
    super(`${status}: ${message}`);
    this.status = status;
  }
}

export function adminKey() {
  try {
    return localStorage.getItem(KEY_NAME);
  } catch {
    return null; // storage disabled: the key lives as long as the page
  }
}

export function setAdminKey(key) {
  try {
    if (key) localStorage.setItem(KEY_NAME, key);
    else localStorage.removeItem(KEY_NAME);
  } catch {
    /* storage disabled */
  }
}

/** GET ``path`` with ``params``; statuses in ``accept`` besides 2xx still return the body. */
export async function getJSON(path, params = {}, accept = []) {
  const url = new URL(path, location.origin);
  for (const [name, value] of Object.entries(params)) {
    if (value !== null && value !== undefined) url.searchParams.set(name, String(value));
  }
  const headers = { accept: "application/json" };
  const key = adminKey();
  if (key) headers["x-kvern-admin-key"] = key;
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), TIMEOUT_MS);
  try {
    const response = await fetch(url, { headers, signal: abort.signal, cache: "no-store" });
    if (response.status === 401) throw new AuthRequired("kvern asks for its admin key");
    const body = await response.json().catch(() => null);
    if (!response.ok && !accept.includes(response.status)) {
      throw new ApiError(response.status, body?.error?.message ?? response.statusText);
    }
    return body;
  } catch (err) {
    if (err.name === "AbortError") throw new ApiError(0, `${path} did not answer in time`);
    if (err instanceof TypeError) throw new ApiError(0, `kvern cannot be reached (${err.message})`);
    throw err;
  } finally {
    clearTimeout(timer);
  }
}

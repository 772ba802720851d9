// The dashboard's only way to Tally: the public HTTP API, with the token the
// visitor gave (kept in sessionStorage: this tab only, gone when it closes).

const TOKEN_KEY = 'tally-token';

/** An answer that is not 2xx, or no answer at all (`status` 0). */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

let prompting = null;

/** Shows the token prompt once, however many requests were refused; resolves when a token is entered. */
function askToken(reason) {
  if (prompting) return prompting;
  const dialog = document.getElementById('auth');
  const form = document.getElementById('auth-form');
  const input = document.getElementById('auth-token');
  const error = document.getElementById('auth-error');
  error.hidden = !reason;
  error.textContent = reason || '';
  input.value = '';
  prompting = new Promise((resolve) => {
    const submit = (ev) => {
      ev.preventDefault();
      const token = input.value.trim();
      if (!token) return;
      sessionStorage.setItem(TOKEN_KEY, token);
      form.removeEventListener('submit', submit);
      dialog.close();
      prompting = null;
      resolve();
    };
    form.addEventListener('submit', submit);
    // Escape must not leave the page without a way back to the prompt.
    dialog.addEventListener('cancel', (ev) => ev.preventDefault(), { once: true });
  });
  if (!dialog.open) dialog.showModal();
  input.focus();
  return prompting;
}

/** GET `path` with `params` (arrays repeat the parameter); the parsed JSON body. */
export async function get(path, params = {}) {
  const url = new URL(path, location.origin);
  for (const [k, v] of Object.entries(params)) {
    if (v === undefined || v === null || v === '') continue;
    for (const one of Array.isArray(v) ? v : [v]) url.searchParams.append(k, String(one));
  }
  for (;;) {
    const token = sessionStorage.getItem(TOKEN_KEY);
    const headers = { accept: 'application/json' };
    if (token) headers.authorization = `Bearer ${token}`;
    let res;
    try {
      res = await fetch(url, { headers, cache: 'no-store' });
    } catch (e) {
      throw new ApiError(0, 'unreachable', `Tally did not answer (${e.message}); is the server running?`);
    }
    let body = null;
    try {
      body = await res.json();
    } catch {
      body = null;
    }
    if (res.status === 401 || res.status === 403) {
      const message = body && body.error ? body.error : `HTTP ${res.status}`;
      const reason = token
        ? (res.status === 403 ? `The token was refused: ${message}` : `The token was refused: ${message}`)
        : null;
      if (token) sessionStorage.removeItem(TOKEN_KEY);
      await askToken(reason);
      continue;
    }
    if (!res.ok) {
      const code = body && body.code ? body.code : `http_${res.status}`;
      const message = body && body.error ? body.error : `HTTP ${res.status} ${res.statusText}`;
      throw new ApiError(res.status, code, message);
    }
    return body;
  }
}

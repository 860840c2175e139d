// The API from the page: fetch with the key (if any) as a Bearer header, the key asked for
// once when the API answers 401, problem+json turned into ApiError, and result files fetched
// with the key into blob: URLs (an <img src> cannot send a header).
//
// The key lives in sessionStorage (this tab only). It is never put in a URL and never logged.

const KEY_NAME = "dalle-farm-key";
let pendingKey = null; // one prompt shared by every request that got a 401

export class ApiError extends Error {
  constructor(status, problem) {
    super(problem?.detail || `the API answered ${status}`);
    this.status = status;
    this.problem = problem || { status, detail: this.message };
  }
}

export function currentKey() {
  return sessionStorage.getItem(KEY_NAME);
}

export function keyHeaders() {
  const key = currentKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function askForKey(message) {
  if (pendingKey) return pendingKey;
  const dialog = document.getElementById("key-dialog");
  const form = document.getElementById("key-form");
  const input = document.getElementById("key-input");
  document.getElementById("key-message").textContent = message;
  input.value = "";
  pendingKey = new Promise((resolve) => {
    const cancel = (event) => event.preventDefault(); // the page cannot go on without one
    const submit = () => {
      const key = input.value.trim();
      if (!key) return;
      sessionStorage.setItem(KEY_NAME, key);
      form.removeEventListener("submit", submit);
      dialog.removeEventListener("cancel", cancel);
      pendingKey = null;
      resolve();
    };
    form.addEventListener("submit", submit);
    dialog.addEventListener("cancel", cancel);
  });
  if (!dialog.open) dialog.showModal();
  input.focus();
  return pendingKey;
}

// fetch() against this origin with the key; on 401, ask for a key and try again.
export async function request(path, { method = "GET", body, headers = {}, signal } = {}) {
  for (;;) {
    const sent = currentKey();
    const all = { ...headers, ...keyHeaders() };
    if (body !== undefined) all["Content-Type"] = "application/json";
    const response = await fetch(path, {
      method,
      headers: all,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: "no-store",
    });
    if (response.status !== 401) return response;
    const problem = await readProblem(response);
    if (currentKey() !== sent) continue; // a key arrived while this request was out
    if (sent) sessionStorage.removeItem(KEY_NAME);
    await askForKey(
      sent
        ? `That key was refused: ${problem.detail}`
        : "This farm needs an API key: ask its operator for one.",
    );
  }
}

async function readProblem(response) {
  try {
    const body = await response.json();
    if (body && typeof body === "object") return body;
  } catch {
    // not JSON: fall through
  }
  return { status: response.status, detail: `the API answered ${response.status}` };
}

// The JSON answer, or ApiError with the problem.
export async function json(path, options) {
  const response = await request(path, options);
  if (!response.ok) throw new ApiError(response.status, await readProblem(response));
  return response.json();
}

// A result file as a URL an <img> or <a download> can use: this origin's /v1/files/… are
// fetched with the key into a blob: URL (revoked by `urls.release()`); presigned S3 URLs are
// used as they are.
export class FileUrls {
  constructor() {
    this.made = [];
  }
  async get(url) {
    if (!url.startsWith("/")) return url;
    const response = await request(url);
    if (!response.ok) throw new ApiError(response.status, await readProblem(response));
    const made = URL.createObjectURL(await response.blob());
    this.made.push(made);
    return made;
  }
  release() {
    for (const url of this.made) URL.revokeObjectURL(url);
    this.made = [];
  }
}

export const sleep = (ms, signal) =>
  new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    });
  });

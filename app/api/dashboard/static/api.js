// Talking to the API: every request sends the key (when one was given), a 401 asks for it
// again, and event streams are read with fetch() so that they can send it too (the browser's
// EventSource cannot send headers).

const KEY_STORAGE = "trainsvc.key";

// A 422's detail is a list of {field, message}: said as "field: message", never as raw JSON.
function describe(detail) {
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail.map((item) => (item && item.message ? `${item.field ? `${item.field}: ` : ""}${item.message}` : JSON.stringify(item))).join("; ");
  }
  return JSON.stringify(detail);
}

export class ApiError extends Error {
  constructor(status, code, detail) {
    super(describe(detail));
    this.status = status;
    this.code = code;
    this.detail = detail;
  }
}

export function storedKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY_STORAGE);
  document.getElementById("forget-key").hidden = true;
}

function authorize(headers) {
  const key = storedKey();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  return headers;
}

// One prompt at a time: every request that got a 401 meanwhile waits for the same answer.
let pendingPrompt = null;

export function askForKey(reason) {
  if (pendingPrompt) return pendingPrompt;
  const dialog = document.getElementById("key-dialog");
  const form = document.getElementById("key-form");
  const input = document.getElementById("key-input");
  document.getElementById("key-reason").textContent = reason;
  input.value = "";
  pendingPrompt = new Promise((resolve) => {
    form.addEventListener(
      "submit",
      (event) => {
        event.preventDefault();
        sessionStorage.setItem(KEY_STORAGE, input.value.trim());
        document.getElementById("forget-key").hidden = false;
        dialog.close();
        pendingPrompt = null;
        resolve();
      },
      { once: true },
    );
  });
  // A key is the only way on: Escape must not leave the page half-loaded behind the dialog.
  dialog.addEventListener("cancel", (event) => event.preventDefault());
  dialog.showModal();
  input.focus();
  return pendingPrompt;
}

function fieldsOf(error) {
  return Array.isArray(error.detail) ? error.detail.map((item) => item.field) : [];
}

async function errorOf(response) {
  let error;
  try {
    const body = await response.json();
    error = new ApiError(response.status, body.error, body.detail);
  } catch {
    error = new ApiError(response.status, "http_error", `${response.status} ${response.statusText}`);
  }
  // A limit's 429 says when to ask again.
  error.retryAfterSeconds = Number(response.headers.get("Retry-After")) || null;
  return error;
}

function reasonFor(error) {
  if (error.code === "missing_key") return "This service needs an API key to show its jobs.";
  return `The key was refused (${error.detail}). Enter another one.`;
}

// fetch() with the key; asks for a key on 401 and tries again; throws ApiError otherwise.
export async function request(path, options = {}) {
  for (;;) {
    const headers = authorize(new Headers(options.headers || {}));
    let response;
    try {
      response = await fetch(path, { ...options, headers });
    } catch {
      // The browser's own words for this are "Failed to fetch".
      throw new ApiError(0, "unreachable", "the service did not answer; is it running?");
    }
    if (response.status === 401) {
      await askForKey(reasonFor(await errorOf(response)));
      continue;
    }
    if (!response.ok) throw await errorOf(response);
    return response;
  }
}

export async function getJSON(path) {
  return (await request(path)).json();
}

export async function postJSON(path, body) {
  const options = { method: "POST", headers: { "Content-Type": "application/json" } };
  if (body !== undefined) options.body = JSON.stringify(body);
  return (await request(path, options)).json();
}

// A binary resource (a plot, a checkpoint) as an object URL, fetched with the key.
export async function blobURL(path) {
  return URL.createObjectURL(await (await request(path)).blob());
}

export function query(params) {
  const search = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    for (const item of [].concat(value)) {
      if (item !== undefined && item !== null && item !== "") search.append(name, item);
    }
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}

// -- Server-Sent Events over fetch() ---------------------------------------------------------

// Parses an event stream (text/event-stream, as the HTML standard defines it) chunk by chunk.
export class EventStreamParser {
  constructor(onEvent) {
    this.onEvent = onEvent;
    this.buffer = "";
    this.reset();
    this.lastEventId = null;
    this.retry = null;
  }

  reset() {
    this.type = "";
    this.data = [];
    this.id = null;
  }

  push(text) {
    this.buffer += text;
    // A \r at the very end may be the first half of \r\n: wait for the next chunk.
    const held = this.buffer.endsWith("\r") ? 1 : 0;
    const lines = this.buffer.slice(0, this.buffer.length - held).split(/\r\n|\r|\n/);
    // The last piece is a line still arriving.
    this.buffer = lines.pop() + (held ? "\r" : "");
    for (const line of lines) this.line(line);
  }

  line(line) {
    if (line === "") {
      if (this.id !== null) this.lastEventId = this.id;
      if (this.data.length) {
        this.onEvent({
          type: this.type || "message",
          data: this.data.join("\n"),
          id: this.lastEventId,
        });
      }
      this.reset();
      return;
    }
    if (line.startsWith(":")) return; // a comment: the server's keep-alive
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this.type = value;
    else if (field === "data") this.data.push(value);
    else if (field === "id" && !value.includes("\0")) this.id = value;
    else if (field === "retry" && /^\d+$/.test(value)) this.retry = Number(value);
  }
}

const sleep = (ms, signal) =>
  new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    });
  });

// Follows an event stream: calls onEvent({type, data (parsed JSON), id}) for each event,
// reconnects after a drop with Last-Event-ID (so nothing is missed or seen twice), and stops
// when close() is called or, if `done(event)` says so, after the stream's last event.
// onState("live" | "reconnecting" | "busy" | "refused" | "ended", detail) reports the
// connection; "busy": the tenant has as many streams open as the service allows (429
// too_many_streams) and this one asks again when the answer's Retry-After says. A first refusal
// is retried soon, as a drop is: it may count the stream this tab closed a moment ago (the page
// before this one). "refused": the service found the request itself wrong (422: a hand-typed
// filter), which no retry mends; the stream stops and says why.
export function followEvents(path, { onEvent, onState = () => {}, done = () => false }) {
  const controller = new AbortController();
  const { signal } = controller;
  let lastEventId = null;
  let finished = false;
  let refusals = 0; // too_many_streams answers in a row

  async function run() {
    let backoff = 500;
    while (!signal.aborted && !finished) {
      try {
        const headers = authorize(new Headers({ Accept: "text/event-stream" }));
        if (lastEventId !== null) headers.set("Last-Event-ID", lastEventId);
        const response = await fetch(path, { headers, signal, cache: "no-store" });
        if (response.status === 401) {
          onState("reconnecting");
          await askForKey(reasonFor(await errorOf(response)));
          continue;
        }
        if (!response.ok || !response.body) throw await errorOf(response);
        onState("live");
        backoff = 500;
        refusals = 0;
        const parser = new EventStreamParser((event) => {
          lastEventId = event.id;
          let data;
          try {
            data = JSON.parse(event.data);
          } catch {
            data = event.data;
          }
          const parsed = { type: event.type, data, id: event.id };
          onEvent(parsed);
          if (done(parsed)) finished = true;
        });
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        for (;;) {
          const { value, done: ended } = await reader.read();
          if (ended) break;
          parser.push(value);
        }
        if (parser.retry !== null) backoff = parser.retry;
      } catch (error) {
        if (signal.aborted) break;
        if (error instanceof ApiError && error.status === 404) {
          finished = true; // the job is gone (deleted): nothing will come
          break;
        }
        if (error instanceof ApiError && error.status === 422) {
          if (lastEventId !== null && fieldsOf(error).includes("Last-Event-ID")) {
            // An id this service never sent (its database was replaced): follow from now.
            lastEventId = null;
            continue;
          }
          onState("refused", error.message);
          return;
        }
        if (error instanceof ApiError && error.code === "too_many_streams" && ++refusals > 1) {
          onState("busy", error.message);
          await sleep((error.retryAfterSeconds || 5) * 1000, signal);
          continue;
        }
      }
      if (finished || signal.aborted) break;
      onState("reconnecting");
      await sleep(backoff, signal);
      backoff = Math.min(backoff * 2, 10000);
    }
    onState("ended");
  }

  run();
  return {
    close() {
      controller.abort();
    },
  };
}

// Every call to the JSON API goes through here. The bearer token is kept per tab in sessionStorage and
// sent as a header, never in a URL; a 401 asks the user for it (once for all requests waiting on it).
const TOKEN_KEY = "polyak.token";
let asking = null; // the open token prompt, shared by every request that got a 401 meanwhile

export class ApiError extends Error {
  constructor(status, body) {
    super(body.detail ?? `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

export async function request(path, options = {}) {
  for (;;) {
    const token = sessionStorage.getItem(TOKEN_KEY);
    const headers = { ...options.headers, ...(token ? { Authorization: `Bearer ${token}` } : {}) };
    const response = await fetch(path, { ...options, headers });
    if (response.status !== 401) return response;
    const { detail } = await response.json();
    // Sent with a token the user has replaced since: retry with the new one instead of asking again.
    if (sessionStorage.getItem(TOKEN_KEY) === token) await askToken(detail);
  }
}

export async function json(path, options) {
  const response = await request(path, options);
  const body = await response.json(); // every answer of the JSON API is JSON, errors included
  if (!response.ok) throw new ApiError(response.status, body);
  return body;
}

function askToken(message) {
  asking ??= new Promise((resolve) => {
    const dialog = document.getElementById("token-dialog");
    const input = document.getElementById("token-input");
    document.getElementById("token-error").textContent = message;
    input.value = "";
    dialog.addEventListener("close", () => {
      sessionStorage.setItem(TOKEN_KEY, input.value.trim());
      asking = null;
      resolve();
    }, { once: true });
    dialog.showModal();
  });
  return asking;
}

// Server-Sent Events read with fetch, not EventSource: EventSource cannot send the Authorization header.
// Calls onEvent(name, data) per frame; returns when the server closes the stream.
export async function streamEvents(path, onEvent, signal) {
  const response = await request(path, { signal, headers: { Accept: "text/event-stream" } });
  if (!response.ok) throw new ApiError(response.status, await response.json());
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = parseFrame(buffer.slice(0, end));
      buffer = buffer.slice(end + 2);
      if (frame) onEvent(frame.event, frame.data);
    }
  }
}

// One frame's "event:" and "data:" lines; null for a comment-only frame (the server's keep-alive).
function parseFrame(text) {
  let event = "message";
  const data = [];
  for (const line of text.split("\n")) {
    const colon = line.indexOf(":");
    if (colon === 0) continue;
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
  }
  return data.length ? { event, data: JSON.parse(data.join("\n")) } : null;
}

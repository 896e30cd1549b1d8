// The server's own /v1 API, same origin, with the key the user typed (never in a URL).

export class ApiError extends Error {
  constructor(status, message, param, code) {
    super(message);
    this.status = status;
    this.param = param;
    this.code = code;
  }

  // As the API gives it: the status, the message, and the field it names.
  describe() {
    const where = this.param ? ` (${this.param})` : "";
    const code = this.code ? ` [${this.code}]` : "";
    return `${this.status}: ${this.message}${where}${code}`;
  }
}

function headers(key) {
  const h = { "Content-Type": "application/json" };
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function raise(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON: the status alone
  }
  const err = body && body.error ? body.error : null;
  const message = err && err.message ? err.message : response.statusText || "request failed";
  throw new ApiError(response.status, message, err ? err.param : null, err ? err.code : null);
}

export async function listModels(key) {
  const response = await fetch("/v1/models", { headers: headers(key) });
  if (!response.ok) await raise(response);
  return (await response.json()).data;
}

// Streams one chat completion; `onChunk(chunk)` for every parsed SSE event, until [DONE].
// Aborting `signal` closes the connection, which the server sees as a disconnect and frees the
// sequences.
export async function streamChat(body, key, signal, onChunk) {
  const response = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: headers(key),
    body: JSON.stringify(body),
    signal,
  });
  if (!response.ok) await raise(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onChunk(JSON.parse(data)); // a failed choice ends in-band: finish_reason "error" (app.js)
      }
    }
  }
  throw new ApiError(0, "the stream ended without [DONE]", null, null);
}

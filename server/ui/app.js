// The playground: one conversation at a time against this server's /v1 API.

import { ApiError, listModels, streamChat } from "./api.js";
import { render } from "./markdown.js";
import { curl, python } from "./snippets.js";
import { loadConversations, loadKey, newConversation, saveConversations, saveKey } from "./store.js";

const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"), modelNote: $("model-note"), key: $("key"), system: $("system"), log: $("log"),
  error: $("error"), stats: $("stats"), composer: $("composer"), message: $("message"), send: $("send"),
  stop: $("stop"), regenerate: $("regenerate"), copyCurl: $("copy-curl"), copyPython: $("copy-python"),
  snippetBox: $("snippet-box"), snippet: $("snippet"), snippetLabel: $("snippet-label"),
  snippetClose: $("snippet-close"), newChat: $("new-chat"), list: $("conversation-list"),
  prefix: $("prefix"), responseFormat: $("response_format"), schemaBox: $("schema-box"), schema: $("schema"),
  safePrompt: $("safe_prompt"), stopText: $("stop_text"),
};
const NUMBERS = ["temperature", "top_p", "max_tokens", "n", "presence_penalty", "frequency_penalty", "random_seed"];

let conversations = loadConversations();
let current = conversations[0] || newConversation();
let streaming = null; // {controller, message} while a reply streams

// ---- building the request -------------------------------------------------------------------

class InputError extends Error {}

function responseFormat() {
  const kind = ui.responseFormat.value;
  if (kind === "text") return null;
  if (kind === "json_object") return { type: "json_object" };
  let schema;
  try {
    schema = JSON.parse(ui.schema.value);
  } catch (e) {
    throw new InputError(`JSON schema: not valid JSON (${e.message})`);
  }
  return { type: "json_schema", json_schema: { name: "playground_schema", schema, strict: true } };
}

function requestBody(history) {
  const messages = [];
  if (ui.system.value.trim()) messages.push({ role: "system", content: ui.system.value });
  for (const m of history) messages.push({ role: m.role, content: m.content });
  if (ui.prefix.value) messages.push({ role: "assistant", content: ui.prefix.value, prefix: true });
  const body = { model: ui.model.value, messages };
  for (const name of NUMBERS) {
    const raw = $(name).value.trim();
    if (raw !== "") body[name] = Number(raw);
  }
  const stops = ui.stopText.value.split(",").map((s) => s.trim()).filter(Boolean);
  if (stops.length) body.stop = stops;
  if (ui.safePrompt.checked) body.safe_prompt = true;
  const format = responseFormat();
  if (format) body.response_format = format;
  body.stream = true;
  body.stream_options = { include_usage: true };
  return body;
}

// ---- rendering ------------------------------------------------------------------------------

function button(label, onClick, aria) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  if (aria) b.setAttribute("aria-label", aria);
  b.addEventListener("click", onClick);
  return b;
}

function fillBody(body, message) {
  body.replaceChildren();
  const choices = message.choices || [message.content];
  choices.forEach((text, i) => {
    const part = document.createElement("div");
    part.className = "choice";
    if (choices.length > 1) {
      const label = document.createElement("div");
      label.className = "choice-label";
      label.textContent = `choice ${i + 1} of ${choices.length}`;
      part.append(label);
    }
    part.append(render(text));
    body.append(part);
  });
  if (message.stopped || message.failed) {
    const note = document.createElement("p");
    note.className = "stopped";
    note.textContent = message.stopped ? "(stopped)" : "(ended by an error)";
    body.append(note);
  }
}

function renderMessage(message, index) {
  const el = document.createElement("article");
  el.className = `message ${message.role}`;
  const head = document.createElement("div");
  head.className = "role";
  const who = document.createElement("strong");
  who.textContent = message.role === "user" ? "You" : "Assistant";
  head.append(who);
  const body = document.createElement("div");
  body.className = "body";
  if (message.role === "user" && !streaming) {
    head.append(button("Edit", () => editMessage(el, body, index), `Edit message ${index + 1}`));
  }
  fillBody(body, message);
  el.append(head, body);
  return el;
}

function renderLog() {
  ui.log.replaceChildren(...current.messages.map(renderMessage));
  const last = current.messages.at(-1);
  ui.regenerate.disabled = Boolean(streaming) || !last;
}

function renderList() {
  ui.list.replaceChildren(
    ...conversations.map((c) => {
      const li = document.createElement("li");
      if (c.id === current.id) li.className = "current";
      const open = button(c.title, () => openConversation(c), `Open conversation: ${c.title}`);
      open.className = "open";
      if (c.id === current.id) open.setAttribute("aria-current", "true");
      li.append(open, button("Delete", () => deleteConversation(c), `Delete conversation: ${c.title}`));
      return li;
    }),
  );
}

function showError(err) {
  if (!err) {
    ui.error.hidden = true;
    ui.error.textContent = "";
    return;
  }
  let text;
  if (err instanceof ApiError) text = err.describe();
  else if (err instanceof InputError) text = err.message;
  else text = `Could not reach the server: ${err.message}`;
  ui.error.textContent = text;
  ui.error.hidden = false;
}

function setStreaming(value) {
  streaming = value;
  ui.send.disabled = Boolean(value);
  ui.stop.disabled = !value;
}

// ---- conversations --------------------------------------------------------------------------

function persist() {
  if (!current.messages.length) return;
  const first = current.messages.find((m) => m.role === "user");
  current.title = first ? first.content.slice(0, 40) || "Untitled" : "Untitled";
  if (!conversations.includes(current)) conversations.unshift(current);
  saveConversations(conversations);
  renderList();
}

function openConversation(c) {
  if (streaming) stop();
  current = c;
  showError(null);
  ui.stats.textContent = "";
  renderLog();
  renderList();
}

function deleteConversation(c) {
  conversations = conversations.filter((x) => x.id !== c.id);
  saveConversations(conversations);
  if (c.id === current.id) openConversation(conversations[0] || newConversation());
  else renderList();
}

function editMessage(el, body, index) {
  const area = document.createElement("textarea");
  area.value = current.messages[index].content;
  area.rows = 3;
  area.setAttribute("aria-label", `Edit message ${index + 1}`);
  const resend = button("Resend", () => {
    current.messages = current.messages.slice(0, index);
    current.messages.push({ role: "user", content: area.value });
    generate();
  });
  body.replaceChildren(area, resend, button("Cancel", renderLog));
  area.focus();
}

// ---- generating -----------------------------------------------------------------------------

async function generate() {
  showError(null);
  ui.stats.textContent = "";
  let body;
  try {
    body = requestBody(current.messages);
  } catch (e) {
    showError(e);
    renderLog();
    return;
  }
  const prefix = ui.prefix.value;
  const n = body.n || 1;
  const message = { role: "assistant", content: prefix, choices: Array(n).fill(prefix) };
  const controller = new AbortController();
  setStreaming({ controller, message });
  current.messages.push(message);
  renderLog();
  const bodyEl = ui.log.lastElementChild.querySelector(".body");
  const start = performance.now();
  let first = null;
  let usage = null;
  const failed = new Set(); // choices the server ended in-band with finish_reason "error"
  try {
    await streamChat(body, ui.key.value, controller.signal, (chunk) => {
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        if (choice.finish_reason === "error") failed.add(choice.index + 1);
        const text = choice.delta && choice.delta.content;
        if (!text) continue;
        if (first === null) first = performance.now();
        message.choices[choice.index] += text;
      }
      message.content = message.choices[0];
      fillBody(bodyEl, message);
    });
    const end = performance.now();
    ui.stats.textContent = stats(start, first, end, usage);
    if (failed.size) {
      message.failed = true;
      const which = n > 1 ? ` (choice ${[...failed].join(", ")})` : "";
      showError(new ApiError(500, `the server ended the reply with an error${which}; what came before is kept`));
    }
  } catch (e) {
    if (controller.signal.aborted) {
      message.stopped = true;
      ui.stats.textContent = "stopped";
    } else {
      if (message.choices.every((t) => t === prefix)) current.messages.pop();
      showError(e);
    }
  } finally {
    setStreaming(null);
    renderLog();
    persist();
  }
}

function stats(start, first, end, usage) {
  const parts = [];
  if (first !== null) parts.push(`TTFT ${Math.round(first - start)} ms`);
  if (usage) {
    const seconds = (end - (first ?? start)) / 1000;
    // the first token came at `first`: the rest were generated in the time after it
    const rate = usage.completion_tokens > 1 && seconds > 0 ? (usage.completion_tokens - 1) / seconds : null;
    if (rate !== null) parts.push(`${rate.toFixed(1)} tokens/s`);
    parts.push(`usage: ${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion = ${usage.total_tokens} tokens`);
  }
  return parts.join(" · ");
}

function send() {
  if (streaming) return;
  const text = ui.message.value;
  if (!text.trim() && !ui.prefix.value) return;
  if (text.trim()) current.messages.push({ role: "user", content: text });
  ui.message.value = "";
  generate();
}

function stop() {
  if (streaming) streaming.controller.abort();
}

function regenerate() {
  if (streaming) return;
  if (current.messages.at(-1)?.role === "assistant") current.messages.pop();
  if (current.messages.length) generate();
}

// ---- models and key -------------------------------------------------------------------------

let retry = null;

async function refreshModels() {
  clearTimeout(retry);
  try {
    const models = await listModels(ui.key.value);
    const chosen = ui.model.value;
    ui.model.replaceChildren(
      ...models.map((m) => {
        const option = document.createElement("option");
        option.value = m.id;
        option.textContent = m.id;
        return option;
      }),
    );
    if (models.some((m) => m.id === chosen)) ui.model.value = chosen;
    ui.modelNote.textContent = "";
    showError(null);
  } catch (e) {
    ui.modelNote.textContent = "no models listed";
    showError(e);
    if (e instanceof ApiError && e.status === 503) retry = setTimeout(refreshModels, 3000);
  }
}

function showSnippet(label, text) {
  ui.snippetLabel.textContent = label;
  ui.snippet.value = text;
  ui.snippetBox.hidden = false;
  ui.snippet.focus();
  ui.snippet.select();
  if (navigator.clipboard) navigator.clipboard.writeText(text).catch(() => {});
}

// The request of the conversation's last reply (or, with a message typed, of the next one).
function snippetHistory() {
  const history = current.messages.map((m) => ({ role: m.role, content: m.content }));
  if (history.at(-1)?.role === "assistant") history.pop();
  if (ui.message.value.trim()) history.push({ role: "user", content: ui.message.value });
  return history;
}

function copyAs(kind) {
  let body;
  try {
    body = requestBody(snippetHistory());
  } catch (e) {
    showError(e);
    return;
  }
  if (kind === "curl") showSnippet("curl (copied)", curl(location.origin, body));
  else showSnippet("Python, mistralai (copied)", python(location.origin, body));
}

// ---- wiring ---------------------------------------------------------------------------------

ui.key.value = loadKey();
ui.key.addEventListener("change", () => {
  saveKey(ui.key.value);
  refreshModels();
});
ui.composer.addEventListener("submit", (e) => {
  e.preventDefault();
  send();
});
ui.message.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    send();
  }
});
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && streaming) {
    e.preventDefault();
    stop();
  }
});
ui.stop.addEventListener("click", stop);
ui.regenerate.addEventListener("click", regenerate);
ui.copyCurl.addEventListener("click", () => copyAs("curl"));
ui.copyPython.addEventListener("click", () => copyAs("python"));
ui.snippetClose.addEventListener("click", () => {
  ui.snippetBox.hidden = true;
  ui.copyCurl.focus();
});
ui.newChat.addEventListener("click", () => openConversation(newConversation()));
ui.responseFormat.addEventListener("change", () => {
  ui.schemaBox.hidden = ui.responseFormat.value !== "json_schema";
});

// On a narrow screen the settings start folded, so the conversation comes first.
if (window.matchMedia("(max-width: 900px)").matches) $("settings-panel").open = false;
renderLog();
renderList();
refreshModels();

// Lamina's web chat: conversations kept on the server (/api/conversations); a reply is one request to
// /api/conversations/{id}/reply, which streams the answer and any tool calls and saves the conversation.
// Vanilla JavaScript, no build step, no CDN (the Markdown libraries are vendored): it works offline.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  conversations: [],
  current: null, // {id, title, settings, messages: [{role, content, meta}]}
  controller: null, // AbortController of the reply being streamed
  key: localStorage.getItem("lamina.apiKey") || "",
  config: { sampling: {}, tools: [], tool_model: null }, // from /api/chat/config
};

// --- HTTP -----------------------------------------------------------------------------------------------

async function api(path, options = {}) {
  // a FormData body (an upload) gets its multipart content type, with the boundary, from the browser
  const type = options.body instanceof FormData ? {} : { "content-type": "application/json" };
  const headers = { ...type, ...(options.headers || {}) };
  if (state.key) headers.authorization = `Bearer ${state.key}`;
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    await askForKey();
    return api(path, options);
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error.message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

function askForKey() {
  return new Promise((resolve) => {
    const dialog = $("key-dialog");
    $("key-form").onsubmit = () => {
      state.key = $("key-input").value.trim();
      localStorage.setItem("lamina.apiKey", state.key);
      resolve();
    };
    if (!dialog.open) dialog.showModal();
  });
}

const json = async (path, options) => (await api(path, options)).json();

// --- conversations ----------------------------------------------------------------------------------------

async function loadConversations() {
  state.conversations = (await json("/api/conversations")).data;
  renderSidebar();
}

function renderSidebar() {
  const list = $("conversations");
  list.replaceChildren();
  for (const c of state.conversations) {
    const item = document.createElement("li");
    item.className = state.current && state.current.id === c.id ? "active" : "";
    const open = document.createElement("button");
    open.className = "open";
    open.textContent = c.title;
    open.title = c.title;
    open.onclick = () => openConversation(c.id);
    const rename = document.createElement("button");
    rename.className = "icon";
    rename.textContent = "✎";
    rename.title = "Rename";
    rename.onclick = () => renameConversation(c);
    const remove = document.createElement("button");
    remove.className = "icon";
    remove.textContent = "×";
    remove.title = "Delete";
    remove.onclick = () => deleteConversation(c);
    item.append(open, rename, remove);
    list.append(item);
  }
}

async function openConversation(id) {
  if (state.controller) state.controller.abort();
  state.current = await json(`/api/conversations/${encodeURIComponent(id)}`);
  $("system").value = state.current.settings.system || "";
  $("temperature").value = state.current.settings.temperature ?? defaultTemperature();
  $("top-p").value = state.current.settings.top_p ?? defaultTopP();
  if (state.current.settings.model) $("model").value = state.current.settings.model;
  $("store").value = state.current.settings.store || "";
  await loadTools();
  localStorage.setItem("lamina.conversation", id);
  renderSidebar();
  renderMessages();
}

async function newConversation() {
  const created = await json("/api/conversations", {
    method: "POST",
    body: JSON.stringify({ title: "New chat", settings: currentSettings() }),
  });
  await loadConversations();
  await openConversation(created.id);
  $("input").focus();
}

async function renameConversation(c) {
  const title = prompt("Rename conversation", c.title);
  if (!title || !title.trim()) return;
  await json(`/api/conversations/${encodeURIComponent(c.id)}`, { method: "PATCH", body: JSON.stringify({ title: title.trim() }) });
  if (state.current && state.current.id === c.id) state.current.title = title.trim();
  await loadConversations();
}

async function deleteConversation(c) {
  if (!confirm(`Delete "${c.title}"?`)) return;
  await api(`/api/conversations/${encodeURIComponent(c.id)}`, { method: "DELETE" });
  if (state.current && state.current.id === c.id) {
    state.current = null;
    localStorage.removeItem("lamina.conversation");
    renderMessages();
  }
  await loadConversations();
}

const defaultTemperature = () => state.config.sampling.temperature ?? 0.7;
const defaultTopP = () => state.config.sampling.top_p ?? 1;

function currentSettings() {
  const tools = [...document.querySelectorAll("#tools input:checked")].map((box) => box.value);
  return { system: $("system").value, temperature: Number($("temperature").value), top_p: Number($("top-p").value),
           model: $("model").value, store: $("store").value, tools };
}

async function saveSettings() {
  if (!state.current) return;
  state.current.settings = currentSettings();
  await json(`/api/conversations/${encodeURIComponent(state.current.id)}`, {
    method: "PATCH", body: JSON.stringify({ settings: state.current.settings }),
  });
}

function nameConversation(title) {
  // The server saved the messages with the reply, and named a new conversation after its first message.
  const c = state.current;
  if (!title || title === c.title) return;
  c.title = title;
  const listed = state.conversations.find((x) => x.id === c.id);
  if (listed) listed.title = title;
  renderSidebar();
}

// --- messages ---------------------------------------------------------------------------------------------

function renderMessages() {
  const box = $("messages");
  box.replaceChildren();
  const messages = state.current ? state.current.messages : [];
  messages.forEach((m, i) => box.append(messageElement(m, i, i === messages.length - 1)));
  box.scrollTop = box.scrollHeight;
}

function messageElement(m, index, last) {
  const el = document.createElement("article");
  el.className = `message ${m.role}`;
  el.dataset.index = index;
  if (m.role === "assistant" && m.meta && m.meta.tools && m.meta.tools.length) el.append(toolList(m.meta.tools));
  const body = document.createElement("div");
  body.className = "body";
  if (m.role === "assistant") {
    body.innerHTML = window.renderMarkdown(m.content); // sanitised: markdown.js
    window.decorateMarkdown(body);
  } else body.textContent = m.content;
  el.append(body);
  const footer = document.createElement("footer");
  if (m.role === "assistant" && m.meta && m.meta.completion_tokens !== undefined) {
    const stats = document.createElement("span");
    stats.className = "stats";
    const rate = m.meta.tokens_per_second ? `, ${m.meta.tokens_per_second.toFixed(1)} tok/s` : "";
    stats.textContent = `${m.meta.completion_tokens} tokens${rate}${m.meta.stopped ? " (stopped)" : ""}`;
    footer.append(stats);
  }
  if (m.role === "assistant" && m.meta && m.meta.citations && m.meta.citations.length) el.append(citationList(m.meta.citations));
  if (m.content) footer.append(button("Copy", "copy", (e) => window.copyText(m.content, e.target)));
  if (!state.controller) { // no editing while a reply streams
    if (m.role === "assistant" && last) footer.append(button("Regenerate", "regenerate", () => regenerate()));
    if (m.role === "user") footer.append(button("Edit", "edit", () => editMessage(index)));
  }
  el.append(footer);
  return el;
}

function toolList(steps) {
  // Each call and its result, collapsible; names, arguments and results are set as text, never parsed as HTML.
  const box = document.createElement("div");
  box.className = "tools";
  for (const step of steps) box.append(toolElement(step));
  return box;
}

function toolElement(step) {
  const item = document.createElement("details");
  item.className = `tool${step.is_error ? " error" : ""}`;
  item.dataset.id = step.id;
  const summary = document.createElement("summary");
  const name = document.createElement("code");
  name.textContent = step.name;
  const args = document.createElement("span");
  args.className = "args";
  args.textContent = step.arguments;
  const status = document.createElement("span");
  status.className = "status";
  status.textContent = step.result === undefined ? " running…" : step.is_error ? " failed" : " done";
  summary.append("Tool ", name, " ", args, status);
  const result = document.createElement("pre");
  result.className = "result";
  result.textContent = step.result ?? "";
  item.append(summary, result);
  return item;
}

function citationList(citations) {
  // Sources under the answer; every field is set as text, never parsed as HTML.
  const list = document.createElement("ol");
  list.className = "citations";
  for (const c of citations) {
    const item = document.createElement("li");
    item.value = c.index;
    const where = document.createElement("strong");
    where.textContent = c.page ? `${c.filename}, page ${c.page}` : c.filename;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = ` (score ${Number(c.score).toFixed(3)})`;
    const snippet = document.createElement("div");
    snippet.className = "snippet";
    snippet.textContent = c.snippet;
    item.append(where, score, snippet);
    list.append(item);
  }
  return list;
}

function button(label, cls, onclick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = cls;
  b.textContent = label;
  b.onclick = onclick;
  return b;
}

function editMessage(index) {
  if (state.controller) return;
  const m = state.current.messages[index];
  const text = prompt("Edit your message", m.content);
  if (text === null || !text.trim()) return;
  state.current.messages = state.current.messages.slice(0, index);
  send(text.trim());
}

function regenerate() {
  if (state.controller) return;
  const messages = state.current.messages;
  while (messages.length && messages[messages.length - 1].role === "assistant") messages.pop();
  if (!messages.length) return;
  const last = messages.pop();
  send(last.content);
}

// --- sending and streaming ----------------------------------------------------------------------------------

async function send(text) {
  if (!state.current) await newConversation();
  const c = state.current;
  c.messages.push({ role: "user", content: text, meta: {} });
  const replyId = `r${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`;
  const reply = { role: "assistant", content: "", meta: { tools: [], reply_id: replyId } };
  const asked = c.messages.map(({ role, content, meta }) => ({ role, content, meta }));
  c.messages.push(reply);
  state.controller = new AbortController();
  renderMessages();
  setBusy(true);
  const settings = currentSettings();
  let title = null;
  try {
    const response = await api(`/api/conversations/${encodeURIComponent(c.id)}/reply`, {
      method: "POST",
      signal: state.controller.signal,
      body: JSON.stringify({
        messages: asked, model: settings.model, temperature: settings.temperature, top_p: settings.top_p,
        system: settings.system, store: settings.store || null, tools: settings.tools, reply_id: replyId,
      }),
    });
    for await (const event of sseEvents(response)) {
      if (event.type === "delta") {
        reply.content += event.content;
        updateLast(reply);
      } else if (event.type === "tool_call") {
        reply.meta.tools.push({ id: event.id, name: event.name, arguments: event.arguments });
        renderLast(reply);
      } else if (event.type === "tool_result") {
        const step = reply.meta.tools.find((s) => s.id === event.id);
        if (step) Object.assign(step, { result: event.result, is_error: event.is_error });
        renderLast(reply);
      } else if (event.type === "citations") {
        reply.meta.citations = event.citations;
      } else if (event.type === "error") {
        reply.meta.error = event.message;
      } else if (event.type === "done") {
        Object.assign(reply, event.message);
        title = event.title;
      }
    }
    if (reply.meta.error) reply.content += `\n\n**Error:** ${reply.meta.error}`;
  } catch (error) {
    if (error.name === "AbortError") reply.meta.stopped = true;  // the server saves what it had, marked stopped
    else reply.content += `\n\n**Error:** ${error.message}`;
  } finally {
    state.controller = null;
    setBusy(false);
    if (reply.meta.stopped) title = await reloadCurrent(replyId); // the saved partial reply, with its token count
    renderMessages();
    nameConversation(title);
  }
}

async function reloadCurrent(replyId) {
  // After a stop the server finishes saving a moment later; read back what it kept.
  const id = state.current.id;
  for (let i = 0; i < 50; i++) {
    const saved = await json(`/api/conversations/${encodeURIComponent(id)}`);
    const last = saved.messages[saved.messages.length - 1];
    if (last && last.meta && last.meta.reply_id === replyId) {
      state.current.messages = saved.messages;
      return saved.title;
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  return null;
}

function renderLast(reply) {
  const el = $("messages").lastElementChild;
  if (!el) return;
  const old = el.querySelector(".tools");
  const fresh = toolList(reply.meta.tools);
  if (old) old.replaceWith(fresh);
  else el.prepend(fresh);
}

let pending = false;
function updateLast(reply) {
  if (pending) return;
  pending = true;
  requestAnimationFrame(() => {
    pending = false;
    const el = $("messages").lastElementChild;
    if (el) {
      const body = el.querySelector(".body");
      body.innerHTML = window.renderMarkdown(reply.content);
      window.decorateMarkdown(body);
    }
    $("messages").scrollTop = $("messages").scrollHeight;
  });
}

async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("status").textContent = busy ? "generating…" : "";
}

// --- start ------------------------------------------------------------------------------------------------

async function loadStores(selected) {
  const stores = (await json("/v1/vector_stores")).data;
  const select = $("store");
  const none = document.createElement("option");
  none.value = "";
  none.textContent = "(none)";
  select.replaceChildren(none, ...stores.map((s) => {
    const option = document.createElement("option");
    option.value = s.id;
    option.textContent = `${s.name} (${s.file_counts.completed} files)`;
    return option;
  }));
  select.value = selected ?? (state.current ? state.current.settings.store || "" : "");
}

async function uploadFiles(files) {
  let storeId = $("store").value;
  if (!storeId) {
    const name = prompt("Name of the new document store", "documents");
    if (!name) return;
    storeId = (await json("/v1/vector_stores", { method: "POST", body: JSON.stringify({ name }) })).id;
  }
  const report = [];
  for (const file of files) {
    $("status").textContent = `uploading ${file.name}…`;
    const form = new FormData();
    form.append("purpose", "assistants");
    form.append("file", file, file.name);
    try {
      const { id } = await json("/v1/files", { method: "POST", body: form });  // api(): the key, and 401 asks for one
      const added = await json(`/v1/vector_stores/${storeId}/files`, { method: "POST", body: JSON.stringify({ file_id: id }) });
      report.push(added.status === "completed" ? `${file.name}: ${added.chunk_count} chunks` : `${file.name}: ${added.last_error.message}`);
    } catch (error) {
      report.push(`${file.name}: ${error.message}`);
    }
  }
  await loadStores(storeId);
  await saveSettings();
  $("status").textContent = report.join("; ");
}

async function loadConfig() {
  state.config = await json("/api/chat/config");
  $("temperature").value = defaultTemperature();
  $("top-p").value = defaultTopP();
}

async function loadTools() {
  // The tools a conversation can enable (file_search needs a store); checked: the conversation's choice.
  const store = $("store").value;
  const listing = await json(`/api/chat/config${store ? `?store=${encodeURIComponent(store)}` : ""}`);
  const chosen = new Set((state.current && state.current.settings.tools) || []);
  const box = $("tools");
  box.replaceChildren(...listing.tools.map((t) => {
    const label = document.createElement("label");
    label.title = t.description;
    const check = document.createElement("input");
    check.type = "checkbox";
    check.value = t.name;
    check.checked = chosen.has(t.name);
    check.onchange = () => saveSettings();
    const source = t.source === "builtin" ? "" : ` (${t.source})`;
    label.append(check, ` ${t.name}${source}`);
    return label;
  }));
  countTools();
}

function countTools() {
  $("tools-summary").textContent = `Tools (${document.querySelectorAll("#tools input:checked").length} on)`;
}

function applyTheme(theme) {
  document.documentElement.dataset.theme = theme;
  $("hl-light").disabled = theme === "dark";
  $("hl-dark").disabled = theme !== "dark";
  $("theme").textContent = theme === "dark" ? "Light" : "Dark";
}

async function loadModels() {
  const models = (await json("/v1/models")).data.filter((m) => m.task !== "embed" && m.id !== state.config.tool_model);
  const select = $("model");
  select.replaceChildren(...models.map((m) => {
    const option = document.createElement("option");
    option.value = m.id;
    option.textContent = m.id;
    return option;
  }));
}

function wire() {
  $("composer").onsubmit = (e) => {
    e.preventDefault();
    const text = $("input").value.trim();
    if (!text || state.controller) return;
    $("input").value = "";
    send(text);
  };
  $("input").onkeydown = (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  };
  $("stop").onclick = () => state.controller && state.controller.abort();
  $("new-chat").onclick = () => newConversation();
  for (const id of ["system", "temperature", "top-p", "model"]) $(id).onchange = () => saveSettings();
  $("store").onchange = async () => { await saveSettings(); await loadTools(); };
  $("tools").onchange = () => countTools();
  $("theme").onclick = () => {
    const next = document.documentElement.dataset.theme === "dark" ? "light" : "dark";
    localStorage.setItem("lamina.theme", next);
    applyTheme(next);
  };
  $("upload-button").onclick = () => $("upload").click();
  $("upload").onchange = async () => {
    const files = [...$("upload").files];
    $("upload").value = "";
    if (files.length) await uploadFiles(files);
  };
}

async function start() {
  wire();
  const dark = window.matchMedia && window.matchMedia("(prefers-color-scheme: dark)").matches;
  applyTheme(localStorage.getItem("lamina.theme") || (dark ? "dark" : "light"));
  try {
    await loadConfig();
    await loadModels();
    await loadStores("");
    await loadConversations();
    const remembered = localStorage.getItem("lamina.conversation");
    if (remembered && state.conversations.some((c) => c.id === remembered)) await openConversation(remembered);
    else { renderMessages(); await loadTools(); }
    document.body.dataset.ready = "true";
  } catch (error) {
    $("status").textContent = `Cannot reach the server: ${error.message}`;
  }
}

start();

// Lamina's web chat: conversations kept on the server (/api/conversations), replies streamed from
// /v1/chat/completions. Vanilla JavaScript, no build step, no CDN: it works offline.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  conversations: [],
  current: null, // {id, title, settings, messages: [{role, content, meta}]}
  controller: null, // AbortController of the reply being streamed
  key: localStorage.getItem("lamina.apiKey") || "",
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
  $("temperature").value = state.current.settings.temperature ?? 0.7;
  if (state.current.settings.model) $("model").value = state.current.settings.model;
  $("store").value = state.current.settings.store || "";
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

function currentSettings() {
  return { system: $("system").value, temperature: Number($("temperature").value), model: $("model").value, store: $("store").value };
}

async function saveSettings() {
  if (!state.current) return;
  state.current.settings = currentSettings();
  await json(`/api/conversations/${encodeURIComponent(state.current.id)}`, {
    method: "PATCH", body: JSON.stringify({ settings: state.current.settings }),
  });
}

async function saveMessages() {
  const c = state.current;
  await json(`/api/conversations/${encodeURIComponent(c.id)}/messages`, {
    method: "PUT", body: JSON.stringify({ messages: c.messages }),
  });
  if (c.title === "New chat" && c.messages.length) {
    c.title = c.messages[0].content.slice(0, 48).replace(/\s+/g, " ").trim() || "New chat";
    await json(`/api/conversations/${encodeURIComponent(c.id)}`, { method: "PATCH", body: JSON.stringify({ title: c.title }) });
  }
  await loadConversations();
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
  const body = document.createElement("div");
  body.className = "body";
  if (m.role === "assistant") body.innerHTML = window.renderMarkdown(m.content); // escaped by construction
  else body.textContent = m.content;
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
  if (!state.controller) { // no editing while a reply streams
    if (m.role === "assistant" && last) footer.append(button("Regenerate", "regenerate", () => regenerate()));
    if (m.role === "user") footer.append(button("Edit", "edit", () => editMessage(index)));
  }
  el.append(footer);
  return el;
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
  const reply = { role: "assistant", content: "", meta: {} };
  c.messages.push(reply);
  state.controller = new AbortController();
  renderMessages();
  setBusy(true);
  const settings = currentSettings();
  const history = c.messages.slice(0, -1).map(({ role, content }) => ({ role, content }));
  if (settings.system.trim()) history.unshift({ role: "system", content: settings.system.trim() });
  const started = performance.now();
  let firstToken = null;
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST",
      signal: state.controller.signal,
      body: JSON.stringify({
        model: settings.model, messages: history, temperature: settings.temperature, stream: true,
        stream_options: { include_usage: true },
        ...(settings.store ? { vector_store_ids: [settings.store] } : {}),
      }),
    });
    for await (const event of sseEvents(response)) {
      if (event.error) throw new Error(event.error.message);
      if (event.usage) reply.meta.completion_tokens = event.usage.completion_tokens;
      if (event.citations) reply.meta.citations = event.citations;
      const delta = event.choices && event.choices[0] && event.choices[0].delta;
      if (delta && delta.content) {
        firstToken = firstToken ?? performance.now();
        reply.content += delta.content;
        updateLast(reply);
      }
    }
  } catch (error) {
    if (error.name === "AbortError") reply.meta.stopped = true;
    else reply.content += `\n\n**Error:** ${error.message}`;
  } finally {
    const seconds = (performance.now() - (firstToken ?? started)) / 1000;
    // A stopped stream never receives its usage chunk; each content chunk carries one token.
    reply.meta.completion_tokens ??= reply.meta.pieces || 0;
    if (seconds > 0 && reply.meta.completion_tokens > 1) reply.meta.tokens_per_second = (reply.meta.completion_tokens - 1) / seconds;
    state.controller = null;
    setBusy(false);
    renderMessages();
    await saveMessages();
  }
}

let pending = false;
function updateLast(reply) {
  reply.meta.pieces = (reply.meta.pieces || 0) + 1;
  if (pending) return;
  pending = true;
  requestAnimationFrame(() => {
    pending = false;
    const el = $("messages").lastElementChild;
    if (el) el.querySelector(".body").innerHTML = window.renderMarkdown(reply.content);
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

async function loadModels() {
  const models = (await json("/v1/models")).data.filter((m) => m.task !== "embed");
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
  for (const id of ["system", "temperature", "model", "store"]) $(id).onchange = () => saveSettings();
  $("upload-button").onclick = () => $("upload").click();
  $("upload").onchange = async () => {
    const files = [...$("upload").files];
    $("upload").value = "";
    if (files.length) await uploadFiles(files);
  };
}

async function start() {
  wire();
  try {
    await loadModels();
    await loadStores("");
    await loadConversations();
    const remembered = localStorage.getItem("lamina.conversation");
    if (remembered && state.conversations.some((c) => c.id === remembered)) await openConversation(remembered);
    else renderMessages();
    document.body.dataset.ready = "true";
  } catch (error) {
    $("status").textContent = `Cannot reach the server: ${error.message}`;
  }
}

start();

// The chat page's script (index.html): compose a message of text and images, stream the answer from
// /v1/chat/completions, keep the conversation in the browser.
//
// Only the public OpenAI endpoints are used (GET /v1/models, POST /v1/chat/completions with stream and
// stream_options.include_usage), so the page works against any compatible server. Model text never becomes HTML:
// it is rendered as text, or as Markdown built node by node with textContent (renderMarkdown below), so nothing
// the model writes can run script here; the Content-Security-Policy the server sends is a second wall.
//
// Where things are kept: settings in localStorage, the API key in sessionStorage (this tab only), the
// conversation (images included, as data: URLs) in IndexedDB, which holds far more than localStorage's few MB.
"use strict";

(() => {
  const $ = (selector) => document.querySelector(selector);

  // ---- settings --------------------------------------------------------------------------------------
  const SETTINGS_KEY = "idefics3-chat:settings";
  const API_KEY_KEY = "idefics3-chat:api-key";
  const DEFAULTS = { apiBase: "/v1", model: "", temperature: 0, maxTokens: "", detail: "high", system: "",
                     markdown: true };

  function loadSettings() {
    try {
      return { ...DEFAULTS, ...JSON.parse(localStorage.getItem(SETTINGS_KEY) || "{}") };
    } catch {
      return { ...DEFAULTS };
    }
  }

  function saveSettings() {
    try {
      localStorage.setItem(SETTINGS_KEY, JSON.stringify(settings));
    } catch { /* storage full or disabled: the settings last until the page closes */ }
  }

  function apiKey() {
    try { return sessionStorage.getItem(API_KEY_KEY) || ""; } catch { return ""; }
  }

  function setApiKey(key) {
    try { sessionStorage.setItem(API_KEY_KEY, key); } catch { /* this page load only */ }
    memoryKey = key;
  }

  let settings = loadSettings();
  let memoryKey = apiKey();

  // The settings form <-> `settings`: each field writes its value back on change.
  const FIELDS = [
    ["#model", "model", (el) => el.value],
    ["#temperature", "temperature", (el) => (el.value === "" ? 0 : Math.min(2, Math.max(0, Number(el.value))))],
    ["#max-tokens", "maxTokens", (el) => (el.value === "" ? "" : Math.max(1, Math.round(Number(el.value))))],
    ["#detail", "detail", (el) => el.value],
    ["#system", "system", (el) => el.value],
    ["#markdown", "markdown", (el) => el.checked],
    ["#api-base", "apiBase", (el) => el.value.trim() || DEFAULTS.apiBase],
  ];

  function fillSettingsForm() {
    for (const [selector, name] of FIELDS) {
      const el = $(selector);
      if (el.type === "checkbox") el.checked = Boolean(settings[name]);
      else if (el.tagName !== "SELECT" || name !== "model") el.value = settings[name];
    }
  }

  function bindSettingsForm() {
    for (const [selector, name, read] of FIELDS) {
      $(selector).addEventListener("change", (event) => {
        settings[name] = read(event.target);
        saveSettings();
        if (name === "markdown") renderLog();
        if (name === "apiBase") loadModels();
      });
    }
    const toggle = $("#settings-toggle");
    const panel = $("#settings");
    const show = (open) => {
      panel.hidden = !open;
      toggle.setAttribute("aria-expanded", String(open));
      if (open) $("#model").focus();
    };
    toggle.addEventListener("click", () => show(panel.hidden));
    $("#settings-close").addEventListener("click", () => { show(false); toggle.focus(); });
    panel.addEventListener("keydown", (event) => {
      if (event.key === "Escape") { show(false); toggle.focus(); }
    });
  }

  // ---- talking to the server -------------------------------------------------------------------------
  function apiUrl(path) {
    return settings.apiBase.replace(/\/+$/, "") + path;
  }

  function headers() {
    const out = { "Content-Type": "application/json" };
    if (memoryKey) out.Authorization = `Bearer ${memoryKey}`;
    return out;
  }

  // An error the server sent (an OpenAI error object) or one on the way there.
  class ServerError extends Error {
    constructor(message, status) {
      super(message);
      this.status = status;
    }
  }

  async function serverError(response) {
    let message = response.statusText || "request failed";
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) message = body.error.message;
      else if (body && typeof body.detail === "string") message = body.detail;
    } catch { /* not JSON: keep the status text */ }
    return new ServerError(message, response.status);
  }

  function describeError(err) {
    if (err instanceof ServerError) {
      if (err.status === 401) return `The server refused the API key: ${err.message}. Enter the key above.`;
      if (err.status === 429) return `The server is busy: ${err.message}. Try again in a moment.`;
      return err.status ? `Error ${err.status}: ${err.message}` : `Error: ${err.message}`;
    }
    return `Could not reach the server: ${err.message}`;
  }

  let models = [];
  let modelsTimer = null;

  // GET /v1/models: fills the model list; asks for a key on 401; retries while the model loads.
  async function loadModels() {
    clearTimeout(modelsTimer);
    const status = $("#model-status");
    try {
      const response = await fetch(apiUrl("/models"), { headers: headers() });
      if (response.status === 401) {
        showKeyPanel(true);
        status.textContent = "API key needed";
        return;
      }
      if (!response.ok) {
        const err = await serverError(response);
        status.textContent = response.status === 503 ? `Not ready: ${err.message}` : describeError(err);
        modelsTimer = setTimeout(loadModels, 3000);
        return;
      }
      const body = await response.json();
      models = (body.data || []).map((m) => m.id);
      const select = $("#model");
      select.replaceChildren(...models.map((id) => new Option(id, id)));
      if (!models.includes(settings.model)) settings.model = models[0] || "";
      select.value = settings.model;
      status.textContent = settings.model ? `${settings.model} · ready` : "The server lists no model";
    } catch (err) {
      status.textContent = "Server unreachable; retrying…";
      modelsTimer = setTimeout(loadModels, 5000);
    }
  }

  function showKeyPanel(focus) {
    const panel = $("#key-panel");
    panel.hidden = false;
    if (focus) $("#api-key").focus();
  }

  // ---- the conversation and its storage --------------------------------------------------------------
  // messages: {role: "user", parts: [{type: "text", text} | {type: "image", url, name, detail}], failed?}
  //           {role: "assistant", text, status: "streaming" | "done" | "stopped" | "error", error?, stats?}
  let conversation = { messages: [] };

  const DB_NAME = "idefics3-chat";
  const STORE = "state";
  let dbPromise = null;

  function db() {
    if (!dbPromise) {
      dbPromise = new Promise((resolve, reject) => {
        const request = indexedDB.open(DB_NAME, 1);
        request.onupgradeneeded = () => request.result.createObjectStore(STORE);
        request.onsuccess = () => resolve(request.result);
        request.onerror = () => reject(request.error);
      });
    }
    return dbPromise;
  }

  async function dbRun(mode, work) {
    const handle = await db();
    return new Promise((resolve, reject) => {
      const tx = handle.transaction(STORE, mode);
      const request = work(tx.objectStore(STORE));
      tx.oncomplete = () => resolve(request.result);
      tx.onerror = () => reject(tx.error);
      tx.onabort = () => reject(tx.error);
    });
  }

  let saveTimer = null;
  let lastSave = 0;

  // Saves are coalesced: at most one a second while an answer streams, at once otherwise. While one is due or
  // running, <body data-saving> is set (the tests wait for it to go).
  function scheduleSave(soon) {
    document.body.dataset.saving = "1";
    clearTimeout(saveTimer);
    const wait = soon ? 0 : Math.max(0, 1000 - (Date.now() - lastSave));
    saveTimer = setTimeout(saveNow, wait);
  }

  async function saveNow() {
    saveTimer = null;
    lastSave = Date.now();
    try {
      await dbRun("readwrite", (store) => store.put(conversation, "conversation"));
    } catch (err) {
      notice(`The conversation could not be saved in this browser (${err && err.message}).`);
    }
    if (saveTimer === null) delete document.body.dataset.saving;
  }

  async function restore() {
    try {
      const saved = await dbRun("readonly", (store) => store.get("conversation"));
      if (saved && Array.isArray(saved.messages)) conversation = saved;
    } catch { /* no IndexedDB here: start empty */ }
    for (const m of conversation.messages) {
      if (m.role === "assistant" && m.status === "streaming") m.status = "stopped";  // the page went away mid-answer
    }
    renderLog();
  }

  // ---- rendering the conversation --------------------------------------------------------------------
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (name === "text") node.textContent = value;
      else if (name === "class") node.className = value;
      else node.setAttribute(name, value);
    }
    node.append(...children.filter((c) => c !== null && c !== undefined));
    return node;
  }

  function renderLog() {
    const log = $("#log");
    log.replaceChildren(...conversation.messages.map((m, i) => renderMessage(m, i)));
    $("#empty").hidden = conversation.messages.length > 0;
  }

  function renderMessage(message, index) {
    const item = el("li", { class: `message ${message.role}`, "data-index": String(index) });
    if (message.role === "user") {
      item.append(el("h3", { class: "visually-hidden", text: "You said" }));
      const bubble = el("div", { class: "bubble" });
      let n = 0;
      for (const part of message.parts) {
        if (part.type === "text") bubble.append(el("p", { class: "text", text: part.text }));
        else bubble.append(el("img", { class: "thumb", src: part.url, alt: `Image ${++n}: ${part.name || "pasted"}` }));
      }
      item.append(bubble, el("div", { class: "actions" }, copyButton(() => userText(message), "your message")));
      if (message.failed) item.classList.add("failed");
      return item;
    }
    item.dataset.status = message.status;
    item.append(el("h3", { class: "visually-hidden", text: "The model answered" }));
    const answer = el("div", { class: "bubble answer" });
    fillAnswer(answer, message);
    item.append(answer);
    const footer = el("div", { class: "actions" });
    if (message.status !== "error") footer.append(copyButton(() => message.text, "the answer"));
    footer.append(el("span", { class: "stats", text: statsLine(message) }));
    item.append(footer);
    if (message.status === "streaming") item.setAttribute("aria-busy", "true");
    return item;
  }

  function fillAnswer(container, message) {
    container.replaceChildren();
    if (message.status === "error") {
      container.classList.add("error");
      container.append(el("p", { class: "text", text: message.error || "The request failed." }));
      return;
    }
    if (settings.markdown) renderMarkdown(message.text, container);
    else container.append(el("p", { class: "text plain", text: message.text }));
    if (message.status === "streaming" && !message.text) container.append(el("span", { class: "typing", text: "…" }));
  }

  function statsLine(message) {
    const s = message.stats;
    const bits = [];
    if (message.status === "stopped") bits.push("stopped");
    if (s) {
      if (s.ttft !== null && s.ttft !== undefined) bits.push(`first token ${s.ttft.toFixed(2)} s`);
      if (s.tps) bits.push(`${s.tps.toFixed(1)} tokens/s`);
      if (s.usage) {
        const cached = s.usage.prompt_tokens_details && s.usage.prompt_tokens_details.cached_tokens;
        bits.push(`${s.usage.prompt_tokens} prompt${cached ? ` (${cached} cached)` : ""} + `
                  + `${s.usage.completion_tokens} completion tokens`);
      } else if (s.pieces) {
        bits.push(`~${s.pieces} tokens`);
      }
    }
    return bits.join(" · ");
  }

  function userText(message) {
    return message.parts.filter((p) => p.type === "text").map((p) => p.text).join("\n");
  }

  function copyButton(getText, what) {
    const button = el("button", { type: "button", class: "copy", "aria-label": `Copy ${what}`, text: "Copy" });
    button.addEventListener("click", async () => {
      const ok = await copyText(getText());
      button.textContent = ok ? "Copied" : "Copy failed";
      notice(ok ? "Copied to the clipboard." : "The browser did not allow copying.");
      setTimeout(() => { button.textContent = "Copy"; }, 1500);
    });
    return button;
  }

  async function copyText(text) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch {  // not a secure context (plain http to another host): the old way
      const area = el("textarea", { class: "visually-hidden" });
      area.value = text;
      document.body.append(area);
      area.select();
      let ok = false;
      try { ok = document.execCommand("copy"); } catch { ok = false; }
      area.remove();
      return ok;
    }
  }

  function notice(text) {
    $("#notice").textContent = text;
  }

  function nearBottom() {
    const root = document.scrollingElement;
    return root.scrollHeight - root.scrollTop - root.clientHeight < 80;
  }

  function scrollToEnd() {
    window.scrollTo(0, document.scrollingElement.scrollHeight);
  }

  // ---- Markdown, safely --------------------------------------------------------------------------------
  // A small subset (fenced code, headings, lists, paragraphs; inline code, bold, italic, http(s) links), built
  // with createElement and textContent only: the model's text is never parsed as HTML.
  const FENCE = /^\s*```/;
  const HEADING = /^(#{1,6})\s+(.*)$/;
  const ITEM = /^\s*([-*+]|\d{1,9}[.)])\s+(.*)$/;

  function renderMarkdown(text, container) {
    const lines = text.split("\n");
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      if (FENCE.test(line)) {
        const code = [];
        for (i++; i < lines.length && !FENCE.test(lines[i]); i++) code.push(lines[i]);
        i++;  // the closing fence (or the end, while it streams)
        container.append(el("pre", {}, el("code", { text: code.join("\n") })));
      } else if (HEADING.test(line)) {
        const [, hashes, title] = line.match(HEADING);
        const h = el(`h${Math.min(6, hashes.length + 3)}`, { class: "md-heading" });
        inline(title, h);
        container.append(h);
        i++;
      } else if (ITEM.test(line)) {
        const ordered = /\d/.test(line.match(ITEM)[1]);
        const list = el(ordered ? "ol" : "ul");
        if (ordered) list.setAttribute("start", String(parseInt(line.match(ITEM)[1], 10)));
        while (i < lines.length && ITEM.test(lines[i]) && /\d/.test(lines[i].match(ITEM)[1]) === ordered) {
          const li = el("li");
          inline(lines[i].match(ITEM)[2], li);
          list.append(li);
          i++;
        }
        container.append(list);
      } else if (!line.trim()) {
        i++;
      } else {
        const p = el("p");
        const start = i;
        while (i < lines.length && lines[i].trim() && !FENCE.test(lines[i]) && !HEADING.test(lines[i])
               && !(ITEM.test(lines[i]) && i > start)) {
          if (i > start) p.append(el("br"));
          inline(lines[i], p);
          i++;
        }
        container.append(p);
      }
    }
  }

  // `code`, **bold**, *italic* (not inside a word: 2*3*4 stays as it is; underscores are never emphasis, so
  // names like __init__ survive), [text](http(s) link).
  const INLINE = /(`+)([\s\S]+?)\1|\*\*(\S(?:.*?\S)?)\*\*|(?<![\w*])\*(\S(?:.*?\S)?)\*(?![\w*])|\[([^\]]+)\]\((https?:\/\/[^\s)]+)\)/g;

  function inline(text, parent) {
    let at = 0;
    for (const m of text.matchAll(INLINE)) {
      if (m.index > at) parent.append(document.createTextNode(text.slice(at, m.index)));
      if (m[1]) parent.append(el("code", { text: m[2] }));
      else if (m[3] !== undefined) parent.append(el("strong", { text: m[3] }));
      else if (m[4] !== undefined) parent.append(el("em", { text: m[4] }));
      else {
        const link = el("a", { href: m[6], rel: "noopener noreferrer nofollow", target: "_blank", text: m[5] });
        parent.append(link);
      }
      at = m.index + m[0].length;
    }
    if (at < text.length) parent.append(document.createTextNode(text.slice(at)));
  }

  // ---- the message box -------------------------------------------------------------------------------
  // Text boxes with image chips between them: an image goes where the caret was (the text box is split there),
  // and the message's parts follow that order. Never two text boxes in a row; one first and one last.
  const composer = $("#composer");
  let lastSegment = null;  // the text box that had the focus last: where images go

  function segments() {
    return [...composer.querySelectorAll("textarea.segment")];
  }

  function newSegment(value) {
    const area = el("textarea", { class: "segment", rows: "1" });
    area.value = value || "";
    area.addEventListener("focus", () => { lastSegment = area; });
    area.addEventListener("input", () => autosize(area));
    area.addEventListener("keydown", onSegmentKey);
    area.addEventListener("paste", onPaste);
    return area;
  }

  function autosize(area) {
    area.style.height = "auto";
    area.style.height = `${area.scrollHeight}px`;
  }

  // After any change: merge neighbouring text boxes, keep one at each end, name them for screen readers.
  function normalize() {
    let node = composer.firstElementChild;
    while (node) {
      const next = node.nextElementSibling;
      if (node.matches("textarea") && next && next.matches("textarea")) {
        const caret = node.value.length;
        node.value += next.value;
        if (document.activeElement === next || lastSegment === next) {
          lastSegment = node;
          if (document.activeElement === next) { node.focus(); node.setSelectionRange(caret, caret); }
        }
        next.remove();
        continue;
      }
      node = next;
    }
    if (!composer.firstElementChild || !composer.firstElementChild.matches("textarea")) {
      composer.prepend(newSegment(""));
    }
    if (!composer.lastElementChild.matches("textarea")) composer.append(newSegment(""));
    const boxes = segments();
    const images = composer.querySelectorAll(".chip").length;
    boxes.forEach((area, i) => {
      area.id = i === 0 ? "message" : `message-${i}`;
      area.setAttribute("aria-label", i === 0 ? "Message" : `Message, after image ${countImagesBefore(area)}`);
      area.placeholder = i === boxes.length - 1
        ? (images ? "Ask about the image…" : "Message (Enter sends, Shift+Enter new line)") : "";
      autosize(area);
    });
    composer.querySelectorAll(".chip").forEach((chip, i) => {
      chip.querySelector("img").alt = `Image ${i + 1}: ${chip.dataset.name}`;
      chip.querySelector("button").setAttribute("aria-label", `Remove image ${i + 1} (${chip.dataset.name})`);
    });
  }

  function countImagesBefore(node) {
    let n = 0;
    for (let prev = node.previousElementSibling; prev; prev = prev.previousElementSibling) {
      if (prev.classList.contains("chip")) n++;
    }
    return n;
  }

  function newChip(url, name) {
    const chip = el("figure", { class: "chip" });
    chip.dataset.name = name;
    chip.dataset.url = url;
    const remove = el("button", { type: "button", class: "remove", text: "×" });
    remove.addEventListener("click", () => removeChip(chip));
    chip.append(el("img", { src: url, alt: "" }), remove);
    return chip;
  }

  function removeChip(chip) {
    const before = chip.previousElementSibling;
    chip.remove();
    normalize();
    if (before && before.matches("textarea") && before.isConnected) {
      before.focus();
      const end = before.value.length;
      before.setSelectionRange(end, end);
    } else {
      segments()[0].focus();
    }
  }

  function readAsDataUrl(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
  }

  // Images from the file picker, a drop or a paste go in at the caret of the text box used last, where the caret
  // was when they came: text typed while they are read stays before the caret that follows them.
  // Images still being read: a message sent meanwhile waits for them.
  const reading = new Set();

  async function addFiles(fileList) {
    const files = [...fileList];
    const images = files.filter((f) => f.type.startsWith("image/"));
    const skipped = files.filter((f) => !f.type.startsWith("image/")).map((f) => f.name || "a file");
    notice(skipped.length ? `Not an image, left out: ${skipped.join(", ")}` : "");
    if (!images.length) return;
    let target = lastSegment && lastSegment.isConnected ? lastSegment : segments().at(-1);
    let caret = target.selectionStart ?? target.value.length;
    const length = target.value.length;
    const read = Promise.all(images.map(readAsDataUrl));
    reading.add(read);
    let urls;
    try {
      urls = await read;
    } catch (err) {
      notice(`Could not read the image: ${err && err.message}`);
      return;
    } finally {
      reading.delete(read);
    }
    if (!target.isConnected) {  // the message was sent meanwhile: the images start the next one
      target = segments().at(-1);
      caret = target.value.length;
    }
    const typed = Math.max(0, target.value.length - length);
    caret = Math.min(caret, target.value.length);
    const after = target.value.slice(caret);
    target.value = target.value.slice(0, caret);
    let anchor = target;
    urls.forEach((url, i) => {
      const chip = newChip(url, images[i].name || `pasted-${i + 1}.${images[i].type.split("/")[1] || "png"}`);
      anchor.after(chip);
      anchor = chip;
    });
    const rest = newSegment(after);
    anchor.after(rest);
    normalize();
    const focus = rest.isConnected ? rest : segments().at(-1);
    focus.focus();
    const at = Math.min(typed, focus.value.length);
    focus.setSelectionRange(at, at);
    notice(`${images.length} image${images.length > 1 ? "s" : ""} added.`);
  }

  function composerParts() {
    const parts = [];
    for (const node of composer.children) {
      if (node.matches("textarea")) {
        const text = node.value.trim();
        if (text) parts.push({ type: "text", text });
      } else if (node.classList.contains("chip")) {
        parts.push({ type: "image", url: node.dataset.url, name: node.dataset.name, detail: settings.detail });
      }
    }
    return parts;
  }

  function resetComposer(parts) {
    composer.replaceChildren(newSegment(""));
    for (const part of parts || []) {
      if (part.type === "text") composer.append(newSegment(part.text));
      else composer.append(newChip(part.url, part.name));
    }
    lastSegment = null;
    normalize();
  }

  function composerEmpty() {
    return composerParts().length === 0;
  }

  function focusMessage() {
    const boxes = segments();
    const area = lastSegment && lastSegment.isConnected ? lastSegment : boxes.at(-1);
    area.focus();
  }

  function onSegmentKey(event) {
    const area = event.target;
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    } else if (event.key === "Backspace" && area.selectionStart === 0 && area.selectionEnd === 0) {
      const prev = area.previousElementSibling;
      if (prev && prev.classList.contains("chip")) {  // delete the image before the caret, as an editor would
        event.preventDefault();
        removeChip(prev);
      }
    }
  }

  function onPaste(event) {
    const files = [...(event.clipboardData ? event.clipboardData.files : [])];
    if (files.some((f) => f.type.startsWith("image/"))) {
      event.preventDefault();
      lastSegment = event.target;
      addFiles(files);
    }
  }

  function bindDropZone() {
    const overlay = $("#drop-overlay");
    let depth = 0;
    const hasFiles = (event) => event.dataTransfer && [...event.dataTransfer.types].includes("Files");
    window.addEventListener("dragenter", (event) => {
      if (!hasFiles(event)) return;
      depth++;
      overlay.hidden = false;
    });
    window.addEventListener("dragleave", () => {
      depth = Math.max(0, depth - 1);
      if (!depth) overlay.hidden = true;
    });
    window.addEventListener("dragover", (event) => {
      if (!hasFiles(event)) return;
      event.preventDefault();
      event.dataTransfer.dropEffect = "copy";
    });
    window.addEventListener("drop", (event) => {
      depth = 0;
      overlay.hidden = true;
      if (!event.dataTransfer || !event.dataTransfer.files.length) return;
      event.preventDefault();
      if (event.target instanceof HTMLTextAreaElement && event.target.classList.contains("segment")) {
        lastSegment = event.target;
      }
      addFiles(event.dataTransfer.files);
    });
  }

  // ---- sending and streaming -------------------------------------------------------------------------
  let current = null;  // {controller, answer} while an answer streams

  function setBusy(busy) {
    document.body.dataset.busy = busy ? "1" : "";
    $("#stop").hidden = !busy;
    $("#send").setAttribute("aria-disabled", String(busy));
  }

  // The conversation as OpenAI messages: failed turns are left out, images keep the detail they were sent with.
  function requestMessages() {
    const out = [];
    if (settings.system.trim()) out.push({ role: "system", content: settings.system });
    for (const m of conversation.messages) {
      if (m.role === "user") {
        if (m.failed) continue;
        out.push({
          role: "user",
          content: m.parts.map((p) => (p.type === "text" ? { type: "text", text: p.text }
            : { type: "image_url", image_url: { url: p.url, detail: p.detail || settings.detail } })),
        });
      } else if (m.status !== "error" && m.text) {
        out.push({ role: "assistant", content: m.text });
      }
    }
    return out;
  }

  async function send() {
    if (reading.size) await Promise.allSettled([...reading]);  // images picked a moment ago belong to this message
    if (current) {
      notice("An answer is still coming: wait for it or press Stop.");
      return;
    }
    const parts = composerParts();
    if (!parts.length) {
      notice("Type a message or add an image first.");
      focusMessage();
      return;
    }
    if (!settings.model) await loadModels();
    if (!settings.model) {
      notice("No model to ask yet (see the status at the top).");
      return;
    }
    notice("");
    const user = { role: "user", parts };
    const answer = { role: "assistant", text: "", status: "streaming" };
    conversation.messages.push(user, answer);
    resetComposer();
    renderLog();
    focusMessage();
    scrollToEnd();
    scheduleSave(true);
    await stream(user, answer);
  }

  async function stream(user, answer) {
    const controller = new AbortController();
    current = { controller, answer };
    setBusy(true);
    const body = { model: settings.model, messages: requestMessages(), stream: true,
                   stream_options: { include_usage: true }, temperature: Number(settings.temperature) };
    if (settings.maxTokens !== "" && settings.maxTokens !== null) body.max_tokens = Number(settings.maxTokens);
    const started = performance.now();
    let first = null;
    let pieces = 0;
    let usage = null;
    const item = () => $(`#log > li[data-index="${conversation.messages.indexOf(answer)}"]`);
    let frame = 0;
    const repaint = () => {  // one repaint per animation frame, however many pieces came
      if (frame) return;
      frame = requestAnimationFrame(() => {
        frame = 0;
        const li = item();
        if (!li) return;
        const stick = nearBottom();
        fillAnswer(li.querySelector(".answer"), answer);
        if (stick) scrollToEnd();
      });
    };
    try {
      const response = await fetch(apiUrl("/chat/completions"), {
        method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal });
      if (!response.ok) throw await serverError(response);
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      let done = false;
      while (!done) {
        const chunk = await reader.read();
        if (chunk.done) break;
        buffer += decoder.decode(chunk.value, { stream: true }).replace(/\r\n?/g, "\n");
        let end;
        while (!done && (end = buffer.indexOf("\n\n")) >= 0) {  // one server-sent event per blank line
          const event = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("");
          if (!data) continue;
          if (data === "[DONE]") { done = true; break; }
          const json = JSON.parse(data);
          if (json.error) throw new ServerError(json.error.message || "the server failed mid-answer", 0);
          const choice = json.choices && json.choices[0];
          const piece = choice && choice.delta && choice.delta.content;
          if (piece) {
            if (first === null) first = performance.now();
            answer.text += piece;
            pieces++;
            repaint();
            scheduleSave(false);
          }
          if (json.usage) usage = json.usage;
        }
      }
      answer.status = "done";
    } catch (err) {
      if (err.name === "AbortError") {
        answer.status = "stopped";
      } else {
        answer.status = "error";
        answer.error = describeError(err);
        user.failed = true;  // left out of later requests: a bad image or a refused key must not stick
        if (composerEmpty()) resetComposer(user.parts);  // the message comes back for another try
        if (err instanceof ServerError && err.status === 401) showKeyPanel(false);
      }
    } finally {
      const ended = performance.now();
      const tokens = usage ? usage.completion_tokens : pieces;
      // Tokens/s: the decode rate after the first token; for an answer over too quickly to time that way (a
      // word or two), tokens over the whole request.
      const decoding = first === null ? 0 : (ended - first) / 1000;
      answer.stats = {
        ttft: first === null ? null : (first - started) / 1000,
        tps: first === null || !tokens ? null
          : decoding >= 0.05 && tokens > 1 ? (tokens - 1) / decoding : tokens / ((ended - started) / 1000),
        usage, pieces,
      };
      if (frame) cancelAnimationFrame(frame);
      current = null;
      setBusy(false);
      const index = conversation.messages.indexOf(answer);
      const li = item();
      if (li) {
        const fresh = renderMessage(answer, index);
        if (answer.status === "error") fresh.querySelector(".answer").setAttribute("role", "alert");
        li.replaceWith(fresh);
        if (user.failed) { const u = $(`#log > li[data-index="${index - 1}"]`); if (u) u.classList.add("failed"); }
      }
      if (document.activeElement === document.body || document.activeElement === $("#stop")) focusMessage();
      scrollToEnd();
      scheduleSave(true);
    }
  }

  function stop() {
    if (current) current.controller.abort();
    focusMessage();
  }

  function newChat() {
    if (current) current.controller.abort();
    conversation = { messages: [] };
    renderLog();
    resetComposer();
    notice("New chat.");
    scheduleSave(true);
    focusMessage();
  }

  // ---- start -----------------------------------------------------------------------------------------
  function start() {
    fillSettingsForm();
    bindSettingsForm();
    bindDropZone();
    resetComposer();
    setBusy(false);
    $("#composer-form").addEventListener("submit", (event) => { event.preventDefault(); send(); });
    $("#stop").addEventListener("click", stop);
    $("#new-chat").addEventListener("click", newChat);
    $("#attach").addEventListener("click", () => $("#file-input").click());
    $("#file-input").addEventListener("change", (event) => {
      addFiles(event.target.files);
      event.target.value = "";  // the same file can be picked again
    });
    $("#skip").addEventListener("click", (event) => { event.preventDefault(); focusMessage(); });
    $("#key-panel").addEventListener("submit", (event) => {
      event.preventDefault();
      setApiKey($("#api-key").value.trim());
      notice("Key set for this tab.");
      loadModels();
      focusMessage();
    });
    $("#api-key").value = memoryKey;
    if (memoryKey) showKeyPanel(false);
    if (window.matchMedia("(pointer: fine)").matches) focusMessage();  // no keyboard popping up on phones
    restore();
    loadModels();
  }

  start();
})();

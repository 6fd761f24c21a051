// ramserve's page: chat over /v1/chat/completions, the fit (/fit), the X-ray, live state (/status).
// Plain modules, no build step, nothing fetched from another host.

const $ = (sel, root = document) => root.querySelector(sel);
const KEY = "ramserve.key";
const CONVERSATIONS = "ramserve.conversations";
const SETTINGS = "ramserve.settings";
const BIT_COLOURS = { 2: "#b2182b", 3: "#d6604d", 4: "#4393c3", 5: "#2166ac", 6: "#1b7837", 8: "#5aae61", 16: "#762a83" };

const state = {
  key: localStorage.getItem(KEY) || "",
  models: [],
  conversations: JSON.parse(localStorage.getItem(CONVERSATIONS) || "[]"),
  current: null,
  controller: null,
  fit: null,
  lastTokens: null,
};

// -- formatting (as ramserve/fmt.py prints: decimal units) ---------------------------------------

export function humanBytes(n) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  for (const unit of units) {
    if (Math.abs(n) < 1000 || unit === "TB") return unit === "B" ? `${n.toFixed(0)} B` : `${n.toFixed(2)} ${unit}`;
    n /= 1000;
  }
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

// -- the API, with the key asked once and kept in this browser -----------------------------------

let asking = null; // one dialog, however many requests were refused at once

function askKey(why) {
  if (asking) return asking;
  const dialog = $("#key-dialog");
  $("#key-why").textContent = why;
  $("#key-input").value = "";
  dialog.showModal();
  asking = new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      state.key = $("#key-input").value.trim();
      localStorage.setItem(KEY, state.key);
      asking = null;
      resolve();
    }, { once: true });
  });
  return asking;
}

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (state.key) headers.Authorization = `Bearer ${state.key}`;
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    await askKey(state.key ? "The server refused that key. Enter its API key." : "This server needs its API key.");
    return api(path, options);
  }
  return response;
}

async function errorOf(response) {
  try {
    const body = await response.json();
    return body.error?.message || body.error || response.statusText;
  } catch {
    return `HTTP ${response.status}`;
  }
}

// -- tabs ----------------------------------------------------------------------------------------

const TABS = ["chat", "fit", "xray"];

function showTab(name, focus = false) {
  for (const t of TABS) {
    const tab = $(`#tab-${t}`);
    const selected = t === name;
    tab.setAttribute("aria-selected", String(selected));
    tab.tabIndex = selected ? 0 : -1;
    $(`#${t}`).hidden = !selected;
    if (selected && focus) tab.focus();
  }
  if (name !== "chat") loadFit();
  history.replaceState(null, "", name === "chat" ? "#" : `#${name}`);
}

function setupTabs() {
  for (const t of TABS) $(`#tab-${t}`).addEventListener("click", () => showTab(t));
  $(".tabs").addEventListener("keydown", (e) => {
    const at = TABS.findIndex((t) => $(`#tab-${t}`).getAttribute("aria-selected") === "true");
    const step = { ArrowRight: 1, ArrowLeft: -1 }[e.key];
    if (step) showTab(TABS[(at + step + TABS.length) % TABS.length], true);
  });
  const asked = location.hash.slice(1);
  showTab(TABS.includes(asked) ? asked : "chat");
}

// -- models and variants -------------------------------------------------------------------------

async function loadModels() {
  const response = await api("/v1/models");
  if (!response.ok) return;
  state.models = (await response.json()).data;
  const select = $("#model");
  const chosen = select.value || state.current?.model;
  select.replaceChildren(...state.models.map((m) => el("option", { value: m.id, text: `${m.id} (${m.status})` })));
  const loaded = state.models.find((m) => m.status === "loaded");
  select.value = state.models.some((m) => m.id === chosen) ? chosen : (loaded || state.models[0])?.id;
  noteModel();
}

function noteModel() {
  const card = state.models.find((m) => m.id === $("#model").value);
  $("#model-note").textContent = !card ? "" : card.status === "loaded"
    ? `${card.bits_per_weight?.toFixed(2) ?? "?"} bits per weight`
    : `not loaded: the first message swaps it in (${card.status})`;
}

// -- conversations, kept in this browser ---------------------------------------------------------

function saveConversations() {
  localStorage.setItem(CONVERSATIONS, JSON.stringify(state.conversations.slice(0, 50)));
}

function newConversation() {
  if (state.current && !state.current.messages.length) { $("#prompt").focus(); return; } // still empty
  const c = { id: crypto.randomUUID(), title: "New chat", messages: [], created: Date.now() };
  state.conversations.unshift(c);
  state.current = c;
  saveConversations();
  renderConversations();
  renderMessages();
  $("#prompt").focus();
}

function renderConversations() {
  const list = $("#conversations");
  list.replaceChildren(...state.conversations.map((c) => el("li", {},
    el("button", { "aria-current": String(c === state.current), text: c.title, title: c.title,
      onclick: () => { state.current = c; renderConversations(); renderMessages(); } }),
    el("button", { class: "delete quiet", "aria-label": `delete ${c.title}`, text: "×",
      onclick: () => {
        state.conversations = state.conversations.filter((x) => x !== c);
        if (state.current === c) state.current = state.conversations[0] || null;
        saveConversations();
        if (!state.current) newConversation(); else { renderConversations(); renderMessages(); }
      } }))));
}

function messageNode(m) {
  const node = el("div", { class: `msg ${m.role}` });
  if (m.reasoning) {
    node.append(el("details", {}, el("summary", { text: "reasoning" }), el("div", { class: "reasoning", text: m.reasoning })));
  }
  node.append(el("div", { class: "content", text: m.content }));
  const meta = [m.model, m.stopped ? "stopped" : m.finish, m.tokens ? `${m.tokens} tokens` : null].filter(Boolean);
  if (m.role === "assistant" && meta.length) node.append(el("span", { class: "meta", text: meta.join(" · ") }));
  return node;
}

function renderMessages() {
  const box = $("#messages");
  box.replaceChildren(...(state.current?.messages || []).map(messageNode));
  box.scrollTop = box.scrollHeight;
}

// -- settings ------------------------------------------------------------------------------------

function setupSettings() {
  const saved = JSON.parse(localStorage.getItem(SETTINGS) || "{}");
  for (const id of ["system", "temperature", "max-tokens"]) {
    if (saved[id] !== undefined) $(`#${id}`).value = saved[id];
    $(`#${id}`).addEventListener("input", () => {
      saved[id] = $(`#${id}`).value;
      localStorage.setItem(SETTINGS, JSON.stringify(saved));
      $("#temperature-value").textContent = $("#temperature").value;
    });
  }
  $("#temperature-value").textContent = $("#temperature").value;
}

// -- chat ----------------------------------------------------------------------------------------

async function* serverEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let at;
    while ((at = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, at).trim();
      buffer = buffer.slice(at + 1);
      if (!line.startsWith("data:")) continue; // blank lines, pings
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

function watchSwap(model) {
  // A variant not loaded yet is planned, quantized and loaded first: show how far that has come.
  const box = $("#swap");
  const started = Date.now();
  box.hidden = false;
  $("#swap-stage").textContent = `switching to ${model}…`;
  const timer = setInterval(async () => {
    const response = await api("/status").catch(() => null);
    if (!response?.ok) return;
    const s = await response.json();
    const seconds = ((Date.now() - started) / 1000).toFixed(0);
    $("#swap-stage").textContent = `${s.stage} (${seconds} s)`;
    const p = s.progress;
    const bar = $("#swap-progress");
    if (p) {
      bar.value = p.fraction;
      const eta = p.fraction > 0.02 ? ` · about ${Math.max(0, p.elapsed_s * (1 / p.fraction - 1)).toFixed(0)} s left` : "";
      const amount = p.unit === "B" ? `${humanBytes(p.done)} of ${humanBytes(p.total)}` : `${p.done.toFixed(1)} of ${p.total} ${p.unit}`;
      $("#swap-detail").textContent = `${p.desc}: ${amount}${eta}`;
    } else {
      bar.removeAttribute("value"); // indeterminate: draining or loading
      $("#swap-detail").textContent = "";
    }
  }, 500);
  return () => { clearInterval(timer); box.hidden = true; };
}

function showError(text) {
  const p = $("#chat-error");
  p.textContent = text || "";
  p.hidden = !text;
}

async function send() {
  const text = $("#prompt").value.trim();
  if (!text || state.controller) return;
  if (!state.current) newConversation();
  const conversation = state.current;
  const model = $("#model").value;
  showError("");
  conversation.messages.push({ role: "user", content: text });
  if (conversation.title === "New chat") conversation.title = text.slice(0, 48);
  const reply = { role: "assistant", content: "", reasoning: "", model };
  conversation.messages.push(reply);
  $("#prompt").value = "";
  renderConversations();
  renderMessages();

  const system = $("#system").value.trim();
  const history = conversation.messages.slice(0, -1).map((m) => ({ role: m.role, content: m.content }));
  const body = {
    model, stream: true, stream_options: { include_usage: true },
    temperature: Number($("#temperature").value), max_tokens: Number($("#max-tokens").value),
    messages: [...(system ? [{ role: "system", content: system }] : []), ...history],
  };
  state.controller = new AbortController();
  $("#send").disabled = true;
  $("#stop").disabled = false;
  const card = state.models.find((m) => m.id === model);
  let stopWatching = card && card.status !== "loaded" ? watchSwap(model) : null;
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      signal: state.controller.signal,
    });
    if (!response.ok) throw new Error(await errorOf(response));
    for await (const chunk of serverEvents(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      stopWatching?.();
      stopWatching = null;
      const choice = chunk.choices?.[0];
      const delta = choice?.delta || {};
      reply.content += delta.content || "";
      reply.reasoning += delta.reasoning_content || "";
      if (choice?.finish_reason) reply.finish = choice.finish_reason;
      if (chunk.usage) reply.tokens = chunk.usage.completion_tokens;
      renderMessagesTail(reply);
    }
  } catch (e) {
    if (e.name === "AbortError") reply.stopped = true;
    else showError(e.message);
  } finally {
    stopWatching?.();
    state.controller = null;
    $("#send").disabled = false;
    $("#stop").disabled = true;
    saveConversations();
    renderMessages();
    loadModels();
  }
}

function renderMessagesTail(reply) {
  // Re-render only the reply being streamed: earlier messages do not change.
  const box = $("#messages");
  box.lastElementChild.replaceWith(messageNode(reply));
  box.scrollTop = box.scrollHeight;
}

function stop() {
  state.controller?.abort(); // the server sees the connection close, cancels and frees the slot
}

function setupChat() {
  $("#composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("#prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); }
  });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") stop(); });
  $("#stop").addEventListener("click", stop);
  $("#new-chat").addEventListener("click", newConversation);
  $("#model").addEventListener("change", noteModel);
  state.current = state.conversations[0] || null;
  if (!state.current) newConversation();
  renderConversations();
  renderMessages();
}

// -- the fit -------------------------------------------------------------------------------------

async function loadFit() {
  const response = await api("/fit");
  if (!response.ok) return;
  state.fit = await response.json();
  drawFit(state.fit);
  drawXray(state.fit);
}

// One machine's memory, left to right, as segments of a bar (the labels pick their colours).
function fillBar(bar, segments, total, what) {
  bar.replaceChildren(...segments.map((s) => el("div", {
    class: "seg", "data-label": s.label, "data-bytes": s.bytes,
    style: `flex: 0 0 ${(100 * s.bytes / total).toFixed(3)}%`, title: `${s.label}: ${humanBytes(s.bytes)} (${s.why})`,
  })));
  bar.setAttribute("aria-label", `${what}: ${segments.map((s) => `${s.label} ${humanBytes(s.bytes)}`).join(", ")}`);
}

function drawFit(fit) {
  const hosts = fit.hosts || [];
  const segments = fit.memory_bar || [];
  const total = fit.budget?.machine.total || 1;
  fillBar($("#memory-bar"), segments, total, "memory");
  $("#memory-bar").hidden = hosts.length > 0;
  // Split over several machines: a bar per host, its layers and its share of the KV cache.
  $("#host-bars").replaceChildren(...hosts.map((h) => {
    const bar = el("div", { class: "bar", role: "img" });
    fillBar(bar, h.memory_bar, h.budget.machine.total, `${h.host} memory`);
    const also = h.rank === 0 ? ", the embedding and the head" : "";
    return el("figure", { class: "host", "data-rank": h.rank },
      el("figcaption", { text: `rank ${h.rank} · ${h.host} · layers ${h.layers[0]}–${h.layers[1] - 1}${also} · ${humanBytes(h.budget.machine.total)}` }), bar);
  }));
  const legend = hosts.length ? hosts[0].memory_bar : segments;
  $("#memory-legend").replaceChildren(
    ...(hosts.length ? [] : [el("li", {}, el("b", { text: "total " }), el("span", { "data-bytes": total, text: humanBytes(total) }))]),
    ...legend.map((s) => el("li", { "data-label": s.label },
      el("span", { class: "swatch seg", "data-label": s.label }), `${s.label} `,
      ...(hosts.length ? [] : [el("b", { text: humanBytes(s.bytes) })]))));
  const lines = fit.budget?.lines || [];
  $("#budget-lines tbody").replaceChildren(...lines.map((ln) => el("tr", { "data-label": ln.label, "data-bytes": ln.bytes },
    el("td", { text: ln.label }), el("td", { class: "num", text: humanBytes(ln.bytes) }), el("td", { class: "muted", text: ln.why }))));
  const shape = fit.budget?.shape || hosts[0]?.budget.shape;
  $("#runtime-shape").textContent = shape
    ? `runtime shape${hosts.length ? ` on each of ${hosts.length} hosts` : ""}: ${shape.context.toLocaleString()} tokens × ${shape.parallel} sequences, KV cache ${shape.kv_bits}-bit, prefill ${shape.prefill_chunk} tokens`
    : "served with `ramserve serve`: no fit to show (`ramserve run` fits the model to this machine)";

  const plan = fit.plan;
  $("#plan-summary").textContent = plan
    ? `${fit.loaded} (${plan.spec}): ${humanBytes(plan.memory_bytes)} in memory, ${plan.bits_per_weight.toFixed(2)} bits per weight, predicted damage ${plan.predicted_damage.toPrecision(4)} (KL per token), rounding ${plan.rounding}`
    : "the loaded folder has no ramserve plan";
  $("#variants tbody").replaceChildren(...fit.variants.map((v) => el("tr", { "data-id": v.id, "aria-current": String(v.status === "loaded") },
    el("td", { text: v.id }), el("td", { text: v.status }),
    el("td", { class: "num", text: v.weight_bytes ? humanBytes(v.weight_bytes) : "–" }),
    el("td", { class: "num", text: v.memory_bytes ? humanBytes(v.memory_bytes) : "–" }),
    el("td", { class: "num", text: v.bits_per_weight?.toFixed(2) ?? "–" }),
    el("td", { class: "num", text: v.predicted_damage?.toPrecision(4) ?? "–" }))));
  drawBitmap(plan);
  drawHistogram(plan);
}

function layout(modules) {
  // Rows are layers (and one row for the modules outside them), columns the module kinds.
  const kinds = [...new Set(modules.filter((m) => m.layer !== null).map((m) => m.kind))];
  for (const m of modules) if (m.layer === null && !kinds.includes(m.kind)) kinds.push(m.kind);
  const layers = [...new Set(modules.filter((m) => m.layer !== null).map((m) => m.layer))].sort((a, b) => a - b);
  if (modules.some((m) => m.layer === null)) layers.push(null);
  const at = new Map(modules.map((m) => [`${m.layer}/${m.kind}`, m]));
  return { kinds, layers, at };
}

function grid(container, modules, cell) {
  const { kinds, layers, at } = layout(modules);
  container.style.gridTemplateColumns = `4rem repeat(${kinds.length}, minmax(2.6rem, 1fr))`;
  const nodes = [el("div", { class: "head", text: "layer" }), ...kinds.map((k) => el("div", { class: "head", text: k }))];
  for (const layer of layers) {
    nodes.push(el("div", { class: "head", text: layer === null ? "model" : String(layer) }));
    for (const kind of kinds) {
      const m = at.get(`${layer}/${kind}`);
      nodes.push(m ? cell(m) : el("div", { class: "empty" }));
    }
  }
  container.replaceChildren(...nodes);
}

function drawBitmap(plan) {
  if (!plan) { $("#bitmap").replaceChildren(); return; }
  grid($("#bitmap"), plan.modules, (m) => el("div", {
    class: "cell", "data-path": m.path, "data-bits": m.bits, style: `background: ${BIT_COLOURS[m.bits] || "#777"}`,
    title: `${m.path}: ${m.bits >= 16 ? "16-bit" : `${m.bits}-bit, group size ${m.group_size}`}, ${humanBytes(m.bytes)}`,
    text: m.bits >= 16 ? "16" : String(m.bits),
  }));
  const used = [...new Set(plan.modules.map((m) => m.bits))].sort((a, b) => a - b);
  $("#bit-legend").replaceChildren(...used.map((b) => el("li", {},
    el("span", { class: "swatch", style: `background: ${BIT_COLOURS[b] || "#777"}` }), `${b}-bit`)));
}

function drawHistogram(plan) {
  const rows = plan?.histogram || [];
  $("#histogram").replaceChildren(...rows.map((h) => {
    const bits = Number(h.choice.split("/")[0]);
    return el("div", { class: "row", "data-choice": h.choice },
      el("span", { text: h.choice === "16" ? "16-bit" : `${h.choice.replace("/", "-bit g")}` }),
      el("div", { class: "fill", style: `width: ${(100 * h.weight).toFixed(1)}%; background: ${BIT_COLOURS[bits] || "#777"}` }),
      el("span", { class: "muted", text: `${(100 * h.weight).toFixed(0)}% of weights, ${(100 * h.modules).toFixed(0)}% of modules` }));
  }));
}

// -- the X-ray -----------------------------------------------------------------------------------

function logColour(value, lo, hi) {
  // A sequential scale on log10: pale (matters little) to dark (matters most).
  if (!(value > 0)) return "#888";
  const t = hi > lo ? (Math.log10(value) - lo) / (hi - lo) : 0.5;
  const light = 88 - 60 * Math.min(1, Math.max(0, t));
  return `hsl(${28 - 28 * t}, 85%, ${light}%)`;
}

function drawXray(fit) {
  const x = fit.xray;
  if (!x || !x.modules.length) {
    $("#xray-verdict").textContent = "No analysis to show: the server was started with `ramserve serve`.";
    $("#xray-map").replaceChildren();
    $("#xray-curve").replaceChildren();
    return;
  }
  const measure = $("#xray-measure").value;
  const values = x.modules.map((m) => m[measure]).filter((v) => v > 0);
  const lo = Math.log10(Math.min(...values)), hi = Math.log10(Math.max(...values));
  grid($("#xray-map"), x.modules, (m) => el("div", {
    class: "cell", "data-path": m.path, "data-value": m[measure], style: `background: ${logColour(m[measure], lo, hi)}; color: ${(Math.log10(m[measure]) - lo) / (hi - lo || 1) > 0.55 ? "#fff" : "#111"}`,
    title: `${m.path}: importance ${m.importance.toPrecision(3)}; damage at 4-bit g64 ${m.damage_4bit?.toPrecision(3) ?? "–"}`,
    text: (m[measure] > 0 ? Math.log10(m[measure]) : NaN).toFixed(1),
  }));
  $("#xray-scale").textContent = `cells: log10 of ${measure === "importance" ? "importance" : "predicted damage at 4-bit g64"}, from ${lo.toFixed(1)} (pale) to ${hi.toFixed(1)} (dark); estimator: ${x.estimator}`;
  const standing = x.stand_out.length;
  $("#xray-verdict").textContent = standing
    ? `${standing} of ${x.modules.length} modules stand out (importance over ${x.stand_out_factor}× the median): these get the most bits. Importance spans ${x.decades.toFixed(1)} decades; the middle 80% spans ${x.spread_p90_p10.toFixed(1)}×.`
    : `Homogeneous: no module's importance is over ${x.stand_out_factor}× the median. Importance spans ${x.decades.toFixed(1)} decades; the middle 80% spans ${x.spread_p90_p10.toFixed(1)}×.`;
  $("#xray-verdict").dataset.standOut = String(standing);
  $("#stand-out").replaceChildren(...x.stand_out.slice(0, 12).map((path) => {
    const m = x.modules.find((n) => n.path === path);
    return el("li", { text: `${path}: ${(m.importance / x.median).toFixed(1)}× the median` });
  }));
  drawCurve(x);
}

function drawCurve(x) {
  const sorted = x.modules.map((m) => m.importance).filter((v) => v > 0).sort((a, b) => b - a);
  const W = 900, H = 220, L = 48, B = 24;
  const lo = Math.floor(Math.log10(sorted[sorted.length - 1])), hi = Math.ceil(Math.log10(sorted[0]));
  const y = (v) => (H - B) - ((Math.log10(v) - lo) / ((hi - lo) || 1)) * (H - B - 8);
  const xAt = (i) => L + (i / Math.max(1, sorted.length - 1)) * (W - L - 8);
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", `importance of ${sorted.length} modules, sorted, from ${sorted[0].toPrecision(3)} to ${sorted[sorted.length - 1].toPrecision(3)}`);
  const add = (tag, attrs, text) => {
    const n = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text) n.textContent = text;
    svg.append(n);
  };
  for (let d = lo; d <= hi; d++) {
    add("line", { class: "axis", x1: L, x2: W - 8, y1: y(10 ** d), y2: y(10 ** d) });
    add("text", { x: 4, y: y(10 ** d) + 4 }, `1e${d}`);
  }
  add("line", { class: "median", x1: L, x2: W - 8, y1: y(x.median), y2: y(x.median) });
  add("text", { x: W - 60, y: y(x.median) - 4 }, "median");
  const threshold = x.median * x.stand_out_factor;
  if (threshold <= 10 ** hi) {
    add("line", { class: "threshold", x1: L, x2: W - 8, y1: y(threshold), y2: y(threshold) });
    add("text", { x: W - 120, y: y(threshold) - 4 }, `${x.stand_out_factor}× median`);
  }
  add("polyline", { class: "curve", points: sorted.map((v, i) => `${xAt(i).toFixed(1)},${y(v).toFixed(1)}`).join(" ") });
  add("text", { x: L, y: H - 6 }, "modules, most important first");
  $("#xray-curve").replaceChildren(svg);
}

// -- live state ----------------------------------------------------------------------------------

async function poll() {
  const response = await api("/status").catch(() => null);
  if (!response?.ok) {
    $("#live-stage").textContent = response ? `status: HTTP ${response.status}` : "the server is not answering";
    return;
  }
  const s = await response.json();
  const now = performance.now();
  let rate = s.tokens_per_second;
  if (state.lastTokens) {
    const [tokens, at] = state.lastTokens;
    if (s.generated_tokens > tokens) rate = (s.generated_tokens - tokens) / ((now - at) / 1000);
    else rate = 0;
  }
  state.lastTokens = [s.generated_tokens, now];
  $("#live-active").textContent = `${s.active}/${s.parallel ?? "–"}`;
  $("#live-queued").textContent = `${s.queued}/${s.queue_size ?? "–"}`;
  $("#live-tps").textContent = rate.toFixed(1);
  $("#live-memory").textContent = `${humanBytes(s.mlx_active_bytes)} MLX, ${humanBytes(s.rss_bytes)} process`;
  $("#live-stage").textContent = s.stage === "ready" ? `${s.model} ready` : s.stage;
}

// -- start ---------------------------------------------------------------------------------------

setupSettings();
setupChat();
setupTabs();
$("#key-button").addEventListener("click", () => askKey("The server's API key (empty for none)."));
$("#xray-measure").addEventListener("change", () => state.fit && drawXray(state.fit));
await loadModels();
poll();
setInterval(poll, 3000);
document.body.dataset.ready = "true";

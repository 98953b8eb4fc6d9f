// The operator's console: every figure comes from the gateway's own key-protected HTTP API.
// The key lives in this tab's sessionStorage only (never a URL, never localStorage).
const KEY = "gateway-console-key";
const $ = (id) => document.getElementById(id);
let timer = null;

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${sessionStorage.getItem(KEY) || ""}`, ...(options.headers || {}) };
  const response = await fetch(path, { ...options, headers });
  const type = response.headers.get("content-type") || "";
  const body = type.includes("json") ? await response.json() : await response.text();
  if (!response.ok) {
    const message = body && body.error ? body.error.message : `${response.status} ${response.statusText}`;
    throw new ApiError(response.status, message);
  }
  return body;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const c of children) node.append(c instanceof Node ? c : String(c ?? "-"));
  return node;
}

function table(head, rows) {
  const t = el("table", {}, el("thead", {}, el("tr", {}, ...head.map((h) => el("th", {}, h)))));
  const body = el("tbody");
  for (const row of rows) {
    body.append(el("tr", {}, ...row.map((c) => (c instanceof Node && c.tagName === "TD" ? c : el("td", {}, c)))));
  }
  t.append(body);
  return t;
}

const num = (v, digits) => el("td", { class: "num" }, v == null ? "-" : Number(v).toFixed(digits));
const cls = (text, name) => el("span", { class: name }, text);

function showError(node, message) {
  node.textContent = message;
  node.hidden = !message;
}

// ---- Models ------------------------------------------------------------------------------------------------

async function loadModels() {
  const [listed, ready] = await Promise.all([api("/v1/models"), fetchReady()]);
  let admin = null;
  try {
    admin = await api("/admin/models");
  } catch (e) {
    if (e.status !== 403) throw e;
  }
  $("ready-status").textContent = ready ? `(server ${ready.status})` : "";
  $("models-note").textContent = admin
    ? ""
    : "Placement, replicas, circuit, queue and limits: needs an admin key (GET /admin/models).";
  const runtime = new Map((admin ? admin.data : []).map((m) => [m.id, m]));
  const rows = listed.data.map((card) => modelRow(card, runtime.get(card.id), ready));
  const head = ["model", "state", "task", "backend", "placement", "replicas", "dim", "max tokens", "limits",
    "prompts", "circuit", "queue"];
  $("models").replaceChildren(table(head, rows));
  fillModelSelect(listed.data);
  return admin !== null;
}

async function fetchReady() {
  // /ready answers 503 with the same body while a model is not ready.
  const response = await fetch("/ready", { headers: { Authorization: `Bearer ${sessionStorage.getItem(KEY)}` } });
  return response.json();
}

function modelRow(card, rt, ready) {
  const state = card.state === "ready" ? cls("ready", "ok") : cls(card.error ? `${card.state}: ${card.error}` : card.state, "bad");
  const replicas = rt ? (rt.replicas == null ? "-" : `${rt.replicas_ready}/${rt.replicas}`) : (ready.replicas || {})[card.id];
  const limits = rt
    ? `batch ${rt.limits.max_batch_size ?? "auto"}, queue ${rt.limits.max_queue}, wait ${rt.limits.max_queue_wait_ms} ms`
    : "needs an admin key";
  const prompts = Object.keys(card.prompts || {}).join(", ") || "-";
  const circuit = rt ? cls(rt.circuit, rt.circuit === "closed" ? "ok" : "bad") : "-";
  return [card.id, el("td", {}, state), card.task, card.backend, rt ? rt.placement : "-", replicas ?? "-",
    card.dimension, card.max_input_tokens, limits, prompts, el("td", {}, circuit), rt ? rt.queue_depth : "-"];
}

function fillModelSelect(cards) {
  const select = $("play-models");
  const chosen = new Set([...select.selectedOptions].map((o) => o.value));
  const embedders = cards.filter((c) => c.task === "embed");
  select.replaceChildren(...embedders.map((c) => el("option", { value: c.id }, c.id)));
  const first = chosen.size ? chosen : new Set(embedders.slice(0, 2).map((c) => c.id));
  for (const option of select.options) option.selected = first.has(option.value);
}

// ---- Live figures (Prometheus text from /metrics) ---------------------------------------------------------

function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    for (const l of (m[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2];
    samples.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return samples;
}

// The console's own polling is not traffic an operator wants to see.
const counted = (s) => !["/metrics", "/ready", "/v1/models", "/admin/models"].includes(s.labels.path);
const sum = (samples, name, keep = () => true) =>
  samples.filter((s) => s.name === name && keep(s)).reduce((a, s) => a + s.value, 0);

function snapshot(samples) {
  const buckets = new Map();
  for (const s of samples) {
    if (s.name !== "gateway_http_request_duration_seconds_bucket" || !counted(s)) continue;
    const le = s.labels.le === "+Inf" ? Infinity : Number(s.labels.le);
    buckets.set(le, (buckets.get(le) || 0) + s.value);
  }
  return {
    t: performance.now() / 1000,
    requests: sum(samples, "gateway_http_requests_total", counted),
    refused: sum(samples, "gateway_http_requests_total", (s) => counted(s) && s.labels.status_code === "429"),
    hits: sum(samples, "gateway_cache_lookups_total", (s) => s.labels.result === "hit"),
    lookups: sum(samples, "gateway_cache_lookups_total"),
    wait: Math.max(0, ...samples.filter((s) => s.name === "gateway_predicted_wait_seconds").map((s) => s.value)),
    queued: sum(samples, "gateway_queue_depth"),
    buckets,
  };
}

function quantile(prev, cur, q) {
  // From the growth of the cumulative buckets between two samples, interpolated inside the bucket.
  const bounds = [...cur.buckets.keys()].sort((a, b) => a - b);
  const delta = bounds.map((b) => cur.buckets.get(b) - (prev.buckets.get(b) || 0));
  const total = delta[delta.length - 1] || 0;
  if (total <= 0) return null;
  const rank = q * total;
  for (let i = 0; i < bounds.length; i++) {
    if (delta[i] >= rank) {
      const lower = i ? bounds[i - 1] : 0;
      const below = i ? delta[i - 1] : 0;
      if (bounds[i] === Infinity) return lower;
      return lower + (bounds[i] - lower) * ((rank - below) / Math.max(delta[i] - below, 1e-9));
    }
  }
  return null;
}

const SERIES = [
  ["rps", "requests/s", (v) => v.toFixed(1)],
  ["p50", "p50 latency", (v) => `${(v * 1000).toFixed(1)} ms`],
  ["p99", "p99 latency", (v) => `${(v * 1000).toFixed(1)} ms`],
  ["wait", "queue wait (predicted)", (v) => `${(v * 1000).toFixed(1)} ms`],
  ["hit", "cache hit rate", (v) => `${(v * 100).toFixed(0)} %`],
  ["r429", "429s/s", (v) => v.toFixed(2)],
];
const history = Object.fromEntries(SERIES.map(([k]) => [k, []]));
let previous = null;

function buildCharts() {
  $("charts").replaceChildren(...SERIES.map(([key, label]) =>
    el("div", { class: "chart", id: `chart-${key}` }, el("div", { class: "label" }, label),
      el("div", { class: "value" }, "-"), svgLine())));
}

function svgLine() {
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", "0 0 100 36");
  svg.setAttribute("preserveAspectRatio", "none");
  svg.append(document.createElementNS("http://www.w3.org/2000/svg", "polyline"));
  return svg;
}

function draw(key, format) {
  const points = history[key];
  const box = $(`chart-${key}`);
  const last = points.length ? points[points.length - 1] : null;
  box.querySelector(".value").textContent = last == null ? "-" : format(last);
  const values = points.map((v) => v ?? 0);
  const top = Math.max(...values, 1e-9);
  const step = 100 / Math.max(values.length - 1, 1);
  const coords = values.map((v, i) => `${(i * step).toFixed(1)},${(34 - (v / top) * 32).toFixed(1)}`);
  box.querySelector("polyline").setAttribute("points", coords.join(" "));
}

async function sampleMetrics() {
  const cur = snapshot(parseMetrics(await api("/metrics")));
  if (previous) {
    const dt = Math.max(cur.t - previous.t, 1e-3);
    const lookups = cur.lookups - previous.lookups;
    const next = {
      rps: (cur.requests - previous.requests) / dt,
      p50: quantile(previous, cur, 0.5),
      p99: quantile(previous, cur, 0.99),
      wait: cur.wait,
      hit: lookups > 0 ? (cur.hits - previous.hits) / lookups : null,
      r429: (cur.refused - previous.refused) / dt,
    };
    for (const [key, , format] of SERIES) {
      history[key].push(next[key]);
      if (history[key].length > 60) history[key].shift();
      draw(key, format);
    }
  }
  previous = cur;
}

// ---- Playground --------------------------------------------------------------------------------------------

function cosine(a, b) {
  let dot = 0, na = 0, nb = 0;
  for (let i = 0; i < a.length; i++) { dot += a[i] * b[i]; na += a[i] * a[i]; nb += b[i] * b[i]; }
  return dot / Math.sqrt(na * nb);
}

async function embed(model, texts) {
  const start = performance.now();
  const body = await api("/v1/embeddings", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ model, input: texts }),
  });
  return { model, ms: performance.now() - start, tokens: body.usage.prompt_tokens, vectors: body.data.map((d) => d.embedding) };
}

async function play(event) {
  event.preventDefault();
  showError($("play-error"), "");
  const texts = $("texts").value.split("\n").map((t) => t.trim()).filter(Boolean);
  const models = [...$("play-models").selectedOptions].map((o) => o.value);
  if (texts.length < 2 || !models.length) {
    showError($("play-error"), "Give two or more texts (one per line) and choose at least one model.");
    return;
  }
  const out = $("play-results");
  out.replaceChildren();
  try {
    const results = [];
    for (const model of models) results.push(await embed(model, texts));  // one at a time: honest timings
    for (const r of results) out.append(matrix(r, texts));
    if (results.length > 1) out.append(crossModel(results, texts));
  } catch (e) {
    showError($("play-error"), e.message);
  }
}

const short = (t) => (t.length > 24 ? `${t.slice(0, 23)}…` : t);

function matrix(r, texts) {
  const rows = r.vectors.map((a, i) => [short(texts[i]), ...r.vectors.map((b) => num(cosine(a, b), 4))]);
  const box = el("div", { class: "result", "data-model": r.model });
  box.append(el("h3", {}, `${r.model}: ${r.tokens} tokens, ${r.ms.toFixed(1)} ms`));
  const t = table(["cosine", ...texts.map((_, i) => `#${i + 1}`)], rows);
  t.classList.add("cosine-matrix");
  box.append(t);
  return box;
}

function crossModel(results, texts) {
  // The same text under two models: agreement shows whether two backends of one model still match.
  const rows = [];
  for (let i = 0; i < results.length; i++) {
    for (let j = i + 1; j < results.length; j++) {
      const [a, b] = [results[i], results[j]];
      const same = a.vectors[0].length === b.vectors[0].length;
      rows.push([`${a.model} vs ${b.model}`,
        ...texts.map((_, k) => (same ? num(cosine(a.vectors[k], b.vectors[k]), 4) : "dimensions differ"))]);
    }
  }
  const box = el("div", { class: "result" }, el("h3", {}, "Across models (cosine of the same text)"));
  const t = table(["models", ...texts.map((_, i) => `#${i + 1}`)], rows);
  t.classList.add("cross-model");
  box.append(t);
  return box;
}

// ---- Check -------------------------------------------------------------------------------------------------

async function runCheck() {
  const out = $("check-results");
  out.replaceChildren(el("p", { class: "note" }, "running…"));
  try {
    const report = await api("/admin/check");
    const rows = report.rows.map((r) => [r.model, r.reference, r.reference ? r.texts : "-",
      r.tokens_equal == null ? "-" : r.tokens_equal ? "yes" : "no",
      num(r.min_cosine, 5), num(r.mean_cosine, 5), num(r.spearman, 4), num(r.reference_spearman, 4),
      el("td", { class: r.passed ? "ok" : "bad" }, r.passed ? "ok" : `FAIL: ${r.problems.join("; ")}`)]);
    const t = table(["model", "reference", "texts", "tokens equal", "min cos", "mean cos", "Spearman",
      "ref Spearman", "result"], rows);
    t.id = "check-table";
    out.replaceChildren(el("p", { class: report.passed ? "ok" : "bad" }, report.passed ? "passed" : "failed"), t);
  } catch (e) {
    out.replaceChildren(el("p", { class: "bad" }, e.status === 403 ? "needs an admin key" : e.message));
  }
}

// ---- Start -------------------------------------------------------------------------------------------------

async function start() {
  clearInterval(timer);
  showError($("error"), "");
  try {
    const admin = await loadModels();
    $("panels").hidden = false;
    $("run-check").disabled = !admin;
    if (!admin) $("check-results").replaceChildren(el("p", { class: "note" }, "needs an admin key"));
    buildCharts();
    previous = null;
    for (const k of Object.keys(history)) history[k] = [];
    // The model table every 10 s, the figures every 2 s: each call counts against the key's request limit.
    let ticks = 0;
    const tick = () =>
      Promise.all([sampleMetrics(), ++ticks % 5 === 0 ? loadModels() : null]).catch((e) => showError($("error"), e.message));
    await tick();
    timer = setInterval(tick, 2000);
  } catch (e) {
    $("panels").hidden = true;
    showError($("error"), e.message);
  }
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("key").value.trim());
  $("key").value = "";
  start();
});
$("forget").addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  clearInterval(timer);
  $("panels").hidden = true;
});
$("play-form").addEventListener("submit", play);
$("run-check").addEventListener("click", runCheck);
if (sessionStorage.getItem(KEY)) start();

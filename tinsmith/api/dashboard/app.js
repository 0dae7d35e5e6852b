// Tinsmith dashboard: reads the server's keyed JSON endpoints with the key kept in
// localStorage, redraws every few seconds. Plain JS, no dependencies, no build step.
"use strict";

const KEY_STORAGE = "tinsmith.apiKey";
const REFRESH_MS = 3000;
const state = { runId: null };

const $ = (sel) => document.querySelector(sel);

// An element with text content and attributes: user data never goes through innerHTML.
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return e;
}

class HttpError extends Error {
  constructor(status, detail) { super(detail); this.status = status; }
}

async function api(path, options = {}) {
  const key = localStorage.getItem(KEY_STORAGE);
  const headers = { ...(options.headers || {}) };
  if (key) headers["X-API-Key"] = key;
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, { ...options, headers });
  if (!resp.ok) {
    let detail = resp.statusText;
    try { detail = (await resp.json()).detail || detail; } catch (e) { /* not JSON */ }
    throw new HttpError(resp.status, typeof detail === "string" ? detail : JSON.stringify(detail));
  }
  return resp;
}
const getJson = async (path) => (await api(path)).json();

// ----- formatting ---------------------------------------------------------------------------
function fmtNum(x, digits = 4) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  if (Number.isInteger(x) && Math.abs(x) < 1e6) return String(x);
  return Math.abs(x) >= 1e4 || (Math.abs(x) < 1e-3 && x !== 0) ? x.toExponential(2) : x.toPrecision(digits);
}
// Binary units, one decimal: the same text as `tinsmith checkpoints` (tinsmith.cli.format_bytes;
// tests/test_cli.py runs the two side by side).
function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}
function fmtTime(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return `${d.toLocaleDateString()} ${d.toLocaleTimeString()}`;
}
const num = (v, digits) => el("td", { class: "num" }, fmtNum(v, digits));
const lossOf = (metrics) => {
  if (!metrics) return null;
  const k = Object.keys(metrics).find((m) => m.startsWith("loss"));
  return k === undefined ? null : metrics[k];
};

// ----- key handling -------------------------------------------------------------------------
function showKeyForm(message) {
  $("#key-form").hidden = false;
  $("#key-error").textContent = message || "";
  $("#key-input").focus();
}
function updateKeyState() {
  $("#key-state").textContent = localStorage.getItem(KEY_STORAGE) ? "key set" : "no key";
}
$("#key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const key = $("#key-input").value.trim();
  if (key) localStorage.setItem(KEY_STORAGE, key);
  $("#key-input").value = "";
  $("#key-form").hidden = true;
  updateKeyState();
  refresh();
});
$("#key-forget").addEventListener("click", () => {
  localStorage.removeItem(KEY_STORAGE);
  updateKeyState();
  refresh();
});
$("#key-change").addEventListener("click", () => showKeyForm(""));

// ----- engine panel -------------------------------------------------------------------------
async function refreshEngine() {
  const data = await getJson("/api/v1/dashboard/engine");
  const body = $("#engine tbody");
  body.replaceChildren(...data.models.map((m) => el("tr", { "data-model": m.model },
    el("td", {}, m.model), num(m.queued), num(m.held),
    el("td", { class: "num" }, `${(100 * m.busy_fraction).toFixed(1)} %`),
    num(m.tokens_per_s, 3), num(m.requests_per_pass, 3), num(m.requests_total),
    num(m.training_runs), num(m.sampling_sessions))));
}

// ----- sessions and runs --------------------------------------------------------------------
async function refreshOverview() {
  const data = await getJson("/api/v1/dashboard/overview");
  refreshPlaygroundModels([...data.models, ...data.sampler_checkpoints]);
  const runs = data.training_runs;
  $("#runs-empty").hidden = runs.length > 0;
  $("#runs tbody").replaceChildren(...runs.map((r) => {
    const tr = el("tr", { "data-run": r.training_run_id, onclick: () => selectRun(r.training_run_id) },
      el("td", {}, el("code", {}, r.training_run_id)),
      el("td", {}, el("span", { class: r.loaded ? "badge live" : "badge" }, r.loaded ? "loaded" : "not loaded")),
      el("td", {}, r.base_model), num(r.lora_rank), num(r.steps),
      num(lossOf(r.last_metrics)), el("td", {}, fmtTime(r.last_request_time)));
    if (r.training_run_id === state.runId) tr.classList.add("selected");
    return tr;
  }));
  $("#sessions tbody").replaceChildren(...data.sessions.map((s) => el("tr", { "data-session": s.session_id },
    el("td", {}, el("code", {}, s.session_id)), el("td", {}, s.display_name || ""),
    el("td", {}, (s.tags || []).join(", ")), el("td", {}, fmtTime(s.created_at)),
    el("td", {}, fmtTime(s.last_heartbeat_at)),
    el("td", {}, el("span", { class: s.status === "active" ? "badge live" : "badge" },
      s.status === "finished" ? `finished (${s.finish_reason || ""})`
        : s.status === "ended" ? "ended (no heartbeat)" : s.status)))));
}

// ----- a run: curves and checkpoints --------------------------------------------------------
function selectRun(runId) {
  state.runId = runId;
  document.querySelectorAll("#runs tbody tr").forEach((tr) =>
    tr.classList.toggle("selected", tr.dataset.run === runId));
  $("#run-panel").hidden = false;
  $("#run-title").textContent = runId;
  refreshRun().catch(showError);
}

// One metric's curve as an inline SVG: x = step, y = value, with min/max labels.
function chart(title, points) {
  const W = 320, H = 150, L = 46, R = 8, T = 8, B = 20;
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  const attrs = { width: W, height: H, viewBox: `0 0 ${W} ${H}`, "data-metric": title, "data-points": points.length };
  for (const [k, v] of Object.entries(attrs)) svg.setAttribute(k, v);
  const add = (tag, a, text) => {
    const e = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(a)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    svg.append(e);
    return e;
  };
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  const px = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const py = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  add("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B });
  add("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B });
  add("text", { x: L - 4, y: T + 8, "text-anchor": "end" }, fmtNum(y1, 3));
  add("text", { x: L - 4, y: H - B, "text-anchor": "end" }, fmtNum(y0, 3));
  add("text", { x: L, y: H - 6 }, `step ${fmtNum(Math.min(...xs))}`);
  add("text", { x: W - R, y: H - 6, "text-anchor": "end" }, `step ${fmtNum(Math.max(...xs))}`);
  add("polyline", { points: points.map(([x, y]) => `${px(x).toFixed(1)},${py(y).toFixed(1)}`).join(" ") });
  if (points.length <= 200) for (const [x, y] of points) add("circle", { cx: px(x), cy: py(y), r: 2.2 });
  const last = points.length ? fmtNum(ys[ys.length - 1]) : "–";
  return el("div", { class: "chart" }, el("div", { class: "title" }, `${title} (last ${last})`), svg);
}

async function refreshRun() {
  const runId = state.runId;
  if (!runId) return;
  const id = encodeURIComponent(runId);
  const [hist, ckpts] = await Promise.all([
    getJson(`/api/v1/training_runs/${id}/metrics`),
    getJson(`/api/v1/training_runs/${id}/checkpoints`),
  ]);
  if (runId !== state.runId) return;
  // One curve per (kind, metric): forward_backward losses first, then optimizer metrics.
  const series = new Map();
  for (const p of hist.points) {
    for (const [m, v] of Object.entries(p.metrics)) {
      const name = p.kind === "optim_step" ? `optim ${m}` : m;
      if (!series.has(name)) series.set(name, []);
      series.get(name).push([p.step, v]);
    }
  }
  const charts = [...series.entries()].map(([name, pts]) => chart(name, pts));
  $("#charts").replaceChildren(...(charts.length ? charts
    : [el("p", { class: "muted" }, "No metrics recorded for this run since the server started.")]));
  $("#checkpoints-empty").hidden = ckpts.checkpoints.length > 0;
  $("#checkpoints tbody").replaceChildren(...ckpts.checkpoints.map((c) => el("tr", { "data-path": c.tinker_path },
    el("td", {}, el("code", {}, c.tinker_path)), el("td", {}, c.checkpoint_type),
    el("td", { class: "num" }, fmtBytes(c.size_bytes)), el("td", {}, fmtTime(c.time)),
    el("td", {}, c.expires_at ? fmtTime(c.expires_at) : "never"),
    el("td", {},
      el("button", { type: "button", class: "download", onclick: () => download(c).catch(showError) }, "Download"),
      " ",
      el("button", { type: "button", class: "danger delete", onclick: () => remove(runId, c).catch(showError) }, "Delete")))));
}

async function download(c) {
  const resp = await api(`/api/v1/checkpoints/download?path=${encodeURIComponent(c.tinker_path)}`);
  const blob = await resp.blob();
  const cd = resp.headers.get("Content-Disposition") || "";
  const name = (cd.match(/filename="([^"]+)"/) || [])[1] || "checkpoint.zip";
  const a = el("a", { href: URL.createObjectURL(blob), download: name });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}

async function remove(runId, c) {
  if (!confirm(`Delete checkpoint ${c.tinker_path}? Its files are removed for good.`)) return;
  const ckpt = c.checkpoint_id.split("/").map(encodeURIComponent).join("/");
  await api(`/api/v1/training_runs/${encodeURIComponent(runId)}/checkpoints/${ckpt}`, { method: "DELETE" });
  await Promise.all([refreshRun(), refreshOverview()]);
}

// ----- playground ---------------------------------------------------------------------------
// `choices`: the served base models, then the caller's own sampler checkpoints.
function refreshPlaygroundModels(choices) {
  const select = $("#pg-model");
  const current = select.value;
  const have = [...select.options].map((o) => o.value);
  if (have.join("\n") === choices.join("\n")) return;  // unchanged: keep the user's choice
  select.replaceChildren(...choices.map((m) => el("option", { value: m }, m)));
  if (choices.includes(current)) select.value = current;
}

$("#pg-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const seed = $("#pg-seed").value;
  const body = {
    model: $("#pg-model").value, prompt: $("#pg-prompt").value,
    max_tokens: Number($("#pg-max-tokens").value), temperature: Number($("#pg-temperature").value),
    seed: seed === "" ? null : Number(seed),
  };
  $("#pg-state").textContent = "sampling…";
  $("#pg-output").classList.remove("error");
  try {
    const resp = await api("/api/v1/dashboard/sample", { method: "POST", body: JSON.stringify(body) });
    const out = await resp.json();
    $("#pg-output").textContent = out.text;
    $("#pg-output").dataset.tokens = JSON.stringify(out.tokens);
    $("#pg-state").textContent = `${out.tokens.length} tokens from ${out.model} (stop: ${out.stop_reason})`;
  } catch (e) {
    $("#pg-output").textContent = e.message;
    $("#pg-output").classList.add("error");
    $("#pg-state").textContent = "failed";
  }
});

// ----- refresh loop -------------------------------------------------------------------------
function showError(e) {
  if (e instanceof HttpError && e.status === 401) {
    $("#status").textContent = "API key needed";
    showKeyForm(e.message);
  } else {
    $("#status").textContent = `error: ${e.message}`;
  }
}

async function refresh() {
  try {
    await refreshOverview();
    await Promise.all([refreshEngine(), refreshRun()]);
    $("#status").textContent = `updated ${new Date().toLocaleTimeString()}`;
    document.body.dataset.loaded = "1";
  } catch (e) {
    showError(e);
  }
}

updateKeyState();
refresh();
setInterval(refresh, REFRESH_MS);

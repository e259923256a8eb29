// knn-defense neighbour viewer: plain JavaScript, no build step, no CDN.
"use strict";

const token = new URLSearchParams(location.search).get("token");
const $ = (id) => document.getElementById(id);
const state = { info: null, viewer: null, image: null, label: null, result: null, page: 0 };

function withToken(url) {
  return token ? url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token) : url;
}

// Every call ends: a timeout aborts it, and any 4xx/5xx shows its message instead of hanging.
async function call(url, options = {}, timeoutMs = 30000) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), timeoutMs);
  const headers = Object.assign({}, options.headers || {});
  if (token) headers["Authorization"] = "Bearer " + token;
  try {
    const response = await fetch(url, Object.assign({}, options, { headers, signal: controller.signal }));
    if (!response.ok) {
      let detail = response.statusText;
      try { detail = (await response.json()).detail || detail; } catch (e) { /* not JSON */ }
      throw new Error(`${response.status}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`);
    }
    return response;
  } catch (err) {
    if (err.name === "AbortError") throw new Error(`no answer from ${url} within ${timeoutMs / 1000} s`);
    throw err;
  } finally {
    clearTimeout(timer);
  }
}

function showError(err) {
  const box = $("error");
  box.textContent = err ? String(err.message || err) : "";
  box.hidden = !err;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function options(select, values, chosen) {
  select.replaceChildren(...values.map((v) => el("option", { value: v }, v)));
  select.value = chosen;
}

function form(image, extra = {}) {
  const body = new FormData();
  body.append("images", image, "query");
  for (const [k, v] of Object.entries(extra)) body.append(k, String(v));
  return body;
}

function params() {
  return { layer: $("layer").value, weighting: $("weighting").value, k: $("k").value };
}

async function start() {
  try {
    state.info = await (await call(withToken("info"))).json();
    state.viewer = await (await call(withToken("viewer-info"))).json();
  } catch (err) { showError(err); return; }
  const info = state.info;
  const sizes = Object.entries(info.index_sizes).map(([l, n]) => `${l}: ${n.toLocaleString()}`).join(", ");
  $("server-info").textContent = `knn-defense ${info.version} · ${info.num_classes} classes · ` +
    `database ${sizes} · default layer ${info.layer_reason}`;
  options($("layer"), info.layers, info.layer);
  options($("weighting"), info.weightings, info.weighting);
  $("k").value = info.k;
  $("k").max = info.limits.max_k;
  options($("attack-method"), state.viewer.attacks, "pgd");
  $("attack-steps").max = state.viewer.limits.max_attack_steps;
  $("attack-budget").max = state.viewer.limits.max_attack_budget;
  if (state.viewer.queries) { $("queries").hidden = false; loadQueries(0); }
}

async function loadQueries(page) {
  try {
    const body = await (await call(withToken(`queries?page=${page}`))).json();
    state.page = body.page;
    $("query-page").textContent = `page ${body.page + 1} of ${body.pages} (${body.total} images)`;
    $("query-prev").disabled = body.page === 0;
    $("query-next").disabled = body.page + 1 >= body.pages;
    const filter = $("query-filter").value.trim();
    $("query-list").replaceChildren(...body.queries.filter((q) => !filter || q.key.includes(filter)).map((q) => {
      const button = el("button", { type: "button", "data-key": q.key }, `${q.key}`,
                        q.name !== null ? el("small", {}, ` · ${q.name}`) : "");
      button.addEventListener("click", () => pickQuery(q));
      return el("li", {}, button);
    }));
  } catch (err) { showError(err); }
}

async function pickQuery(q) {
  try {
    const blob = await (await call(withToken(`query-image/${encodeURIComponent(q.key)}`))).blob();
    await classify(blob, q.label, `query ${q.key}` + (q.name !== null ? ` (${q.name})` : ""));
  } catch (err) { showError(err); }
}

async function classify(image, label = null, caption = "uploaded image") {
  showError(null);
  state.image = image;
  state.label = label;
  try {
    const response = await call(withToken("explain"), { method: "POST", body: form(image, params()) });
    state.result = await response.json();
  } catch (err) { showError(err); return; }
  $("query-image").src = URL.createObjectURL(image);
  $("query-caption").textContent = caption;
  $("attack-result").hidden = true;
  $("result").hidden = false;
  render();
}

function neighbourTiles(layerResult, rule, predicted, limit = Infinity) {
  return layerResult.neighbours.slice(0, limit).map((n) => {
    const tile = el("div", { class: "thumb" + (n.vote !== predicted ? " against" : ""), title: `id ${n.id}` },
      el("img", { src: withToken(`image/${n.id}?size=96`), alt: n.key || String(n.id), loading: "lazy" }),
      el("div", { class: "key" }, n.key || String(n.id)),
      el("div", {}, `${n.vote_name}`),
      el("div", {}, `d ${n.distance.toFixed(3)} · w ${n.weights[rule].toFixed(3)}`));
    return tile;
  });
}

function render() {
  const r = state.result, layer = $("layer").value, rule = $("weighting").value;
  const chosen = r.layers[layer], prediction = chosen.predictions[rule];
  $("undefended").textContent = `${r.undefended.name} (${(100 * r.undefended.score).toFixed(1)}%)`;
  $("prediction").textContent = prediction.name;
  $("chosen-rule").textContent = `${layer}, ${rule}, K=${r.k}`;
  const rules = Object.keys(chosen.predictions);
  $("predictions").replaceChildren(
    el("tr", {}, el("th", {}, "layer"), ...rules.map((w) => el("th", {}, w))),
    ...Object.entries(r.layers).map(([name, lr]) => el("tr", {}, el("td", {}, name),
      ...rules.map((w) => el("td", { class: state.label !== null && lr.predictions[w].label !== state.label ? "wrong" : "" },
                             lr.predictions[w].name)))));
  const scores = prediction.scores, total = scores.reduce((a, b) => a + b, 0) || 1;
  const order = scores.map((s, c) => [s, c]).sort((a, b) => b[0] - a[0]).slice(0, 10);
  $("vote").replaceChildren(el("h3", {}, `Vote (${rule})`), ...order.map(([s, c], i) => el("div", { class: "bar" + (i === 0 ? " top" : "") },
    el("span", {}, state.viewer.class_names[c] || `class ${c}`),
    el("div", { style: `width: ${Math.max(1, 100 * s / total)}%` }),
    el("span", {}, (s / total).toFixed(2)))));
  $("neighbour-caption").textContent = `${chosen.neighbours.length} nearest in ${layer}; red border: votes against the prediction`;
  $("neighbours").replaceChildren(...neighbourTiles(chosen, rule, prediction.label));
}

async function attack() {
  if (!state.image) return;
  showError(null);
  const button = $("attack-button");
  button.disabled = true;
  $("attack-status").textContent = "running…";
  const extra = Object.assign(params(), { method: $("attack-method").value, budget: $("attack-budget").value,
                                          steps: $("attack-steps").value });
  if (state.label !== null) extra.label = state.label;
  try {
    const timeout = 1000 * (state.viewer.limits.attack_timeout_s + 30);
    const r = await (await call(withToken("attack"), { method: "POST", body: form(state.image, extra) }, timeout)).json();
    const layer = r.layer, rule = r.weighting;
    $("attack-clean").src = r.images.clean;
    $("attack-adv").src = r.images.adversarial;
    $("attack-delta").src = r.images.perturbation;
    $("attack-adv-caption").textContent = `adversarial (${r.method}, Δ ${r.achieved.toFixed(3)} of ${r.budget})`;
    for (const [which, res, cls] of [["clean", r.clean, "prediction-clean"], ["adv", r.adversarial, "prediction-adv"]]) {
      const p = res.layers[layer].predictions[rule];
      document.querySelector("." + cls).textContent =
        `undefended: ${res.undefended.name} · defended (${layer}, ${rule}): ${p.name}`;
      $(`attack-neigh-${which}`).replaceChildren(...neighbourTiles(res.layers[layer], rule, p.label, 12));
    }
    $("attack-result").hidden = false;
    $("attack-status").textContent = "";
  } catch (err) {
    showError(err);
    $("attack-status").textContent = "";
  } finally {
    button.disabled = false;
  }
}

$("file-input").addEventListener("change", (e) => { if (e.target.files[0]) classify(e.target.files[0]); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files[0]) classify(e.dataTransfer.files[0]);
});
for (const id of ["layer", "weighting"]) $(id).addEventListener("change", () => state.result && render());
$("k").addEventListener("change", () => state.image && classify(state.image, state.label, $("query-caption").textContent));
$("query-prev").addEventListener("click", () => loadQueries(state.page - 1));
$("query-next").addEventListener("click", () => loadQueries(state.page + 1));
$("query-filter").addEventListener("input", () => loadQueries(state.page));
$("attack-button").addEventListener("click", attack);
start();

// inkwash studio: a single page over the /v1 API. Plain DOM, no framework, no build step.
"use strict";

const KEY_STORAGE = "inkwash.apiKey";
const GALLERY_PAGE = 48;

const state = {
  models: [],
  modelsLoading: null, // the promise of GET /v1/models
  job: null, // the Generate tab's running job
  stream: null, // its event stream
  galleryLast: null, // `created` of the last card shown, for "load more"
  match: null, // the Arena's current match
};

// ---------------------------------------------------------------- helpers

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

/** A URL that cannot carry headers (EventSource, <img>) carries the key as ?key=. */
function withKey(url) {
  const key = apiKey();
  if (!key || url.startsWith("data:")) return url;
  return url + (url.includes("?") ? "&" : "?") + "key=" + encodeURIComponent(key);
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** One sentence: the server's message, with a full stop if it lacks one. */
function sentence(text) {
  const s = String(text || "Something went wrong").trim().replace(/\s+/g, " ");
  return /[.!?]$/.test(s) ? s : s + ".";
}

function showError(message) {
  const box = $("error");
  box.textContent = sentence(message);
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const key = apiKey();
  if (key) headers.Authorization = "Bearer " + key;
  let response;
  try {
    response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (e) {
    throw new ApiError(0, "The server cannot be reached");
  }
  let data = null;
  try {
    data = await response.json();
  } catch (e) {
    data = null;
  }
  if (response.status === 401) {
    $("api-key-form").hidden = false;
    $("api-key").focus();
  }
  if (!response.ok) {
    const message = (data && data.error && data.error.message) || `${response.status} ${response.statusText}`;
    throw new ApiError(response.status, message);
  }
  return data;
}

/** Run an action; show its failure in #error rather than in the console. */
async function guarded(action) {
  try {
    return await action();
  } catch (e) {
    if (e instanceof ApiError && e.status === 401 && !apiKey()) showError("This server needs an API key: enter it above");
    else showError(e.message);
    return undefined;
  }
}

/**
 * Follow a job's progress over server-sent events.
 * handlers: progress({step, steps, preview}), finish(kind, job) with kind "done" | "failed" | "cancelled".
 * Returns a function that stops following.
 */
function followJob(jobId, handlers) {
  let source = null;
  let stopped = false;
  let retry = null;
  const finish = (kind, job) => {
    if (stopped) return;
    stop();
    handlers.finish(kind, job);
  };
  const stop = () => {
    stopped = true;
    clearTimeout(retry);
    if (source) source.close();
  };
  const open = () => {
    if (stopped) return;
    source = new EventSource(withKey(`/v1/jobs/${jobId}/events`));
    source.addEventListener("progress", (e) => handlers.progress(JSON.parse(e.data)));
    for (const kind of ["done", "failed", "cancelled"]) {
      source.addEventListener(kind, (e) => finish(kind, JSON.parse(e.data)));
    }
    // The stream broke before a final event: ask for the job, and listen again if it is still going.
    source.onerror = async () => {
      source.close();
      if (stopped) return;
      try {
        const job = await api("GET", `/v1/jobs/${jobId}`);
        const kinds = { succeeded: "done", failed: "failed", cancelled: "cancelled" };
        if (kinds[job.status]) return finish(kinds[job.status], job);
      } catch (e) {
        if (e.status === 404 || e.status === 401) return finish("failed", { error: e.message });
      }
      retry = setTimeout(open, 1000);
    };
  };
  open();
  return stop;
}

function settingsList(target, rows) {
  target.replaceChildren(
    ...rows.filter(([, value]) => value !== "" && value !== null && value !== undefined)
      .flatMap(([name, value]) => [el("dt", { text: name }), el("dd", { text: String(value), "data-setting": name })])
  );
  return target;
}

/** What a request asked for: its prompt, or "class N" for a class-conditional model. */
function promptText(r) {
  return r.class_label !== undefined && r.class_label !== null ? `class ${r.class_label}` : r.prompt;
}

function jobSettings(job) {
  const r = job.request || {};
  const seeds = (job.images || []).map((image) => image.seed);
  return [
    ["prompt", r.prompt],
    ["class", r.class_label],
    ["negative", r.negative_prompt],
    ["sampler", r.sampler],
    ["steps", r.steps],
    ["guidance", r.guidance],
    ["seed", seeds.length ? seeds.join(", ") : r.seed],
    ["size", r.size ? `${r.size}×${r.size}` : ""],
    ["model", job.model],
  ];
}

// ---------------------------------------------------------------- routing

const VIEWS = { generate: openGenerate, gallery: openGallery, arena: openArena };

function route() {
  const name = location.hash.slice(1) in VIEWS ? location.hash.slice(1) : "generate";
  clearError();
  for (const view of Object.keys(VIEWS)) $("view-" + view).hidden = view !== name;
  for (const tab of document.querySelectorAll(".tab")) {
    tab.classList.toggle("active", tab.dataset.view === name);
    if (tab.dataset.view === name) tab.setAttribute("aria-current", "page");
    else tab.removeAttribute("aria-current");
  }
  VIEWS[name]();
}

// ---------------------------------------------------------------- generate

function currentModel() {
  return state.models.find((m) => m.id === $("model").value) || state.models[0];
}

function fillOptions(select, values, chosen, label = (v) => String(v)) {
  select.replaceChildren(...values.map((v) => el("option", { value: String(v), text: label(v) })));
  if (values.map(String).includes(String(chosen))) select.value = String(chosen);
}

/** Point the form's choices and limits at the chosen model; keep what the user typed where it still fits. */
function renderModelChoices(keepValues) {
  const model = currentModel();
  if (!model) return;
  const d = model.defaults || {};
  const limits = model.limits || {};
  fillOptions($("sampler"), model.samplers || [], keepValues ? $("sampler").value || d.sampler : d.sampler);
  fillOptions($("size"), model.sizes || [model.image_size], keepValues ? $("size").value || model.image_size : model.image_size, (s) => `${s}×${s}`);
  if (!keepValues || !$("steps").value) $("steps").value = d.steps ?? 20;
  if (!keepValues || !$("guidance").value) $("guidance").value = d.guidance ?? 5;
  if (limits.max_steps) $("steps").max = limits.max_steps;
  if (limits.max_n) $("n").max = limits.max_n;
  if (limits.max_prompt_chars) $("prompt").maxLength = limits.max_prompt_chars;
  // a class-conditional model (ImageNet DiT) takes a class label instead of a prompt
  const classes = model.num_classes || 0;
  $("class-field").hidden = !classes;
  $("prompt-field").hidden = $("negative-field").hidden = !!classes;
  $("prompt").required = !classes;
  if (classes) $("class-label").max = classes - 1;
}

/** Fetch the models once (again after a failure, or after a new API key). */
function loadModels() {
  if (!state.modelsLoading) {
    state.modelsLoading = fetchModels().then((ok) => {
      if (!ok) state.modelsLoading = null;
    });
  }
  return state.modelsLoading;
}

async function fetchModels() {
  const reply = await guarded(() => api("GET", "/v1/models"));
  if (!reply) return false;
  state.models = reply.data || [];
  fillOptions($("model"), state.models.map((m) => m.id), state.models[0] && state.models[0].id);
  $("model-field").hidden = state.models.length < 2;
  renderModelChoices(false);
  return true;
}

function openGenerate() {
  loadModels();
}

function readForm() {
  const classes = (currentModel() || {}).num_classes || 0;
  const body = {
    prompt: classes ? undefined : $("prompt").value,
    class_label: classes ? Number($("class-label").value) : undefined,
    negative_prompt: classes ? undefined : $("negative").value || undefined,
    sampler: $("sampler").value || undefined,
    steps: Number($("steps").value),
    guidance: Number($("guidance").value),
    n: Number($("n").value) || 1,
  };
  if ($("size").value) body.size = `${$("size").value}x${$("size").value}`;
  if ($("seed").value.trim() !== "") body.seed = Number($("seed").value);
  if (state.models.length > 1) body.model = $("model").value;
  return body;
}

function renderRunning(job) {
  $("generate-btn").disabled = !!job;
  $("cancel-btn").hidden = !job;
  $("job-status").textContent = job ? "Generating…" : "";
}

function renderProgress(event) {
  $("live").hidden = false;
  $("progress").max = event.steps || 1;
  $("progress").value = event.step || 0;
  $("progress-text").textContent = `${event.step || 0} / ${event.steps || 1}`;
  if (event.preview) {
    $("preview").src = event.preview;
    $("preview").hidden = false;
  }
}

function renderResult(job) {
  $("output").hidden = false;
  $("result").replaceChildren(
    ...(job.images || []).map((image) =>
      el("a", { href: withKey(image.url), target: "_blank", rel: "noopener" },
        el("img", { class: "result-image", src: withKey(image.url), alt: promptText(job.request), title: `seed ${image.seed}` })))
  );
  settingsList($("result-settings"), jobSettings(job));
}

async function submitGenerate(event) {
  event.preventDefault();
  if (state.job) return;
  clearError();
  const job = await guarded(() => api("POST", "/v1/jobs", readForm()));
  if (!job) return;
  state.job = job;
  renderRunning(job);
  renderProgress({ step: 0, steps: job.progress ? job.progress.steps : job.request.steps });
  $("preview").hidden = true;
  $("preview").removeAttribute("src");
  state.stream = followJob(job.id, {
    progress: renderProgress,
    finish: (kind, final) => {
      state.job = null;
      state.stream = null;
      renderRunning(null);
      if (kind === "done") {
        renderProgress({ step: final.progress ? final.progress.steps : 1, steps: final.progress ? final.progress.steps : 1 });
        renderResult(final);
      } else if (kind === "failed") {
        showError(final.error || "The job failed");
      } else {
        $("job-status").textContent = "Cancelled.";
      }
    },
  });
}

async function cancelGenerate() {
  if (!state.job) return;
  await guarded(() => api("POST", `/v1/jobs/${state.job.id}/cancel`));
}

/** Put a job's request back into the form (the gallery's "Reuse these settings"). */
function fillForm(job) {
  const r = job.request || {};
  if (job.model && state.models.some((m) => m.id === job.model)) {
    $("model").value = job.model;
    renderModelChoices(true);
  }
  $("prompt").value = r.prompt || "";
  $("negative").value = r.negative_prompt || "";
  if (r.class_label !== undefined && r.class_label !== null) $("class-label").value = r.class_label;
  if (r.sampler) $("sampler").value = r.sampler;
  if (r.steps !== undefined) $("steps").value = r.steps;
  if (r.guidance !== undefined) $("guidance").value = r.guidance;
  const seed = r.seed ?? (job.images && job.images.length ? job.images[0].seed : "");
  $("seed").value = seed ?? "";
  if (r.size) $("size").value = String(r.size);
  if (r.n) $("n").value = r.n;
}

// ---------------------------------------------------------------- gallery

function galleryCard(job) {
  const first = (job.images || [])[0];
  return el("article", { class: "gallery-card", "data-job": job.id },
    first ? el("img", { src: withKey(first.url), alt: promptText(job.request), loading: "lazy" }) : null,
    el("p", { class: "card-prompt", text: promptText(job.request) }),
    settingsList(el("dl", { class: "settings compact" }), jobSettings(job).filter(([name]) => name !== "prompt")),
    el("button", {
      type: "button", class: "reuse-btn", text: "Reuse these settings",
      onclick: async () => {
        await loadModels();
        fillForm(job);
        location.hash = "#generate";
      },
    }));
}

async function loadGallery(more) {
  const query = `?limit=${GALLERY_PAGE}` + (more && state.galleryLast !== null ? `&before=${state.galleryLast}` : "");
  const reply = await guarded(() => api("GET", "/v1/gallery" + query));
  if (!reply) return;
  renderGallery(reply.data || [], more);
}

function renderGallery(jobs, append) {
  const grid = $("gallery");
  if (!append) grid.replaceChildren();
  grid.append(...jobs.map(galleryCard));
  if (jobs.length) state.galleryLast = jobs[jobs.length - 1].created;
  $("gallery-empty").hidden = grid.children.length > 0;
  $("gallery-more").hidden = jobs.length < GALLERY_PAGE;
}

function openGallery() {
  state.galleryLast = null;
  loadGallery(false);
}

// ---------------------------------------------------------------- arena

function contestantPane(side, job) {
  const pane = $("arena-" + side);
  pane.replaceChildren(
    el("progress", { class: "arena-progress", value: "0", max: String(job.request ? job.request.steps : 1) }),
    el("img", { class: "arena-image", alt: `${side} contestant`, hidden: true }),
    el("p", { class: "contestant-name muted", text: side === "left" ? "Contestant A" : "Contestant B" })
  );
  return pane;
}

function renderArenaProgress(side, event) {
  const pane = $("arena-" + side);
  const bar = pane.querySelector("progress");
  bar.max = event.steps || 1;
  bar.value = event.step || 0;
  if (event.preview) {
    const img = pane.querySelector("img");
    img.src = event.preview;
    img.hidden = false;
  }
}

function renderArenaDone(side, job) {
  const pane = $("arena-" + side);
  const bar = pane.querySelector("progress");
  bar.value = bar.max;
  const img = pane.querySelector("img");
  img.src = withKey(job.images[0].url);
  img.hidden = false;
  img.classList.add("final");
}

function renderVotes(enabled) {
  $("arena-votes").hidden = false;
  for (const id of ["vote-left", "vote-right", "vote-tie"]) $(id).disabled = !enabled;
}

async function startMatch(event) {
  event.preventDefault();
  clearError();
  if (state.match) state.match.stops.forEach((stop) => stop());
  $("arena-fight").disabled = true;
  const match = await guarded(() => api("POST", "/v1/arena/matches", { prompt: $("arena-prompt").value }));
  $("arena-fight").disabled = false;
  if (!match) return;
  state.match = { id: match.id, pending: 2, stops: [], failed: false };
  const current = state.match;
  $("arena-match").hidden = false;
  renderVotes(false);
  for (const side of ["left", "right"]) {
    contestantPane(side, match[side]);
    current.stops.push(followJob(match[side].id, {
      progress: (e) => renderArenaProgress(side, e),
      finish: (kind, job) => {
        if (state.match !== current) return;
        if (kind === "done") renderArenaDone(side, job);
        else {
          current.failed = true;
          showError(kind === "failed" ? job.error || "A contestant failed" : "A contestant was cancelled");
        }
        current.pending -= 1;
        if (current.pending === 0 && !current.failed) renderVotes(true);
      },
    }));
  }
}

async function vote(winner) {
  if (!state.match) return;
  renderVotes(false);
  const reply = await guarded(() => api("POST", `/v1/arena/matches/${state.match.id}/vote`, { winner }));
  if (!reply) return;
  for (const side of ["left", "right"]) {
    const name = $("arena-" + side).querySelector(".contestant-name");
    name.textContent = reply.match[side].contestant;
    name.classList.remove("muted");
    name.classList.toggle("winner", reply.match.winner === side);
  }
  renderRanking(reply.ranking || []);
  state.match = null;
}

function renderRanking(rows) {
  const fmt = (x) => (typeof x === "number" ? x.toFixed(0) : "–");
  $("ranking").tBodies[0].replaceChildren(
    ...rows.map((row, i) =>
      el("tr", { "data-name": row.name },
        el("td", { class: "rank", text: String(i + 1) }),
        el("td", { class: "name", text: row.name }),
        el("td", { class: "rating", text: fmt(row.rating) }),
        el("td", { class: "interval", text: `${fmt(row.lo)}–${fmt(row.hi)}` }),
        el("td", { class: "record", text: `${row.wins} / ${row.losses} / ${row.ties}` }),
        el("td", { class: "matches", text: String(row.matches) })))
  );
}

async function openArena() {
  const reply = await guarded(() => api("GET", "/v1/arena/ranking"));
  if (reply) renderRanking(reply.data || []);
}

// ---------------------------------------------------------------- start

function saveKey(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
  $("api-key-form").hidden = true;
  clearError();
  state.modelsLoading = null;
  route();
}

function start() {
  $("generate-form").addEventListener("submit", submitGenerate);
  $("cancel-btn").addEventListener("click", cancelGenerate);
  $("model").addEventListener("change", () => renderModelChoices(true));
  $("gallery-more").addEventListener("click", () => loadGallery(true));
  $("arena-form").addEventListener("submit", startMatch);
  for (const side of ["left", "right", "tie"]) $("vote-" + side).addEventListener("click", () => vote(side));
  $("api-key-form").addEventListener("submit", saveKey);
  $("api-key").value = apiKey();
  window.addEventListener("hashchange", route);
  loadModels();
  route();
}

start();

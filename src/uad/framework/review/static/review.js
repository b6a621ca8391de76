// The review page: every score comes from the server (the project's Inferencer); the slider's
// cost is computed here from the held-out scores the server sends once.
"use strict";
const $ = (id) => document.getElementById(id);
const S = { items: [], ref: null, thr: null, saved: null, current: null, open: null, kinds: [] };

function fmt(v, digits = 4) { return v === null || v === undefined || Number.isNaN(v) ? "–" : Number(v).toPrecision(digits); }
function pct(v) { return v === null || v === undefined ? "–" : (100 * v).toFixed(1) + " %"; }

function say(text, kind = "error") {
  const box = $("message");
  $("message-text").textContent = text;
  box.className = kind === "info" ? "info" : "";
  box.hidden = false;
}
$("message-close").onclick = () => { $("message").hidden = true; };

async function call(url, options = {}) {
  let resp;
  try { resp = await fetch(url, options); } catch (e) { throw new Error("the server cannot be reached (" + e.message + "): is kedro review still running?"); }
  let body = null;
  try { body = await resp.json(); } catch (e) { body = null; }
  if (!resp.ok) {
    const msg = body && body.error ? body.error : "the server answered " + resp.status + " " + resp.statusText;
    throw new Error(msg);
  }
  return body;
}

function decisionAt(item, t) {
  if (item.status !== "ok" || item.score === null) return item.status === "ok" ? "unknown" : "error";
  if (t === null || t === undefined) return "unknown";
  return item.score >= t ? "anomalous" : "normal";
}

function cost(t) {
  const r = S.ref;
  const out = { fpr: null, recall: null, precision: null };
  if (r.normals.length) out.fpr = r.normals.filter((s) => s >= t).length / r.normals.length;
  const pos = r.labelled.filter(([, y]) => y === 1), neg = r.labelled.filter(([, y]) => y === 0);
  if (pos.length && neg.length) {
    const tp = pos.filter(([s]) => s >= t).length, fp = neg.filter(([s]) => s >= t).length;
    out.recall = tp / pos.length;
    out.precision = tp + fp ? tp / (tp + fp) : null;
  }
  return out;
}

function sliderRange() {
  const all = S.ref.normals.concat(S.ref.labelled.map(([s]) => s), S.items.filter((i) => i.score !== null).map((i) => i.score));
  if (S.saved !== null) all.push(S.saved);
  let lo = Math.min(...all), hi = Math.max(...all);
  if (!all.length || !Number.isFinite(lo)) { lo = 0; hi = 1; }
  const pad = (hi - lo) * 0.05 || Math.abs(hi) * 0.05 || 1;
  const s = $("slider");
  s.min = lo - pad; s.max = hi + pad; s.step = (hi - lo + 2 * pad) / 2000;
}

function showThreshold() {
  const t = S.current;
  $("thr-value").textContent = fmt(t, 5);
  const c = cost(t);
  $("fpr").textContent = S.ref.normals.length ? pct(c.fpr) + " (" + S.ref.normals.filter((s) => s >= t).length + " of " + S.ref.normals.length + ")" : "not known";
  $("recall").textContent = c.recall === null ? "no labelled defects" : pct(c.recall);
  $("precision").textContent = c.precision === null ? (c.recall === null ? "–" : "nothing flagged") : pct(c.precision);
  const changed = S.items.filter((i) => i.status === "ok" && decisionAt(i, t) !== decisionAt(i, S.saved)).length;
  $("changes").textContent = changed + " of " + S.items.filter((i) => i.status === "ok").length;
  $("thr-stored").textContent = "stored: " + fmt(S.saved, 5) + " (" + (S.thr.image_source || "none") + (S.thr.version ? ", " + S.thr.version : "") + ")";
  for (const card of document.querySelectorAll(".card[data-id]")) {
    const item = S.items.find((i) => i.id === card.dataset.id);
    const d = decisionAt(item, t);
    card.classList.toggle("anomalous", d === "anomalous");
    const badge = card.querySelector(".decision");
    if (badge) { badge.textContent = d; badge.className = "badge decision " + d; }
  }
  if (S.open) showDetailFacts();
}

function card(item) {
  const el = document.createElement("div");
  el.className = "card";
  el.dataset.id = item.id;
  el.title = item.name;
  if (item.status !== "ok") {
    el.innerHTML = '<div class="err"></div><div class="meta"><div class="name"></div><span class="badge">' + item.status + "</span></div>";
    el.querySelector(".err").textContent = item.error;
  } else {
    el.innerHTML = '<img alt="" loading="lazy"><div class="meta"><span class="score"></span><div class="name"></div>' +
      '<span class="badge decision"></span> <span class="badge mark" hidden></span></div>';
    el.querySelector("img").src = "/api/items/" + item.id + "/thumb.jpg";
    el.querySelector(".score").textContent = fmt(item.score);
    el.onclick = () => openDetail(item.id);
  }
  el.querySelector(".name").textContent = item.name;
  const mark = el.querySelector(".badge.mark");
  if (mark && item.mark) { mark.hidden = false; mark.textContent = item.mark === "normal" ? "marked normal" : "marked " + item.defect_kind; }
  return el;
}

function renderGrid() {
  const grid = $("grid");
  grid.innerHTML = "";
  const items = S.items.slice().sort((a, b) => (b.score ?? -Infinity) - (a.score ?? -Infinity));
  if (!items.length) grid.innerHTML = '<p class="muted" id="empty">No images yet: choose files or name a folder.</p>';
  for (const item of items) grid.appendChild(card(item));
  $("grid-title").textContent = "Images (" + items.length + ")";
  sliderRange();
  $("slider").value = S.current;
  showThreshold();
}

function upsert(item) {
  const k = S.items.findIndex((i) => i.id === item.id);
  if (k >= 0) S.items[k] = item; else S.items.push(item);
}

async function uploadFiles(files) {
  const list = Array.from(files);
  let done = 0, failed = [];
  $("busy").hidden = false;
  for (const f of list) {
    $("busy").textContent = "scoring " + f.name + " (" + (done + 1) + " of " + list.length + ")…";
    if (S.limits && f.size > S.limits.max_upload_mb * 1048576) {
      failed.push(f.name + " is " + (f.size / 1048576).toFixed(1) + " MB, over this server's upload limit of " + S.limits.max_upload_mb +
                  " MB: scale it down, or restart kedro review with a larger --max-upload-mb");
      done++;
      continue;
    }
    try {
      const item = await call("/api/upload?name=" + encodeURIComponent(f.name), { method: "POST", body: f, headers: { "Content-Type": "application/octet-stream" } });
      upsert(item);
      if (item.status !== "ok") failed.push(item.error);
    } catch (e) { failed.push(e.message); }
    done++;
    renderGrid();
  }
  $("busy").hidden = true;
  if (failed.length) say(failed.join(" — ")); else $("message").hidden = true;
}

$("files").onchange = (e) => { uploadFiles(e.target.files); e.target.value = ""; };
const drop = $("drop");
drop.ondragover = (e) => { e.preventDefault(); drop.classList.add("over"); };
drop.ondragleave = () => drop.classList.remove("over");
drop.ondrop = (e) => { e.preventDefault(); drop.classList.remove("over"); uploadFiles(e.dataTransfer.files); };

$("folder-form").onsubmit = async (e) => {
  e.preventDefault();
  $("busy").hidden = false;
  $("busy").textContent = "scoring the folder…";
  try {
    const out = await call("/api/folder", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ path: $("folder").value }) });
    out.items.forEach(upsert);
    const bad = out.items.filter((i) => i.status !== "ok");
    if (bad.length) say(bad.length + " file(s) not scored: " + bad.map((i) => i.error).join(" — ")); else $("message").hidden = true;
  } catch (err) { say(err.message); }
  $("busy").hidden = true;
  renderGrid();
};

$("slider").oninput = (e) => { S.current = Number(e.target.value); showThreshold(); };

$("save-thr").onclick = async () => {
  try {
    const out = await call("/api/thresholds", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ image: S.current }) });
    S.thr = out.thresholds; S.saved = out.threshold; S.current = out.threshold;
    out.items.forEach(upsert);
    $("thr-saved").textContent = "Saved as version " + out.version + (out.mlflow_run ? " (MLflow run " + out.mlflow_run + ")" : " (" + out.mlflow_note + ")") + ": infer and the Inferencer apply it from now on.";
    say("Threshold " + fmt(out.threshold, 5) + " saved: " + out.path, "info");
    renderGrid();
  } catch (err) { say(err.message); }
};

// ------------------------------------------------------------------------------ detail view
function ordered() { return S.items.filter((i) => i.status === "ok").sort((a, b) => b.score - a.score); }

function openDetail(id) {
  S.open = id;
  const item = S.items.find((i) => i.id === id);
  $("detail").hidden = false;
  $("d-name").textContent = item.name;
  const img = $("d-image"), heat = $("d-heat");
  img.onload = layout;
  img.src = "/api/items/" + id + "/image";
  heat.src = "/api/items/" + id + "/heat.png";
  heat.style.opacity = $("opacity").value;
  $("kind").value = item.defect_kind || $("kind").value || (S.kinds[0] || "");
  showDetailFacts();
}

function showDetailFacts() {
  const item = S.items.find((i) => i.id === S.open);
  if (!item) return;
  const d = decisionAt(item, S.current);
  $("d-badge").textContent = d; $("d-badge").className = "badge " + d;
  $("d-facts").textContent = "score " + fmt(item.score) + " · image threshold " + fmt(S.current) + " · " + areaText(item) +
    " · " + item.width + " × " + item.height + " px · scored in " + item.seconds.toFixed(2) + " s";
  const pix = S.thr ? S.thr.pixel : null;
  $("d-scale").textContent = pix === null || pix === undefined
    ? "map colours: clear at this image's median, red at its top 1 %"
    : "map colours: clear at this image's median, red (outlined) at or above the pixel threshold " + fmt(pix);
  $("d-mark").textContent = item.mark ? "marked " + (item.mark === "normal" ? "normal" : item.defect_kind) + " → " + item.written[0] : "not marked yet";
}

// The area is the share of pixels at or above the pixel threshold, which is set apart from the
// image threshold (on the pixels): an image can pass the image threshold with no pixel above it.
function areaText(item) {
  const pix = S.thr ? S.thr.pixel : null;
  if (item.anomalous_area === null || item.anomalous_area === undefined || pix === null || pix === undefined)
    return "no pixel threshold stored: no anomalous area";
  const share = item.anomalous_area > 0 && item.anomalous_area < 0.0001 ? "< 0.01 %" : (100 * item.anomalous_area).toFixed(2) + " %";
  if (item.anomalous_area > 0) return "area at or above the pixel threshold " + fmt(pix) + ": " + share;
  return "no pixel reaches the pixel threshold " + fmt(pix) + " (hottest " + fmt(item.map_max) + ")";
}

function layout() {
  const img = $("d-image"), stack = $("stack"), vp = $("viewport");
  if (!img.naturalWidth) return;
  let scale = Number($("zoom").value);
  if (scale === 0) scale = Math.min((vp.clientWidth - 12) / img.naturalWidth, (vp.clientHeight - 12) / img.naturalHeight);
  $("zoom-out").textContent = Number($("zoom").value) === 0 ? "fit (" + Math.round(100 * scale) + " %)" : Math.round(100 * scale) + " %";
  stack.style.width = img.naturalWidth * scale + "px";
  stack.style.height = img.naturalHeight * scale + "px";
}
$("zoom").oninput = layout;
window.onresize = () => { if (S.open) layout(); };
$("opacity").oninput = (e) => { $("d-heat").style.opacity = e.target.value; $("opacity-out").textContent = Math.round(100 * e.target.value) + " %"; };
$("close").onclick = () => { $("detail").hidden = true; S.open = null; };
function step(k) {
  const list = ordered(), i = list.findIndex((x) => x.id === S.open);
  if (list.length) openDetail(list[(i + k + list.length) % list.length].id);
}
$("prev").onclick = () => step(-1);
$("next").onclick = () => step(1);
document.addEventListener("keydown", (e) => {
  if ($("detail").hidden || e.target.tagName === "INPUT") return;
  if (e.key === "Escape") $("close").onclick();
  if (e.key === "ArrowLeft") step(-1);
  if (e.key === "ArrowRight") step(1);
});

async function mark(kind) {
  const body = { mark: kind, class_name: $("class-name").value, defect_kind: $("kind").value, threshold: S.current };
  try {
    const out = await call("/api/items/" + S.open + "/mark", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    upsert(out.item);
    S.kinds = out.kinds; fillKinds();
    showCounts(out.reviewed_counts);
    say("Marked " + (kind === "normal" ? "normal" : out.item.defect_kind) + ": written to " + out.written.join(" and ") +
        (out.mask_source ? " (mask: " + out.mask_source + ", correct it if needed)" : ""), "info");
    renderGrid();
    showDetailFacts();
  } catch (err) { say(err.message); }
}
$("mark-normal").onclick = () => mark("normal");
$("mark-defect").onclick = () => mark("defect");

function fillKinds() { $("kinds").innerHTML = ""; for (const k of S.kinds) { const o = document.createElement("option"); o.value = k; $("kinds").appendChild(o); } }
function showCounts(c) { $("counts").textContent = c.normal + " normal, " + c.defect + " defective"; }

async function start() {
  try {
    const st = await call("/api/state");
    $("model").textContent = st.model + " · scoring in the " + st.frame + " frame";
    S.ref = st.reference; S.thr = st.thresholds; S.saved = st.thresholds.image;
    S.current = S.saved === null ? 0 : S.saved; S.items = st.items; S.kinds = st.kinds; S.limits = st.limits;
    $("ref-note").textContent = [st.reference.normals_from && "False alarms: " + st.reference.normals_from + ".",
      st.reference.labelled_from && "Recall, precision: " + st.reference.labelled_from + ".", st.reference.note].filter(Boolean).join(" ");
    $("reviewed").textContent = st.reviewed; showCounts(st.reviewed_counts);
    $("retrain").textContent = st.retrain;
    $("class-name").value = st.class_name;
    for (const c of st.classes) { const o = document.createElement("option"); o.value = c; $("classes").appendChild(o); }
    fillKinds();
    $("files").title = "up to " + st.limits.max_upload_mb + " MB and " + Math.round(st.limits.max_pixels / 1e6) + " MP per image";
    renderGrid();
  } catch (err) { say(err.message); }
}
start();

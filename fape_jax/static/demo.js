// The demo page: uploads one file to the server (fape_jax/demo.py) and shows what comes back.
"use strict";

const $ = (id) => document.getElementById(id);
let info = { max_bytes: Infinity };

const mb = (n) => `${(n / 1e6).toFixed(1)} MB`;

// body[data-state] is idle | busy | done | error; the browser test waits on it.
function setState(state, status) {
  document.body.dataset.state = state;
  document.body.classList.toggle("busy", state === "busy");
  $("status").textContent = status || "";
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  $("result").hidden = true;
  setState("error");
}

async function loadInfo() {
  try {
    const r = await fetch("api/info");
    info = await r.json();
  } catch (e) {
    showError(`Cannot reach the demo server: ${e.message}`);
    return;
  }
  $("run").textContent = `Run ${info.workdir}, checkpoint step ${info.checkpoint_step}, ` +
      `planner: ${info.planner}.`;
  $("formats").textContent = `${info.suffixes.join(" ")}; up to ${mb(info.max_bytes)} and ` +
      `${info.max_megapixels} megapixels`;
  $("file").accept = info.suffixes.join(",");
  setState("idle");
}

async function upload(file) {
  $("error").hidden = true;
  if (file.size > info.max_bytes) {  // the server says the same; this saves the upload
    showError(`${file.name} is ${mb(file.size)}; this demo takes uploads up to ` +
              `${mb(info.max_bytes)} (restart it with a larger --max_upload_mb, or use ` +
              "fape-restore).");
    return;
  }
  setState("busy", `Planning and restoring ${file.name} \u2026`);
  let response, body;
  try {
    response = await fetch(`api/restore?name=${encodeURIComponent(file.name)}`,
                           { method: "POST", body: file });
    body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  } catch (e) {
    showError(`Uploading ${file.name} failed: ${e.message}`);
    return;
  }
  if (!response.ok) {
    showError(body.error || `HTTP ${response.status}`);
    return;
  }
  await show(body);
  setState("done", `${body.name} restored in ${body.meta.seconds.toFixed(1)} s.`);
}

const shortLayer = (name) => name.replace(/down_blocks\./g, "down.")
    .replace(/up_blocks\./g, "up.").replace(/mid_block\./g, "mid.")
    .replace(/attentions\./g, "att.").replace(/transformer_blocks\./g, "tb.")
    .replace(/resnets\./g, "res.");

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function showRouting(layers) {
  const tbody = $("routing").tBodies[0];
  tbody.replaceChildren();
  $("no-routing").hidden = layers.length > 0;
  $("routing").hidden = layers.length === 0;
  for (const l of layers) {
    const row = tbody.insertRow();
    if (l.context) row.className = "context";
    cell(row, shortLayer(l.name), "name").title = l.name;
    cell(row, l.low.toFixed(3), "num");
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.setAttribute("role", "img");
    bar.setAttribute("aria-label", `low ${l.low.toFixed(3)}, high ${l.high.toFixed(3)}`);
    for (const [cls, w] of [["low", l.low], ["high", l.high]]) {
      const seg = document.createElement("div");
      seg.className = cls;
      seg.style.width = `${(100 * w / (l.low + l.high || 1)).toFixed(2)}%`;
      bar.append(seg);
    }
    row.insertCell().append(bar);
    cell(row, l.high.toFixed(3), "num");
  }
}

const loaded = (img) => img.decode().catch(() => {});

async function show(body) {
  $("plan").textContent = body.text;
  const fields = $("plan-fields");
  fields.replaceChildren();
  for (const [k, v] of [["Task", body.plan.task], ["Focus", body.plan.focus],
                        ["Rationale", body.plan.rationale],
                        ["Pipeline", body.plan.pipeline.join(" \u2192 ")]]) {
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = k;
    dd.textContent = v;
    fields.append(dt, dd);
  }
  showRouting(body.layers);
  const [w, h] = body.meta.size;
  // Small images are shown enlarged, with visible pixels, so the difference can be seen.
  const compare = $("compare");
  compare.style.width = `${Math.max(w, Math.min(512, 8 * w))}px`;
  compare.classList.toggle("pixelated", w < 512);
  $("before").src = body.input_url;
  $("after").src = body.output_url;
  $("download").href = body.output_url;
  $("download").download = body.download_name;
  $("meta").textContent = `${w}\u00d7${h} px, ${body.meta.tiles} tile(s) of ` +
      `${body.meta.tile} px, checkpoint step ${body.meta.checkpoint_step}`;
  $("result").hidden = false;
  await Promise.all([loaded($("before")), loaded($("after"))]);
}

$("split").addEventListener("input", (e) => {
  $("compare").style.setProperty("--split", `${e.target.value}%`);
});

$("file").addEventListener("change", (e) => {
  if (e.target.files.length) upload(e.target.files[0]);
  e.target.value = "";  // choosing the same file again uploads it again
});

const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) upload(e.dataTransfer.files[0]);
});
// A file dropped beside the zone would replace the page with the file itself.
window.addEventListener("dragover", (e) => e.preventDefault());
window.addEventListener("drop", (e) => e.preventDefault());

loadInfo();

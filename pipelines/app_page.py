"""The single HTML page of ``inpformer app`` (plain HTML + JS, no build step, no external assets)."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>inpformer inspector</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
 header { display: flex; gap: 1rem; align-items: end; flex-wrap: wrap; }
 label { display: flex; flex-direction: column; font-size: .85rem; gap: .2rem; }
 #drop { border: 2px dashed #888; padding: 1.2rem; margin: 1rem 0; text-align: center; border-radius: 6px; }
 #drop.over { background: #eef; }
 .card { display: inline-block; vertical-align: top; margin: .5rem; padding: .5rem; border: 1px solid #ccc;
         border-radius: 6px; max-width: 420px; }
 .card img { width: 320px; max-width: 100%; height: auto; display: block; image-rendering: pixelated; }
 .anomalous { color: #b00; font-weight: bold; } .normal { color: #070; font-weight: bold; }
 #status { color: #555; min-height: 1.2em; }
</style>
</head>
<body>
<h1>inpformer inspector</h1>
<header>
 <label>Model <select id="model"></select></label>
 <label>Category <select id="category"></select></label>
 <label>Image threshold <input id="threshold" type="range" min="0" max="1" step="any">
   <span>value: <span id="threshold-value">-</span>
   <button id="reset" type="button">reset</button></span></label>
</header>
<div id="drop">Drop images here, or <input id="files" type="file" accept="image/*" multiple></div>
<div id="status"></div>
<div id="results"></div>
<script>
const $ = (id) => document.getElementById(id);
let cards = [], defaultThreshold = null;
function setStatus(t) { $("status").textContent = t; }
async function loadModels() {
  const refs = await (await fetch("/api/models")).json();
  $("model").innerHTML = "";
  for (const ref of refs) {
    const o = document.createElement("option"); o.value = ref; o.textContent = ref; $("model").appendChild(o);
  }
  await fillCategories();
}
async function fillCategories() {
  $("category").innerHTML = "";
  setStatus("loading " + $("model").value + " ...");
  const resp = await fetch("/api/model?ref=" + encodeURIComponent($("model").value));
  const info = await resp.json();
  if (!resp.ok) { setStatus($("model").value + ": " + info.detail); return; }
  for (const c of info.categories) {
    const o = document.createElement("option"); o.value = c; o.textContent = c; $("category").appendChild(o);
  }
  $("model").selectedOptions[0].textContent = $("model").value + " (" + info.version + ")";
  setStatus("ready");
}
function threshold() { return parseFloat($("threshold").value); }
function decide(card) {
  const t = threshold();
  const d = card.score >= t ? "anomalous" : "normal";
  card.el.querySelector(".decision").textContent = d;
  card.el.querySelector(".decision").className = "decision " + d;
  card.el.querySelector(".thr").textContent = t.toPrecision(6);
}
function refresh() { $("threshold-value").textContent = threshold().toPrecision(6); cards.forEach(decide); }
function setSlider(res) {
  if (res.threshold === null) res.threshold = res.score;  // no calibrated threshold: start at the score
  const lo = Math.min(res.range[0], res.threshold, res.score), hi = Math.max(res.range[1], res.threshold, res.score);
  const pad = (hi - lo) * 0.1 || 1e-3;
  $("threshold").min = lo - pad; $("threshold").max = hi + pad; $("threshold").step = "any";
  defaultThreshold = res.threshold; $("threshold").value = res.threshold;
}
async function scoreFile(file) {
  const data = await new Promise((ok, fail) => {
    const r = new FileReader(); r.onload = () => ok(r.result); r.onerror = fail; r.readAsDataURL(file);
  });
  setStatus("scoring " + file.name + " ...");
  const resp = await fetch("/api/score", {method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({model: $("model").value, category: $("category").value, image: data})});
  const res = await resp.json();
  if (!resp.ok) { setStatus(file.name + ": " + (res.detail || resp.status)); return; }
  if (defaultThreshold === null || cards.length === 0) setSlider(res);
  const el = document.createElement("div");
  el.className = "card";
  el.innerHTML = '<div class="name"></div><img alt="overlay"><div>score <span class="score"></span>' +
    ' / threshold <span class="thr"></span> (' + res.rule + '): <span class="decision"></span></div>';
  el.querySelector(".name").textContent = file.name + " [" + res.category + ", " + res.version + "]";
  el.querySelector("img").src = "data:image/png;base64," + res.overlay;
  el.querySelector(".score").textContent = res.score.toPrecision(6);
  $("results").prepend(el);
  const card = {el: el, score: res.score};
  cards.push(card); decide(card); refresh();
  setStatus("scored " + file.name);
}
async function scoreAll(files) { for (const f of files) await scoreFile(f); }
$("files").addEventListener("change", async (e) => {
  await scoreAll(Array.from(e.target.files));
  e.target.value = "";  // the same file may be chosen again (e.g. for another category)
});
$("model").addEventListener("change", () => { cards = []; defaultThreshold = null;
  $("results").innerHTML = ""; fillCategories(); });
$("category").addEventListener("change", () => { cards = []; defaultThreshold = null; $("results").innerHTML = ""; });
$("threshold").addEventListener("input", refresh);
$("reset").addEventListener("click", () => { if (defaultThreshold !== null) $("threshold").value = defaultThreshold;
  refresh(); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over");
  scoreAll(e.dataTransfer.files); });
loadModels();
</script>
</body>
</html>
"""

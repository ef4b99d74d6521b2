/* cytosae explorer: one page, hash routes, every view drawn from the JSON API.
   In a static report (window.CYTOSAE_STATIC) the same API URLs are read from pre-rendered
   data/<hash>.js files (script tags work from file://, fetch does not). */
"use strict";

const STATIC = !!window.CYTOSAE_STATIC;
window.CYTOSAE_DATA = window.CYTOSAE_DATA || {};
const $app = document.getElementById("app");
const state = { run: null, overview: {}, annotations: null };

// ---------------------------------------------------------------- data access
function u(path, params) {
  // canonical URL (sorted params, null dropped) so the static report can name files by it
  const keys = Object.keys(params || {}).filter(k => params[k] !== null && params[k] !== undefined && params[k] !== "").sort();
  const q = keys.map(k => encodeURIComponent(k) + "=" + encodeURIComponent(String(params[k]))).join("&");
  return "/api/" + path + (q ? "?" + q : "");
}
function fnv1a(s) {
  const bytes = new TextEncoder().encode(s);
  let h = 0x811c9dc5;
  for (const b of bytes) { h ^= b; h = Math.imul(h, 0x01000193) >>> 0; }
  return h.toString(16).padStart(8, "0");
}
function loadScript(src) {
  return new Promise((resolve, reject) => {
    const s = document.createElement("script");
    s.src = src; s.onload = resolve; s.onerror = () => reject(new Error("not included in this static report"));
    document.head.appendChild(s);
  });
}
async function api(url, opts) {
  if (STATIC) {
    if (opts && opts.method && opts.method !== "GET") throw new Error("this static report is read-only");
    const key = fnv1a(url);
    if (!(key in window.CYTOSAE_DATA)) await loadScript("data/" + key + ".js");
    return window.CYTOSAE_DATA[key];
  }
  const r = await fetch(url.slice(1), opts);  // relative to the page, so a reverse proxy prefix keeps working
  const body = await r.json().catch(() => ({}));
  if (!r.ok) {
    const d = body.detail;
    throw new Error(`${r.status}: ${typeof d === "string" ? d : JSON.stringify(d)}`);
  }
  return body;
}
function fileUrl(url) { return STATIC ? "data/" + fnv1a(url) + ".jpg" : url.slice(1); }

// ---------------------------------------------------------------- helpers
// Image ids are paths relative to the data root and can be long: captions show the file name with its folder when
// both fit in a tile (cells of different patients are often all cell_000.png), else the file name alone (ellipsised
// by CSS if still too wide), the full id on hover: tiles never print paths over each other.
const SHORT_ID = 24;
function shortId(id) {
  const parts = String(id).split("/").filter(Boolean), last2 = parts.slice(-2).join("/");
  return last2.length <= SHORT_ID ? last2 : (parts[parts.length - 1] || String(id));
}
function idCaption(id) { return h("div", { class: "id muted", title: id }, shortId(id)); }
const fmt = (x, d = 3) => x === null || x === undefined || Number.isNaN(x) ? "–" :
  (Math.abs(x) >= 1000 || (Math.abs(x) < 1e-3 && x !== 0) ? Number(x).toExponential(2) : Number(x).toFixed(d));
function showError(where, e) { where.append(h("p", { class: "error" }, String(e.message || e))); }
function parseHash() {
  const raw = location.hash.replace(/^#\/?/, "");
  const [path, qs] = raw.split("?");
  return { parts: path.split("/").filter(Boolean), params: new URLSearchParams(qs || "") };
}
function latentLink(j, name) {
  return h("a", { href: `#/latent/${j}` }, `#${j}` + (name ? ` ${name}` : ""));
}
function statusPill(s) { return s ? h("span", { class: "pill " + s }, s) : ""; }
const tip = document.getElementById("tooltip");
function showTip(ev, text) { tip.hidden = false; tip.textContent = text; tip.style.left = (ev.clientX + 12) + "px"; tip.style.top = (ev.clientY + 12) + "px"; }
function hideTip() { tip.hidden = true; }

// colour for a value in [0, 1]: transparent -> red -> yellow
function viridis(t) { // short approximation for scatter colouring (label entropy)
  const c = [[68,1,84],[59,82,139],[33,145,140],[94,201,98],[253,231,37]];
  const x = Math.max(0, Math.min(1, t)) * (c.length - 1), i = Math.min(c.length - 2, Math.floor(x)), f = x - i;
  return `rgb(${c[i].map((v, k) => Math.round(v + f * (c[i + 1][k] - v))).join(",")})`;
}

// draw per-patch values over an image; mode: overlay | mask | off

// ---------------------------------------------------------------- small SVG charts
function barChart(items, { width = 320, barH = 16, label, value, valueFmt = v => fmt(v, 2), title }) {
  const max = Math.max(1e-12, ...items.map(value));
  const H = items.length * (barH + 4) + 4, L = 95;
  const svg = `<svg width="${width}" height="${H}" role="img" aria-label="${title || ""}">` + items.map((it, i) => {
    const w = (width - L - 50) * value(it) / max, y = 2 + i * (barH + 4);
    return `<text x="${L - 4}" y="${y + barH - 4}" text-anchor="end">${escapeXml(label(it))}</text>` +
      `<rect x="${L}" y="${y}" width="${Math.max(0, w)}" height="${barH}" fill="#7b1e3a"></rect>` +
      `<text x="${L + w + 4}" y="${y + barH - 4}">${valueFmt(value(it))}</text>`;
  }).join("") + "</svg>";
  const d = h("div"); d.innerHTML = svg; return d;
}
function histogram(edges, counts, { width = 320, height = 130 } = {}) {
  const max = Math.max(1, ...counts), n = counts.length, bw = (width - 40) / n;
  let s = `<svg width="${width}" height="${height + 22}" role="img" aria-label="activation histogram">`;
  counts.forEach((c, i) => { const bh = (height - 10) * c / max;
    s += `<rect x="${30 + i * bw}" y="${height - bh}" width="${Math.max(1, bw - 1)}" height="${bh}" fill="#7b1e3a"><title>${fmt(edges[i])}–${fmt(edges[i + 1])}: ${c}</title></rect>`; });
  s += `<text x="30" y="${height + 14}">${fmt(edges[0], 2)}</text><text x="${width - 10}" y="${height + 14}" text-anchor="end">${fmt(edges[edges.length - 1], 2)}</text>`;
  s += `<text x="0" y="10">${max}</text></svg>`;
  const d = h("div"); d.innerHTML = s; return d;
}
function escapeXml(s) { return String(s).replace(/[&<>"]/g, c => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c])); }

// ---------------------------------------------------------------- overview
async function viewOverview(params) {
  const run = state.run;
  const ds = params.get("dataset") || (run.datasets[0] || {}).name;
  $app.replaceChildren(h("h1", {}, "Latents"), h("p", { class: "muted" }, "Loading latents…"));
  let data;
  try { data = state.overview[ds] || await api(u("latents", { dataset: ds })); state.overview[ds] = data; }
  catch (e) { $app.replaceChildren(h("h1", {}, "Latents")); return showError($app, e); }
  const C = data.columns, n = C.latent.length;
  const fx = C.freq_image.map(v => v > 0 ? Math.log10(v) : null), fy = C.mean_act.map(v => v > 0 ? Math.log10(v) : null);
  const ent = C.label_entropy, maxEnt = Math.max(1e-9, ...ent.filter(v => v !== null));
  const classes = [...new Set(C.top_label.filter(Boolean))].sort();

  const sel = (id, opts, value) => h("select", { id }, ...opts.map(([v, t]) => h("option", { value: v, selected: v === value }, t)));
  const num = (id, ph) => h("input", { id, type: "number", step: "0.1", placeholder: ph });
  const controls = h("div", { class: "controls" },
    h("label", {}, "dataset", sel("f-dataset", run.datasets.map(d => [d.name, d.name]), ds)),
    h("label", {}, "top class", sel("f-class", [["", "any"], ...classes.map(c => [c, c])], "")),
    h("label", {}, "entropy ≥ (nats)", num("f-emin", "min")), h("label", {}, "entropy ≤", num("f-emax", "max")),
    h("label", {}, "log10 freq ≥", num("f-fmin", "min")), h("label", {}, "log10 freq ≤", num("f-fmax", "max")),
    h("label", {}, "annotated", sel("f-ann", [["", "any"], ["yes", "annotated"], ["no", "not annotated"],
      ["validated", "validated"], ["rejected", "rejected"]], "")),
    h("label", {}, "search", h("input", { id: "f-q", type: "search", placeholder: "id or name" })));
  const count = h("p", { id: "count", class: "muted" });
  const W = Math.min(1100, window.innerWidth - 60), H = 520;
  const canvas = h("canvas", { id: "scatter", class: "plot", width: W, height: H });
  const nImg = (((run.stats_summary || {}).datasets || []).find(d => d.dataset === ds) || {}).n_images;  // stats/summary.json as write_stats writes it
  const caption = h("p", { class: "caption" }, `Each dot is one of ${data.n_latents} SAE latents measured on dataset “${ds}”` +
    (typeof nImg === "number" ? ` (${nImg} images)` : "") + ": " +
    "x = log10 fraction of images where it fires (any token), y = log10 mean image activation (mean over patch tokens) " +
    "over the images where it fires, colour = natural-log entropy (nats) of the class labels of its top-k images " +
    "(dark = class-specific, yellow = mixed). Latents that never fire are not drawn. Click a dot to open it.");
  $app.replaceChildren(h("h1", {}, "Latents"), controls, count, canvas, caption);

  const xs = fx.filter(v => v !== null), ys = fy.filter(v => v !== null);
  const x0 = Math.min(...xs, -1) - 0.1, x1 = Math.max(...xs, 0) + 0.1, y0 = Math.min(...ys, -1) - 0.1, y1 = Math.max(...ys, 0) + 0.1;
  const P = 46, sx = v => P + (v - x0) / (x1 - x0) * (W - P - 10), sy = v => H - P + 10 - (v - y0) / (y1 - y0) * (H - P);
  let visible = [];
  const ctx = canvas.getContext("2d");

  function filtered() {
    const g = id => document.getElementById(id).value;
    const cls = g("f-class"), emin = parseFloat(g("f-emin")), emax = parseFloat(g("f-emax"));
    const fmin = parseFloat(g("f-fmin")), fmax = parseFloat(g("f-fmax")), ann = g("f-ann"), q = g("f-q").trim().toLowerCase();
    const out = [];
    for (let i = 0; i < n; i++) {
      if (fx[i] === null || fy[i] === null) continue;
      if (cls && C.top_label[i] !== cls) continue;
      if (!Number.isNaN(emin) && !(ent[i] >= emin)) continue;
      if (!Number.isNaN(emax) && !(ent[i] <= emax)) continue;
      if (!Number.isNaN(fmin) && fx[i] < fmin) continue;
      if (!Number.isNaN(fmax) && fx[i] > fmax) continue;
      if (ann === "yes" && !C.status[i]) continue;
      if (ann === "no" && C.status[i]) continue;
      if ((ann === "validated" || ann === "rejected") && C.status[i] !== ann) continue;
      if (q && !(String(C.latent[i]) === q.replace(/^#/, "") || (C.name[i] || "").toLowerCase().includes(q))) continue;
      out.push(i);
    }
    return out;
  }
  function draw() {
    visible = filtered();
    ctx.clearRect(0, 0, W, H);
    ctx.strokeStyle = "#999"; ctx.fillStyle = "#555"; ctx.font = "11px sans-serif";
    ctx.beginPath(); ctx.moveTo(P, 10); ctx.lineTo(P, H - P + 10); ctx.lineTo(W - 10, H - P + 10); ctx.stroke();
    for (let t = Math.ceil(x0); t <= x1; t++) ctx.fillText(String(t), sx(t) - 4, H - P + 24);
    for (let t = Math.ceil(y0); t <= y1; t++) ctx.fillText(String(t), P - 20, sy(t) + 4);
    ctx.fillText("log10 firing frequency (images)", W / 2 - 80, H - 6);
    ctx.save(); ctx.translate(12, H / 2 + 60); ctx.rotate(-Math.PI / 2); ctx.fillText("log10 mean activation", 0, 0); ctx.restore();
    const r = visible.length > 5000 ? 1.5 : 3;
    for (const i of visible) {
      ctx.fillStyle = viridis((ent[i] || 0) / maxEnt);
      ctx.fillRect(sx(fx[i]) - r, sy(fy[i]) - r, 2 * r, 2 * r);
      if (C.status[i]) { ctx.strokeStyle = "#7b1e3a"; ctx.strokeRect(sx(fx[i]) - r - 1, sy(fy[i]) - r - 1, 2 * r + 2, 2 * r + 2); }
    }
    // colour legend: label entropy in nats (stats.py: natural-log entropy)
    const lx = W - 190, ly = 16;
    for (let k = 0; k < 120; k++) { ctx.fillStyle = viridis(k / 119); ctx.fillRect(lx + k, ly, 1, 10); }
    ctx.fillStyle = "#555"; ctx.fillText("0", lx - 10, ly + 9); ctx.fillText(`${fmt(maxEnt, 1)} nats`, lx + 124, ly + 9);
    ctx.fillText("label entropy", lx + 25, ly + 24);
    count.textContent = `${visible.length} of ${n} latents shown`;
  }
  function nearest(ev) {
    const b = canvas.getBoundingClientRect(), mx = (ev.clientX - b.left) * W / b.width, my = (ev.clientY - b.top) * H / b.height;
    let best = -1, bd = 64;
    for (const i of visible) { const d = (sx(fx[i]) - mx) ** 2 + (sy(fy[i]) - my) ** 2; if (d < bd) { bd = d; best = i; } }
    return best;
  }
  canvas.addEventListener("mousemove", ev => { const i = nearest(ev);
    if (i < 0) return hideTip();
    showTip(ev, `#${C.latent[i]} ${C.name[i] || ""} · freq ${fmt(C.freq_image[i])} · mean ${fmt(C.mean_act[i])} · H ${fmt(ent[i], 2)} · ${C.top_label[i] || ""}`); });
  canvas.addEventListener("mouseleave", hideTip);
  canvas.addEventListener("click", ev => { const i = nearest(ev); if (i >= 0) { hideTip(); location.hash = `#/latent/${C.latent[i]}`; } });
  controls.addEventListener("input", ev => { if (ev.target.id === "f-dataset") location.hash = `#/?dataset=${encodeURIComponent(ev.target.value)}`; else draw(); });
  draw();
}

// ---------------------------------------------------------------- latent page
async function viewLatent(j) {
  $app.replaceChildren(h("h1", {}, `Latent #${j}`), h("p", { class: "muted" }, "Loading…"));
  let d;
  try { d = await api(u(`latents/${j}`, {})); } catch (e) { $app.replaceChildren(h("h1", {}, `Latent #${j}`)); return showError($app, e); }
  const a = d.annotation;
  const title = h("h1", { id: "latent-title" }, `Latent #${d.latent}`, a && a.name ? ` — ${a.name}` : "", " ", statusPill(a && a.status));
  const nav = h("p", {}, d.latent > 0 ? h("a", { href: `#/latent/${d.latent - 1}` }, "← previous") : "", "  ",
    d.latent < d.n_latents - 1 ? h("a", { href: `#/latent/${d.latent + 1}` }, "next →") : "");

  // stats table
  const statsT = h("table", {}, h("tr", {}, ...["dataset", "freq (images)", "freq (tokens)", "mean act (image, when firing)", "max act (any token)", "label entropy (nats, top-k)", "top class"].map(t => h("th", {}, t))),
    ...d.stats.map(s => h("tr", {}, h("td", {}, s.dataset), h("td", { class: "num" }, fmt(s.freq_image)), h("td", { class: "num" }, fmt(s.freq_token)),
      h("td", { class: "num" }, fmt(s.mean_act)), h("td", { class: "num" }, fmt(s.max_act)), h("td", { class: "num" }, fmt(s.label_entropy, 2)),
      h("td", {}, s.top_label || "–", s.noisy ? " (noisy)" : ""))));

  const annot = annotationForm(d.latent, a, title);
  const modeSel = h("select", { id: "overlay-mode" }, h("option", { value: "overlay" }, "heatmap overlay"), h("option", { value: "mask" }, "mask (dim where silent)"), h("option", { value: "off" }, "off"));
  const topWrap = h("div", { id: "top-images" });
  const described = d.description ? h("p", { id: "latent-description", class: "caption" }, "Automatic description (measured facts, `cytosae describe`): ", h("strong", {}, d.description.text)) : "";
  $app.replaceChildren(title, nav, described, h("div", { class: "row" }, h("div", {}, h("h2", {}, "Statistics"), statsT), h("div", { class: "card" }, h("h2", {}, "Annotation"), annot)),
    h("h2", {}, "Top images ", h("label", { class: "muted" }, " overlay: ", modeSel)),
    h("p", { class: "caption" }, d.measured.top_images + ". Overlay: this latent's activation on each of the 16×16 patches (scaled to the image's maximum), on the image resized as the model saw it."),
    topWrap);
  const canvases = [];
  modeSel.addEventListener("change", () => canvases.forEach(([c, it]) => drawHeat(c, it.values, it.grid, modeSel.value, null, it.patch)));
  for (const [ds, byMap] of Object.entries(d.top_images)) {
    for (const by of ["image", "patch"]) {
      const list = byMap[by]; if (!list || !list.length) continue;
      const tiles = h("div", { class: "tiles" });
      topWrap.append(h("h3", {}, `${ds} — ranked by ${by === "image" ? "image activation (mean over patches)" : "best patch activation"}`), tiles);
      const byId = {};
      for (const it of list) {
        const img = h("img", { src: fileUrl(u("image/file", { dataset: ds, image_id: it.image_id })), alt: it.image_id, loading: "lazy" });
        const cv = h("canvas", { width: 224, height: 224, class: "heat", "data-image": it.image_id });
        byId[it.image_id] = cv;
        tiles.append(h("div", { class: "tile" }, h("a", { href: `#/image?dataset=${encodeURIComponent(ds)}&id=${encodeURIComponent(it.image_id)}&latent=${d.latent}`, class: "imgwrap" }, img, cv),
          h("div", { class: "id", title: it.image_id }, `${it.label || ""} · ${fmt(it.value)}`), idCaption(it.image_id)));
      }
      api(u(`latents/${d.latent}/heatmaps`, { by, dataset: ds })).then(hm => {
        for (const it of hm.items) { const cv = byId[it.image_id]; if (!cv) continue;
          it.patch = by === "patch" ? it.patch : -1; canvases.push([cv, it]); drawHeat(cv, it.values, it.grid, modeSel.value, null, it.patch); }
      }).catch(e => showError(tiles, e));
    }
  }
  if (!Object.keys(d.top_images).length) topWrap.append(h("p", { class: "muted" }, "No top-image table in this run (run `cytosae stats`)."));

  // class profile + histogram, one row per dataset
  const prof = h("div", {});
  for (const ds of new Set([...Object.keys(d.class_profile), ...Object.keys(d.histogram)])) {
    const row = h("div", { class: "row" });
    const rows = d.class_profile[ds];
    if (rows) row.append(h("div", { class: "card chart" }, h("h3", {}, `Class profile — ${ds}`),
      barChart([...rows].sort((a, b) => b.freq - a.freq), { label: r => r.class, value: r => r.freq, valueFmt: v => (100 * v).toFixed(0) + "%", title: "class profile" }),
      h("p", { class: "caption" }, d.measured.class_profile + " (bars: fraction of the class's images where it fires).")));
    const hg = d.histogram[ds];
    if (hg) row.append(h("div", { class: "card chart" }, h("h3", {}, `Activation histogram — ${ds}`), histogram(hg.bin_edges, hg.counts),
      h("p", { class: "caption" }, d.measured.histogram + " (x: activation, y: number of images).")));
    prof.append(row);
  }
  $app.append(h("h2", {}, "Class profile and activation distribution"), prof);
  if (d.class_ap) $app.append(classApTable(d.class_ap));

  // patients + neighbours
  const pt = d.patients.length ? h("table", { id: "patients-table" }, h("tr", {}, ...["patient", "diagnosis", "fraction of cells", "cells", "× mean"].map(t => h("th", {}, t))),
    ...d.patients.map(p => h("tr", {}, h("td", {}, p.patient_id), h("td", {}, p.diagnosis || "–"), h("td", { class: "num" }, fmt(p.frac, 2)),
      h("td", { class: "num" }, p.n_cells), h("td", { class: "num" }, fmt(p.enrichment, 1))))) : h("p", { class: "muted" }, "No patient barcodes in this run.");
  const cmp = d.compare.length ? h("table", {}, h("tr", {}, ...["groups", "effect", "p", "q"].map(t => h("th", {}, t))),
    ...d.compare.map(c => h("tr", {}, h("td", {}, `${c.group_a} vs ${c.group_b}`), h("td", { class: "num" }, fmt(c.effect)), h("td", { class: "num" }, fmt(c.p)), h("td", { class: "num" }, fmt(c.q))))) : "";
  const nb = h("table", { id: "neighbours" }, h("tr", {}, h("th", {}, "latent"), h("th", {}, "cosine")),
    ...d.neighbours.map(n => h("tr", {}, h("td", {}, latentLink(n.latent, n.name)), h("td", { class: "num" }, fmt(n.cosine)))));
  $app.append(h("div", { class: "row" },
    h("div", {}, h("h2", {}, "Patients where it is enriched"), pt, h("p", { class: "caption" }, d.measured.patients + "; × mean = fraction / mean fraction over patients."), cmp),
    h("div", {}, h("h2", {}, "Neighbours"), nb, h("p", { class: "caption" }, d.measured.neighbours + (d.neighbours_error ? ` (${d.neighbours_error})` : "")))));
}

function annotationForm(latent, a, titleEl) {
  a = a || { name: "", tags: [], note: "", status: "unreviewed", author: "" };
  const f = h("form", { class: "annot", id: "annotation-form" },
    h("label", { for: "a-name" }, "name"), h("input", { id: "a-name", value: a.name, maxlength: 200 }),
    h("label", { for: "a-tags" }, "tags"), h("input", { id: "a-tags", value: (a.tags || []).join(", "), placeholder: "comma separated" }),
    h("label", { for: "a-status" }, "status"), h("select", { id: "a-status" }, ...(state.run.statuses || ["unreviewed", "validated", "rejected"]).map(s => h("option", { value: s, selected: s === a.status }, s))),
    h("label", { for: "a-note" }, "note"), h("textarea", { id: "a-note", maxlength: 10000 }, a.note),
    h("label", { for: "a-author" }, "author"), h("input", { id: "a-author", value: a.author || localStorage.getItem("cytosae-author") || "" }),
    h("span"), h("div", {}, h("button", { type: "submit", id: "a-save", disabled: STATIC || !!state.run.annotations_error }, "Save"), " ", h("span", { id: "a-msg", class: "muted" }, STATIC ? "static report: read-only" : state.run.annotations_error ? "read-only: annotations.sqlite is damaged (see the banner)" : (a.updated ? `saved ${a.updated}` : ""))));
  f.addEventListener("submit", async ev => {
    ev.preventDefault();
    const msg = f.querySelector("#a-msg");
    const body = { name: f.querySelector("#a-name").value, tags: f.querySelector("#a-tags").value.split(",").map(s => s.trim()).filter(Boolean),
      note: f.querySelector("#a-note").value, status: f.querySelector("#a-status").value, author: f.querySelector("#a-author").value };
    localStorage.setItem("cytosae-author", body.author);
    try {
      const saved = await api(u(`annotations/${latent}`, {}), { method: "PUT", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
      msg.className = "ok"; msg.textContent = `saved ${saved.updated}`;
      titleEl.replaceChildren(`Latent #${latent}`, saved.name ? ` — ${saved.name}` : "", " ", statusPill(saved.status));
      state.overview = {};  // names and statuses changed
    } catch (e) { msg.className = "error"; msg.textContent = e.message; }
  });
  return f;
}

// ---------------------------------------------------------------- image page
async function viewImage(params) {
  const run = state.run;
  const ds = params.get("dataset") || (run.datasets[0] || {}).name;
  const imageId = params.get("id"), uploadId = params.get("upload");
  const picker = h("div", { class: "card picker" }, h("h2", {}, "Pick an image"));
  const dsSel = h("select", { id: "img-dataset" }, ...run.datasets.map(d => h("option", { value: d.name, selected: d.name === ds }, d.name)));
  dsSel.addEventListener("change", () => { location.hash = `#/image?dataset=${encodeURIComponent(dsSel.value)}`; });
  const list = h("div", { class: "lat-list", id: "image-list" });
  const labels = ((run.datasets.find(d => d.name === ds) || {}).labels || []);
  const labelSel = h("select", { id: "img-label" }, h("option", { value: "" }, "all classes"), ...labels.map(l => h("option", { value: l }, l)));
  const qIn = h("input", { id: "img-q", type: "search", placeholder: "image id contains", disabled: STATIC });
  picker.append(h("div", { class: "controls" }, dsSel, labelSel, qIn), list);
  if (!STATIC) {
    const fileIn = h("input", { type: "file", id: "upload-file", accept: "image/png,image/jpeg,image/tiff,image/bmp,image/webp" });
    const upMsg = h("p", { class: "muted", id: "upload-msg" }, "or upload a cell image (≤ 10 MB)");
    fileIn.addEventListener("change", async () => {
      if (!fileIn.files.length) return;
      const fd = new FormData(); fd.append("file", fileIn.files[0]);
      upMsg.className = "muted"; upMsg.textContent = "encoding…";
      try { const r = await api(u("uploads", {}), { method: "POST", body: fd }); state.lastUpload = r; location.hash = `#/image?upload=${r.upload_id}`; }
      catch (e) { upMsg.className = "error"; upMsg.textContent = e.message; }
    });
    picker.append(h("h3", {}, "Upload"), fileIn, upMsg);
  }
  const main = h("div", { id: "image-main" });
  $app.replaceChildren(h("h1", {}, "Image"), h("div", { class: "row" }, picker, main));
  const fill = () => api(u("images", STATIC ? { dataset: ds, limit: 200 } : { dataset: ds, limit: 200, label: labelSel.value, q: qIn.value.trim() })).then(r => {
    const rows = STATIC && labelSel.value ? r.images.filter(im => im.label === labelSel.value) : r.images;
    list.replaceChildren(h("p", { class: "muted" }, `${r.total} images` + (r.total > r.images.length ? ` (first ${r.images.length})` : "")));
    r = { ...r, images: rows };
    const included = STATIC ? new Set(window.CYTOSAE_STATIC.images.filter(x => x[0] === ds).map(x => x[1])) : null;
    if (STATIC) list.append(h("p", { class: "muted" }, `static report: ${included.size} of them have an image page`));
    for (const im of r.images) if (!included || included.has(im.image_id)) list.append(h("button", { class: imageId === im.image_id ? "active" : "",
      title: im.image_id, onclick: () => { location.hash = `#/image?dataset=${encodeURIComponent(ds)}&id=${encodeURIComponent(im.image_id)}`; } }, `${shortId(im.image_id)} · ${im.label || ""}`));
  }).catch(e => showError(list, e));
  labelSel.addEventListener("change", fill);
  let timer = null;
  qIn.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(fill, 250); });
  fill();
  if (!imageId && !uploadId) { main.append(h("p", { class: "muted" }, "Choose an image on the left to see which latents it activates.")); return; }

  let info, src;
  try {
    if (uploadId) {
      info = state.lastUpload && state.lastUpload.upload_id === uploadId ? state.lastUpload : null;
      if (!info) throw new Error("this upload is no longer available; upload the image again");
      src = { file: u(`uploads/${uploadId}/file`, {}), patch: p => u(`uploads/${uploadId}/patch`, { patch: p }), heat: l => u(`uploads/${uploadId}/heatmap`, { latent: l }) };
    } else {
      info = await api(u("image", { dataset: ds, image_id: imageId }));
      src = { file: u("image/file", { dataset: ds, image_id: imageId }), patch: p => u("image/patch", { dataset: ds, image_id: imageId, patch: p }),
        heat: l => u("image/heatmap", { dataset: ds, image_id: imageId, latent: l }) };
    }
  } catch (e) { return showError(main, e); }
  const grid = info.grid;
  const img = h("img", { src: fileUrl(src.file), alt: imageId || "upload" });
  const cv = h("canvas", { id: "image-canvas", width: 448, height: 448 });
  const modeSel = h("select", { id: "img-mode" }, h("option", { value: "overlay" }, "overlay"), h("option", { value: "mask" }, "mask"), h("option", { value: "off" }, "off"));
  const cur = { latent: null, values: null, patch: -1 };
  const heading = h("p", { id: "overlay-label", class: "muted" }, "Click a patch to list its latents; click a latent to overlay it.");
  const patchBox = h("div", { id: "patch-latents", class: "lat-list" });
  const redraw = () => drawHeat(cv, cur.values, grid, cur.values ? modeSel.value : "off", null, cur.patch);
  modeSel.addEventListener("change", redraw);
  async function overlay(latent) {
    cur.latent = latent;
    try { const r = await api(src.heat(latent)); cur.values = r.values;
      heading.replaceChildren("Overlay: ", latentLink(latent, ""), ` — activation per patch (max ${fmt(Math.max(...r.values))}; CLS ${fmt(r.cls)})`); redraw();
      document.querySelectorAll("#image-main .lat-list button").forEach(b => b.classList.toggle("active", b.dataset.latent === String(latent)));
    } catch (e) { heading.replaceChildren(h("span", { class: "error" }, e.message)); }
  }
  if (!grid) heading.textContent = "This store holds one embedding per image (no patch tokens): no patch map.";
  cv.addEventListener("click", async ev => {
    if (!grid) return;
    const b = cv.getBoundingClientRect();
    const col = Math.floor((ev.clientX - b.left) / b.width * grid), row = Math.floor((ev.clientY - b.top) / b.height * grid);
    cur.patch = Math.max(0, Math.min(grid - 1, row)) * grid + Math.max(0, Math.min(grid - 1, col)); redraw();
    patchBox.replaceChildren(h("p", { class: "muted" }, "loading…"));
    try { const r = await api(src.patch(cur.patch));
      patchBox.replaceChildren(h("h3", {}, `Patch ${cur.patch} (row ${r.row}, col ${r.col})`),
        ...(r.top.length ? r.top.map(t => latentButton(t, overlay)) : [h("p", { class: "muted" }, "no latent fires on this patch")]));
      if (r.top.length) overlay(r.top[0].latent);
    } catch (e) { patchBox.replaceChildren(h("p", { class: "error" }, e.message)); }
  });
  const meta = info.meta ? Object.entries(info.meta).filter(([k]) => k !== "image_id").map(([k, v]) => `${k}: ${v}`).join(" · ") : `uploaded ${info.filename || ""} (${info.size.join("×")} px)` + (info.encoded_with ? ` · encoded with ${info.encoded_with}` : "");
  main.append(h("h2", { class: "image-id", title: imageId || "" }, imageId || "uploaded image"), h("p", { class: "muted" }, meta),
    h("div", { class: "row" },
      h("div", {}, h("div", { class: "viewer" }, img, cv), h("label", { class: "muted" }, "display: ", modeSel), heading,
        h("p", { class: "caption" }, `Image as the model saw it (${grid}×${grid} patches). Overlay = SAE latent activation per patch token, scaled to its maximum on this image.`)),
      h("div", { class: "card" }, h("h3", {}, "Top latents (CLS token)"), h("div", { class: "lat-list", id: "top-cls" }, ...info.top_cls.map(t => latentButton(t, overlay))),
        h("h3", {}, "Top latents (strongest patch)"), h("div", { class: "lat-list", id: "top-patch" }, ...info.top_patch_max.map(t => latentButton(t, overlay))),
        h("p", { class: "caption" }, info.measured)),
      h("div", { class: "card" }, patchBox)));
  const want = params.get("latent");
  if (!grid) return;
  if (want !== null) overlay(Number(want)); else if (info.top_patch_max.length) overlay(info.top_patch_max[0].latent);
}
function latentButton(t, onpick) {
  const b = h("button", { "data-latent": t.latent, onclick: () => onpick(t.latent), ondblclick: () => { location.hash = `#/latent/${t.latent}`; } },
    `#${t.latent}  ${fmt(t.value)}` + (t.patches !== undefined ? `  (${t.patches} patches)` : ""));
  b.title = "click: overlay · double-click: open latent page";
  return b;
}

// ---------------------------------------------------------------- patients page
async function viewPatients() {
  $app.replaceChildren(h("h1", {}, "Patients"));
  const bcBox = h("div", { id: "barcodes" }), volBox = h("div", { id: "volcano" }), clsBox = h("div", { id: "classify" });
  $app.append(h("h2", {}, "Patient barcodes"), bcBox, h("h2", {}, "Disease comparison"), volBox, h("h2", {}, "Diagnosis classifiers"), clsBox);
  const cellsBox = h("div", { id: "patient-cells" });
  bcBox.after(cellsBox);
  api(u("patients/barcodes", {})).then(r => { drawBarcodes(bcBox, r); hookPatientCells(bcBox, r, cellsBox); }).catch(e => showError(bcBox, e));
  const loadVolcano = (a, b) => api(u("patients/compare", { group_a: a, group_b: b })).then(r => {
    volBox.replaceChildren();
    if (r.pairs.length > 1) {
      const sel = h("select", { id: "compare-pair" }, ...r.pairs.map(([pa, pb]) => h("option", { value: `${pa}\u0000${pb}`, selected: pa === r.group_a && pb === r.group_b }, `${pa} vs ${pb}`)));
      sel.addEventListener("change", () => { const [pa, pb] = sel.value.split("\u0000"); loadVolcano(pa, pb); });
      volBox.append(h("label", { class: "muted" }, "comparison: ", sel));
    }
    drawVolcano(volBox, r);
  }).catch(e => showError(volBox, e));
  loadVolcano(null, null);
  api(u("classify", {})).then(r => drawClassify(clsBox, r)).catch(e => showError(clsBox, e));
}
// Click a patient's name in the barcodes: its cells ranked by MIL attention (classify/attention.parquet).
function hookPatientCells(bcBox, r, box) {
  const cv = bcBox.querySelector("canvas"), rh = 14, L = 170;
  if (!cv) return;
  const show = (pid, model) => api(u(`patients/${encodeURIComponent(pid)}/cells`, model ? { model } : {})).then(d => {
    const sel = h("select", { id: "attention-model" }, ...d.models.map(m => h("option", { value: m, selected: m === d.model }, m)));
    sel.addEventListener("change", () => show(pid, sel.value));
    const cells = d.cells.map(c => h("figure", { class: "thumb" },
      d.dataset ? h("img", { src: fileUrl(u("image/file", { dataset: d.dataset, image_id: c.image_id })), alt: c.image_id, loading: "lazy" }) : "",
      h("figcaption", { title: c.image_id }, `#${c.rank + 1} · ${fmt(c.attention, 3)}`)));
    box.replaceChildren(h("h3", {}, `Cells of ${pid} by attention (predicted ${d.cells[0].predicted})`), h("label", { class: "muted" }, "model: ", sel),
      h("div", { class: "gallery" }, ...cells), h("p", { class: "caption" }, `${d.measured}; ${d.n_cells} cells, ${d.cells.length} shown.`));
  }).catch(e => showError(box, e));
  cv.addEventListener("click", ev => { const b = cv.getBoundingClientRect(); const i = Math.floor((ev.clientY - b.top) / rh);
    if (ev.clientX - b.left < L && i >= 0 && i < r.patients.length) show(r.patients[i].patient_id); });
}
function drawBarcodes(box, r) {
  const rows = r.patients.length, cols = r.latents.length, cw = Math.max(4, Math.min(18, Math.floor(900 / Math.max(1, cols)))), rh = 14, L = 170;
  const cv = h("canvas", { class: "plot", width: L + cols * cw + 10, height: rows * rh + 30 });
  const ctx = cv.getContext("2d"); ctx.font = "11px sans-serif";
  r.patients.forEach((p, i) => {
    ctx.fillStyle = "#333"; ctx.fillText(`${p.patient_id} (${p.diagnosis || "?"})`.slice(0, 26), 2, i * rh + 11);
    r.frac[i].forEach((v, j) => { ctx.fillStyle = `rgba(123,30,58,${Math.min(1, v)})`; ctx.fillRect(L + j * cw, i * rh, cw - 1, rh - 1); });
  });
  cv.addEventListener("mousemove", ev => { const b = cv.getBoundingClientRect(); const j = Math.floor((ev.clientX - b.left - L) / cw), i = Math.floor((ev.clientY - b.top) / rh);
    if (i >= 0 && i < rows && j >= 0 && j < cols) showTip(ev, `${r.patients[i].patient_id} · latent #${r.latents[j]} · ${fmt(r.frac[i][j], 2)}`); else hideTip(); });
  cv.addEventListener("mouseleave", hideTip);
  cv.addEventListener("click", ev => { const b = cv.getBoundingClientRect(); const j = Math.floor((ev.clientX - b.left - L) / cw); if (j >= 0 && j < cols) location.hash = `#/latent/${r.latents[j]}`; });
  const on = patientsPolicy();
  box.append(cv, h("p", { class: "caption" }, `${r.measured}${on}; colour: white = 0 → dark red = 1; rows = patients (sorted by diagnosis), columns = the ${cols} latents that vary most between patients. Click a column to open the latent.`));
}
// patients/summary.json as write_patients writes it: how a cell counts as firing
function patientsPolicy() {
  const s = state.run.patients_summary || {};
  return (s.token_policy ? ` (a cell fires when its ${s.token_policy} activation` : "") +
    (s.token_policy ? ` > ${typeof s.threshold === "number" ? s.threshold : 0})` : "");
}
function drawVolcano(box, r) {
  const C = r.columns, W = 640, H = 380, P = 44;
  const xs = C.effect, ys = C.q.map(q => q === null ? null : -Math.log10(Math.max(q, 1e-300)));
  const xm = Math.max(1e-9, ...xs.filter(v => v !== null).map(Math.abs)), ym = Math.max(1.5, ...ys.filter(v => v !== null));
  const sx = v => P + (v + xm) / (2 * xm) * (W - P - 10), sy = v => H - P - v / ym * (H - P - 10);
  const cv = h("canvas", { class: "plot", width: W, height: H, id: "volcano-canvas" }); const ctx = cv.getContext("2d");
  ctx.strokeStyle = "#999"; ctx.beginPath(); ctx.moveTo(P, H - P); ctx.lineTo(W - 10, H - P); ctx.moveTo(sx(0), 10); ctx.lineTo(sx(0), H - P); ctx.stroke();
  ctx.setLineDash([4, 4]); ctx.beginPath(); ctx.moveTo(P, sy(-Math.log10(0.05))); ctx.lineTo(W - 10, sy(-Math.log10(0.05))); ctx.stroke(); ctx.setLineDash([]);
  ctx.fillStyle = "#555"; ctx.font = "11px sans-serif";
  ctx.fillText(`effect (${r.group_a} − ${r.group_b})`, W / 2 - 60, H - 8); ctx.fillText("-log10 q", 2, 12); ctx.fillText("q = 0.05", W - 60, sy(-Math.log10(0.05)) - 3);
  ctx.fillText(fmt(-xm, 2), P, H - P + 14); ctx.fillText(fmt(xm, 2), W - 40, H - P + 14);
  for (let i = 0; i < C.latent.length; i++) { if (xs[i] === null || ys[i] === null) continue;
    ctx.fillStyle = C.q[i] < 0.05 ? "#7b1e3a" : "#9aa3b5"; ctx.fillRect(sx(xs[i]) - 2, sy(ys[i]) - 2, 4, 4); }
  const near = ev => { const b = cv.getBoundingClientRect(), mx = (ev.clientX - b.left) * W / b.width, my = (ev.clientY - b.top) * H / b.height; let best = -1, bd = 49;
    for (let i = 0; i < C.latent.length; i++) { if (xs[i] === null || ys[i] === null) continue; const d = (sx(xs[i]) - mx) ** 2 + (sy(ys[i]) - my) ** 2; if (d < bd) { bd = d; best = i; } } return best; };
  cv.addEventListener("mousemove", ev => { const i = near(ev); if (i < 0) return hideTip(); showTip(ev, `#${C.latent[i]} · effect ${fmt(xs[i])} · q ${fmt(C.q[i])}`); });
  cv.addEventListener("mouseleave", hideTip);
  cv.addEventListener("click", ev => { const i = near(ev); if (i >= 0) { hideTip(); location.hash = `#/latent/${C.latent[i]}`; } });
  box.append(h("p", { class: "muted" }, `${r.group_a} vs ${r.group_b}: ${r.n} latents`), cv,
    h("p", { class: "caption" }, (typeof r.measured === "string" ? r.measured : JSON.stringify(r.measured)) + patientsPolicy() +
      ". x: effect, y: −log10 q; dark red = q < 0.05. Click a dot to open the latent."));
}
function drawClassify(box, r) {
  const models = r.models || r;
  const rows = Object.entries(models).filter(([, v]) => v && typeof v === "object" && "macro_f1" in v);
  if (!rows.length) { box.append(h("pre", {}, JSON.stringify(r, null, 1))); return; }
  box.append(h("table", { id: "classify-table" }, h("tr", {}, ...["model", "macro F1", "AUROC", "AUROC CI", "folds × repeats"].map(t => h("th", {}, t))),
    ...rows.map(([name, v]) => h("tr", {}, h("td", {}, name), h("td", { class: "num" }, fmt(v.macro_f1)), h("td", { class: "num" }, fmt(v.auroc)),
      h("td", {}, v.auroc_ci ? `${fmt(v.auroc_ci[0], 2)}–${fmt(v.auroc_ci[1], 2)}` : "–"), h("td", {}, `${v.folds ?? "?"} × ${v.repeats ?? "?"}`)))),
    h("p", { class: "caption" }, `Patient-level diagnosis prediction${r.dataset ? " on " + r.dataset : ""}: cross-validated macro F1 and AUROC (with confidence interval), from classify/results.json.`));
}

// ---------------------------------------------------------------- quality page: how good the SAE is
// Tables of plain figures, each column headed by its name and explained by the definitions the writers recorded.
function figureTable(id, rows, cols, opts = {}) {
  const cell = (r, c) => typeof r[c] === "number" ? h("td", { class: "num" }, Number.isInteger(r[c]) ? r[c] : fmt(r[c])) :
    (c === "best_latent" ? h("td", {}, latentLink(r[c])) : h("td", {}, r[c] === null || r[c] === undefined ? "–" : String(r[c])));
  return h("table", { id, class: "quality" }, h("tr", {}, ...cols.map(c => h("th", { title: (opts.defs || {})[c] || "" }, c))),
    ...rows.map(r => h("tr", {}, ...cols.map(c => cell(r, c)))));
}
function definitionList(defs) {
  return h("dl", { class: "definitions" }, ...Object.entries(defs || {}).flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, String(v))]));
}
// eval.json: one row per token group (all, cls, patch), one column per figure
function evalSection(id, doc) {
  const groups = ["all", "cls", "patch"].filter(g => doc[g] && typeof doc[g] === "object");
  const figs = [...new Set(groups.flatMap(g => Object.keys(doc[g])))];
  // the group's own figures include `tokens` (how many): the group's name goes in a column of its own
  return [figureTable(id, groups.map(g => ({ "token group": g, ...doc[g] })), ["token group", ...figs], { defs: doc.definitions }),
    definitionList(doc.definitions)];
}
// eval.spliced.json (analysis.spliced): final outputs of the spliced and control inputs vs clean, per token group,
// and downstream classifiers on the final CLS
function splicedSection(doc) {
  const out = doc.output || {}, rows = [];
  for (const input of ["spliced", "control"]) for (const g of ["cls", "patch"])
    if (out[input] && out[input][g]) rows.push({ input, tokens: g, ...out[input][g], fvu: input === "spliced" ? (doc.fvu || {})[g] : null });
  const down = [];
  for (const [col, e] of Object.entries(doc.downstream || {})) for (const model of ["knn", "probe"])
    if (e[model]) down.push({ label: col, model, ...e[model], n_images: e.n_images, n_classes: e.n_classes });
  return [h("h3", {}, "Spliced into the backbone"),
    h("p", { class: "caption" }, `the SAE's reconstruction run through the rest of ${(doc.backbone || {}).name || "the backbone"} instead of the clean tokens (control: the token-group means), on ${doc.n_images} images:`),
    figureTable("spliced-table", rows, ["input", "tokens", "cosine", "relative_l2", "fvu"]),
    down.length ? figureTable("spliced-downstream", down, ["label", "model", "clean", "spliced", "control", "recovered", "n_images", "n_classes"]) : "",
    definitionList(doc.definitions)];
}
async function viewQuality() {
  $app.replaceChildren(h("h1", {}, "SAE quality"));
  const q = await api(u("quality", {}));
  if (q.evaluate) $app.append(h("h2", {}, "Reconstruction and sparsity"), h("p", { class: "caption" }, `cytosae evaluate on ${q.evaluate.dataset || q.evaluate.store || "the run's store"} (sae/eval.json), per token group:`),
    ...evalSection("eval-table", q.evaluate));
  if (q.spliced) $app.append(...splicedSection(q.spliced));
  const a = q.alignment;
  if (a) {
    const tcols = ["method", "n_scores", "n_classes", "mean_best_ap", "mean_best_auroc", "mean_purity@16", "mean_coverage@0.3"];
    const ccols = ["method", "class", "n_images", "best_latent", "ap", "auroc", "prevalence", "purity@16", "coverage@0.3"];
    const pcols = ["method", "m", "balanced_accuracy", "auroc", "n_classes"];
    $app.append(h("h2", {}, "Label alignment: SAE vs baselines"),
      h("p", { class: "caption" }, `cytosae align on ${a.dataset}: ${a.n_labelled} labelled of ${a.n_images} images, ${(a.classes || []).length} classes (${a.label_column}), token policy ${a.token_policy}; per class the best score's figures, mean over classes:`),
      figureTable("alignment-table", a.table, tcols.filter(c => a.table.length && c in a.table[0])),
      h("h3", {}, "Per class"), figureTable("alignment-classes", a.per_class, ccols.filter(c => a.per_class.length && c in a.per_class[0])),
      h("pre", { class: "definitions" }, a.definitions || ""),
      h("h2", {}, "Sparse probing"), h("p", { class: "caption" }, `Folds: ${a.probing.folds || "–"}; mean over classes:`),
      a.probing.table && a.probing.table.length ? figureTable("probing-table", a.probing.table, pcols.filter(c => c in a.probing.table[0])) : h("p", { class: "muted" }, "not measured"),
      h("pre", { class: "definitions" }, a.probing.definitions || ""));
  }
  if (q.missing.length) $app.append(h("h2", {}, "Not in this run"), h("ul", { id: "quality-missing" }, ...q.missing.map(m => h("li", { class: "muted" }, m))));
}
function classApTable(c) {
  const rows = [...c.classes].sort((x, y) => (y.ap ?? -1) - (x.ap ?? -1));
  return h("div", {}, h("h2", {}, "Average precision per class"),
    h("p", {}, "best class: ", h("strong", { id: "best-class" }, c.best_class || "–")),
    h("table", { id: "class-ap" }, h("tr", {}, ...["class", "AP", "chance AP (prevalence)", "AUROC"].map(t => h("th", {}, t))),
      ...rows.map(r => h("tr", { class: r.best ? "best" : "" }, h("td", {}, r.class), h("td", { class: "num" }, fmt(r.ap)), h("td", { class: "num" }, fmt(r.prevalence)), h("td", { class: "num" }, fmt(r.auroc))))),
    h("p", { class: "caption" }, `${c.measured}${c.dataset ? "; on " + c.dataset : ""}${c.token_policy ? ", token policy " + c.token_policy : ""}.`));
}

// ---------------------------------------------------------------- router
async function route() {
  const { parts, params } = parseHash();
  const page = parts[0] || "overview";
  document.querySelectorAll("nav a").forEach(a => a.classList.toggle("active", a.dataset.nav === page || (page === "latent" && a.dataset.nav === "overview")));
  hideTip();
  try {
    if (page === "latent") {
      const j = Number(parts[1]);
      if (!Number.isInteger(j) || j < 0) { $app.replaceChildren(h("p", { class: "error" }, `not a latent id: ${parts[1]}`)); return; }
      await viewLatent(j);
    } else if (page === "image") await viewImage(params);
    else if (page === "patients") await viewPatients();
    else if (page === "quality") await viewQuality();
    else await viewOverview(params);
  } catch (e) { showError($app, e); }
}
document.getElementById("global-search").addEventListener("submit", async ev => {
  ev.preventDefault();
  const q = document.getElementById("global-q").value.trim(); if (!q) return;
  if (/^#?\d+$/.test(q)) { location.hash = `#/latent/${q.replace("#", "")}`; return; }
  if (STATIC) {  // no server to search: look through the names already in the overview table
    const ov = Object.values(state.overview)[0] || await api(u("latents", { dataset: state.run.datasets[0].name }));
    const hits = ov.columns.latent.map((j, i) => [j, ov.columns.name[i]]).filter(([, n]) => n && n.toLowerCase().includes(q.toLowerCase()));
    $app.replaceChildren(h("h1", {}, `Search: ${q}`), hits.length ? h("ul", {}, ...hits.map(([j, n]) => h("li", {}, latentLink(j, n)))) : h("p", { class: "muted" }, "no latent matches"));
    return;
  }
  try { const r = await api(u("search", { q }));
    $app.replaceChildren(h("h1", {}, `Search: ${q}`), r.results.length ? h("ul", {}, ...r.results.map(x => h("li", {}, latentLink(x.latent, x.name), ` (${x.match})`, x.description ? h("span", { class: "muted" }, " — " + x.description) : ""))) : h("p", { class: "muted" }, "no latent matches"));
  } catch (e) { showError($app, e); }
});
(async function start() {
  if (STATIC) document.getElementById("validate-link").remove();  // answers need the server
  try { state.run = await api(u("run", {})); }
  catch (e) { $app.replaceChildren(h("p", { class: "error" }, "cannot read the run: " + e.message)); return; }
  const sae = state.run.shown_sae;
  document.getElementById("run-name").textContent = `${state.run.run} · SAE ${sae.name} · ${state.run.n_latents} latents · ${state.run.datasets.map(d => d.name).join(", ")}`;
  if (sae.sweep || !sae.default) {  // one SAE of several: say which on every page, and when its own analyses are missing
    $app.before(h("p", { class: "banner info", id: "sae-banner" }, "Showing " + sae.title + (sae.note ? ". " + sae.note : "")));
  }
  if (!STATIC) document.title = "cytosae explorer: " + sae.title;
  if (state.run.annotations_error) {  // damaged annotations.sqlite: say so on every page, the explorer is read-only
    $app.before(h("p", { class: "banner error", id: "annotations-banner", role: "alert" }, "Annotations are read-only: " + state.run.annotations_error));
  }
  window.addEventListener("hashchange", route);
  route();
})();

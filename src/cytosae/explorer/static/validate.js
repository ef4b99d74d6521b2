/* cytosae expert validation: an expert judges latents one at a time, blinded to other experts' answers and
   names, to the annotations and (until they switch it on) to the automatic description. The name is kept in
   this browser (localStorage) so a reload resumes the session; answers live on the server, saved as given.
   A few helpers repeat app.js's: that script draws the explorer's pages as soon as it loads. */
"use strict";

const $app = document.getElementById("app");
const EXPERT_KEY = "cytosae.validation.expert";
const ANSWERS = [["coherent", "Coherent"], ["not_coherent", "Not coherent"], ["unsure", "Unsure"]];

function q(path, params) {
  const s = new URLSearchParams(Object.entries(params || {}).filter(([, v]) => v !== null && v !== undefined));
  return "api/" + path + (String(s) ? "?" + s : "");
}
async function api(url, opts) {
  const r = await fetch(url, opts);
  const body = await r.json().catch(() => ({}));
  if (!r.ok) {
    const d = body.detail;
    const err = new Error(`${r.status}: ${typeof d === "string" ? d : JSON.stringify(d)}`);
    err.status = r.status;
    throw err;
  }
  return body;
}
const send = (method, path, body) => api(q(path), { method, headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
function message(text, cls) { return h("p", { id: "v-msg", class: cls || "muted", role: cls === "error" ? "alert" : null }, text); }

// ---------------------------------------------------------------- start: the expert's name, once
function viewStart(error) {
  const name = h("input", { id: "v-expert", required: true, maxlength: 100, autocomplete: "name" });
  const n = h("input", { id: "v-n", type: "number", min: 1, placeholder: "all" });
  const form = h("form", { class: "annot", id: "v-start" },
    h("label", { for: "v-expert" }, "Your name"), name,
    h("label", { for: "v-n" }, "Latents"), n,
    h("span", {}), h("button", { id: "v-begin", type: "submit" }, "Start"));
  form.addEventListener("submit", async ev => {
    ev.preventDefault();
    try {
      const s = await send("POST", "validation/session", { expert: name.value, n: n.value ? Number(n.value) : null });
      localStorage.setItem(EXPERT_KEY, s.expert);
      await show(s.expert, null);
      if (!s.started) document.getElementById("v-who").after(message(`Welcome back: your session of ${s.n} latents resumes here.`, "ok"));
    } catch (e) { form.after(message(e.message, "error")); }
  });
  $app.replaceChildren(h("h1", {}, "Expert validation"),
    h("p", { class: "caption" }, "You will see latents one at a time, each by the images that activate it most, and judge whether " +
      "they show one coherent concept. Other experts' answers and names are not shown. The sample of latents is the same " +
      "for every expert asking for the same number; the order is your own. Your answers are saved as you give them; " +
      "coming back with the same name resumes where you stopped."), form, error ? message(error, "error") : "");
}

// ---------------------------------------------------------------- one latent
async function show(expert, position) {
  let s;
  try { s = await api(q("validation/session", { expert })); }
  catch (e) { if (e.status === 404) { localStorage.removeItem(EXPERT_KEY); return viewStart(); } throw e; }
  const switchLink = h("a", { href: "#", id: "v-switch", onclick: ev => { ev.preventDefault(); localStorage.removeItem(EXPERT_KEY); viewStart(); } }, "not you?");
  const head = [h("h1", {}, "Expert validation"), h("p", { id: "v-who" }, `Expert: ${s.expert} · `, switchLink)];
  if (position === null || position === undefined) {
    if (s.next === null) {
      return $app.replaceChildren(...head, h("p", { id: "v-done", class: "ok" }, `All ${s.n} latents judged. Thank you.`),
        h("button", { id: "v-review", onclick: () => show(expert, s.n - 1) }, "review your answers"));
    }
    position = s.next;
  }
  const d = await api(q("validation/item", { expert, position }));
  const a = d.answer;
  const progress = h("p", { id: "v-progress" }, `Latent ${position + 1} of ${d.session.n} (#${d.latent}) · ${d.session.answered} judged`);
  const name = h("input", { id: "v-name", maxlength: 200, placeholder: "what it shows (optional)", value: a ? a.name : "" });
  const descBox = h("p", { id: "v-desc", class: "muted", hidden: true });
  const toggle = h("input", { id: "v-desc-toggle", type: "checkbox" });
  toggle.addEventListener("change", async () => {
    descBox.hidden = !toggle.checked;
    if (!toggle.checked || descBox.dataset.loaded) return;
    try { const r = await api(q(`validation/description/${d.latent}`));
      descBox.textContent = r.text + (r.best_class ? ` (best class: ${r.best_class})` : ""); descBox.dataset.loaded = "1"; }
    catch (e) { descBox.textContent = e.status === 404 ? e.message.replace(/^404: /, "") : e.message; }
  });
  const buttons = ANSWERS.map(([value, label]) => h("button", { id: "v-" + value.replace("_", "-"), type: "button",
    class: a && a.answer === value ? "active" : null, "aria-pressed": a && a.answer === value ? "true" : "false",
    onclick: () => answer(expert, d, value, name.value, toggle.checked) }, label));
  const nav = h("p", {},
    position > 0 ? h("button", { id: "v-prev", type: "button", onclick: () => show(expert, position - 1) }, "← previous") : "", " ",
    position < d.session.n - 1 ? h("button", { id: "v-next", type: "button", onclick: () => show(expert, position + 1) }, "next →") : "");
  const gallery = h("div", { id: "v-images" });
  $app.replaceChildren(...head, progress,
    h("div", { class: "card", id: "v-answer" }, h("div", { class: "row" }, ...buttons), h("p", {}, name),
      h("label", {}, toggle, " show the automatic description"), descBox,
      a ? h("p", { id: "v-saved", class: "ok" }, `your answer: ${a.answer.replace("_", " ")}`) : ""),
    nav, gallery);
  drawImages(gallery, d);
}

function drawImages(box, d) {
  const groups = Object.entries(d.top_images);
  if (!groups.length) { box.append(h("p", { class: "muted" }, "This latent has no top images.")); return; }
  for (const [ds, byMap] of groups) {
    for (const by of ["image", "patch"]) {
      const list = byMap[by]; if (!list || !list.length) continue;
      const tiles = h("div", { class: "tiles" }), canv = {};
      box.append(h("h3", {}, `${ds}: ranked by ${by === "image" ? "image activation" : "best patch"}`), tiles);
      for (const it of list) {
        const cv = h("canvas", { width: 224, height: 224, class: "heat" });
        canv[it.image_id] = cv;
        // no caption: image ids are often class folders, which would tell the expert the label
        tiles.append(h("div", { class: "tile" }, h("span", { class: "imgwrap" },
          h("img", { src: q("image/file", { dataset: ds, image_id: it.image_id }), alt: "cell image" }), cv)));
      }
      api(q(`latents/${d.latent}/heatmaps`, { dataset: ds, by, k: list.length })).then(hm => {
        for (const it of hm.items) if (canv[it.image_id]) drawHeat(canv[it.image_id], it.values, it.grid, "overlay", null, by === "patch" ? it.patch : -1);
      }).catch(e => tiles.after(message(e.message, "error")));
    }
  }
}

// after an answer: the first latent still without one (or the end), the place a reload would resume at too
async function answer(expert, d, value, name, sawDescription) {
  try {
    await send("PUT", "validation/answer", { expert, latent: d.latent, answer: value, name, saw_description: sawDescription });
  } catch (e) { document.getElementById("v-answer").append(message(e.message, "error")); return; }
  await show(expert, null);
}

(async function start() {
  try {
    const run = await api(q("run"));
    document.getElementById("run-name").textContent = `${run.run} · ${run.n_latents} latents`;
    if (run.annotations_error) $app.before(h("p", { class: "banner error", id: "annotations-banner", role: "alert" }, "Answers are read-only: " + run.annotations_error));
    const expert = localStorage.getItem(EXPERT_KEY);
    if (expert) await show(expert, null); else viewStart();
  } catch (e) { $app.replaceChildren(h("p", { class: "error" }, e.message)); }
})();

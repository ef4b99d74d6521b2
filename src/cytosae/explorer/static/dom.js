// What both pages (index.html: app.js, validate.html: validate.js) draw with: elements and patch heatmaps.
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c.nodeType ? c : String(c));
  return el;
}
function heatColor(t) {
  const r = 255, g = Math.round(255 * Math.max(0, t * 1.6 - 0.6)), b = 0;
  return `rgba(${r},${g},${b},${Math.min(0.75, 0.15 + 0.7 * t)})`;
}
function drawHeat(canvas, values, grid, mode, vmax, selected) {
  const ctx = canvas.getContext("2d");
  if (!grid) { ctx.clearRect(0, 0, canvas.width, canvas.height); return; }
  const W = canvas.width, cell = W / grid;
  ctx.clearRect(0, 0, W, W);
  const mx = vmax || Math.max(1e-9, ...values);
  if (mode !== "off" && values) {
    for (let p = 0; p < values.length; p++) {
      const t = values[p] / mx, x = (p % grid) * cell, y = Math.floor(p / grid) * cell;
      if (mode === "mask") { ctx.fillStyle = `rgba(0,0,0,${0.85 * (1 - Math.min(1, t))})`; ctx.fillRect(x, y, cell, cell); }
      else if (t > 0) { ctx.fillStyle = heatColor(Math.min(1, t)); ctx.fillRect(x, y, cell, cell); }
    }
  }
  if (selected !== null && selected !== undefined && selected >= 0) {
    ctx.strokeStyle = "#00e5ff"; ctx.lineWidth = 2;
    ctx.strokeRect((selected % grid) * cell + 1, Math.floor(selected / grid) * cell + 1, cell - 2, cell - 2);
  }
}

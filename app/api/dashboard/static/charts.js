// Line charts by epoch, drawn with the vendored uPlot. Every chart on the page is registered in
// window.__charts by name, and its container carries data-points (how many x values it draws),
// so that a person's browser console and the browser tests can see what is drawn.

import { el } from "./dom.js";

export const PALETTE = [
  "#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed",
  "#0891b2", "#db2777", "#65a30d", "#475569", "#ea580c",
];

window.__charts = window.__charts || {};

export function forgetCharts() {
  for (const [name, chart] of Object.entries(window.__charts)) {
    chart.destroy();
    delete window.__charts[name];
  }
}

const TRAINING = "No epochs yet: the chart fills in as the job trains.";
const NEVER = "No epoch finished: the job ended before its first.";

// A chart card: title, a short explanation, and the chart. `series` is [{label, color, dash}];
// `data` is [epochs, values...] as uPlot wants it. Returns {card, update(data, ended)}.
export function lineChart({ name, title, help, yLabel, series, data, yRange }) {
  const target = el("div", { class: "chart", dataset: { chart: name, points: "0" } });
  const empty = el("p", { class: "empty small" }, TRAINING);
  const card = el("section", { class: "card chart-card" }, el("h3", {}, title), help ? el("p", { class: "help" }, help) : null, target, empty);
  const options = {
    width: 400,
    height: 220,
    legend: { live: true },
    cursor: { drag: { x: false, y: false } },
    scales: { x: { time: false }, y: yRange ? { range: yRange } : {} },
    axes: [
      // Whole epochs only: no tick at epoch 2.5.
      { label: "epoch", labelSize: 18, size: 36, incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000] },
      { label: yLabel, labelSize: 18, size: 56 },
    ],
    series: [
      { label: "epoch" },
      ...series.map((s, index) => ({
        label: s.label,
        stroke: s.color || PALETTE[index % PALETTE.length],
        width: 2,
        dash: s.dash,
        spanGaps: true,
        points: { show: (self) => self.data[0].length < 40 },
      })),
    ],
  };
  let chart = null;
  let pending = data;

  function draw() {
    const width = Math.max(240, target.clientWidth);
    if (!chart) {
      chart = new uPlot({ ...options, width }, pending, target);
      window.__charts[name] = chart;
    } else if (Math.abs(chart.width - width) > 2) {
      chart.setSize({ width, height: options.height });
    }
  }

  // `ended`: the job will add no epoch, so an empty chart stays empty and says so.
  function update(next, ended = false) {
    pending = next;
    const points = next[0].length;
    target.dataset.points = String(points);
    empty.hidden = points > 0;
    empty.textContent = ended ? NEVER : TRAINING;
    if (chart) chart.setData(next);
  }

  // Drawn once the card is in the page (uPlot measures it); redrawn when its width changes.
  const observer = new ResizeObserver(() => {
    if (!target.isConnected) {
      if (chart && !document.body.contains(card)) observer.disconnect();
      return;
    }
    draw();
  });
  observer.observe(target);
  update(data);
  return { card, update };
}

// [epochs, a, b, ...] from rows, one column per accessor (a missing value is null).
export function columns(rows, accessors) {
  return [rows.map((row) => row.epoch), ...accessors.map((get) => rows.map((row) => get(row) ?? null))];
}

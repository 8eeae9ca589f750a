// Compare: the picked jobs' curves overlaid, one line per job, with what sets them apart.

import { getJSON } from "../api.js";
import { PALETTE, lineChart } from "../charts.js";
import { clear, dataTable, dropoutOf, el, errorBox, jobTitle, normalizationOf, percent, statusBadge } from "../dom.js";
import { selection } from "./selection.js";

const CHARTS = [
  ["val_accuracy", "Validation accuracy", "accuracy", "Fraction of validation samples classified correctly."],
  ["val_loss", "Validation loss", "loss", "Lower is better."],
  ["train_loss", "Training loss", "loss", "With dropout active, as the optimizer saw it."],
  ["generalization_gap", "Generalization gap", "loss difference", "Validation loss minus training loss without dropout. Above 0: overfitting."],
];

// A label that tells the jobs apart: name, then what differs (normalization, dropout, lr, seed).
function labelFor(job, jobs) {
  const parts = [jobTitle(job)];
  const differs = (get) => new Set(jobs.map((other) => JSON.stringify(get(other.spec)))).size > 1;
  if (differs(normalizationOf)) parts.push(normalizationOf(job.spec));
  if (differs(dropoutOf)) parts.push(`dropout ${dropoutOf(job.spec)}`);
  if (differs((s) => s.optimizer?.lr)) parts.push(`lr ${job.spec.optimizer.lr}`);
  if (differs((s) => s.seed)) parts.push(`seed ${job.spec.seed}`);
  if (new Set(jobs.map(jobTitle)).size < jobs.length && parts.length === 1) parts.push(job.id.slice(0, 8));
  return parts.join(" · ");
}

// uPlot shares one x array: the union of every job's epochs, null where a job has none.
function aligned(metrics, field) {
  const xs = [...new Set(metrics.flatMap((rows) => rows.map((row) => row.epoch)))].sort((a, b) => a - b);
  return [xs, ...metrics.map((rows) => {
    const byEpoch = new Map(rows.map((row) => [row.epoch, row[field]]));
    return xs.map((x) => byEpoch.get(x) ?? null);
  })];
}

export function compareView(root, params) {
  const ids = (params.get("jobs") || "").split(",").filter(Boolean);
  root.append(el("div", { class: "page-head" }, el("h1", {}, "Compare jobs"), el("p", { class: "help" },
    "Curves of the picked jobs, overlaid by epoch. Pick jobs with the boxes in the ", el("a", { href: "#/jobs" }, "jobs table"), ".")));
  if (!ids.length) {
    const picked = selection.ids();
    root.append(el("div", { class: "empty" },
      el("p", {}, "No jobs picked yet. Tick two or more jobs in the jobs table, then press “Compare”."),
      picked.length ? el("p", {}, el("a", { href: `#/compare?jobs=${picked.join(",")}`, class: "button primary" }, `Compare the ${picked.length} ticked jobs`)) : null));
    return;
  }
  const body = el("div", {}, el("p", { class: "empty" }, "Loading…"));
  root.append(body);

  async function load() {
    const results = await Promise.allSettled(ids.map((id) =>
      Promise.all([getJSON(`/v1/jobs/${id}`), getJSON(`/v1/jobs/${id}/metrics`)])));
    const found = results.filter((r) => r.status === "fulfilled").map((r) => r.value);
    const missing = ids.length - found.length;
    const jobs = found.map(([job]) => job);
    const metrics = found.map(([, page]) => page.epochs);
    const without = (id) => `#/compare?jobs=${ids.filter((other) => other !== id).join(",")}`;
    const charts = el("div", { class: "charts" });
    clear(
      body,
      missing ? el("div", { class: "notice" }, `${missing} of the picked jobs could not be loaded (deleted, or another tenant's).`) : null,
      dataTable({ id: "compared" }, ["", "Job", "Status", "Normalization", "Dropout", "Learning rate", "Best val accuracy", ""], jobs.map((job, index) => [
        el("td", {}, el("span", { class: "swatch", style: `background: ${PALETTE[index % PALETTE.length]}` })),
        el("td", {}, el("a", { href: `#/jobs/${job.id}`, class: "name" }, labelFor(job, jobs))),
        el("td", {}, statusBadge(job.status)),
        el("td", {}, normalizationOf(job.spec)),
        el("td", {}, dropoutOf(job.spec)),
        el("td", {}, String(job.spec.optimizer?.lr ?? "–")),
        el("td", {}, percent(job.summary?.best_val_accuracy ?? (metrics[index].length ? Math.max(...metrics[index].map((r) => r.val_accuracy)) : null))),
        el("td", {}, el("a", { href: without(job.id), title: "drop from the comparison" }, "remove")),
      ])),
      charts,
    );
    const series = jobs.map((job, index) => ({ label: labelFor(job, jobs), color: PALETTE[index % PALETTE.length] }));
    for (const [field, title, yLabel, help] of CHARTS) {
      const chart = lineChart({ name: `compare_${field}`, title, help, yLabel, series, data: aligned(metrics, field) });
      charts.append(chart.card);
    }
  }

  load().catch((error) => clear(body, errorBox(error)));
}

// Studies: the list, and one study's report (configurations, effects with their intervals,
// and the server's plots: curves by configuration with a band over seeds).

import { ApiError, blobURL, getJSON, query } from "../api.js";
import { age, clear, dataTable, duration, el, errorBox, moment, number, percent } from "../dom.js";

const COUNTS = ["queued", "running", "succeeded", "failed", "cancelled"];

function counts(study) {
  return el(
    "span",
    { class: "counts" },
    COUNTS.filter((status) => study.counts[status]).map((status) =>
      el("span", { class: `badge ${status}`, title: `${study.counts[status]} ${status}` }, `${study.counts[status]} ${status}`),
    ),
  );
}

export function studiesView(root) {
  const body = el("div", {}, el("p", { class: "empty" }, "Loading…"));
  root.append(
    el("div", { class: "page-head" }, el("h1", {}, "Studies"), el("p", { class: "help" },
      "A study trains one spec over a grid (normalization × dropout × learning rate × seeds …) and reports what each axis did, with intervals.")),
    body,
  );
  let cursor = null;
  const tbody = el("tbody");
  const more = el("button", { type: "button", hidden: true }, "Load more");

  async function load() {
    const page = await getJSON(`/v1/studies${query({ limit: 50, cursor })}`);
    if (!cursor && !page.items.length) {
      clear(body, el("div", { class: "empty" }, el("p", {}, "No studies yet. Create one with ", el("code", {}, "POST /v1/studies"), " or ", el("code", {}, "trainsvc study create grid.json"), ".")));
      return;
    }
    for (const study of page.items) {
      tbody.append(el("tr", {},
        el("td", { "data-label": "Name" }, el("a", { href: `#/studies/${study.id}`, class: "name" }, study.name || study.id.slice(0, 8))),
        el("td", { "data-label": "Preset" }, study.preset || "–"),
        el("td", { "data-label": "Jobs" }, counts(study)),
        el("td", { "data-label": "Created" }, el("span", { title: moment(study.created_at) }, age(study.created_at))),
      ));
    }
    cursor = page.next_cursor;
    more.hidden = !cursor;
    if (!tbody.isConnected) {
      clear(body, el("div", { class: "table-wrap" }, el("table", { class: "plain cards" },
        el("thead", {}, el("tr", {}, ["Name", "Preset", "Jobs", "Created"].map((h) => el("th", {}, h)))), tbody)), more);
    }
  }
  more.addEventListener("click", () => load().catch((error) => body.append(errorBox(error))));
  load().catch((error) => clear(body, errorBox(error)));
}

function stat(value, format) {
  if (!value || value.n === 0 || value.mean === null || value.mean === undefined) return "–";
  const spread = value.n > 1 && value.std !== null ? ` ± ${format(value.std)}` : "";
  return `${format(value.mean)}${spread}`;
}

const METRICS = {
  // A difference of accuracies, in percentage points.
  best_val_accuracy: { label: "Best val accuracy", format: (v) => `${v > 0 ? "+" : ""}${(v * 100).toFixed(2)} pp` },
  generalization_gap: { label: "Generalization gap", format: (v) => number(v, 3) },
  epochs_to_target: { label: "Epochs to target", format: (v) => `${number(v, 2)}×` },
};

// Too few pairs for a bootstrap (one pair): the report gives an estimate and no interval.
const hasInterval = (effect) => effect.ci_low !== null && effect.ci_low !== undefined && effect.ci_high !== null && effect.ci_high !== undefined;

// One effect as an interval on an axis shared by its metric's rows, with zero (or 1 for a
// ratio) marked: a person sees at a glance whether the interval crosses "no effect".
function intervalBar(effect, scale, neutral) {
  const position = (v) => `${(((v - scale.low) / (scale.high - scale.low)) * 100).toFixed(2)}%`;
  const bounded = hasInterval(effect);
  const crosses = !bounded || (effect.ci_low <= neutral && effect.ci_high >= neutral);
  return el("div", { class: `interval ${crosses ? "neutral" : "clear"}`, title: effect.reading },
    el("span", { class: "zero", style: `left: ${position(neutral)}` }),
    bounded ? el("span", { class: "range", style: `left: ${position(effect.ci_low)}; width: calc(${position(effect.ci_high)} - ${position(effect.ci_low)})` }) : null,
    el("span", { class: "point", style: `left: ${position(effect.estimate)}` }),
  );
}

function effectsSection(effects) {
  if (!effects.length) {
    return el("p", { class: "empty" }, "No effects yet: they need succeeded runs on both sides of an axis value.");
  }
  const sections = [];
  for (const [metric, { label, format }] of Object.entries(METRICS)) {
    const rows = effects.filter((effect) => effect[metric] && effect[metric].estimate !== null && effect[metric].estimate !== undefined);
    if (!rows.length) continue;
    const neutral = metric === "epochs_to_target" ? 1 : 0;
    const values = rows
      .flatMap((effect) => (hasInterval(effect[metric]) ? [effect[metric].ci_low, effect[metric].ci_high] : [effect[metric].estimate]))
      .concat(neutral);
    let low = Math.min(...values);
    let high = Math.max(...values);
    const pad = (high - low) * 0.08 || 1;
    low -= pad;
    high += pad;
    sections.push(el("h3", {}, label), el("p", { class: "help" }, rows[0][metric].kind, metric === "best_val_accuracy" ? " (pp: percentage points)" : "", "; bars are 95 % bootstrap intervals, the line marks no effect."));
    sections.push(dataTable({ class: "effects" }, ["Change", "Estimate [95 % interval]", "", "Reading"], rows.map((effect) => {
      const value = effect[metric];
      return [
        el("td", {}, el("code", {}, `${effect.axis} = ${effect.value}`), el("div", { class: "help" }, `vs ${effect.baseline}, ${value.n} pair${value.n === 1 ? "" : "s"}`)),
        el("td", { class: "mono" }, hasInterval(value)
          ? `${format(value.estimate)} [${format(value.ci_low)}, ${format(value.ci_high)}]`
          : `${format(value.estimate)} (no interval from ${value.n} pair${value.n === 1 ? "" : "s"})`),
        el("td", { class: "interval-cell" }, intervalBar(value, { low, high }, neutral)),
        el("td", {}, value.reading),
      ];
    })));
  }
  return el("div", { class: "effects-block" }, sections);
}

function configurationTable(report) {
  const axes = report.axes.filter((axis) => axis !== "seed");
  const target = report.target?.val_accuracy;
  const headers = [
    ...axes.map((axis) => axis.split(".").slice(-2).join(" ")),
    "Runs done", "Best val accuracy", "Final val loss", "Gap at end", `Epochs to ${target ? percent(target, 1) : "target"}`, "Diverged", "Seconds per epoch", "Packed",
  ];
  return dataTable({ id: "configurations" }, headers, report.configurations.map((row) => [
    axes.map((axis) => el("td", {}, el("code", {}, String(row.configuration[axis])))),
    el("td", {}, `${row.succeeded} of ${row.jobs}`),
    el("td", {}, stat(row.best_val_accuracy, (v) => percent(v, 2))),
    el("td", {}, stat(row.final_val_loss, (v) => number(v, 3))),
    el("td", {}, stat(row.generalization_gap_final, (v) => number(v, 3))),
    el("td", {}, stat(row.epochs_to_target, (v) => number(v, 1)), row.epochs_to_target?.never_reached ? el("span", { class: "help" }, ` (${row.epochs_to_target.never_reached} never)`) : null),
    el("td", {}, String(row.diverged)),
    el("td", {}, stat(row.seconds_per_epoch, (v) => duration(v))),
    el("td", {}, String(row.packed)),
  ]));
}

// The largest learning rate each configuration trained stably at, and why each rate was or was
// not: a table, as the configurations are (it was shown as raw JSON, a screenful of it).
function stableLearningRates(stable) {
  const axes = Object.keys(stable.configurations[0]?.configuration || {});
  const headers = [...axes.map((axis) => axis.split(".").slice(-2).join(" ")), "Largest stable learning rate", "By learning rate"];
  return el("section", { id: "stable-lr" },
    el("h2", {}, "Largest stable learning rate"),
    el("p", { class: "help" }, `Stable: no seed diverged and every one ended at least ${number(stable.chance_margin * 100, 1)} percentage points above chance accuracy.`),
    dataTable({ id: "stable-lrs" }, headers, stable.configurations.map((row) => [
      axes.map((axis) => el("td", {}, el("code", {}, String(row.configuration[axis])))),
      el("td", {}, row.max_stable_lr === null ? "none stable" : number(row.max_stable_lr)),
      // One span: a phone's card spreads a cell's children across the line.
      el("td", {}, el("span", {}, row.by_lr.flatMap((verdict, index) => [index ? ", " : "",
        el("span", { title: verdict.reason }, `${number(verdict.lr)} ${verdict.stable ? "stable" : `unstable (${verdict.reason})`}`)]))),
    ])));
}

const PLOT_CAPTIONS = {
  learning_curves: "Validation loss and accuracy by epoch for each configuration: the line is the mean over seeds, the band ± one standard deviation.",
  gap_by_dropout: "The generalization gap at the end, by dropout rate.",
  accuracy_by_lr: "The validation accuracy at the end, by learning rate, for each configuration.",
};

export function studyView(root, studyId) {
  const urls = [];
  const body = el("div", {}, el("p", { class: "empty" }, "Loading the report…"));
  root.append(el("p", { class: "crumbs" }, el("a", { href: "#/studies" }, "← All studies")), body);

  async function load() {
    const [study, report] = await Promise.all([
      getJSON(`/v1/studies/${studyId}`),
      getJSON(`/v1/studies/${studyId}/report`),
    ]);
    const plots = el("div", { class: "plots" });
    clear(
      body,
      el("div", { class: "page-head" },
        el("h1", {}, study.name || `Study ${studyId.slice(0, 8)}`),
        el("p", {}, counts(study), " ", el("a", { href: `#/jobs?study=${studyId}` }, "see its jobs")),
        el("p", { class: "help" }, "Grid: ", Object.entries(study.grid).map(([axis, values]) => `${axis} ∈ {${values.join(", ")}}`).join(" × "))),
      report.note ? el("div", { class: "notice" }, report.note) : null,
      el("h2", {}, "Configurations"),
      el("p", { class: "help" }, "Each configuration aggregated over its seeds: mean ± sample standard deviation, succeeded runs only."),
      configurationTable(report),
      // Why a configuration's seconds may not compare with another's: its jobs trained packed.
      report.seconds_note ? el("p", { class: "help", id: "seconds-note" }, report.seconds_note) : null,
      report.max_stable_lr ? stableLearningRates(report.max_stable_lr) : null,
      el("h2", {}, "Effects"),
      el("p", { class: "help" }, "Each axis value against its baseline, paired over the other axes and seeds."),
      effectsSection(report.effects),
      el("h2", {}, "Curves"),
      plots,
    );
    // Every plot draws succeeded runs only: until one has, there is nothing to fetch.
    const entries = study.counts.succeeded ? Object.entries(report.plots || {}) : [];
    if (!entries.length) plots.append(el("p", { class: "empty" }, "No plots yet: they are drawn once runs have succeeded."));
    for (const [name, path] of entries) {
      const figure = el("figure", { class: "card" }, el("p", { class: "empty small" }, "Drawing…"), el("figcaption", {}, PLOT_CAPTIONS[name] || name));
      plots.append(figure);
      blobURL(path)
        .then((url) => {
          urls.push(url);
          figure.firstChild.replaceWith(el("img", { src: url, alt: PLOT_CAPTIONS[name] || name, "data-plot": name }));
        })
        .catch((error) => figure.firstChild.replaceWith(errorBox(error)));
    }
  }

  // Tried again while the service is away (unreachable, or 503): a report opened during a
  // restart fills in by itself.
  let left = false;
  async function loadWhenBack() {
    for (let wait = 1000; !left; wait = Math.min(wait * 2, 10000)) {
      try {
        return await load();
      } catch (error) {
        if (!(error instanceof ApiError && (error.status === 0 || error.status === 503))) throw error;
        clear(body, errorBox(error), el("p", { class: "help" }, "Trying again…"));
        await new Promise((resolve) => setTimeout(resolve, wait));
      }
    }
  }

  loadWhenBack().catch((error) => {
    // 422: not a study id at all (a mistyped or shortened URL).
    clear(body, error instanceof ApiError && (error.status === 404 || error.status === 422)
      ? el("div", { class: "empty" }, el("h1", {}, "No such study"), el("p", {}, `There is no study ${studyId}.`))
      : errorBox(error));
  });
  return () => {
    left = true;
    urls.forEach((url) => URL.revokeObjectURL(url));
  };
}

// One job: its status and attempts, live learning curves and diagnostics, checkpoints, spec,
// and a cancel button. Metrics come from GET /v1/jobs/{id}/metrics, then live from the job's
// event stream (which replays its past events too: an epoch seen twice is drawn once).

import { ApiError, followEvents, getJSON, postJSON, request, storedKey } from "../api.js";
import { columns, lineChart } from "../charts.js";
import {
  ENDED,
  STATUS_HELP,
  age,
  bytes,
  clear,
  dataTable,
  dropoutOf,
  duration,
  el,
  errorBox,
  jobTitle,
  moment,
  normalizationOf,
  number,
  percent,
  progressBar,
  statusBadge,
} from "../dom.js";
import { selection } from "./selection.js";

// How often, at most, the per-layer statistics (not carried by epoch events) are re-read.
const LAYER_REFRESH_MS = 1000;
// How often, at most, a training job's checkpoint list is re-read (the worker rewrites `last`
// every TRAINSVC_CHECKPOINT_EVERY_SECONDS).
const CHECKPOINT_REFRESH_MS = 15000;

function fact(label, ...value) {
  return el("div", { class: "fact" }, el("dt", {}, label), el("dd", {}, ...value));
}

function specFacts(spec) {
  const model = spec.model || {};
  const optimizer = spec.optimizer || {};
  const schedule = spec.schedule || {};
  const rows = [
    ["Dataset", `${spec.dataset?.name} (validation ${percent(spec.dataset?.val_fraction, 0)}, batches of ${spec.dataset?.batch_size})`],
    ["Architecture", `${model.architecture}, hidden sizes ${JSON.stringify(model.hidden_sizes)}, ${model.activation}`],
    ["Normalization", normalizationOf(spec)],
    ["Dropout", dropoutOf(spec)],
    ["Optimizer", `${optimizer.type}, learning rate ${optimizer.lr}${optimizer.momentum ? `, momentum ${optimizer.momentum}` : ""}${optimizer.weight_decay ? `, weight decay ${optimizer.weight_decay}` : ""}`],
    ["Schedule", schedule.type + (schedule.warmup_epochs ? `, ${schedule.warmup_epochs} warm-up epochs` : "")],
    ["Epochs, seed", `${spec.epochs} epochs, seed ${spec.seed}`],
    ["Device", `${spec.device}${spec.mixed_precision !== "none" ? `, ${spec.mixed_precision}` : ""}`],
    ["Tags", Object.entries(spec.tags || {}).map(([k, v]) => `${k}:${v}`).join(", ") || "none"],
  ];
  return el("dl", { class: "spec-facts" }, rows.map(([label, value]) => fact(label, value)));
}

export function jobView(root, jobId, context) {
  let job = null;
  const epochs = new Map(); // epoch -> metrics row
  let stream = null;
  let stopped = false;
  let checkpointsReadAt = 0;
  const layerCharts = { key: null, activation: null, gradient: null };
  const probeCharts = new Map(); // probe chart name -> chart, made when a job has that probe

  const head = el("div", { class: "page-head" });
  const away = el("div"); // the service did not answer when the page opened: says so, and retries
  const facts = el("dl", { class: "facts" });
  const errorSlot = el("div");
  const charts = el("div", { class: "charts" });
  const layers = el("div", { class: "charts" });
  const probes = el("div", { class: "charts" });
  const probesSection = el(
    "section",
    { hidden: true },
    el("h2", {}, "Why it trains as it does"),
    el(
      "p",
      { class: "help" },
      "Probes this job asked for (spec.diagnostics), by epoch. Landscape (Santurkar et al. 2018): how much the loss and its gradient change along the gradient direction; lower is smoother. Covariate shift: how much a layer's gradient changes when the layers before it take their step (cosine 1: not at all). Gradient noise scale (McCandlish et al. 2018): how noisy the gradients are, in samples.",
    ),
    probes,
  );
  const attempts = el("div");
  const checkpoints = el("div");
  const spec = el("div");
  root.append(
    el("p", { class: "crumbs" }, el("a", { href: "#/jobs" }, "← All jobs")),
    away,
    head,
    errorSlot,
    facts,
    el("h2", {}, "Learning curves"),
    charts,
    el("h2", {}, "Per layer"),
    el("p", { class: "help" }, "Measured each epoch on a fixed probe batch: the spread (standard deviation) of each layer's pre-activations, and each layer's gradient norm. Normalization keeps the spread near 1; vanishing or exploding signals show as lines falling to 0 or climbing."),
    layers,
    probesSection,
    el("h2", {}, "Attempts"),
    attempts,
    el("h2", {}, "Checkpoints"),
    checkpoints,
    el("h2", {}, "Spec"),
    spec,
  );

  const sorted = () => [...epochs.values()].sort((a, b) => a.epoch - b.epoch);
  const lossChart = lineChart({
    name: "loss",
    title: "Loss",
    help: "Cross-entropy per sample; lower is better.",
    yLabel: "loss",
    series: [{ label: "train" }, { label: "validation" }],
    data: [[], [], []],
  });
  const accuracyChart = lineChart({
    name: "accuracy",
    title: "Accuracy",
    help: "Fraction classified correctly.",
    yLabel: "accuracy",
    series: [{ label: "train" }, { label: "validation" }],
    data: [[], [], []],
  });
  const gapChart = lineChart({
    name: "gap",
    title: "Generalization gap",
    help: "Validation loss minus loss on the training data (evaluated without dropout). Above 0: overfitting.",
    yLabel: "loss difference",
    series: [{ label: "gap" }],
    data: [[], []],
  });
  const gradChart = lineChart({
    name: "grad_norm",
    title: "Gradient norm",
    help: "Global gradient norm over the epoch's steps: mean and largest.",
    yLabel: "norm",
    series: [{ label: "mean" }, { label: "max", dash: [4, 4] }],
    data: [[], [], []],
  });
  charts.append(lossChart.card, accuracyChart.card, gapChart.card, gradChart.card);

  function drawLayers(rows) {
    const withLayers = rows.filter((row) => Array.isArray(row.layers));
    if (!withLayers.length) {
      if (!layers.children.length) layers.append(el("p", { class: "empty" }, "No per-layer statistics yet."));
      return;
    }
    const last = withLayers[withLayers.length - 1].layers;
    const activations = last.filter((layer) => "pre_activation_std" in layer).map((layer) => layer.name);
    const gradients = last.filter((layer) => "grad_norm" in layer).map((layer) => layer.name);
    const key = JSON.stringify([activations, gradients]);
    const pick = (names, field) =>
      columns(
        withLayers,
        names.map((name) => (row) => row.layers.find((layer) => layer.name === name)?.[field]),
      );
    if (layerCharts.key !== key) {
      clear(layers);
      layerCharts.key = key;
      layerCharts.activation = lineChart({
        name: "activation_std",
        title: "Pre-activation spread",
        help: "Standard deviation of each layer's input to its activation.",
        yLabel: "std",
        series: activations.map((label) => ({ label })),
        data: pick(activations, "pre_activation_std"),
      });
      layerCharts.gradient = lineChart({
        name: "layer_grad_norm",
        title: "Gradient norm by layer",
        help: "Norm of each layer's weight gradient.",
        yLabel: "norm",
        series: gradients.map((label) => ({ label })),
        data: pick(gradients, "grad_norm"),
      });
      layers.append(layerCharts.activation.card, layerCharts.gradient.card);
      return;
    }
    layerCharts.activation.update(pick(activations, "pre_activation_std"));
    layerCharts.gradient.update(pick(gradients, "grad_norm"));
  }

  // Each probe chart: its name, what it shows, and its series (accessors into a metrics row).
  const PROBE_CHARTS = [
    {
      name: "landscape",
      probe: "landscape",
      title: "Loss landscape (raw)",
      help: "Mean over the epoch's probed steps: range of the loss along the gradient, largest gradient change, effective β-smoothness.",
      yLabel: "value",
      series: [
        ["loss variation", (r) => r.landscape?.loss_variation_mean],
        ["gradient predictiveness", (r) => r.landscape?.gradient_predictiveness_mean],
        ["β-smoothness", (r) => r.landscape?.beta_smoothness_mean],
      ],
    },
    {
      name: "landscape_relative",
      probe: "landscape",
      title: "Loss landscape (relative)",
      help: "The same, relative to the loss and to the gradient norm: a flat, vanishing-signal region looks smooth in raw terms only.",
      yLabel: "ratio",
      series: [
        ["loss variation / loss", (r) => r.landscape?.loss_variation_relative_mean],
        ["predictiveness / |g|", (r) => r.landscape?.gradient_predictiveness_relative_mean],
        ["β / |g|", (r) => r.landscape?.beta_smoothness_relative_mean],
      ],
    },
    {
      name: "covariate_shift",
      probe: "covariate_shift",
      title: "Internal covariate shift",
      help: "Mean over layers after the first: cosine between a layer's gradient before and after the layers before it update, and the relative change.",
      yLabel: "value",
      series: [
        ["cosine", (r) => r.covariate_shift?.ics_cosine_mean],
        ["relative L2", (r) => r.covariate_shift?.ics_l2_relative_mean],
      ],
    },
    {
      name: "gradient_noise",
      probe: "gradient_noise",
      title: "Gradient noise scale",
      help: "B_simple = tr(Σ) / |G|²: the batch size past which larger batches stop helping.",
      yLabel: "samples",
      series: [["noise scale", (r) => r.gradient_noise?.gradient_noise_scale]],
    },
  ];

  function drawProbes(rows) {
    for (const spec of PROBE_CHARTS) {
      const measured = rows.filter((row) => row[spec.probe]);
      if (!measured.length) continue;
      const data = columns(measured, spec.series.map(([, get]) => get));
      const chart = probeCharts.get(spec.name);
      if (chart) {
        chart.update(data);
        continue;
      }
      const made = lineChart({
        name: spec.name,
        title: spec.title,
        help: spec.help,
        yLabel: spec.yLabel,
        series: spec.series.map(([label]) => ({ label })),
        data,
      });
      probeCharts.set(spec.name, made);
      probes.append(made.card);
      probesSection.hidden = false;
    }
  }

  let frame = null;
  function drawSoon() {
    if (frame !== null) return;
    frame = requestAnimationFrame(() => {
      frame = null;
      const rows = sorted();
      const ended = Boolean(job && ENDED.has(job.status));
      lossChart.update(columns(rows, [(r) => r.train_loss, (r) => r.val_loss]), ended);
      accuracyChart.update(columns(rows, [(r) => r.train_accuracy, (r) => r.val_accuracy]), ended);
      gapChart.update(columns(rows, [(r) => r.generalization_gap]), ended);
      gradChart.update(columns(rows, [(r) => r.grad_norm_mean, (r) => r.grad_norm_max]), ended);
      drawLayers(rows);
      drawProbes(rows);
      if (job) drawFacts();
    });
  }

  function merge(row) {
    const known = epochs.get(row.epoch);
    // A resumed attempt may store an epoch again: the newer attempt's numbers win, and the
    // per-layer statistics (absent from events) stay until re-read.
    if (known && (row.attempt ?? 0) < (known.attempt ?? 0)) return;
    epochs.set(row.epoch, { ...known, ...row });
  }

  let layerTimer = null;
  function refreshLayersSoon() {
    if (layerTimer !== null) return;
    layerTimer = setTimeout(async () => {
      layerTimer = null;
      const missing = sorted().filter((row) => !row.layers);
      if (!missing.length || stopped) return;
      try {
        const since = missing[0].epoch - 1;
        const page = await getJSON(`/v1/jobs/${jobId}/metrics?since_epoch=${since}`);
        for (const row of page.epochs) merge(row);
        drawSoon();
      } catch {
        // The next epoch tries again.
      }
    }, LAYER_REFRESH_MS);
  }

  // -- header and facts -----------------------------------------------------------------------
  const cancelArea = el("div", { class: "actions" });

  function drawCancel() {
    const active = !ENDED.has(job.status);
    if (!active) {
      clear(cancelArea);
    } else if (job.cancel_requested) {
      clear(cancelArea, el("span", { class: "help" }, "Cancel requested: the job stops within a batch and keeps its checkpoints."));
    } else if (!cancelArea.querySelector("#cancel-job, #confirm-cancel")) {
      const cancel = el("button", { type: "button", id: "cancel-job", class: "danger" }, "Cancel job");
      cancel.addEventListener("click", () => {
        clear(
          cancelArea,
          el("span", {}, "Stop this job? "),
          el("button", { type: "button", id: "confirm-cancel", class: "danger", onclick: doCancel }, "Yes, cancel it"),
          el("button", { type: "button", class: "link", onclick: keep }, "No"),
        );
      });
      clear(cancelArea, cancel);
    }
  }

  function keep() {
    clear(cancelArea);
    drawCancel();
  }

  async function doCancel() {
    try {
      job = await postJSON(`/v1/jobs/${jobId}/cancel`);
      drawHead();
      drawFacts();
    } catch (error) {
      clear(cancelArea, el("span", { class: "error-text" }, `Could not cancel: ${error.message}`));
    }
  }

  function drawHead() {
    const inSelection = selection.has(job.id);
    const compare = el(
      "button",
      {
        type: "button",
        class: "link",
        onclick() {
          selection.toggle(job.id, !selection.has(job.id));
          drawHead();
        },
      },
      inSelection ? "Remove from comparison" : "Add to comparison",
    );
    clear(
      head,
      el("h1", {}, jobTitle(job), " ", statusBadge(job.status, job.cancel_requested)),
      el("p", { class: "help" }, `Job ${job.id}`, job.study_id ? [" · part of ", el("a", { href: `#/studies/${job.study_id}` }, "a study")] : null, " · ", compare,
        selection.ids().length ? [" · ", el("a", { href: `#/compare?jobs=${selection.ids().join(",")}` }, `compare ${selection.ids().length} selected`)] : null),
      cancelArea,
    );
    drawCancel();
  }

  function drawFacts() {
    const summary = job.summary || {};
    const rows = sorted();
    const bestSoFar = rows.reduce((best, row) => (best && best.val_accuracy >= row.val_accuracy ? best : row), null);
    const best = summary.best_val_accuracy ?? bestSoFar?.val_accuracy;
    const bestEpoch = summary.best_epoch ?? bestSoFar?.epoch;
    const seconds = rows.reduce((sum, row) => sum + (row.epoch_seconds || 0), 0);
    clear(
      facts,
      fact("Status", statusBadge(job.status, job.cancel_requested), el("span", { class: "help" }, ` ${STATUS_HELP[job.status] || ""}`)),
      fact("Progress", progressBar(job.progress.epoch, job.progress.epochs)),
      fact("Best val accuracy", percent(best), bestEpoch ? el("span", { class: "help" }, ` at epoch ${bestEpoch}`) : null),
      fact("Final val loss", number(summary.final_val_loss ?? rows[rows.length - 1]?.val_loss)),
      fact("Attempts", String(job.attempts)),
      fact("Trained", trainedIn(job)),
      fact("Training time", rows.length ? duration(seconds) : "–", rows.length ? el("span", { class: "help" }, ` (${duration(seconds / rows.length)} per epoch)`) : null),
      fact("Parameters", summary.parameters ? summary.parameters.toLocaleString() : "–"),
      fact("Submitted", el("span", { title: moment(job.created_at) }, age(job.created_at))),
      fact("Finished", job.finished_at ? el("span", { title: moment(job.finished_at) }, age(job.finished_at)) : "–"),
    );
    clear(errorSlot, job.error ? el("div", { class: "error-box" }, el("strong", {}, job.error.type), ": ", job.error.message) : null);
  }

  // Packing is the worker's choice (TRAINSVC_MAX_PACK): the latest attempt trained alone, or
  // as one batched model with other queued jobs of its tenant that share its computation.
  function trainedIn(job) {
    if (!job.attempt_history.length) return "–";
    if (!job.pack) return "alone";
    const title = `Trained with other jobs of the same computation as one batched model: pack ${job.pack}`;
    return el("span", { title }, `in pack ${job.pack.slice(0, 8)}`);
  }

  function drawAttempts() {
    if (!job.attempt_history.length) {
      clear(attempts, el("p", { class: "empty" }, "Not started yet: it waits for a free worker."));
      return;
    }
    clear(
      attempts,
      dataTable({}, ["#", "Worker", "Started", "Ended", "Outcome"], job.attempt_history.map((a) => [
        el("td", {}, String(a.attempt)),
        el("td", { class: "mono" }, a.worker_id),
        el("td", {}, moment(a.started_at)),
        el("td", {}, moment(a.ended_at)),
        el("td", {}, a.outcome || "running"),
      ])),
    );
  }

  async function download(event, url, filename) {
    if (!storedKey()) return; // no key: the browser downloads the link itself, streaming
    event.preventDefault();
    const link = el("a", { href: URL.createObjectURL(await (await request(url)).blob()), download: filename });
    document.body.append(link);
    link.click();
    link.remove();
  }

  async function drawCheckpoints() {
    checkpointsReadAt = Date.now();
    try {
      const { items } = await getJSON(`/v1/jobs/${jobId}/checkpoints`);
      if (!items.length) {
        clear(checkpoints, el("p", { class: "empty" }, job && ENDED.has(job.status)
          ? "None: the job ended before a checkpoint was saved."
          : "None yet: the latest is saved every so often while the job trains (TRAINSVC_CHECKPOINT_EVERY_SECONDS) and when it ends."));
        return;
      }
      clear(
        checkpoints,
        el("p", { class: "help" }, "Model weights as safetensors files (load with safetensors.torch.load_file)."),
        dataTable({ id: "checkpoints" }, ["Kind", "Epoch", "Size", "Saved", ""], items.map((c) => {
          const url = `/v1/jobs/${jobId}/checkpoints/${c.id}`;
          const filename = `${jobId}-epoch${c.epoch}-${c.kind}.safetensors`;
          return [
            el("td", {}, c.kind === "best" ? "best (highest val accuracy)" : "last"),
            el("td", {}, String(c.epoch)),
            el("td", {}, bytes(c.size_bytes)),
            el("td", {}, moment(c.created_at)),
            el("td", {}, el("a", { href: url, download: filename, onclick: (e) => download(e, url, filename) }, "Download")),
          ];
        })),
      );
    } catch (error) {
      clear(checkpoints, errorBox(error));
    }
  }

  function drawSpec() {
    clear(
      spec,
      specFacts(job.spec),
      el("details", {}, el("summary", {}, "The full spec as stored (JSON)"), el("pre", {}, JSON.stringify(job.spec, null, 2))),
    );
  }

  async function reloadJob() {
    job = await getJSON(`/v1/jobs/${jobId}`);
    drawHead();
    drawFacts();
    drawAttempts();
    drawSoon(); // the charts say whether more epochs may come
  }

  function onEvent({ type, data }) {
    if (type === "epoch") {
      merge(data);
      drawSoon();
      refreshLayersSoon();
      if (Date.now() - checkpointsReadAt > CHECKPOINT_REFRESH_MS) drawCheckpoints();
      return;
    }
    if (type === "status") {
      const reloaded = reloadJob();
      reloaded.catch(() => {});
      if (ENDED.has(data.status)) {
        // Once the job is read as ended: an ended job without a checkpoint says so.
        reloaded.finally(drawCheckpoints).catch(() => {});
        refreshLayersSoon();
      } else if (data.status === "running") {
        drawCheckpoints();
      }
    }
  }

  // The first read of the job, tried again while the service is away (unreachable, or 503):
  // a page opened during a restart fills in by itself, as the jobs table does. False: left.
  async function firstRead() {
    for (let wait = 1000; !stopped; wait = Math.min(wait * 2, 10000)) {
      try {
        await reloadJob();
        clear(away);
        return true;
      } catch (error) {
        if (!(error instanceof ApiError && (error.status === 0 || error.status === 503))) throw error;
        clear(away, errorBox(error), el("p", { class: "help" }, "Trying again…"));
        context.setLive("reconnecting");
        await new Promise((resolve) => setTimeout(resolve, wait));
      }
    }
    return false;
  }

  async function start() {
    try {
      if (!(await firstRead())) return;
    } catch (error) {
      clear(root, el("p", { class: "crumbs" }, el("a", { href: "#/jobs" }, "← All jobs")),
        // 422: not a job id at all (a mistyped or shortened URL).
        error instanceof ApiError && (error.status === 404 || error.status === 422)
          ? el("div", { class: "empty" }, el("h1", {}, "No such job"), el("p", {}, `There is no job ${jobId}, or it belongs to another tenant.`))
          : errorBox(error));
      return;
    }
    drawSpec();
    drawCheckpoints();
    const page = await getJSON(`/v1/jobs/${jobId}/metrics`);
    for (const row of page.epochs) merge(row);
    drawSoon();
    if (stopped) return;
    stream = followEvents(`/v1/jobs/${jobId}/events`, {
      onEvent,
      onState: context.setLive,
      done: (event) => event.type === "status" && ENDED.has(event.data.status),
    });
  }

  start().catch((error) => root.append(errorBox(error)));
  return () => {
    stopped = true;
    if (stream) stream.close();
    if (layerTimer) clearTimeout(layerTimer);
  };
}

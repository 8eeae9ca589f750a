// The jobs table: filtered and paged by the API (never every job at once), kept current by the
// event stream (GET /v1/events) rather than by reloading.

import { followEvents, getJSON, query } from "../api.js";
import {
  ENDED,
  age,
  dropoutOf,
  el,
  errorBox,
  jobTitle,
  normalizationOf,
  percent,
  progressBar,
  statusBadge,
} from "../dom.js";
import { selection } from "./selection.js";

const PAGE_SIZE = 50;
// More new jobs than this at once (a study was created): offer a reload instead of fetching
// each one.
const MAX_NEW_FETCHES = 25;
const STATUSES = ["queued", "running", "succeeded", "failed", "cancelled"];

const COLUMNS = [
  ["", "select"],
  ["Status", "status"],
  ["Name", "name"],
  ["Dataset", "dataset"],
  ["Architecture", "architecture"],
  ["Normalization", "normalization"],
  ["Dropout", "dropout"],
  ["Progress (epochs)", "progress"],
  ["Best val accuracy", "best"],
  ["Submitted", "age"],
];

function filtersOf(params) {
  return {
    status: params.get("status") || "",
    tag: params.get("tag") || "",
    study: params.get("study") || "",
  };
}

function hashFor(filters) {
  return `#/jobs${query({ status: filters.status, tag: filters.tag, study: filters.study })}`;
}

// A study job's place in its grid, shortly: "normalization.type=none · dropout.rate=0.5 · seed=1".
function gridPoint(point) {
  return Object.entries(point)
    .map(([axis, value]) => `${axis.split(".").slice(-2).join(".")}=${value}`)
    .join(" · ");
}

function matches(job, filters) {
  if (filters.status && job.status !== filters.status) return false;
  if (filters.study && job.study_id !== filters.study) return false;
  if (filters.tag) {
    const [key, ...rest] = filters.tag.split(":");
    if ((job.spec.tags || {})[key] !== rest.join(":")) return false;
  }
  return true;
}

export function jobsView(root, params, context) {
  const filters = filtersOf(params);
  const rows = new Map(); // job id -> {job, tr, liveBest}
  let cursor = null;
  let loaded = false;
  const dirty = new Set();
  const pendingNew = new Set();
  let flushTimer = null;

  // -- the filter form ----------------------------------------------------------------------
  const statusSelect = el(
    "select",
    { id: "filter-status", name: "status" },
    el("option", { value: "" }, "any status"),
    STATUSES.map((status) => el("option", { value: status, selected: status === filters.status }, status)),
  );
  const tagInput = el("input", {
    id: "filter-tag",
    name: "tag",
    value: filters.tag,
    placeholder: "team:vision",
    pattern: "[^:]+:.*",
    title: "key:value, as in the spec's tags",
  });
  const studySelect = el(
    "select",
    { id: "filter-study", name: "study" },
    el("option", { value: "" }, "any study"),
    filters.study ? el("option", { value: filters.study, selected: true }, filters.study.slice(0, 8)) : null,
  );
  const form = el(
    "form",
    {
      class: "filters",
      onsubmit(event) {
        event.preventDefault();
        location.hash = hashFor({
          status: statusSelect.value,
          tag: tagInput.value.trim(),
          study: studySelect.value,
        });
      },
    },
    el("label", {}, "Status ", statusSelect),
    el("label", {}, "Tag ", tagInput),
    el("label", {}, "Study ", studySelect),
    el("button", { type: "submit", class: "primary" }, "Filter"),
    filters.status || filters.tag || filters.study ? el("a", { href: "#/jobs", class: "button" }, "Clear filters") : null,
  );
  statusSelect.addEventListener("change", () => form.requestSubmit());
  studySelect.addEventListener("change", () => form.requestSubmit());
  getJSON("/v1/studies?limit=100")
    .then((page) => {
      for (const study of page.items) {
        if (study.id === filters.study) {
          studySelect.querySelector(`option[value="${study.id}"]`).textContent = study.name || study.id.slice(0, 8);
          continue;
        }
        studySelect.append(el("option", { value: study.id }, study.name || study.id.slice(0, 8)));
      }
    })
    .catch(() => {});

  // -- the compare bar ----------------------------------------------------------------------
  const compareButton = el("a", { class: "button primary", id: "compare-selected" }, "");
  const clearSelection = el("button", { class: "link", type: "button" }, "clear selection");
  const compareBar = el("div", { class: "compare-bar" }, compareButton, clearSelection);
  function showSelection() {
    const ids = selection.ids();
    compareBar.hidden = ids.length === 0;
    compareButton.textContent = `Compare ${ids.length} selected`;
    compareButton.href = `#/compare?jobs=${ids.join(",")}`;
  }
  clearSelection.addEventListener("click", () => {
    selection.clear();
    for (const box of tbody.querySelectorAll("input[type=checkbox]")) box.checked = false;
    showSelection();
  });

  // -- the table ------------------------------------------------------------------------------
  const tbody = el("tbody");
  const table = el(
    "table",
    { class: "jobs", id: "jobs-table" },
    el("thead", {}, el("tr", {}, COLUMNS.map(([label, key]) => el("th", { class: `col-${key}` }, label)))),
    tbody,
  );
  const emptyState = el("div", { class: "empty", hidden: true });
  const count = el("span", { class: "count" });
  const loadMore = el("button", { type: "button", id: "load-more", hidden: true }, "Load more");
  const notice = el("div", { class: "notice", hidden: true });

  root.append(
    el("div", { class: "page-head" }, el("h1", {}, "Jobs"), el("p", { class: "help" },
      "Training jobs, newest first. Open a name for its learning curves; tick jobs to compare them. ",
      "The table updates itself as jobs run.")),
    form,
    compareBar,
    notice,
    el("div", { class: "table-wrap" }, table),
    emptyState,
    el("div", { class: "table-foot" }, count, loadMore),
  );
  showSelection();

  function cell(key, ...children) {
    const label = COLUMNS.find(([, k]) => k === key)[0];
    return el("td", { class: `col-${key}`, "data-label": label }, ...children);
  }

  function renderRow(entry) {
    const { job } = entry;
    const spec = job.spec || {};
    const best = job.summary?.best_val_accuracy ?? entry.liveBest;
    const box = el("input", {
      type: "checkbox",
      "aria-label": `select ${jobTitle(job)} to compare`,
      checked: selection.has(job.id),
      onchange(event) {
        selection.toggle(job.id, event.target.checked);
        showSelection();
      },
    });
    const tags = Object.entries(spec.tags || {}).map(([key, value]) =>
      el("a", { class: "tag", href: hashFor({ ...filters, tag: `${key}:${value}` }), title: "show only jobs with this tag" }, `${key}:${value}`),
    );
    const tr = el(
      "tr",
      { dataset: { jobId: job.id, status: job.status } },
      cell("select", box),
      cell("status", statusBadge(job.status, job.cancel_requested)),
      cell(
        "name",
        el("a", { href: `#/jobs/${job.id}`, class: "job-link name" }, jobTitle(job)),
        job.grid_point ? el("div", { class: "help small" }, gridPoint(job.grid_point)) : null,
        tags.length ? el("div", { class: "tags" }, tags) : null,
      ),
      cell("dataset", spec.dataset?.name ?? "–"),
      cell("architecture", spec.model?.architecture ?? "–"),
      cell("normalization", normalizationOf(spec)),
      cell("dropout", dropoutOf(spec)),
      cell("progress", progressBar(job.progress.epoch, job.progress.epochs)),
      cell("best", el("span", { title: job.summary ? "best epoch's validation accuracy" : "so far" }, percent(best))),
      cell("age", el("time", { datetime: job.created_at, title: new Date(job.created_at).toLocaleString() }, age(job.created_at))),
    );
    if (entry.tr) entry.tr.replaceWith(tr);
    entry.tr = tr;
    return tr;
  }

  function showCount() {
    const n = rows.size;
    count.textContent = n ? `Showing ${n} job${n === 1 ? "" : "s"}${cursor ? "; more are older" : ""}` : "";
    loadMore.hidden = !cursor;
    emptyState.hidden = !loaded || n > 0;
    table.hidden = loaded && n === 0;
    const filtered = filters.status || filters.tag || filters.study;
    emptyState.replaceChildren(
      filtered
        ? el("p", {}, "No job matches these filters. ", el("a", { href: "#/jobs" }, "Show every job"))
        : el("p", {}, "No jobs yet. Submit one with ", el("code", {}, "POST /v1/jobs"), " (see ", el("a", { href: "docs" }, "the API docs"), ") or ", el("code", {}, "trainsvc submit spec.json"), "; it appears here at once."),
    );
  }

  const listQuery = () =>
    query({ status: filters.status, tag: filters.tag, study_id: filters.study, limit: PAGE_SIZE, cursor });

  // A running job has no summary yet, and epoch events only tell the epochs since the page
  // opened: its best so far comes from its metrics, read once, then follows the events.
  async function readBestSoFar(entry) {
    if (entry.job.status !== "running" || entry.job.summary) return;
    try {
      const page = await getJSON(`/v1/jobs/${entry.job.id}/metrics`);
      for (const row of page.epochs) {
        if (typeof row.val_accuracy === "number") entry.liveBest = Math.max(entry.liveBest ?? 0, row.val_accuracy);
      }
      redrawSoon(entry.job.id);
    } catch {
      // The events still bring the epochs to come.
    }
  }

  let pageError = null;
  async function loadPage() {
    loadMore.disabled = true;
    try {
      const page = await getJSON(`/v1/jobs${listQuery()}`);
      if (pageError) pageError.remove();
      pageError = null;
      for (const job of page.items) {
        if (rows.has(job.id)) continue;
        const entry = { job, tr: null, liveBest: null };
        rows.set(job.id, entry);
        tbody.append(renderRow(entry));
        readBestSoFar(entry);
      }
      cursor = page.next_cursor;
      loaded = true;
      showCount();
    } catch (error) {
      if (pageError) pageError.remove();
      pageError = errorBox(error);
      root.append(pageError);
    } finally {
      loadMore.disabled = false;
    }
  }
  loadMore.addEventListener("click", loadPage);

  // -- live updates -------------------------------------------------------------------------
  let frame = null;
  function redrawSoon(id) {
    dirty.add(id);
    if (frame === null) {
      frame = requestAnimationFrame(() => {
        frame = null;
        for (const dirtyId of dirty) {
          const entry = rows.get(dirtyId);
          if (entry) renderRow(entry);
        }
        dirty.clear();
      });
    }
  }

  async function refetch(id) {
    try {
      const entry = rows.get(id);
      if (entry) {
        entry.job = await getJSON(`/v1/jobs/${id}`);
        redrawSoon(id);
        readBestSoFar(entry);
      }
    } catch {
      // A deleted job keeps its last row; the next load drops it.
    }
  }

  // Where a job belongs among the loaded rows, newest first; null if it is older than them
  // all while older pages remain (it will come with "Load more").
  function insertionPoint(job) {
    for (const entry of rows.values()) {
      if (entry.job.created_at < job.created_at) return entry.tr;
    }
    return cursor ? null : undefined;
  }

  async function addNew(id) {
    try {
      const job = await getJSON(`/v1/jobs/${id}`);
      if (rows.has(id) || !matches(job, filters)) return;
      const before = insertionPoint(job);
      if (before === null) return;
      const entry = { job, tr: null, liveBest: null };
      rows.set(id, entry);
      const tr = renderRow(entry);
      tr.classList.add("fresh");
      if (before) tbody.insertBefore(tr, before);
      else tbody.append(tr);
      showCount();
      readBestSoFar(entry);
    } catch {
      // Gone already: nothing to show.
    }
  }

  function flushNew() {
    flushTimer = null;
    const ids = [...pendingNew];
    pendingNew.clear();
    if (ids.length > MAX_NEW_FETCHES) {
      notice.hidden = false;
      notice.replaceChildren(
        `${ids.length} new jobs arrived. `,
        el("button", { type: "button", class: "link", onclick: () => window.dispatchEvent(new HashChangeEvent("hashchange")) }, "Show them"),
      );
      return;
    }
    for (const id of ids) addNew(id);
  }

  // Events that arrive before the first page are held, then applied to it: the stream opens
  // first so that nothing between the page's read and the stream's start is missed.
  const early = [];
  let firstLoad = Promise.resolve();
  async function loadFirstPage() {
    await loadPage();
    if (loaded) for (const event of early.splice(0)) onEvent(event);
  }
  function onEvent(event) {
    if (!loaded) {
      early.push(event);
      return;
    }
    const { type, data } = event;
    const id = data.job_id;
    const entry = rows.get(id);
    if (type === "epoch") {
      if (!entry) return;
      entry.job.progress.epoch = Math.max(entry.job.progress.epoch, data.epoch);
      if (typeof data.val_accuracy === "number") {
        entry.liveBest = Math.max(entry.liveBest ?? 0, data.val_accuracy);
      }
      redrawSoon(id);
      return;
    }
    if (type !== "status") return;
    if (entry) {
      entry.job.status = data.status;
      entry.job.attempts = data.attempt ?? entry.job.attempts;
      if (typeof data.epoch === "number") entry.job.progress.epoch = data.epoch;
      redrawSoon(id);
      // The row's summary (best accuracy) and times come with the job itself.
      if (ENDED.has(data.status) || data.status === "running") refetch(id);
      return;
    }
    const isNew = data.status === "queued" && !data.attempt;
    if (isNew || (filters.status && data.status === filters.status)) {
      pendingNew.add(id);
      if (flushTimer === null) flushTimer = setTimeout(flushNew, 300);
    }
  }

  const stream = followEvents(`/v1/events${query({ study_id: filters.study })}`, {
    onEvent,
    onState(state, detail) {
      context.setLive(state, detail);
      // The service is back after the first page failed (it was down): read the page now,
      // rather than say "live" over an empty table.
      if (state === "live" && !loaded) firstLoad = firstLoad.then(() => (loaded ? undefined : loadFirstPage()));
    },
  });
  const ages = setInterval(() => {
    for (const time of tbody.querySelectorAll("time")) time.textContent = age(time.getAttribute("datetime"));
  }, 30000);

  firstLoad = loadFirstPage();
  return () => {
    stream.close();
    clearInterval(ages);
    if (flushTimer) clearTimeout(flushTimer);
  };
}

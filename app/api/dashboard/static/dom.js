// Small helpers to build the page and to say numbers and times the way a person reads them.

// el("a", {href: "#/x", class: "y"}, "text", child...): an element; null children are skipped.
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (value === true) node.setAttribute(name, "");
    else node.setAttribute(name, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

// A table of `headers` and `rows` (each a list of <td>s). On a phone each row becomes a card of
// "header: value" lines (style.css, table.cards), so no page scrolls sideways to read one.
export function dataTable(attributes, headers, rows) {
  const classes = ["plain", "cards", attributes.class].filter(Boolean).join(" ");
  return el("div", { class: "table-wrap" }, el("table", { ...attributes, class: classes },
    el("thead", {}, el("tr", {}, headers.map((header) => el("th", {}, header)))),
    el("tbody", {}, rows.map((cells) => el("tr", {}, cells.flat().map((cell, index) => {
      if (!cell.hasAttribute("data-label")) cell.setAttribute("data-label", headers[index]);
      return cell;
    }))))));
}

export function clear(node, ...children) {
  node.replaceChildren(...children.flat().filter((child) => child !== null && child !== undefined));
  return node;
}

export const ENDED = new Set(["succeeded", "failed", "cancelled"]);

export const STATUS_HELP = {
  queued: "waiting for a worker",
  running: "training now",
  succeeded: "finished every epoch (or stopped early)",
  failed: "stopped by an error",
  cancelled: "stopped on request",
};

export function statusBadge(status, cancelRequested = false) {
  const text = cancelRequested && status === "running" ? "cancelling" : status;
  return el("span", { class: `badge ${status}`, title: STATUS_HELP[status] || "" }, text);
}

export function percent(value, digits = 1) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  return `${(value * 100).toFixed(digits)} %`;
}

export function number(value, digits = 3) {
  if (value === null || value === undefined) return "–";
  if (typeof value !== "number") return String(value);
  if (value !== 0 && (Math.abs(value) < 10 ** -digits || Math.abs(value) >= 1e5)) {
    return value.toExponential(2);
  }
  return String(Number(value.toFixed(digits)));
}

export function bytes(value) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let size = value;
  let unit = 0;
  while (size >= 1024 && unit < units.length - 1) {
    size /= 1024;
    unit += 1;
  }
  return `${size.toFixed(unit ? 1 : 0)} ${units[unit]}`;
}

export function age(iso, now = Date.now()) {
  if (!iso) return "–";
  const seconds = Math.max(0, Math.round((now - Date.parse(iso)) / 1000));
  if (seconds < 60) return `${seconds} s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
  return `${Math.floor(seconds / 86400)} d ago`;
}

export function moment(iso) {
  return iso ? new Date(iso).toLocaleString() : "–";
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 120) return `${seconds.toFixed(1)} s`;
  return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
}

export function progressBar(epoch, epochs) {
  const fraction = epochs ? Math.min(1, epoch / epochs) : 0;
  return el(
    "div",
    { class: "progress", title: `${epoch} of ${epochs} epochs` },
    el("div", { class: "bar", style: `width: ${(fraction * 100).toFixed(1)}%` }),
    el("span", {}, `${epoch}/${epochs}`),
  );
}

// What a spec's normalization and dropout say, in a few words.
export function normalizationOf(spec) {
  const normalization = spec?.model?.normalization;
  if (!normalization || normalization.type === "none") return "none";
  const where = normalization.position === "after_activation" ? " (after act.)" : "";
  return `${normalization.type.replace("_", " ")}${where}`;
}

export function dropoutOf(spec) {
  const dropout = spec?.model?.dropout;
  if (!dropout) return "–";
  const rates = [].concat(dropout.rate);
  const rate = rates.every((r) => r === rates[0]) ? String(rates[0]) : rates.join("/");
  return rate === "0" && !dropout.input_rate ? "none" : rate;
}

export function jobTitle(job) {
  return job.name || `job ${job.id.slice(0, 8)}`;
}

export function errorBox(error) {
  return el("div", { class: "error-box", role: "alert" }, `Could not load: ${error.message}`);
}

// The dashboard's entry: routes by the URL's #fragment to one view at a time.
//   #/jobs?status=&tag=&study=   the jobs table        #/jobs/<id>      one job
//   #/studies                    the studies           #/studies/<id>   one study's report
//   #/compare?jobs=a,b,c         overlaid curves
// Each view gets (root, params, context) and returns a function that stops what it started
// (event streams, timers) when the person moves on.

import { forgetKey, storedKey } from "./api.js";
import { forgetCharts } from "./charts.js";
import { clear, el } from "./dom.js";
import { compareView } from "./views/compare.js";
import { jobView } from "./views/job.js";
import { jobsView } from "./views/jobs.js";
import { studiesView, studyView } from "./views/study.js";

const root = document.getElementById("view");
const live = document.getElementById("live");
let stop = () => {};

// "ended": the view follows nothing (a finished job, a study page): nothing more will change.
// "busy": the service refused the stream (too many open for this tenant): say what to do.
const LIVE_TEXT = {
  live: "live",
  reconnecting: "reconnecting…",
  busy: "not live: too many tabs open",
  refused: "not live: the service refused this view's updates",
  ended: "up to date",
};
const LIVE_HELP = {
  busy: "This page does not update itself: the service allows only so many live pages per tenant " +
    "(TRAINSVC_TENANT_MAX_STREAMS), and that many are open (other tabs, other people with the " +
    "same tenant). Close one, and this page goes live again within seconds.",
  refused: "The service refused this view's event stream, and asking again would not change that:",
};

const context = {
  // The header's badge: whether the view's event stream is connected.
  setLive(state, detail) {
    live.textContent = LIVE_TEXT[state] || state;
    live.className = `live state-${state}`;
    live.title = [LIVE_HELP[state] || "Live updates from the event stream", detail].filter(Boolean).join("\n\n");
  },
};

function parse(hash) {
  const [path, search = ""] = hash.replace(/^#/, "").split("?");
  const parts = path.split("/").filter(Boolean);
  return { parts, params: new URLSearchParams(search) };
}

function route() {
  stop();
  forgetCharts();
  context.setLive("ended");
  const { parts, params } = parse(location.hash || "#/jobs");
  const section = parts[0] || "jobs";
  for (const link of document.querySelectorAll("[data-nav]")) {
    link.classList.toggle("current", link.dataset.nav === section);
  }
  clear(root);
  window.scrollTo(0, 0);
  let view;
  if (section === "jobs" && parts[1]) view = jobView(root, parts[1], context);
  else if (section === "jobs") view = jobsView(root, params, context);
  else if (section === "studies" && parts[1]) view = studyView(root, parts[1], context);
  else if (section === "studies") view = studiesView(root, params, context);
  else if (section === "compare") view = compareView(root, params, context);
  else {
    root.append(
      el("h1", {}, "Page not found"),
      el("p", {}, "Nothing lives at ", el("code", {}, location.hash), ". ", el("a", { href: "#/jobs" }, "Back to the jobs")),
    );
  }
  stop = typeof view === "function" ? view : () => {};
}

document.getElementById("forget-key").addEventListener("click", () => {
  forgetKey();
  route();
});
document.getElementById("forget-key").hidden = !storedKey();
window.addEventListener("hashchange", route);
route();

// The web app: a hash router over three views.
//   #/            submit a job, and my jobs (newest first, live)
//   #/jobs/{id}   one job: live progress, previews, the grid and its tiles, details, curl
//   #/farm        the farm for operators, from /metrics

import { FileUrls } from "./client.js";
import { farmView } from "./farm.js";
import { homeView } from "./home.js";
import { jobView } from "./job.js";

const main = document.getElementById("view");
let current = null; // {controller, urls} of the view on screen

function route() {
  if (current) {
    current.controller.abort();
    current.urls.release();
  }
  current = { controller: new AbortController(), urls: new FileUrls() };
  const hash = location.hash.replace(/^#/, "") || "/";
  const context = { ...current, signal: current.controller.signal };
  const job = /^\/jobs\/([0-9a-f]{32})$/.exec(hash);
  let view;
  let nav = "home";
  if (job) view = jobView(job[1], context);
  else if (hash === "/farm") {
    view = farmView(context);
    nav = "farm";
  } else view = homeView(context);
  for (const link of document.querySelectorAll("[data-nav]")) {
    if (link.dataset.nav === nav) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  main.replaceChildren(view);
  main.focus({ preventScroll: true });
  window.scrollTo(0, 0);
}

function closeOnClick(id) {
  const dialog = document.getElementById(id);
  dialog.addEventListener("click", (event) => {
    if (event.target === dialog) dialog.close(); // a click on the backdrop
  });
}

document.getElementById("tile-close").addEventListener("click", () => {
  document.getElementById("tile-dialog").close();
});
closeOnClick("tile-dialog");
window.addEventListener("hashchange", route);
route();

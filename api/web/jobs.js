// My jobs: newest first, a page at a time (cursor), a status filter, a live progress bar per
// running job, Cancel and Again. Live from GET /v1/events when the API has it; otherwise it
// polls the running and queued jobs every second or so (two requests, however many jobs).

import { ApiError, json, sleep } from "./client.js";
import { errorBox, h, progressBar, setProgress, setStatus, statusBadge, when } from "./dom.js";
import { againBody } from "./form.js";
import { FINISHED, watchAll } from "./watch.js";

const PAGE = 20;
const POLL_MS = 1200;
const STATUSES = ["queued", "running", "succeeded", "failed", "canceled"];

export function jobList({ signal }) {
  const rows = new Map(); // id → row
  let cursor = null;
  let filter = "";
  let generation = 0; // a reload makes older answers stale
  const list = h("ol", { class: "jobs", "aria-live": "off" });
  const message = h("div", { "aria-live": "polite" });
  const more = h("button", { type: "button", hidden: true }, "Load more");
  const select = h("select", { id: "status-filter" },
    h("option", { value: "" }, "all"), STATUSES.map((s) => h("option", { value: s }, s)));

  function row(job) {
    const badge = statusBadge(job.status);
    const bar = progressBar(`progress of job ${job.id.slice(0, 8)}`);
    const cancel = h("button", { type: "button", class: "cancel" }, "Cancel");
    const again = h("button", { type: "button", class: "again" }, "Again");
    const error = h("p", { class: "error" });
    const p = job.params;
    const element = h("li", { class: "job", "data-id": job.id },
      h("div", { class: "job-head" },
        h("a", { class: "prompt", href: `#/jobs/${job.id}` }, p.text), badge),
      bar,
      h("p", { class: "meta" },
        `${when(job.created_at)} · ${p.grid_size}×${p.grid_size} · ${p.model} · seed ${p.seed}` +
          (p.priority === "bulk" ? " · bulk" : "")),
      h("div", { class: "actions" }, cancel, again),
      error);
    const entry = { element, badge, bar, cancel, job };
    cancel.addEventListener("click", async () => {
      cancel.disabled = true;
      try {
        update(await json(`/v1/jobs/${job.id}`, { method: "DELETE" }));
      } catch (e) {
        error.textContent = e.message;
        if (e instanceof ApiError && e.status === 409) refresh(job.id);
      }
    });
    again.addEventListener("click", async () => {
      again.disabled = true;
      try {
        add(await json("/v1/jobs", { method: "POST", body: againBody(entry.job.params) }));
      } catch (e) {
        error.textContent = e.message;
      } finally {
        again.disabled = false;
      }
    });
    rows.set(job.id, entry);
    update(job);
    return element;
  }

  function update(job) {
    const entry = rows.get(job.id);
    if (!entry) return;
    entry.job = job;
    setStatus(entry.badge, job.status);
    // Its place in its lane while queued (GET answers it; events do not carry it).
    if (job.status === "queued" && job.queue_position) {
      entry.badge.textContent = `queued · #${job.queue_position}`;
    }
    setProgress(entry.bar, job.progress.step, job.progress.total);
    entry.bar.hidden = FINISHED.has(job.status);
    entry.cancel.hidden = FINISHED.has(job.status);
    entry.cancel.disabled = job.cancel_requested;
    entry.element.dataset.status = job.status;
  }

  function progress({ id, step, total }) {
    const entry = rows.get(id);
    if (entry) setProgress(entry.bar, step, total);
  }

  // A job made here or elsewhere: at the top, if the filter shows it.
  function add(job) {
    if (rows.has(job.id)) return update(job);
    if (filter && job.status !== filter) return;
    list.prepend(row(job));
    message.replaceChildren();
  }

  async function refresh(id) {
    try {
      update(await json(`/v1/jobs/${id}`, { signal }));
    } catch {
      // the next poll tries again
    }
  }

  async function load(reset) {
    const mine = reset ? ++generation : generation;
    if (reset) {
      rows.clear();
      list.replaceChildren();
      cursor = null;
    }
    const query = new URLSearchParams({ limit: PAGE });
    if (filter) query.set("status", filter);
    if (cursor) query.set("cursor", cursor);
    more.disabled = true;
    try {
      const page = await json(`/v1/jobs?${query}`, { signal });
      if (mine !== generation) return;
      for (const job of page.jobs) if (!rows.has(job.id)) list.append(row(job));
      cursor = page.next_cursor;
      more.hidden = !cursor;
      message.replaceChildren(rows.size ? "" : h("p", { class: "muted" }, "No jobs yet."));
    } catch (error) {
      if (!signal.aborted) message.replaceChildren(errorBox(error));
    } finally {
      more.disabled = false;
    }
  }

  // Without an event stream: the running and queued jobs every POLL_MS; a job shown as
  // running that is in neither answer has finished, and is read once more.
  async function poll() {
    while (!signal.aborted) {
      await sleep(POLL_MS, signal);
      if (signal.aborted) return;
      try {
        const seen = new Set();
        for (const status of ["running", "queued"]) {
          const page = await json(`/v1/jobs?status=${status}&limit=100`, { signal });
          for (const job of page.jobs.reverse()) {
            seen.add(job.id);
            const newest = list.firstElementChild?.dataset.id || "";
            if (rows.has(job.id)) update(job);
            else if (job.id > newest) add(job);
          }
        }
        for (const [id, entry] of rows) {
          if (!seen.has(id) && !FINISHED.has(entry.job.status)) await refresh(id);
        }
      } catch {
        // a blip: try again at the next round
      }
    }
  }

  select.addEventListener("change", () => {
    filter = select.value;
    load(true);
  });
  more.addEventListener("click", () => load(false));
  load(true);
  watchAll({ job: (job) => add(job), progress }, signal).then((stopped) => {
    if (!stopped) poll();
  });

  return {
    element: h("section", { class: "card", "aria-labelledby": "jobs-title" },
      h("div", { class: "section-head" }, h("h2", { id: "jobs-title" }, "My jobs"),
        h("label", { for: "status-filter", class: "inline" }, "Status ", select)),
      message, list, more),
    add,
  };
}

// #/farm: the farm for operators, from the same numbers as /metrics, read every few seconds:
// queue depth, workers alive, models served, jobs by state, images per second over the last
// minutes (the counter's rate between scrapes, as Prometheus's rate() takes it), and job
// duration percentiles from the histogram.

import { keyHeaders, sleep } from "./client.js";
import { errorBox, h, svg } from "./dom.js";
import { buckets, parse, quantile, rate, value } from "./prom.js";

const SAMPLE_MS = 2000;
const WINDOW_S = 300;
const STATUSES = ["queued", "running", "succeeded", "failed", "canceled"];
const QUANTILES = [0.5, 0.9, 0.99];
const CHART = { width: 600, height: 160, pad: 28 };

function stat(id, label) {
  return h("div", { class: "stat" }, h("dt", {}, label), h("dd", { id, "data-value": "" }, "…"));
}

function setStat(id, number, text) {
  const element = document.getElementById(id);
  if (!element) return;
  element.dataset.value = String(number);
  element.textContent = text ?? String(number);
}

function seconds(s) {
  if (Number.isNaN(s)) return "no jobs yet";
  return s < 10 ? `${s.toFixed(2)} s` : `${s.toFixed(1)} s`;
}

export function farmView({ signal }) {
  const points = []; // [{t (s), rate}]
  let previous = null; // {t, images}
  const chart = svg("svg", {
    id: "rate-chart", viewBox: `0 0 ${CHART.width} ${CHART.height}`, role: "img",
    "aria-label": "images per second over the last five minutes",
  });
  const updated = h("p", { class: "muted", id: "farm-updated", "aria-live": "off" });
  const problem = h("div", { role: "alert" });
  const view = h("div", { class: "farm" },
    h("section", { class: "card" }, h("h1", {}, "Farm"),
      h("dl", { class: "stats" },
        stat("farm-queue-depth", "Queue depth"), stat("farm-workers", "Workers alive"),
        stat("farm-models", "Models served"), stat("farm-rate", "Images/s now")),
      updated, problem),
    h("section", { class: "card" }, h("h2", {}, "Jobs by state"),
      h("dl", { class: "stats" }, STATUSES.map((s) => stat(`farm-jobs-${s}`, s)))),
    h("section", { class: "card" }, h("h2", {}, "Images per second, last 5 minutes"), chart),
    h("section", { class: "card" }, h("h2", {}, "Job duration (all finished jobs)"),
      h("dl", { class: "stats" }, QUANTILES.map((q) => stat(`farm-p${Math.round(q * 100)}`, `p${Math.round(q * 100)}`)),
        stat("farm-finished", "Jobs measured"))));

  function draw() {
    const { width, height, pad } = CHART;
    const now = performance.now() / 1000;
    const max = Math.max(1, ...points.map((p) => p.rate));
    const x = (t) => pad + ((t - (now - WINDOW_S)) / WINDOW_S) * (width - pad - 4);
    const y = (r) => height - pad + 4 - (r / max) * (height - pad - 8);
    const shapes = [
      svg("line", { x1: pad, y1: y(0), x2: width - 4, y2: y(0), class: "axis" }),
      svg("line", { x1: pad, y1: y(max), x2: pad, y2: y(0), class: "axis" }),
    ];
    const label = (text, attrs) => {
      const t = svg("text", attrs);
      t.textContent = text;
      return t;
    };
    shapes.push(label(max.toFixed(max < 10 ? 1 : 0), { x: pad - 4, y: y(max) + 4, class: "tick end" }));
    shapes.push(label("0", { x: pad - 4, y: y(0) + 4, class: "tick end" }));
    shapes.push(label("−5 min", { x: pad, y: height - 6, class: "tick" }));
    shapes.push(label("now", { x: width - 4, y: height - 6, class: "tick end" }));
    if (points.length) {
      const d = points.map((p, i) => `${i ? "L" : "M"}${x(p.t).toFixed(1)},${y(p.rate).toFixed(1)}`);
      shapes.push(svg("path", { d: d.join(" "), class: "line" }));
    }
    chart.replaceChildren(...shapes);
  }

  function show(samples, t) {
    setStat("farm-queue-depth", value(samples, "dalle_farm_queue_depth"));
    setStat("farm-workers", value(samples, "dalle_farm_workers_alive"));
    const served = samples
      .filter((s) => s.name === "dalle_farm_model_served" && s.value > 0)
      .map((s) => s.labels.model);
    setStat("farm-models", served.join(" "), served.length ? served.join(", ") : "none");
    for (const status of STATUSES) {
      setStat(`farm-jobs-${status}`, value(samples, "dalle_farm_jobs", { status }));
    }
    const histogram = buckets(samples, "dalle_farm_job_duration_seconds");
    for (const q of QUANTILES) {
      const v = quantile(q, histogram);
      setStat(`farm-p${Math.round(q * 100)}`, v, seconds(v));
    }
    setStat("farm-finished", value(samples, "dalle_farm_job_duration_seconds_count"));
    const images = value(samples, "dalle_farm_images_generated_total") ?? 0;
    if (previous) {
      const r = rate(previous.images, images, t - previous.t);
      points.push({ t, rate: r });
      setStat("farm-rate", r, r.toFixed(2));
    }
    previous = { t, images };
    while (points.length && points[0].t < t - WINDOW_S) points.shift();
    draw();
    updated.textContent = `Read from /metrics at ${new Date().toLocaleTimeString()}, every ${
      SAMPLE_MS / 1000} s.`;
  }

  (async () => {
    while (!signal.aborted) {
      try {
        // /metrics needs no key; it is sent anyway if the page has one.
        const response = await fetch("/metrics", { headers: keyHeaders(), signal, cache: "no-store" });
        if (!response.ok) throw new Error(`/metrics answered ${response.status}`);
        show(parse(await response.text()), performance.now() / 1000);
        problem.replaceChildren();
      } catch (error) {
        if (signal.aborted) return;
        problem.replaceChildren(errorBox(error));
      }
      await sleep(SAMPLE_MS, signal);
    }
  })();
  draw();
  return view;
}

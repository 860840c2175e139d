// #/jobs/{id}: one job, live. Progress and progressive previews as they arrive, then the grid
// and its tiles (each downloadable, each opens large), its params, the seed used, the weights'
// identity and timings (from the job's job.json, when the API serves its files), and a curl
// command that submits the same job again.

import { ApiError, currentKey, json } from "./client.js";
import { errorBox, h, progressBar, setProgress, setStatus, statusBadge, when } from "./dom.js";
import { againBody } from "./form.js";
import { FINISHED, watchJob } from "./watch.js";

const FRAME_STEPS = 32; // a preview is stored every 32 decoder steps (8 frames)

export function jobView(id, { signal, urls }) {
  const badge = statusBadge("queued");
  const bar = progressBar("job progress");
  bar.id = "job-progress";
  const stepText = h("span", { id: "job-step", class: "muted" });
  const prompt = h("p", { class: "prompt-text" });
  const cancel = h("button", { type: "button", id: "job-cancel" }, "Cancel");
  const again = h("button", { type: "button", id: "job-again" }, "Again (seed + 1)");
  const notes = h("div", { "aria-live": "polite" });
  const previews = h("section", { id: "previews", class: "card", hidden: true },
    h("h2", {}, "Previews"));
  const previewStrip = h("div", { class: "previews" });
  previews.append(previewStrip);
  const result = h("section", { id: "result", class: "card", hidden: true });
  const details = h("section", { id: "details", class: "card" }, h("h2", {}, "Details"));
  const view = h("div", { class: "job-page" },
    h("section", { class: "card" },
      h("div", { class: "section-head" }, h("h1", {}, `Job ${id.slice(0, 8)}`), badge),
      prompt, h("div", { class: "progress-row" }, bar, stepText),
      h("div", { class: "actions" }, cancel, again), notes),
    previews, result, details);

  let job = null;
  const shownFrames = new Set();
  let probing = false;
  let noProbes = false;

  function showJob(next) {
    job = next;
    setStatus(badge, job.status);
    prompt.textContent = job.params.text;
    showProgress(job.progress);
    cancel.hidden = FINISHED.has(job.status);
    cancel.disabled = job.cancel_requested;
    bar.hidden = stepText.hidden = job.status === "succeeded";
    notes.replaceChildren(
      ...(job.error ? [h("p", { class: "error" }, job.error)] : []),
      ...(job.cancel_requested && !FINISHED.has(job.status)
        ? [h("p", { class: "muted" }, "Cancel requested: it stops at its next step.")] : []),
    );
    if (job.params.progressive_outputs) {
      previews.hidden = false;
      for (const [i, file] of (job.result?.previews || []).entries()) addPreview(i + 1, file.url);
      probePreviews();
    }
    if (job.status === "succeeded" && result.hidden) showResult();
    showDetails();
  }

  function showProgress({ step, total }) {
    setProgress(bar, step, total);
    stepText.textContent = `${step} / ${total}`;
  }

  async function addPreview(frame, url) {
    if (shownFrames.has(frame)) return true;
    shownFrames.add(frame);
    const img = h("img", { alt: `preview ${frame} of 8`, "data-frame": frame });
    const figure = h("figure", {}, img, h("figcaption", {}, `frame ${frame}`));
    const after = [...previewStrip.children].find((f) => Number(f.firstChild.dataset.frame) > frame);
    previewStrip.insertBefore(figure, after || null);
    try {
      img.src = await urls.get(url);
      return true;
    } catch (error) {
      figure.remove();
      shownFrames.delete(frame);
      // Results in S3: the API has no file route to probe (its 404 says so).
      if (error instanceof ApiError && /\bS3\b/.test(error.problem?.detail || "")) noProbes = true;
      return false;
    }
  }

  // Without an event stream, previews are found by their fixed keys once the job's progress
  // has passed their frame (on the API's own file route; a presigned store has none).
  async function probePreviews() {
    if (probing || noProbes || !job || job.result) return;
    probing = true;
    try {
      const frames = Math.floor(Number(bar.value) / FRAME_STEPS);
      for (let frame = 1; frame <= frames && !signal.aborted; frame++) {
        if (shownFrames.has(frame)) continue;
        // Not stored yet, or no such route here: the next update tries again.
        if (!(await addPreview(frame, `/v1/files/jobs/${id}/previews/${frame}.png`))) break;
      }
    } finally {
      probing = false;
    }
  }

  async function showResult() {
    result.hidden = false;
    const grid = job.result.grid;
    const gridImg = h("img", { id: "grid-image", alt: `the grid: ${job.params.text}` });
    const gridLink = h("a", { class: "button", download: `${id}-grid.png` }, "Download grid");
    const tiles = h("ul", { class: "tiles" });
    tiles.style.gridTemplateColumns = `repeat(${job.params.grid_size}, 1fr)`;
    tiles.style.maxWidth = `${Math.min(40, 10 * job.params.grid_size)}rem`;
    result.replaceChildren(h("h2", {}, "Result"), h("figure", { class: "grid" }, gridImg),
      h("p", { class: "actions" }, gridLink), h("h3", {}, "Tiles"), tiles);
    try {
      const url = await urls.get(grid.url);
      gridImg.src = url;
      gridLink.href = url;
    } catch (error) {
      result.append(errorBox(error));
    }
    for (const [i, file] of job.result.images.entries()) {
      const img = h("img", { alt: `tile ${i + 1}` });
      const open = h("button", { type: "button", class: "tile", "aria-label": `open tile ${i + 1}` }, img);
      const save = h("a", { class: "download", download: `${id}-${i}.png` }, `Download ${i + 1}`);
      tiles.append(h("li", {}, open, save));
      urls.get(file.url).then((url) => {
        img.src = url;
        save.href = url;
        open.addEventListener("click", () => openTile(i, url));
      }, () => {});
    }
  }

  function openTile(i, url) {
    const dialog = document.getElementById("tile-dialog");
    document.getElementById("tile-title").textContent = `Tile ${i + 1}`;
    const img = document.getElementById("tile-image");
    img.src = url;
    img.alt = `tile ${i + 1}: ${job.params.text}`;
    const link = document.getElementById("tile-download");
    link.href = url;
    link.download = `${id}-${i}.png`;
    dialog.showModal();
  }

  let record = null; // job.json, once read
  function showDetails() {
    const p = job.params;
    const rows = [
      ["Seed used", p.seed], ["Grid size", `${p.grid_size}×${p.grid_size}`], ["Model", p.model],
      ["Temperature", p.temperature], ["Top k", p.top_k],
      ["Supercondition factor", p.supercondition_factor], ["Seamless", p.is_seamless ? "yes" : "no"],
      ["Progressive previews", p.progressive_outputs ? "yes" : "no"],
      ["Created", when(job.created_at)], ["Started", when(job.started_at)],
      ["Finished", when(job.finished_at)], ["Worker", job.worker || ""],
      ["Attempts", job.attempts],
    ];
    if (record) {
      const t = record.timings || {};
      if (t.queued_s !== undefined) rows.push(["Queued for", `${t.queued_s} s`]);
      if (t.render_s !== undefined) rows.push(["Render time", `${t.render_s} s`]);
      if (t.upload_s !== undefined) rows.push(["Upload time", `${t.upload_s} s`]);
      if (record.resumed_from) rows.push(["Resumed from step", record.resumed_from]);
      const w = record.weights || {};
      if (w.sha256) rows.push(["Weights (sha256)", w.sha256]);
      if (w.model) rows.push(["Weights model", w.model]);
      if (w.format) rows.push(["Weights format", w.format]);
    }
    const list = h("dl", { class: "params" },
      rows.flatMap(([name, value]) => [h("dt", {}, name), h("dd", {}, String(value))]));
    const command = curlCommand(p);
    const code = h("textarea", { id: "curl", readonly: true, rows: 4, "aria-label": "curl command" });
    code.value = command;
    const copy = h("button", { type: "button", id: "copy-curl" }, "Copy");
    const copied = h("span", { class: "muted", "aria-live": "polite" });
    copy.addEventListener("click", async () => {
      try {
        await navigator.clipboard.writeText(command);
      } catch {
        code.select(); // no clipboard API (plain http): select it for Ctrl+C
        document.execCommand?.("copy");
      }
      copied.textContent = "copied";
    });
    details.replaceChildren(h("h2", {}, "Details"), list,
      h("h3", {}, h("label", { for: "curl" }, "The same job with curl")), code,
      h("p", { class: "actions" }, copy, copied),
      h("p", { class: "hint" }, "Set DALLE_FARM_KEY to your API key first" +
        (currentKey() ? "." : " (a farm on loopback needs none).")));
  }

  async function loadRecord() {
    try {
      record = await json(`/v1/files/jobs/${id}/job.json`, { signal });
      showDetails();
    } catch {
      // results in S3 (no file route): the details stay without weights and timings
    }
  }

  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    try {
      showJob(await json(`/v1/jobs/${id}`, { method: "DELETE" }));
    } catch (error) {
      notes.replaceChildren(errorBox(error));
    }
  });
  again.addEventListener("click", async () => {
    again.disabled = true;
    try {
      const next = await json("/v1/jobs", { method: "POST", body: againBody(job.params) });
      location.hash = `#/jobs/${next.id}`;
    } catch (error) {
      notes.replaceChildren(errorBox(error));
      again.disabled = false;
    }
  });

  (async () => {
    try {
      showJob(await json(`/v1/jobs/${id}`, { signal }));
    } catch (error) {
      if (!signal.aborted) {
        view.replaceChildren(errorBox(error instanceof ApiError && error.status === 404
          ? new Error(`There is no job ${id} for this key.`) : error));
      }
      return;
    }
    if (!FINISHED.has(job.status)) {
      await watchJob(id, {
        job: showJob,
        progress: (p) => { showProgress(p); probePreviews(); },
        preview: (p) => addPreview(p.frame, p.url),
      }, signal);
    }
    if (job?.status === "succeeded") loadRecord();
  })();
  return view;
}

// A shell command that submits these params (the seed included) again; the key is
// $DALLE_FARM_KEY, never the real one.
export function curlCommand(params) {
  const body = JSON.stringify(params).replaceAll("'", "'\\''");
  return `curl -X POST '${location.origin}/v1/jobs' \\\n` +
    `  -H "Authorization: Bearer $DALLE_FARM_KEY" -H 'Content-Type: application/json' \\\n` +
    `  -d '${body}'`;
}

// Live updates of jobs: the API's event streams when it has them, polling otherwise.
//
// watchJob(id, on, signal): on.job(job) for each new state, on.progress({step, total}),
// on.preview({frame, key, url}), until the job is finished (queued/running → the end).
// It reads GET /v1/jobs/{id}/events; without that endpoint (404), or after the stream broke
// a few times in a row, it polls GET /v1/jobs/{id} every second instead.

import { json, sleep } from "./client.js";
import { EventParser, NoStream, readStream } from "./sse.js";

export const FINISHED = new Set(["succeeded", "failed", "canceled"]);
const POLL_MS = 1000;
const STREAM_TRIES = 3;

export async function watchJob(id, on, signal) {
  const path = `/v1/jobs/${encodeURIComponent(id)}`;
  const parser = new EventParser();
  let finished = false;
  const onEvent = (type, data) => {
    if (type === "status" || type === "done") {
      on.job?.(data);
      if (type === "done" || FINISHED.has(data.status)) finished = true;
    } else if (type === "progress") on.progress?.(data);
    else if (type === "preview") on.preview?.(data);
  };
  for (let failures = 0; failures < STREAM_TRIES && !signal.aborted; ) {
    try {
      await readStream(`${path}/events`, parser, onEvent, signal);
      if (finished || signal.aborted) return;
      failures = 0; // a clean end before "done": reconnect with Last-Event-ID
    } catch (error) {
      if (signal.aborted) return;
      if (error instanceof NoStream) break;
      failures += 1;
    }
    await sleep(POLL_MS * (failures + 1), signal);
  }
  while (!signal.aborted) {
    try {
      const job = await json(path, { signal });
      on.job?.(job);
      if (FINISHED.has(job.status)) return;
    } catch (error) {
      if (signal.aborted) return;
      on.error?.(error); // a blip (the server restarting): keep polling
    }
    await sleep(POLL_MS, signal);
  }
}

// watchAll(on, signal): every job of the caller as it changes, from GET /v1/events; false
// (at once, or once the stream broke a few times) when there is no such stream, for the
// caller to poll instead.
export async function watchAll(on, signal) {
  const parser = new EventParser();
  const onEvent = (type, data) => {
    if (type === "status" || type === "done") on.job?.(data);
    else if (type === "progress") on.progress?.(data);
  };
  for (let failures = 0; failures < STREAM_TRIES && !signal.aborted; ) {
    try {
      await readStream("/v1/events", parser, onEvent, signal);
      failures = 0;
    } catch (error) {
      if (signal.aborted || error instanceof NoStream) break;
      failures += 1;
    }
    await sleep(POLL_MS * (failures + 1), signal);
  }
  return signal.aborted;
}

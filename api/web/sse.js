// Server-sent events over fetch(): EventSource cannot send the Authorization header, so the
// stream is read with a ReadableStream reader and parsed here (the WHATWG event-stream
// format: "field: value" lines, a blank line ends an event, lines starting with ":" are
// comments). `Last-Event-ID` resumes after a reconnect.

import { request } from "./client.js";

export class NoStream extends Error {} // the endpoint is not there (404, not an event stream)

// Parses chunks of text into events {type, data, id}; feed() returns the complete ones.
export class EventParser {
  constructor() {
    this.buffer = "";
    this.reset();
    this.lastId = null;
  }
  reset() {
    this.type = "";
    this.data = [];
  }
  feed(text) {
    this.buffer += text;
    const events = [];
    for (;;) {
      const match = /\r\n|\r|\n/.exec(this.buffer);
      // A lone \r at the end may be the first half of \r\n: wait for more.
      if (!match || (match[0] === "\r" && match.index === this.buffer.length - 1)) break;
      const line = this.buffer.slice(0, match.index);
      this.buffer = this.buffer.slice(match.index + match[0].length);
      const event = this.line(line);
      if (event) events.push(event);
    }
    return events;
  }
  line(line) {
    if (line === "") {
      const event = this.data.length
        ? { type: this.type || "message", data: this.data.join("\n"), id: this.lastId }
        : null;
      this.reset();
      return event;
    }
    if (line.startsWith(":")) return null;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this.type = value;
    else if (field === "data") this.data.push(value);
    else if (field === "id" && !value.includes("\0")) this.lastId = value;
    return null;
  }
}

// Read one connection of the stream at `path`, calling onEvent(type, data) per event (data is
// parsed JSON). Resolves when the server ends the stream; NoStream if there is none.
export async function readStream(path, parser, onEvent, signal) {
  const headers = { Accept: "text/event-stream" };
  if (parser.lastId) headers["Last-Event-ID"] = parser.lastId;
  const response = await request(path, { headers, signal });
  const type = response.headers.get("Content-Type") || "";
  if (!response.ok || !type.startsWith("text/event-stream") || !response.body) {
    response.body?.cancel().catch(() => {});
    throw new NoStream(`${path}: ${response.status}`);
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      for (const event of parser.feed(value)) {
        let data;
        try {
          data = JSON.parse(event.data);
        } catch {
          continue; // not one of ours
        }
        onEvent(event.type, data);
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

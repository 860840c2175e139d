// The Prometheus text format (what /metrics answers), read in the page: samples, counter
// rates between two scrapes, and quantiles of a histogram, as Prometheus computes them.

// parse(text) → [{name, labels: {…}, value}] for every sample line.
export function parse(text) {
  const samples = [];
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (!line || line.startsWith("#")) continue;
    const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)/.exec(line);
    if (!match) continue;
    const labels = {};
    const body = match[3] || "";
    const pair = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
    for (let m = pair.exec(body); m; m = pair.exec(body)) {
      labels[m[1]] = m[2].replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
    }
    samples.push({ name: match[1], labels, value: parseValue(match[4]) });
  }
  return samples;
}

function parseValue(text) {
  if (text === "+Inf") return Infinity;
  if (text === "-Inf") return -Infinity;
  return Number(text); // NaN stays NaN
}

// The one value of `name` whose labels include `labels`, or undefined.
export function value(samples, name, labels = {}) {
  const found = samples.find(
    (s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v),
  );
  return found?.value;
}

// [{le, count}] of histogram `name`, sorted by le (+Inf last).
export function buckets(samples, name) {
  return samples
    .filter((s) => s.name === `${name}_bucket`)
    .map((s) => ({ le: parseValue(s.labels.le), count: s.value }))
    .sort((a, b) => a.le - b.le);
}

// Per-second rate of a counter from two scrapes; a counter that went down was reset (a
// restart), and then counts from zero, as Prometheus's rate() takes it.
export function rate(before, after, seconds) {
  if (!(seconds > 0)) return 0;
  const increase = after >= before ? after - before : after;
  return increase / seconds;
}

// histogram_quantile(q): linear interpolation inside the bucket that holds the q-th
// observation; NaN without observations; the highest finite bound if it falls in +Inf.
export function quantile(q, sortedBuckets) {
  if (sortedBuckets.length < 2) return NaN;
  const total = sortedBuckets[sortedBuckets.length - 1].count;
  if (!(total > 0)) return NaN;
  const rank = q * total;
  let lowerBound = 0;
  let lowerCount = 0;
  for (const [i, { le, count }] of sortedBuckets.entries()) {
    if (count >= rank) {
      if (le === Infinity) return sortedBuckets[sortedBuckets.length - 2].le;
      if (i === 0 && le <= 0) return le;
      if (count === lowerCount) return le;
      return lowerBound + (le - lowerBound) * ((rank - lowerCount) / (count - lowerCount));
    }
    lowerBound = le;
    lowerCount = count;
  }
  return NaN;
}

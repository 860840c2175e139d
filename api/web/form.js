// The submit form: the prompt and every JobParams setting, with limits and defaults read
// from /openapi.json (the contract, with this farm's own grid limit), the API's field errors
// shown at their fields, and a warning when the prompt looks longer than the model reads.

import { ApiError, json } from "./client.js";
import { h } from "./dom.js";

export const TEXT_TOKENS = 64; // the model reads this many text tokens
export const SEED_MAX = 2 ** 31 - 1;

// name → [label, kind, default, min, max, step, hint]; the document refines min/max/default.
const FIELDS = [
  ["grid_size", "Grid size", "number", 1, 1, 8, 1, "grid_size² images"],
  ["seed", "Seed", "number", "", -1, SEED_MAX, 1, "empty, 0 or -1: random"],
  ["model", "Model", "select", "mini"],
  ["temperature", "Temperature", "number", 1, 0.01, 100, "any", "lower is more conservative"],
  ["top_k", "Top k", "number", 256, 1, 16384, 1, "sample from the k likeliest tokens"],
  ["supercondition_factor", "Supercondition factor", "number", 16, 0, 128, "any",
    "how strongly the text steers the image"],
  ["is_seamless", "Seamless tiles", "checkbox", false],
  ["progressive_outputs", "Progressive previews", "checkbox", false],
];

// About how many tokens the model's BPE makes of `text`: one per short word or punctuation
// mark, more for long words, and the start and end tokens. An estimate only.
export function estimateTokens(text) {
  const pieces = text.toLowerCase().match(/[\p{L}\p{N}]+|[^\s\p{L}\p{N}]/gu) || [];
  let count = 2;
  for (const piece of pieces) count += Math.max(1, Math.ceil(piece.length / 7));
  return count;
}

function randomKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16)); // randomUUID needs https
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

let schemaPromise = null;
function jobParamsSchema() {
  schemaPromise ||= fetch("/openapi.json")
    .then((r) => (r.ok ? r.json() : null))
    .then((doc) => doc?.components?.schemas?.JobParams?.properties || null)
    .catch(() => null);
  return schemaPromise;
}

export function submitForm({ onSubmitted }) {
  const inputs = {};
  const errors = {};
  const rows = [];
  const text = h("textarea", {
    id: "text", name: "text", rows: 3, required: true, "aria-describedby": "text-hint text-error",
  });
  inputs.text = text;
  errors.text = h("p", { id: "text-error", class: "field-error", role: "alert" });
  const hint = h("p", { id: "text-hint", class: "hint" });
  const updateHint = () => {
    const tokens = estimateTokens(text.value);
    hint.textContent = `About ${tokens} of the ${TEXT_TOKENS} tokens the model reads (an estimate).`;
    if (tokens > TEXT_TOKENS) {
      hint.textContent += " The model will probably not read the end of this prompt.";
      hint.classList.add("warning");
    } else hint.classList.remove("warning");
  };
  text.addEventListener("input", updateHint);
  updateHint();

  for (const [name, label, kind, value, min, max, step, note] of FIELDS) {
    const id = `field-${name}`;
    const error = h("p", { id: `${name}-error`, class: "field-error", role: "alert" });
    errors[name] = error;
    let input;
    if (kind === "select") {
      input = h("select", { id, name }, h("option", { value: "mini" }, "DALL·E Mini"),
        h("option", { value: "mega" }, "DALL·E Mega"));
      input.value = value;
    } else if (kind === "checkbox") {
      input = h("input", { id, name, type: "checkbox" });
      input.checked = value;
    } else {
      input = h("input", {
        id, name, type: "number", inputmode: step === 1 ? "numeric" : "decimal",
        min, max, step, value, placeholder: name === "seed" ? "random" : null,
      });
    }
    input.setAttribute("aria-describedby", `${name}-error`);
    inputs[name] = input;
    const caption = h("span", {}, label, note ? h("small", {}, ` (${note})`) : null);
    rows.push(
      kind === "checkbox"
        ? h("div", { class: "field check" }, input, h("label", { for: id }, caption), error)
        : h("div", { class: "field" }, h("label", { for: id }, caption), input, error),
    );
  }
  // The farm's own limits and defaults, as its document states them.
  jobParamsSchema().then((properties) => {
    if (!properties) return;
    for (const [name, schema] of Object.entries(properties)) {
      const input = inputs[name];
      if (!input || input.type !== "number") continue;
      if (schema.minimum !== undefined) input.min = schema.minimum;
      if (schema.maximum !== undefined) input.max = schema.maximum;
      if (schema.default !== undefined && name !== "seed") input.defaultValue = schema.default;
    }
  });

  const general = h("div", { class: "form-error", role: "alert" });
  const outcome = h("div", { class: "outcome", "aria-live": "polite" });
  const button = h("button", { type: "submit", class: "primary" }, "Render");
  const more = h("details", { class: "more" }, h("summary", {}, "More settings"),
    h("div", { class: "row" }, rows.slice(2)));
  const form = h(
    "form",
    { id: "submit-form", novalidate: true, "aria-label": "New job" },
    h("div", { class: "field" }, h("label", { for: "text" }, "Prompt"), text, hint, errors.text),
    h("div", { class: "row" }, rows.slice(0, 2)),
    more,
    general,
    h("div", { class: "actions" }, button),
    outcome,
  );

  const clearErrors = () => {
    general.replaceChildren();
    for (const [name, error] of Object.entries(errors)) {
      error.textContent = "";
      inputs[name].removeAttribute("aria-invalid");
    }
  };
  const showError = (field, message) => {
    const error = errors[field];
    if (!error) {
      general.append(h("p", { class: "error" }, `${field}: ${message}`));
      return;
    }
    error.textContent = error.textContent ? `${error.textContent} ${message}` : message;
    inputs[field].setAttribute("aria-invalid", "true");
    if (more.contains(error)) more.open = true;
  };

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors();
    const body = { text: text.value };
    let bad = false;
    for (const [name, , kind] of FIELDS) {
      const input = inputs[name];
      if (kind === "checkbox") body[name] = input.checked;
      else if (kind === "select") body[name] = input.value;
      else if (input.validity.badInput) {
        showError(name, "enter a number");
        bad = true;
      } else if (input.value !== "") body[name] = Number(input.value);
    }
    if (bad) return;
    button.disabled = true;
    try {
      const job = await json("/v1/jobs", {
        method: "POST", body, headers: { "Idempotency-Key": randomKey() },
      });
      outcome.replaceChildren(
        h("p", {}, "Submitted: ", h("a", { href: `#/jobs/${job.id}` }, `job ${job.id.slice(0, 8)}`),
          ` (seed ${job.params.seed}).`),
        ...(job.warnings || []).map((w) => h("p", { class: "warning", role: "status" }, w)),
      );
      onSubmitted(job);
    } catch (error) {
      const problem = error instanceof ApiError ? error.problem : null;
      if (problem?.errors?.length) for (const e of problem.errors) showError(e.field, e.message);
      else general.append(h("p", { class: "error" }, error.message));
      const first = form.querySelector("[aria-invalid=true]");
      first?.focus();
    } finally {
      button.disabled = false;
    }
  });
  return form;
}

// The same job's body with the next seed: "Again".
export function againBody(params) {
  const body = { ...params };
  body.seed = params.seed >= SEED_MAX || params.seed < 1 ? 1 : params.seed + 1;
  return body;
}

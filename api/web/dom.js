// A few DOM helpers: elements are built with textContent, never innerHTML, so a prompt or an
// error message can never become markup.

export function h(tag, attrs = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") element.className = value;
    else if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else element.setAttribute(name, value === true ? "" : String(value));
  }
  element.append(...children.flat().filter((child) => child !== null && child !== undefined));
  return element;
}

export function svg(tag, attrs = {}) {
  const element = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attrs)) element.setAttribute(name, String(value));
  return element;
}

// A <progress> for a job: value/max and the ARIA values a screen reader announces.
export function progressBar(label) {
  return h("progress", { class: "job-progress", max: 256, value: 0, "aria-label": label });
}

export function setProgress(bar, step, total) {
  bar.max = total;
  bar.value = step;
  bar.setAttribute("aria-valuemin", "0");
  bar.setAttribute("aria-valuemax", String(total));
  bar.setAttribute("aria-valuenow", String(step));
  bar.setAttribute("aria-valuetext", `${step} of ${total} steps`);
}

export function statusBadge(status) {
  return h("span", { class: `status status-${status}` }, status);
}

export function setStatus(badge, status) {
  badge.className = `status status-${status}`;
  badge.textContent = status;
}

export function when(iso) {
  if (!iso) return "";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? iso : date.toLocaleString();
}

export function errorBox(error) {
  return h("p", { class: "error", role: "alert" }, error?.message || String(error));
}

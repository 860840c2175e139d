// #/: the submit form above my jobs.

import { h } from "./dom.js";
import { submitForm } from "./form.js";
import { jobList } from "./jobs.js";

export function homeView(context) {
  const jobs = jobList(context);
  const form = submitForm({ onSubmitted: (job) => jobs.add(job) });
  return h("div", { class: "home" },
    h("section", { class: "card", "aria-labelledby": "new-title" },
      h("h1", { id: "new-title" }, "New job"), form),
    jobs.element);
}

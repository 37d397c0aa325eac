// Submit a spec (typed, pasted or loaded from a file) as YAML; the server's field errors appear beside it.
import { ApiError, json } from "./api.js";
import { h } from "./ui.js";

const EXAMPLE = `name: quadratic-heavy-ball
model: {layers: [20, 1], loss: mse, seed: 0}
data: {source: synthetic, name: regression, n_samples: 2000, n_features: 20, condition_number: 100}
optimizer: {method: heavy_ball, lr: 4.967, alpha: 0.3245}
batch: {size: null}
stopping: {max_epochs: 3000, target_loss: 1.0e-8}
cluster: {num_workers: 0, dtype: float64}`;
let draft = ""; // what was typed, kept while the tab lives

export function submitView(main) {
  const text = h("textarea", { id: "spec-text", rows: 22, spellcheck: "false", placeholder: EXAMPLE,
    "aria-describedby": "spec-errors", oninput: () => { draft = text.value; } });
  text.value = draft;
  const file = h("input", { type: "file", id: "spec-file", accept: ".yaml,.yml,.json", onchange: load });
  const errors = h("section", { id: "spec-errors", class: "errors", "aria-live": "polite" });
  const button = h("button", { type: "submit" }, "Submit job");
  main.append(h("h1", {}, "Submit a job"), h("div", { class: "submit" },
    h("form", { class: "stack", onsubmit: submit },
      h("label", { for: "spec-file" }, "Load a spec file"), file,
      h("label", { for: "spec-text" }, "Job spec (YAML or JSON)"), text,
      h("div", {}, button)),
    errors));

  async function load() {
    const [chosen] = file.files;
    if (!chosen) return;
    text.value = draft = await chosen.text();
    errors.replaceChildren();
  }

  async function submit(e) {
    e.preventDefault();
    button.disabled = true;
    try {
      const info = await json("jobs", { method: "POST", body: text.value,
        headers: { "Content-Type": "application/yaml" } });
      draft = "";
      location.hash = `#/jobs/${info.id}`;
    } catch (err) {
      showErrors(err);
    } finally {
      button.disabled = false;
    }
  }

  function showErrors(err) {
    text.setAttribute("aria-invalid", "true");
    const fields = err instanceof ApiError ? err.body.errors ?? [] : [];
    errors.replaceChildren(
      h("h2", {}, "Not submitted"),
      h("p", {}, err.message),
      fields.length ? h("ul", {}, fields.map((f) => h("li", {}, h("code", {}, f.field), ": ", f.message))) : null);
  }
}

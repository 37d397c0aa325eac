// Several jobs' curves on one chart: the jobs picked in the jobs view (#/compare?ids=a,b) or a group's
// (#/compare?group=G). Each job has its own colour and dash; the table says where each curve ends.
import { json } from "./api.js";
import { Chart, STYLES } from "./charts.js";
import { fmt, h, jobLink, stateBadge, TERMINAL } from "./ui.js";

const REFRESH_MS = 2000;
const METRICS = { train_loss: "train loss", val_loss: "validation loss", val_accuracy: "validation accuracy" };
const AXES = { step: "step", epoch: "epoch", samples_seen: "samples seen", elapsed_seconds: "seconds" };
const choice = { metric: "train_loss", x: "step", log: true }; // kept while the tab lives

export function compareView(main, params) {
  const ids = (params.get("ids") ?? "").split(",").filter(Boolean);
  const group = params.get("group");
  main.append(h("h1", {}, "Compare"));
  if (!ids.length && !group) {
    main.append(pickForm());
    return () => {};
  }
  let timer = null;
  let left = false;
  let runs = []; // [{info, metrics}]
  let chart = null;
  const status = h("p", { class: "status", role: "status" }, "loading…");
  const table = h("div", { class: "table-wrap", tabindex: "0", "aria-label": "compared jobs" });
  const holder = h("div", { class: "charts single" });
  const select = (id, label, options, key) => {
    const el = h("select", { id, onchange: (e) => { choice[key] = e.target.value; redraw(); } },
      Object.entries(options).map(([value, text]) => h("option", { value }, text)));
    el.value = choice[key];
    return h("label", { for: id }, `${label} `, el);
  };
  const log = h("input", { type: "checkbox", id: "compare-log", checked: choice.log,
    onchange: (e) => { choice.log = e.target.checked; redraw(); } });
  main.append(
    h("p", {}, group ? `Group ${group}` : `${ids.length} jobs`),
    h("div", { class: "toolbar" }, select("compare-metric", "Metric", METRICS, "metric"),
      select("compare-x", "x axis", AXES, "x"), h("label", { for: "compare-log" }, log, " log scale")),
    status, holder, table);
  load();

  async function load() {
    try {
      const infos = group ? await json(`jobs?group=${encodeURIComponent(group)}&limit=1000`)
        : await Promise.all(ids.map((id) => json(`jobs/${id}`)));
      const metrics = await Promise.all(infos.map((info) => json(`jobs/${info.id}/metrics`)));
      if (left) return;
      runs = infos.map((info, i) => ({ info, metrics: metrics[i] }));
      if (group) runs.reverse(); // oldest first, so a job keeps its line style as the group grows
      status.textContent = runs.length ? "" : `no jobs in group ${group}`;
      redraw();
      if (runs.some((r) => !TERMINAL.has(r.info.state))) timer = setTimeout(load, REFRESH_MS);
    } catch (e) {
      status.textContent = `could not load the jobs: ${e.message}`;
    }
  }

  function redraw() {
    if (!runs.length) return;
    const style = (i) => STYLES[i % STYLES.length];
    const series = runs.map((r, i) => ({ label: `${r.info.name ?? ""} ${r.info.id}`.trim(), ...style(i) }));
    if (!chart || chart.series.length !== series.length || chart.xLabel !== AXES[choice.x]) {
      chart = new Chart({ name: "compare", title: METRICS[choice.metric], xLabel: AXES[choice.x], series,
        height: 320 });
      holder.replaceChildren(chart.figure);
    }
    chart.note.firstChild.textContent = METRICS[choice.metric];
    chart.setLog(choice.log);
    chart.update(uPlot.join(runs.map((r) => [r.metrics.map((m) => m[choice.x]), r.metrics.map((m) => m[choice.metric])])));
    table.replaceChildren(runTable(runs, style));
  }

  return () => {
    left = true;
    clearTimeout(timer);
  };
}

function runTable(runs, style) {
  const head = ["line", "job", "name", "state", "optimizer", "batch", "stop reason", "epochs", "steps",
    "final train loss", "final val loss"];
  const row = (r, i) => {
    const last = r.metrics.at(-1);
    const { stroke, dash } = style(i);
    const swatch = h("span", { class: "swatch", dataset: { dash: dash.join(",") || "solid" } });
    swatch.innerHTML = `<svg width="40" height="10" aria-hidden="true"><line x1="0" y1="5" x2="40" y2="5" stroke="${stroke}" stroke-width="2.5" stroke-dasharray="${dash.join(" ")}"/></svg>`;
    const spec = r.info.spec;
    return h("tr", { dataset: { job: r.info.id, steps: last?.step ?? 0 } },
      h("td", {}, swatch), h("td", {}, jobLink(r.info.id)), h("td", {}, r.info.name ?? "—"),
      h("td", {}, stateBadge(r.info.state)), h("td", {}, `${spec.optimizer.method}, lr ${fmt(spec.optimizer.lr)}`),
      h("td", {}, spec.batch.size === null ? "full" : fmt(spec.batch.size)), h("td", {}, r.info.stop_reason ?? "—"),
      h("td", {}, fmt(last?.epoch)), h("td", {}, fmt(last?.step)), h("td", {}, fmt(last?.train_loss)),
      h("td", {}, fmt(last?.val_loss)));
  };
  return h("table", { id: "compare-table" },
    h("thead", {}, h("tr", {}, head.map((c) => h("th", { scope: "col" }, c)))), h("tbody", {}, runs.map(row)));
}

function pickForm() {
  const go = (e) => {
    e.preventDefault();
    const data = new FormData(e.target);
    const group = data.get("group").trim();
    const ids = data.get("ids").split(/[\s,]+/).filter(Boolean);
    if (group) location.hash = `#/compare?group=${encodeURIComponent(group)}`;
    else if (ids.length) location.hash = `#/compare?ids=${ids.join(",")}`;
  };
  return h("form", { class: "stack", onsubmit: go },
    h("p", {}, "Pick jobs in the ", h("a", { href: "#/" }, "jobs view"), ", or name a group or job ids:"),
    h("label", { for: "compare-group" }, "Group"), h("input", { id: "compare-group", name: "group" }),
    h("label", { for: "compare-ids" }, "Job ids (comma separated)"), h("input", { id: "compare-ids", name: "ids" }),
    h("button", { type: "submit" }, "Compare"));
}

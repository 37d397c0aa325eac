// One job: its facts, live curves (fed by the job's event stream), stopping criteria, spec and weights.
import { ApiError, json, request, streamEvents } from "./api.js";
import { Chart, STYLES, THRESHOLD } from "./charts.js";
import { fmt, h, jobLink, stateBadge, TERMINAL, when } from "./ui.js";
import { toYaml } from "./yaml.js";

const RECONNECT_MS = 1000;
const WIDE_FACTS = new Set(["placement", "error"]); // long texts: a whole row of the facts grid

export function jobView(main, params, id) {
  const controller = new AbortController();
  const epochs = [];
  let info = null;
  let charts = null;
  let drawPending = false;

  const title = h("h1", {}, "Job ", h("code", {}, id));
  const facts = h("dl", { class: "facts" });
  const actions = h("div", { class: "toolbar" });
  const status = h("p", { class: "status", role: "status" });
  const chartGrid = h("div", { class: "charts" });
  const criteria = h("div", { class: "table-wrap", tabindex: "0", "aria-label": "stopping criteria" });
  const spec = h("pre", { class: "spec", id: "spec-yaml" });
  main.append(title, facts, actions, status,
    h("h2", {}, "Curves"), chartGrid,
    h("h2", {}, "Stopping criteria"), criteria,
    h("h2", {}, "Spec"), spec);
  follow();

  async function follow() {
    while (!controller.signal.aborted) {
      try {
        const after = epochs.length ? epochs[epochs.length - 1].epoch : 0;
        await streamEvents(`jobs/${id}/events?after=${after}`, onEvent, controller.signal);
        if (info && TERMINAL.has(info.state)) return; // the stream ended with the job
      } catch (e) {
        if (controller.signal.aborted) return;
        status.textContent = e instanceof ApiError ? e.message : `live updates interrupted: ${e.message}`;
        if (e instanceof ApiError && e.status === 404) return;
      }
      await new Promise((resolve) => setTimeout(resolve, RECONNECT_MS));
    }
  }

  function onEvent(kind, data) {
    if (kind === "epoch") {
      epochs.push(data);
      scheduleDraw();
      return;
    }
    status.textContent = "";
    info = data;
    showInfo();
    if (!charts) {
      charts = makeCharts(info.spec);
      chartGrid.append(...Object.values(charts).map((c) => c.figure));
    }
    scheduleDraw();
  }

  // A replay of thousands of epochs redraws once per frame, not once per epoch.
  function scheduleDraw() {
    if (drawPending || !charts) return;
    drawPending = true;
    requestAnimationFrame(() => {
      drawPending = false;
      drawCharts(charts, epochs, info.spec.stopping);
      showCriteria(epochs.at(-1) ?? info.metrics);
    });
  }

  function showInfo() {
    document.title = `${info.name ?? info.id} · polyak`;
    title.replaceChildren(info.name ?? "job", " ", h("code", {}, info.id), " ", stateBadge(info.state));
    const stop = info.spec.stopping;
    const rows = [
      ["group", info.group ?? "—"],
      ["priority", fmt(info.priority)],
      ["queue position", info.queue_position === null ? "—" : `${info.queue_position}${info.waiting_reason ? ` (${info.waiting_reason})` : ""}`],
      ["epoch", info.epoch === null ? "—" : `${info.epoch}${stop.max_epochs === null ? "" : ` / ${stop.max_epochs}`}`],
      ["optimizer", `${info.spec.optimizer.method}, lr ${fmt(info.spec.optimizer.lr)}`],
      ["stop reason", info.stop_reason ?? "—"],
      ["created", when(info.created_at)],
      ["started", when(info.started_at)],
      ["finished", when(info.finished_at)],
      ["placement", info.placement ?? "—"],
      info.resumed_from ? ["resumed from", jobLink(info.resumed_from)] : null,
      info.error ? ["error", h("span", { class: "error-text" }, info.error)] : null,
    ].filter(Boolean);
    facts.replaceChildren(...rows.map(([k, v]) => h("div", { class: WIDE_FACTS.has(k) ? "wide" : null },
      h("dt", {}, k), h("dd", {}, v))));
    actions.replaceChildren(
      TERMINAL.has(info.state) ? "" : h("button", { type: "button", class: "danger", onclick: cancel }, "Cancel job"),
      h("button", { type: "button", onclick: () => download("last") }, "Download last weights"),
      h("button", { type: "button", onclick: () => download("best") }, "Download best weights"),
    );
    spec.textContent = toYaml(info.spec);
  }

  function showCriteria(latest) {
    if (!latest?.criteria?.length) {
      criteria.replaceChildren(h("p", {}, "No epoch has ended yet."));
      return;
    }
    const row = (c) => h("tr", { class: c.met ? "met" : "" },
      h("th", { scope: "row" }, c.name), h("td", {}, fmt(c.value)), h("td", {}, fmt(c.threshold)),
      h("td", {}, c.met ? "✓ met" : "· not met"));
    criteria.replaceChildren(h("table", { id: "criteria" },
      h("caption", {}, `after epoch ${latest.epoch} (step ${latest.step})${latest.stop ? `: stops, ${latest.stop}` : ""}`),
      h("thead", {}, h("tr", {}, ["criterion", "value", "threshold", "status"].map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, latest.criteria.map(row))));
  }

  async function cancel() {
    try {
      await json(`jobs/${id}/cancel`, { method: "POST" });
    } catch (e) {
      status.textContent = `could not cancel: ${e.message}`;
    }
  }

  // A plain link cannot carry the bearer header: fetch the file, then hand it to the browser as a Blob.
  async function download(which) {
    const response = await request(`jobs/${id}/weights?which=${which}`);
    if (!response.ok) {
      status.textContent = (await response.json()).detail;
      return;
    }
    const url = URL.createObjectURL(await response.blob());
    const link = h("a", { href: url, download: `${id}-${which}.npz`, hidden: true });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
  }

  return () => controller.abort();
}

function makeCharts(spec) {
  const stop = spec.stopping;
  const [a, b] = STYLES;
  const lossChart = new Chart({ name: "loss", title: "Loss", yLabel: spec.model.loss, log: true,
    series: [{ label: "train loss", ...a }, { label: "validation loss", ...b }] });
  const logToggle = h("input", { type: "checkbox", id: "loss-log", checked: true,
    onchange: (e) => lossChart.setLog(e.target.checked) });
  lossChart.note.append(" ", h("label", { for: "loss-log", class: "inline" }, logToggle, " log scale"));
  const threshold = (label, value) => (value === null ? [] : [{ label: `${label} ${fmt(value)}`, ...THRESHOLD }]);
  return {
    loss: lossChart,
    accuracy: new Chart({ name: "accuracy", title: "Validation accuracy", series: [{ label: "val accuracy", ...a }] }),
    weightChange: new Chart({
      name: "weight-change", title: "Weight change ‖ΔW‖ / ‖W‖ over an epoch (Fix 1)", log: true,
      caption: stop.weight_change_tol === null ? "no weight_change_tol set" : "stops below the threshold",
      series: [{ label: "weight change", ...a }, ...threshold("weight_change_tol", stop.weight_change_tol)],
    }),
    gradient: new Chart({
      name: "gradient", title: "Norm of the epoch's averaged gradient ‖ḡ‖ (Fix 1′)", log: true,
      caption: stop.grad_tol === null ? "no grad_tol set"
        : `stops below the threshold${stop.warmup_steps ? `, from step ${stop.warmup_steps} on` : ""}`,
      series: [{ label: "‖ḡ‖", ...a }, ...threshold("grad_tol", stop.grad_tol)],
    }),
    schedule: new Chart({ name: "schedule", title: "Step size and batch size", yLabel: "lr", y2Label: "batch size",
      series: [{ label: "lr", ...a }, { label: "batch size", ...b, scale: "y2" }] }),
    staleness: new Chart({ name: "staleness", title: "Staleness (async)", yLabel: "versions",
      series: [{ label: "mean", ...a }, { label: "max", ...b }] }),
  };
}

function drawCharts(charts, epochs, stop) {
  const xs = epochs.map((m) => m.epoch);
  const col = (key) => epochs.map((m) => m[key] ?? null);
  const flat = (value) => (value === null ? [] : [xs.map(() => value)]);
  charts.loss.update([xs, col("train_loss"), col("val_loss")]);
  charts.accuracy.update([xs, col("val_accuracy")]);
  charts.weightChange.update([xs, col("weight_change"), ...flat(stop.weight_change_tol)]);
  charts.gradient.update([xs, col("grad_avg_norm"), ...flat(stop.grad_tol)]);
  charts.schedule.update([xs, col("lr"), col("batch_size")]);
  charts.staleness.update([xs, col("staleness_mean"), col("staleness_max")]);
}

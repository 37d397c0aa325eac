// The jobs view: every job, polled once a second, filtered by state and group, with cancel buttons and
// a selection to compare.
import { fmt, h, jobLink, stateBadge, STATES, TERMINAL } from "./ui.js";
import { json } from "./api.js";

const POLL_MS = 1000;
const LIMIT = 500;
const filters = { state: "", group: "" }; // kept while the tab lives, so coming back shows the same jobs
const selected = new Set();
const groupsSeen = new Set();
const COLUMNS = ["select", "id", "name", "group", "state", "priority", "queue", "epoch", "train loss", "val loss",
  "stop reason", "actions"];
const UNSEEN_HEADERS = new Set(["select", "actions"]); // named for screen readers; the cells speak for sighted users

export function jobsView(main) {
  let timer = null;
  let generation = 0; // bumped by a new filter and on leaving: an older poll loop then ends
  const rows = new Map(); // job id -> its <tr>, reused so a poll keeps focus and selection in place
  const tbody = h("tbody");
  const status = h("p", { class: "status", role: "status" });
  const groups = h("datalist", { id: "groups" }, [...groupsSeen].map((g) => h("option", { value: g })));
  const compareSelected = h("button", { type: "button", onclick: () => {
    location.hash = `#/compare?ids=${[...selected].join(",")}`;
  } });
  const compareGroup = h("button", { type: "button", onclick: () => {
    location.hash = `#/compare?group=${encodeURIComponent(filters.group)}`;
  } });
  const stateSelect = h("select", { id: "filter-state", onchange: (e) => refilter("state", e.target.value) },
    h("option", { value: "" }, "all"), STATES.map((s) => h("option", { value: s }, s)));
  const groupInput = h("input", { id: "filter-group", list: "groups", autocomplete: "off",
    oninput: (e) => refilter("group", e.target.value.trim()) });
  stateSelect.value = filters.state;
  groupInput.value = filters.group;

  main.append(
    h("h1", {}, "Jobs"),
    h("div", { class: "toolbar" },
      h("label", { for: "filter-state" }, "State ", stateSelect),
      h("label", { for: "filter-group" }, "Group ", groupInput), groups,
      compareSelected, compareGroup),
    status,
    h("div", { class: "table-wrap", tabindex: "0", "aria-label": "jobs table, scrolls sideways" },
      h("table", { id: "jobs" },
        h("thead", {}, h("tr", {}, COLUMNS.map((c) => h("th", { scope: "col" },
          UNSEEN_HEADERS.has(c) ? h("span", { class: "visually-hidden" }, c) : c)))), tbody)),
  );
  updateActions();
  poll();

  function refilter(key, value) {
    filters[key] = value;
    updateActions();
    clearTimeout(timer);
    poll(++generation);
  }

  function updateActions() {
    compareSelected.textContent = `Compare selected (${selected.size})`;
    compareSelected.disabled = selected.size < 1;
    compareGroup.textContent = filters.group ? `Compare group ${filters.group}` : "Compare group";
    compareGroup.disabled = !filters.group;
  }

  async function poll(loop = generation) {
    if (document.hidden) { // a background tab asks for nothing until it is looked at again
      timer = setTimeout(() => poll(loop), POLL_MS);
      return;
    }
    const query = new URLSearchParams({ limit: LIMIT });
    if (filters.state) query.set("state", filters.state);
    if (filters.group) query.set("group", filters.group);
    try {
      const jobs = await json(`jobs?${query}`);
      if (loop !== generation) return;
      render(jobs);
      status.textContent = jobs.length === LIMIT ? `showing the newest ${LIMIT} jobs` : `${jobs.length} jobs`;
    } catch (e) {
      status.textContent = `could not list the jobs: ${e.message}`;
    }
    if (loop === generation) timer = setTimeout(() => poll(loop), POLL_MS);
  }

  function render(jobs) {
    const ids = new Set(jobs.map((j) => j.id));
    for (const [id, tr] of rows) if (!ids.has(id)) { tr.remove(); rows.delete(id); }
    jobs.forEach((job, i) => {
      if (job.group && !groupsSeen.has(job.group)) {
        groupsSeen.add(job.group);
        groups.append(h("option", { value: job.group }));
      }
      const tr = rows.get(job.id) ?? newRow(job.id);
      fill(tr, job);
      if (tbody.children[i] !== tr) tbody.insertBefore(tr, tbody.children[i] ?? null);
    });
  }

  function newRow(id) {
    const check = h("input", { type: "checkbox", "aria-label": `select job ${id} to compare`, onchange: (e) => {
      e.target.checked ? selected.add(id) : selected.delete(id);
      updateActions();
    } });
    check.checked = selected.has(id);
    const tr = h("tr", { dataset: { job: id } }, h("td", {}, check), h("td", {}, jobLink(id)),
      ...COLUMNS.slice(2).map(() => h("td")));
    rows.set(id, tr);
    return tr;
  }

  function fill(tr, job) {
    const m = job.metrics;
    const max = job.spec.stopping.max_epochs;
    const cells = {
      2: job.name ?? "—", 3: job.group ?? "—", 5: fmt(job.priority),
      6: job.queue_position ?? "—", 7: job.epoch === null ? "—" : `${job.epoch}${max === null ? "" : ` / ${max}`}`,
      8: fmt(m?.train_loss), 9: fmt(m?.val_loss), 10: job.stop_reason ?? "—",
    };
    for (const [i, text] of Object.entries(cells)) {
      if (tr.cells[i].textContent !== String(text)) tr.cells[i].textContent = text;
    }
    tr.cells[6].title = job.waiting_reason ?? "";
    if (tr.dataset.state !== job.state) {
      tr.dataset.state = job.state;
      tr.cells[4].replaceChildren(stateBadge(job.state));
      tr.cells[11].replaceChildren(TERMINAL.has(job.state) ? "" : cancelButton(job.id));
    }
  }

  async function cancel(id, button) {
    button.disabled = true;
    try {
      await json(`jobs/${id}/cancel`, { method: "POST" });
    } catch (e) {
      status.textContent = `could not cancel ${id}: ${e.message}`;
      button.disabled = false;
    }
  }

  function cancelButton(id) {
    const button = h("button", { type: "button", class: "danger", "aria-label": `cancel job ${id}` }, "Cancel");
    button.addEventListener("click", () => cancel(id, button));
    return button;
  }

  return () => {
    generation++;
    clearTimeout(timer);
  };
}

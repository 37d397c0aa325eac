// Small DOM helpers shared by the views. Text always goes in as text (job names are user input).

// h("a", {href: "#/"}, "jobs", child): an element; attributes starting with "on" become listeners.
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else el.setAttribute(key, value === true ? "" : value);
  }
  el.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return el;
}

export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
export const STATES = ["queued", "running", "succeeded", "failed", "cancelled"];
// The state is spelled out and marked with a symbol, so colour is never the only cue.
const STATE_MARKS = { queued: "◷", running: "▶", succeeded: "✓", failed: "✗", cancelled: "■" };

export function stateBadge(state) {
  return h("span", { class: `state state-${state}` }, h("span", { "aria-hidden": "true" }, STATE_MARKS[state]), ` ${state}`);
}

// Numbers as the CLI shows them: 4 significant digits, exponent form for the very small or large.
export function fmt(x) {
  if (x === null || x === undefined) return "—";
  if (typeof x !== "number") return String(x);
  if (Number.isInteger(x) && Math.abs(x) < 1e6) return String(x);
  const a = Math.abs(x);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? x.toExponential(3) : String(Number(x.toPrecision(4)));
}

export function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "—";
}

export function jobLink(id) {
  return h("a", { href: `#/jobs/${id}` }, h("code", {}, id));
}

// Line charts on the vendored uPlot (a global from vendor/uplot/uPlot.iife.min.js). A chart stays hidden
// until one of its series has a value; its figure exposes data-points (how many x values it plots) and
// data-series (how many lines), which the browser tests read.
import { h } from "./ui.js";

// Okabe-Ito colours (distinguishable with the common colour-vision deficiencies), each with its own dash.
export const STYLES = [
  { stroke: "#0072B2", dash: [] },
  { stroke: "#D55E00", dash: [10, 5] },
  { stroke: "#009E73", dash: [2, 4] },
  { stroke: "#CC79A7", dash: [12, 4, 2, 4] },
  { stroke: "#E69F00", dash: [6, 3, 6, 9] },
  { stroke: "#56B4E9", dash: [1, 2] },
  { stroke: "#000000", dash: [16, 6] },
];
// A log axis labelled and ruled at powers of ten only, as 1e-8 (uPlot's own labels round 1e-8 to 0).
const DECADES = {
  splits: (u, axis, min, max) => {
    const [lo, hi] = [Math.ceil(Math.log10(min)), Math.floor(Math.log10(max))];
    const step = Math.max(1, Math.ceil((hi - lo + 1) / 10)); // at most ~10 labels
    const out = [];
    for (let e = lo; e <= hi; e += step) out.push(10 ** e);
    return out;
  },
  values: (u, splits) => splits.map((v) => (v === null ? "" : v >= 0.01 && v <= 1000 ? String(v) : v.toExponential(0))),
};
export const THRESHOLD = { stroke: "#6b7280", dash: [4, 4], width: 1.5 };

export class Chart {
  // series: [{label, stroke, dash, width, scale}] ("y2" puts a series on a right-hand axis named y2Label).
  constructor({ name, title, caption, series, xLabel = "epoch", yLabel = "", y2Label = null, log = false,
    height = 220 }) {
    Object.assign(this, { series, xLabel, yLabel, y2Label, log, height, plot: null, data: null });
    this.body = h("div", { class: "chart-body" });
    this.note = h("figcaption", {}, h("strong", {}, title), caption ? h("span", {}, ` — ${caption}`) : null);
    this.figure = h("figure", { class: "chart", hidden: true, dataset: { chart: name, points: "0" } },
      this.note, this.body);
    new ResizeObserver(() => this.plot?.setSize(this.size())).observe(this.body);
  }

  // data: [xs, ys1, ys2, ...], uPlot's aligned columns (null = no value there).
  update(data) {
    this.data = data;
    const shown = data.slice(1).some((ys) => ys.some((y) => y !== null && y !== undefined));
    this.figure.hidden = !shown;
    this.figure.dataset.points = String(data[0].length);
    this.figure.dataset.series = String(this.series.length);
    if (!shown) return;
    if (this.plot) this.plot.setData(this.plotted(data));
    else this.draw();
  }

  setLog(log) {
    if (log === this.log) return;
    this.log = log;
    if (this.plot) this.draw();
  }

  draw() {
    this.plot?.destroy();
    const log = { distr: this.log ? 3 : 1, auto: true };
    const axis = (label, scale, side) => ({ label, scale, side, stroke: "#374151", grid: { stroke: "#e5e7eb" },
      ...(scale === "y" && this.log ? DECADES : {}) });
    const options = {
      ...this.size(),
      scales: { x: { time: false }, y: log, ...(this.y2Label ? { y2: { distr: 1, auto: true } } : {}) },
      axes: [axis(this.xLabel, "x", 2), axis(this.yLabel, "y", 3), ...(this.y2Label ? [axis(this.y2Label, "y2", 1)] : [])],
      series: [{ label: this.xLabel }, ...this.series.map((s) => ({
        label: s.label, stroke: s.stroke, dash: s.dash, width: s.width ?? 2, scale: s.scale ?? "y", spanGaps: true,
        points: { show: false },
      }))],
      legend: { live: true },
    };
    this.plot = new uPlot(options, this.plotted(this.data), this.body);
  }

  // On a log scale only positive values can be drawn.
  plotted(data) {
    if (!this.log) return data;
    return [data[0], ...data.slice(1).map((ys, i) => (this.series[i].scale ?? "y") === "y"
      ? ys.map((y) => (y > 0 ? y : null)) : ys)];
  }

  size() {
    return { width: Math.max(this.body.clientWidth, 200), height: this.height };
  }
}

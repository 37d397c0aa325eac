// The dashboard's router: #/ (jobs), #/jobs/<id>, #/compare?ids=a,b | ?group=G, #/submit.
import { compareView } from "./compare.js";
import { jobView } from "./job.js";
import { jobsView } from "./jobs.js";
import { submitView } from "./submit.js";

const main = document.getElementById("view");
const ROUTES = [
  [/^\/jobs\/([^/]+)$/, jobView, "job"],
  [/^\/compare$/, compareView, "compare"],
  [/^\/submit$/, submitView, "submit"],
  [/^\/?$/, jobsView, "jobs"],
];
let leave = () => {};

function route() {
  const [path, query] = location.hash.replace(/^#/, "").split("?");
  const [pattern, view, name] = ROUTES.find(([p]) => p.test(path)) ?? ROUTES.at(-1);
  const [, id] = path.match(pattern) ?? [];
  leave();
  main.replaceChildren();
  main.dataset.view = name;
  document.title = `${name} · polyak`;
  for (const link of document.querySelectorAll("nav a[data-view]")) {
    if (link.dataset.view === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  leave = view(main, new URLSearchParams(query ?? ""), id && decodeURIComponent(id)) ?? (() => {});
}

window.addEventListener("hashchange", route);
route();

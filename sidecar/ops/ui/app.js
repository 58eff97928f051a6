// The live page: polls the sidecar's view (GET view) every second and places its strings,
// built by the sidecar (sidecar/ops/view.py) exactly as `graysteer status --watch` shows them.
// Every value is put in with textContent: nothing from the rules reaches the page as markup.
"use strict";

const REFRESH_MS = 1000;
const POST_HEADER = "x-graysteer-request"; // the server refuses a POST without it (CSRF)
let access = { actions: false, explain: false, credentials: "" };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function bar(share) {
  const inner = el("div");
  inner.style.width = `${Math.round(Math.max(0, Math.min(1, share)) * 100)}%`;
  return el("div", { class: "bar" }, inner);
}

function replace(id, ...children) {
  document.getElementById(id).replaceChildren(...children);
}

function headers() {
  const sent = { "content-type": "application/json", [POST_HEADER]: "1" };
  const token = document.getElementById("token").value.trim();
  if (token) sent.authorization = `Bearer ${token}`;
  return sent;
}

async function post(path, body) {
  const response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body) });
  const answer = await response.json();
  if (!response.ok) throw new Error(answer.error || `HTTP ${response.status}`);
  return answer;
}

function drawTable(view) {
  const t = view.table;
  document.getElementById("table").textContent = t
    ? `rules ${t.source}, version ${t.version}, default ${t.default_cluster}; last reload ${t.last_reload}`
    : "";
  document.getElementById("updated").textContent = `at ${view.at}`;
  const problems = [...view.problems];
  if (t && t.reload_error) problems.push(`last reload failed: ${t.reload_error.split("\n")[0]}`);
  replace("problems", ...problems.map((p) => el("div", { class: "problem", text: p })));
}

function drawAccess(view) {
  access = view.access;
  document.getElementById("access-note").textContent = access.note;
  document.getElementById("token-label").hidden = !access.credentials.includes("token");
  document.getElementById("explain-section").hidden = !access.explain;
}

function drawFleet(fleet) {
  document.getElementById("fleet-section").hidden = !fleet;
  if (!fleet) return;
  document.getElementById("fleet-title").textContent =
    `Fleet ${fleet.address}: rules version ${fleet.rules_version}, leader ${fleet.leader}`;
  replace(
    "fleet",
    ...fleet.replicas.map((r) => el("li", { class: r.leader ? "leader" : "", text: `${r.id}: ${r.shown}` })),
    ...fleet.refused.map((x) => el("li", { class: "problem", text: `refused record ${x}` })),
  );
}

function drawSplits(splits) {
  replace(
    "splits",
    ...splits.map((split) =>
      el(
        "div",
        { class: "card split", "data-rule": split.rule },
        el("h3", { text: split.rule + (split.note ? ` (${split.note})` : "") }),
        ...split.clusters.map((c) =>
          el("div", { class: "row", "data-cluster": c.cluster }, el("span", { text: c.cluster }), bar(c.share),
            el("span", { class: "weight", text: c.shown })),
        ),
      ),
    ),
  );
}

const ACTIONS = { progressing: ["pause", "promote", "abort"], paused: ["resume", "promote", "abort"],
  aborted: ["resume"], promoted: ["resume"], ramping_down: ["abort", "resume"] };

const actionResults = {}; // rule -> {text, problem, until}: an action's answer, shown for a while
const SHOW_RESULT_MS = 15000;

function actionButtons(rollout) {
  if (!access.actions) return [];
  const shown = actionResults[rollout.rule];
  const result = el("span", { class: shown && shown.problem ? "action-result problem" : "action-result" });
  if (shown && Date.now() < shown.until) result.textContent = shown.text;
  const offered = (rollout.can_approve ? ["approve"] : []).concat(ACTIONS[rollout.phase] || ["promote", "pause", "resume", "abort"]);
  const buttons = offered.map((action) => {
    const button = el("button", { type: "button", "data-action": action, text: action });
    button.addEventListener("click", async () => {
      if (!window.confirm(`${action} the rollout of ${rollout.rule}?`)) return;
      let answer;
      try {
        const report = await post(`rollouts/${encodeURIComponent(rollout.rule)}/${action}`, {});
        answer = { text: `${action}: now ${report.phase}`, problem: false };
      } catch (error) {
        answer = { text: `${action} refused: ${error.message}`, problem: true };
      }
      actionResults[rollout.rule] = { ...answer, until: Date.now() + SHOW_RESULT_MS };
      refresh();
    });
    return button;
  });
  return [el("div", { class: "actions" }, ...buttons, result)];
}

function checksTable(rollout) {
  const head = el("tr", {}, ...["cluster", "responses", "error rate", "vs baseline", "p99"].map((h) => el("th", { text: h })));
  const rows = rollout.clusters.map((cluster) => {
    const byName = Object.fromEntries(cluster.checks.map((c) => [c.name.split(" ")[0], c]));
    const cells = ["error", "vs", "p99"].map((name) => {
      const check = byName[name];
      if (!check) return el("td");
      const text = check.shown + (check.limit !== null ? ` / max ${check.limit_shown}` : "");
      return el("td", { class: `check-${check.state.replace(" ", "-")}`, text });
    });
    return el("tr", { "data-cluster": cluster.cluster }, el("td", { text: `${cluster.cluster} (${cluster.role})` }),
      el("td", { text: cluster.requests_shown }), ...cells);
  });
  return el("table", { class: "checks" }, head, ...rows);
}

function metricRows(rollout) {
  return (rollout.metrics || []).map((m) =>
    el("div", { class: `metric check-${m.state.replace(" ", "-")}${m.dry_run ? " dry-run" : ""}`,
      "data-metric": m.name, "data-state": m.state, text: m.line }));
}

const STEP_MARKS = { done: "✓", current: "▶", pending: "·" };

function drawRollouts(rollouts) {
  if (!rollouts.length) {
    replace("rollouts", el("p", { class: "dim", text: "no rollout" }));
    return;
  }
  replace(
    "rollouts",
    ...rollouts.map((r) =>
      el(
        "div",
        { class: "card rollout", "data-rule": r.rule, "data-phase": r.phase },
        el("h3", { text: `rollout ${r.rule}` }),
        el("div", { class: `status phase-${r.phase}`, text: r.status }),
        el("div", { class: "position", text: `${r.step_shown}, ${r.weight_shown}` }),
        el("div", { class: r.verdict === "breach" ? "verdict problem" : "verdict", text: r.verdict_shown }),
        ...(r.state_problem ? [el("div", { class: "problem", text: r.state_problem })] : []),
        ...r.waits.map((w) => el("div", { class: "wait", text: w })),
        ...r.details.map((d) => el("div", { class: "detail", text: d })),
        el("ol", { class: "steps" }, ...r.steps.map((s) =>
          el("li", { class: `step-${s.place}`, "data-place": s.place },
            `${STEP_MARKS[s.place]} step ${s.number}: weight ${s.weight} (${s.note})`))),
        checksTable(r),
        ...metricRows(r),
        ...actionButtons(r),
      ),
    ),
  );
}

function drawTraffic(traffic, bypass) {
  document.getElementById("traffic-note").textContent = traffic ? traffic.note : "";
  replace(
    "traffic",
    ...(traffic ? traffic.clusters : []).map((c) =>
      el("div", { class: "row traffic", "data-cluster": c.cluster }, el("span", { text: c.cluster }),
        bar(c.requests_per_second / Math.max(...traffic.clusters.map((x) => x.requests_per_second), 1e-9)),
        el("span", { text: c.shown })),
    ),
  );
  replace(
    "bypass",
    ...(bypass ? [el("div", { class: "dim", text: `envoy bypass: ${bypass.note}` }),
      ...bypass.modes.map((m) => el("div", { text: `${m.mode}: ${m.shown}` }))] : []),
  );
}

function drawShadow(shadow) {
  if (!shadow) {
    replace("shadow", el("p", { class: "dim", text: "no shadow table (serve --shadow-config NEXT, or push --next)" }));
    return;
  }
  replace(
    "shadow",
    el("div", { class: shadow.differing ? "shadow problem" : "shadow", "data-differing": String(shadow.differing),
      "data-requests": String(shadow.requests), text: shadow.note }),
    ...shadow.moves.map((m) => el("div", { class: "row shadow-move", text: m.shown })),
  );
}

async function refresh() {
  try {
    const response = await fetch("view", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const view = await response.json();
    drawAccess(view);
    drawTable(view);
    drawFleet(view.fleet);
    drawSplits(view.splits);
    drawRollouts(view.rollouts);
    drawTraffic(view.traffic, view.bypass);
    drawShadow(view.shadow);
  } catch (error) {
    replace("problems", el("div", { class: "problem", text: `cannot read the sidecar's view: ${error.message}` }));
  }
}

async function explain(event) {
  event.preventDefault();
  const form = new FormData(event.target);
  const body = Object.fromEntries(["method", "path", "host", "headers", "uri_san", "dns_san", "listener_port"]
    .map((name) => [name, String(form.get(name) || "")]));
  const summary = document.getElementById("explain-summary");
  const result = document.getElementById("explain-result");
  try {
    const decision = await post("explain", body);
    summary.className = "";
    summary.textContent = `-> ${decision.cluster} (${decision.reason}${decision.rule ? `, rule ${decision.rule}` : ""})`;
    result.textContent = JSON.stringify(decision, null, 2);
  } catch (error) {
    summary.className = "problem";
    summary.textContent = `explain refused: ${error.message}`;
    result.textContent = "";
  }
}

document.getElementById("explain-form").addEventListener("submit", explain);
document.getElementById("access-section").addEventListener("submit", (event) => event.preventDefault());
const token = document.getElementById("token");
token.value = sessionStorage.getItem("graysteer-token") || "";
token.addEventListener("change", () => sessionStorage.setItem("graysteer-token", token.value));
refresh();
setInterval(refresh, REFRESH_MS);

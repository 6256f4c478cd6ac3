// Tandem console: plain JS over /api/. Every value from the server is put
// in the page with textContent (never innerHTML). The admin token stays in
// sessionStorage (this tab only) and goes out as a Bearer header.
"use strict";

const TOKEN_KEY = "tandem.adminToken";
const STATES = ["ACTIVE", "PREPARING", "COMMITTING", "COMMITTED", "ABORTING", "ABORTED", "STUCK"];
const $ = (id) => document.getElementById(id);

const ui = {
  list: { states: new Set(), tokens: [""], page: 0, timer: null },
  detail: null,
  skipped: false,
};

// ---- small helpers -------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) {
    if (c == null) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function badge(state) {
  const s = String(state || "");
  // Class names only from the known set: a value never becomes markup.
  const known = /^[A-Z_]+$/.test(s) ? s : "";
  return el("span", { class: "badge " + known, text: s || "—" });
}

function human(ms) {
  ms = Math.max(0, Math.round(ms));
  const s = Math.floor(ms / 1000);
  if (s === 0) return ms + "ms";
  if (s < 60) return (ms / 1000).toFixed(1) + "s";
  if (s < 3600) return Math.floor(s / 60) + "m" + (s % 60) + "s";
  if (s < 86400) return Math.floor(s / 3600) + "h" + Math.floor((s % 3600) / 60) + "m";
  return Math.floor(s / 86400) + "d" + Math.floor((s % 86400) / 3600) + "h";
}

function when(ms) {
  if (!ms) return "—";
  const d = new Date(ms);
  const delta = Date.now() - ms;
  const rel = delta >= 0 ? human(delta) + " ago" : "in " + human(-delta);
  return d.toLocaleString() + " (" + rel + ")";
}

function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
}

// ---- API -----------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, options) {
  const headers = { Accept: "application/json" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = "Bearer " + token;
  if (options && options.body) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, { ...(options || {}), headers, cache: "no-store" });
  let body = null;
  try {
    body = await resp.json();
  } catch (_) {
    body = null;
  }
  if (!resp.ok) {
    const message = (body && body.error) || resp.statusText || "request failed";
    throw new ApiError(resp.status, message);
  }
  return body;
}

function refusal(e) {
  if (e.status === 401) return "refused: the admin credential is required (" + e.message + ")";
  if (e.status === 403) return "refused: " + e.message;
  if (e.status === 409) return "refused: " + e.message;
  return "failed: " + e.message;
}

// ---- sign in -------------------------------------------------------------

function signedIn() {
  return !!sessionStorage.getItem(TOKEN_KEY);
}

function showSignIn(message) {
  for (const v of ["view-overview", "view-list", "view-detail"]) $(v).hidden = true;
  $("signin").hidden = false;
  $("signin-error").textContent = message || "";
  $("token").focus();
}

function updateChrome() {
  $("signout").hidden = !signedIn();
}

// ---- overview ------------------------------------------------------------

function card(label, value, sub, kind) {
  return el("div", { class: kind || "" },
    el("div", { class: "label", text: label }),
    el("div", { class: "value", text: value }),
    el("div", { class: "sub", text: sub || "\u00a0" }));
}

async function showOverview() {
  const o = await api("/api/overview");
  $("instance").textContent = o.instance ? "instance " + o.instance : "";
  const cards = $("cards");
  clear(cards);
  const count = (s) => (o.counts && o.counts[s]) || 0;
  cards.append(
    card("Live", o.live, "in memory, unfinished"),
    card("STUCK", o.stuck, o.stuck ? "oldest " + human(o.oldest_stuck_age_ms) : "none", o.stuck ? "alert" : ""),
    card("In doubt", o.in_doubt, "decided, phase 2 running", o.in_doubt ? "warn" : ""),
    card("Committed", count("COMMITTED"), "kept until retention"),
    card("Aborted", count("ABORTED"), "kept until retention"),
    card("Oldest live", o.oldest_live_age_ms ? human(o.oldest_live_age_ms) : "—", o.oldest_live_gtid || "none unfinished"),
    card("Recovery backlog", o.recovery_backlog, o.recovery_backlog ? "recovering after a restart" : "nothing to recover"),
    card("Log forces", o.forces, o.flushes + " flushes, " + o.purged + " purged"),
  );
  const counts = $("state-counts");
  clear(counts);
  for (const s of STATES) {
    const link = el("a", { href: "#/tx?state=" + s }, badge(s), el("span", { text: String(count(s)) }));
    counts.append(link);
  }
  $("overview-note").textContent = o.counts_partial
    ? "Counts cover the oldest records only: the log holds more than the console counts at once."
    : "";
  const banner = $("banner");
  if (o.halted) {
    banner.className = "banner";
    banner.textContent = "HALTED: the coordinator stopped deciding after a log failure; see its logs.";
    banner.hidden = false;
  } else if (o.draining) {
    banner.className = "banner info";
    banner.textContent = "Draining: the coordinator is shutting down and takes no new transactions.";
    banner.hidden = false;
  } else if (o.recovery_backlog > 0) {
    banner.className = "banner info";
    banner.textContent = "Recovering: " + o.recovery_backlog + " transactions found at start are being finished.";
    banner.hidden = false;
  } else {
    banner.hidden = true;
  }
  $("view-overview").hidden = false;
}

// ---- list ----------------------------------------------------------------

function buildChips() {
  const box = $("state-chips");
  clear(box);
  for (const s of STATES) {
    const chip = el("button", {
      type: "button", class: "chip", "data-state": s,
      "aria-pressed": ui.list.states.has(s) ? "true" : "false", text: s,
    });
    chip.addEventListener("click", () => {
      if (ui.list.states.has(s)) ui.list.states.delete(s); else ui.list.states.add(s);
      chip.setAttribute("aria-pressed", ui.list.states.has(s) ? "true" : "false");
      resetPaging();
      loadList();
    });
    box.append(chip);
  }
}

function resetPaging() {
  ui.list.tokens = [""];
  ui.list.page = 0;
}

function listQuery(token) {
  const p = new URLSearchParams();
  for (const s of ui.list.states) p.append("state", s);
  const mode = $("f-mode").value;
  if (mode) p.set("mode", mode);
  const resource = $("f-resource").value.trim();
  if (resource) p.set("resource", resource);
  const label = $("f-label").value.trim();
  if (label) p.set("label", label);
  const age = $("f-age").value.trim();
  if (age) p.set("min_age", age);
  const gtid = $("f-gtid").value.trim();
  if (gtid) p.set("gtid", gtid);
  if ($("f-newest").checked) p.set("newest_first", "1");
  p.set("page_size", window.innerWidth < 640 ? "20" : "50");
  if (token) p.set("page_token", token);
  return p.toString();
}

function lastError(t) {
  for (let i = t.branches.length - 1; i >= 0; i--) {
    const b = t.branches[i];
    if (b.last_error) return "#" + b.branch_id + ": " + b.last_error;
  }
  return "";
}

async function loadList() {
  const token = ui.list.tokens[ui.list.page] || "";
  $("list-error").textContent = "";
  let page;
  try {
    page = await api("/api/transactions?" + listQuery(token));
  } catch (e) {
    if (e.status === 401) return showSignIn(refusal(e));
    $("list-error").textContent = refusal(e);
    return;
  }
  const rows = $("tx-rows");
  clear(rows);
  if (page.transactions.length === 0) {
    rows.append(el("tr", { class: "empty" }, el("td", { colspan: "7", text: "No transactions match." })));
  }
  for (const t of page.transactions) {
    const open = () => { location.hash = "#/tx/" + encodeURIComponent(t.gtid); };
    const tr = el("tr", { "data-gtid": t.gtid, tabindex: "0" },
      el("td", { class: "mono", "data-label": "GTID" },
        el("a", { href: "#/tx/" + encodeURIComponent(t.gtid), text: t.gtid }),
        el("div", { class: "tx-labels", text: Object.entries(t.labels || {}).map(([k, v]) => k + "=" + v).join(" ") })),
      el("td", { "data-label": "State" }, badge(t.state)),
      el("td", { "data-label": "Mode", text: t.mode }),
      el("td", { class: "num", "data-label": "Age", text: human(t.age_ms) }),
      el("td", { class: "num", "data-label": "Branches", text: String(t.branches.length) }),
      el("td", { class: "num", "data-label": "Attempts", text: String(t.attempts) }),
      el("td", { class: "err", "data-label": "Last error", text: lastError(t) || "—", title: lastError(t) }));
    tr.addEventListener("click", (ev) => { if (ev.target.tagName !== "A") open(); });
    tr.addEventListener("keydown", (ev) => { if (ev.key === "Enter") open(); });
    rows.append(tr);
  }
  ui.list.tokens[ui.list.page + 1] = page.next_page_token;
  $("prev").disabled = ui.list.page === 0;
  $("next").disabled = !page.next_page_token;
  $("page-no").textContent = "page " + (ui.list.page + 1);
  $("list-note").textContent = page.partial
    ? "Fewer matches than a page in the records read at once; press Next to keep looking."
    : "";
}

async function showList(params) {
  if (params.has("state")) {
    ui.list.states = new Set(params.getAll("state").filter((s) => STATES.includes(s)));
    resetPaging();
  }
  buildChips();
  $("view-list").hidden = false;
  await loadList();
}

function setAutoRefresh(on) {
  clearInterval(ui.list.timer);
  ui.list.timer = on ? setInterval(() => {
    if (!$("view-list").hidden) loadList();
    else if (!$("view-overview").hidden) showOverview().catch(() => {});
  }, 5000) : null;
}

// ---- detail --------------------------------------------------------------

function fact(list, label, value) {
  list.append(el("div", {}, el("dt", { text: label }), el("dd", {}, value)));
}

async function showDetail(gtid) {
  $("action-result").textContent = "";
  $("action-result").className = "result";
  const t = await api("/api/transactions/" + encodeURIComponent(gtid));
  ui.detail = t;
  $("d-gtid").textContent = t.gtid;
  $("d-state").replaceWith(Object.assign(badge(t.state), { id: "d-state" }));
  const facts = $("d-facts");
  clear(facts);
  fact(facts, "Decision", t.decision === "NONE" ? "none yet" : t.decision);
  fact(facts, "Mode", t.mode);
  fact(facts, "Epoch", String(t.epoch));
  fact(facts, "Owner", t.owner ? t.owner + " at " + (t.owner_address || "?") : "this coordinator");
  fact(facts, "Created", when(t.created_at_ms));
  fact(facts, "Updated", when(t.updated_at_ms));
  fact(facts, "Deadline", when(t.deadline_ms));
  if (t.reason) fact(facts, "Reason", t.reason);
  if (t.abort_cause) fact(facts, "Abort cause", t.abort_cause + (t.abort_branch ? " (branch " + t.abort_branch + ")" : ""));

  const rows = $("d-branches");
  clear(rows);
  for (const b of t.branches) {
    let err = b.last_error || "—";
    if (b.resolution) err = "settled by hand by " + b.resolution.by + ": " + b.resolution.reason;
    rows.append(el("tr", {},
      el("td", { "data-label": "#", text: String(b.branch_id) }),
      el("td", { class: "mono wrap", "data-label": "Endpoint", text: b.endpoint }),
      el("td", { "data-label": "Resource", text: b.resource + (b.mode !== t.mode ? " (" + b.mode + ")" : "") }),
      el("td", { "data-label": "State" }, badge(b.state)),
      el("td", { class: "num", "data-label": "Attempts", text: String(b.attempts) }),
      el("td", { class: "wrap", "data-label": "Last error", text: err }),
      el("td", { "data-label": "Next attempt", text: b.next_attempt_at_ms ? when(b.next_attempt_at_ms) : "—" })));
  }

  const labels = t.labels || {};
  const labelList = $("d-labels");
  clear(labelList);
  for (const [k, v] of Object.entries(labels)) fact(labelList, k, v);
  $("d-labels-box").hidden = Object.keys(labels).length === 0;

  const tl = $("d-timeline");
  clear(tl);
  for (const m of t.timeline || []) {
    tl.append(el("li", {},
      el("time", { text: m.at_ms ? when(m.at_ms) : "time not recorded" }),
      el("span", { class: "what", text: m.what })));
  }

  const finished = t.state === "COMMITTED" || t.state === "ABORTED";
  const commitDecided = t.decision === "COMMIT";
  $("retry").disabled = finished;
  $("retry").title = finished ? "finished: nothing to retry" : "";
  const abort = $("abort");
  if (commitDecided) {
    abort.disabled = true;
    $("abort-why").textContent = "Abort is not possible: only undecided transactions can be aborted; this one is decided commit and cannot be (a commit decision is never reversed).";
  } else if (finished || t.decision === "ABORT") {
    abort.disabled = true;
    $("abort-why").textContent = "Abort is not needed: this transaction is already decided abort.";
  } else {
    abort.disabled = false;
    $("abort-why").textContent = "";
  }
  $("view-detail").hidden = false;
}

function confirmAction(kind) {
  const t = ui.detail;
  if (!t) return;
  const dialog = $("confirm");
  const reasonLabel = $("confirm-reason-label");
  $("confirm-reason").value = "";
  if (kind === "retry") {
    $("confirm-title").textContent = "Retry " + t.gtid + "?";
    $("confirm-text").textContent =
      "Retry drives phase 2 now with a fresh retry budget; a STUCK transaction's decision (" +
      t.decision + ") is carried out at every branch still owing it — a commit decision is never " +
      "reversed. An undecided transaction past its deadline is aborted; one within its deadline is refused.";
    $("confirm-ok").textContent = "Retry now";
    reasonLabel.hidden = true;
  } else {
    $("confirm-title").textContent = "Abort " + t.gtid + "?";
    $("confirm-text").textContent =
      "Abort decides ABORT for this undecided transaction: every branch is rolled back (or cancelled). " +
      "Only undecided transactions can be aborted, and the decision cannot be undone.";
    $("confirm-ok").textContent = "Abort transaction";
    reasonLabel.hidden = false;
  }
  dialog.returnValue = "";
  dialog.onclose = async () => {
    if (dialog.returnValue !== "ok") return;
    await act(kind, t.gtid, $("confirm-reason").value);
  };
  dialog.showModal();
}

async function act(kind, gtid, reason) {
  const out = $("action-result");
  out.className = "result";
  out.textContent = kind === "retry" ? "Retrying…" : "Aborting…";
  try {
    const body = kind === "abort" ? JSON.stringify({ reason: reason || "" }) : undefined;
    const t = await api("/api/transactions/" + encodeURIComponent(gtid) + "/" + kind, { method: "POST", body });
    await showDetail(gtid);
    out.className = "result ok";
    out.textContent = (kind === "retry" ? "Retried" : "Aborted") + ": the transaction is now " + t.state + ".";
  } catch (e) {
    out.className = "result refused";
    out.textContent = refusal(e);
  }
}

// ---- routing -------------------------------------------------------------

async function route() {
  const hash = location.hash || "#/";
  const [path, queryString] = hash.slice(1).split("?");
  const params = new URLSearchParams(queryString || "");
  $("signin").hidden = true;
  for (const v of ["view-overview", "view-list", "view-detail"]) $(v).hidden = true;
  $("nav-overview").classList.toggle("active", path === "/" || path === "");
  $("nav-list").classList.toggle("active", path.startsWith("/tx"));
  updateChrome();
  if (!signedIn() && !ui.skipped) return showSignIn("");
  try {
    if (path.startsWith("/tx/")) await showDetail(decodeURIComponent(path.slice(4)));
    else if (path === "/tx") await showList(params);
    else await showOverview();
  } catch (e) {
    if (e.status === 401) return showSignIn(refusal(e));
    const main = $("view-overview");
    clear($("cards"));
    $("overview-note").textContent = refusal(e);
    main.hidden = false;
  }
}

function init() {
  $("signin-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const token = $("token").value.trim();
    if (!token) {
      $("signin-error").textContent = "Paste the admin token first.";
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    $("token").value = "";
    try {
      await api("/api/overview");
    } catch (e) {
      sessionStorage.removeItem(TOKEN_KEY);
      return showSignIn(refusal(e));
    }
    route();
  });
  $("signin-skip").addEventListener("click", () => {
    ui.skipped = true;
    route();
  });
  $("signout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    ui.skipped = false;
    setAutoRefresh(false);
    $("f-auto").checked = false;
    route();
  });
  $("filters").addEventListener("submit", (ev) => {
    ev.preventDefault();
    resetPaging();
    loadList();
  });
  $("f-mode").addEventListener("change", () => { resetPaging(); loadList(); });
  $("f-newest").addEventListener("change", () => { resetPaging(); loadList(); });
  $("f-auto").addEventListener("change", (ev) => setAutoRefresh(ev.target.checked));
  $("prev").addEventListener("click", () => { if (ui.list.page > 0) { ui.list.page--; loadList(); } });
  $("next").addEventListener("click", () => { if (ui.list.tokens[ui.list.page + 1]) { ui.list.page++; loadList(); } });
  $("retry").addEventListener("click", () => confirmAction("retry"));
  $("abort").addEventListener("click", () => confirmAction("abort"));
  window.addEventListener("hashchange", route);
  route();
}

document.addEventListener("DOMContentLoaded", init);

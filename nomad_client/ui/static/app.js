// The agent's web UI: a hash-routed single page in plain JavaScript (no framework).
//
// Safe by construction: every value shown comes from the API and may be hostile (job names,
// metadata, log lines, task events), so text only ever reaches the page through
// `textContent`, and elements are built with `createElement` and `setAttribute` on the fixed
// attribute names `ATTRIBUTES` allows. Links are "#/" routes built with encodeURIComponent.
//
// The ACL token lives in the tab's sessionStorage; it is sent as X-Nomad-Token on API calls
// and never put in a URL or logged. Live views use blocking queries (index + wait), and
// every loop of a page stops when the route changes (one AbortController per page).

const TOKEN_KEY = "nomad.token";
const WAIT = "30s";
const LOG_REFRESH_MS = 2000;
const LOG_TAIL_BYTES = 4096;
const SOCKET_EVERY = 5; // log refreshes between two looks at a task's API socket
const RETRY_MS = 5000;
const MAX_LOG_LINES = 200;

// ---- the API -------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

// One API call. `index`: a blocking query that returns once the data changed past it (or the
// wait ran out). Resolves to {body, index}; rejects with ApiError for an HTTP refusal.
async function api(path, { index = 0, signal, text = false } = {}) {
  let url = path;
  if (index > 0) {
    url += (url.includes("?") ? "&" : "?") + "index=" + index + "&wait=" + WAIT;
  }
  const headers = {};
  const tokenSecret = token();
  if (tokenSecret) {
    headers["X-Nomad-Token"] = tokenSecret;
  }
  const resp = await fetch(url, { headers, signal, cache: "no-store", credentials: "omit" });
  if (!resp.ok) {
    const reason = (await resp.text()).slice(0, 300);
    throw new ApiError(resp.status, reason || resp.statusText);
  }
  const got = Number(resp.headers.get("X-Nomad-Index")) || 0;
  const body = text ? await resp.text() : await resp.json();
  return { body, index: got };
}

// A 403 or 404: what the token may not see (or what is not there) is left out, not an error.
function hiddenFromUs(err) {
  return err instanceof ApiError && (err.status === 403 || err.status === 404);
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    if (signal.aborted) {
      resolve();
      return;
    }
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      signal.removeEventListener("abort", done);
      resolve();
    }
    signal.addEventListener("abort", done);
  });
}

// Keeps `path` rendered while the page is shown: a blocking query, re-issued with the last
// index seen. `render(body)` on every change; `refused(err)` once on a 403/404 (the loop
// then ends). Network errors and 5xx show the banner and are retried after a pause.
async function watch(signal, path, render, refused) {
  let index = 0;
  while (!signal.aborted) {
    let result;
    try {
      result = await api(path, { index, signal });
    } catch (err) {
      if (signal.aborted) {
        return;
      }
      if (hiddenFromUs(err)) {
        refused(err);
        return;
      }
      showError(err);
      await sleep(RETRY_MS, signal);
      continue;
    }
    clearError();
    if (index === 0 || result.index !== index) {
      try {
        render(result.body);
      } catch (err) {
        showError(err); // an answer of an unexpected shape: said, and the loop goes on
      }
    }
    if (result.index <= 0) {
      // No index to block on: look again later instead of asking in a tight loop.
      await sleep(RETRY_MS, signal);
    } else if (result.index < index) {
      index = 0; // the state was reset (e.g. a new leader): start over
    } else {
      index = result.index;
    }
  }
}

// ---- building the page ---------------------------------------------------------------------

// The only attribute names the page ever sets.
const ATTRIBUTES = new Set([
  "id", "class", "href", "type", "title", "autocomplete", "placeholder", "colspan",
  "data-job-id", "data-namespace", "data-alloc-id", "data-node-id", "data-key",
  "data-task", "data-var-path", "data-version", "data-eval-id", "aria-label",
]);

// <tag attrs>text</tag>, or with child nodes when `content` is an array.
function el(tag, attrs = {}, content = null) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (!ATTRIBUTES.has(name)) {
      throw new Error("attribute not allowed: " + name);
    }
    if (name === "href" && !String(value).startsWith("#/")) {
      throw new Error("only in-page links are built");
    }
    node.setAttribute(name, String(value));
  }
  if (Array.isArray(content)) {
    for (const child of content) {
      if (typeof child === "string") {
        node.appendChild(el("span", {}, child));
      } else if (child) {
        node.appendChild(child);
      }
    }
  } else if (content instanceof Node) {
    node.appendChild(content);
  } else if (content !== null && content !== undefined) {
    node.textContent = String(content);
  }
  return node;
}

function route(...parts) {
  return "#/" + parts.map((part) => encodeURIComponent(String(part))).join("/");
}

function link(text, ...parts) {
  return el("a", { href: route(...parts) }, text);
}

function clear(node) {
  while (node.firstChild) {
    node.removeChild(node.firstChild);
  }
}

function cell(content, cls) {
  return el("td", cls ? { class: cls } : {}, content);
}

// The class names of a status (a word from the API, reduced to letters).
function statusClass(value) {
  return "status status-" + String(value || "").toLowerCase().replace(/[^a-z]/g, "");
}

function statusText(value) {
  const text = value === null || value === undefined || value === "" ? "-" : String(value);
  return el("span", { class: statusClass(text) }, text);
}

// A table with a header row; returns [table, tbody].
function table(id, headings, cls) {
  const attrs = id ? { id } : {};
  if (cls) {
    attrs.class = cls;
  }
  const body = el("tbody");
  const head = el("thead", {}, [el("tr", {}, headings.map((h) => el("th", {}, h)))]);
  return [el("table", attrs, [head, body]), body];
}

function replaceRows(body, rows) {
  clear(body);
  for (const row of rows) {
    body.appendChild(row);
  }
}

// Key/value rows (`td.key`, `td.value`) of a map, sorted by key.
function keyValueRows(map, extra) {
  return Object.keys(map || {}).sort().map((key) => el("tr", { "data-key": key }, [
    cell(key, "key"), cell(map[key], "value"), ...(extra ? [extra(key)] : []),
  ]));
}

function section(title, children) {
  return el("section", {}, [el("h2", {}, title), ...children]);
}

function emptyNote(id, text) {
  const note = el("p", { id, class: "empty" }, text);
  note.hidden = true;
  return note;
}

function summaryList(pairs) {
  const items = [];
  for (const [label, value] of pairs) {
    items.push(el("dt", {}, label));
    items.push(el("dd", {}, value === null || value === undefined || value === "" ? "-" : value));
  }
  return el("dl", { class: "summary" }, items);
}

// Unix nanoseconds (or an RFC 3339 string) as local time.
function when(value) {
  if (value === null || value === undefined || value === 0 || value === "") {
    return "-";
  }
  const date = typeof value === "number" ? new Date(value / 1e6) : new Date(value);
  return Number.isNaN(date.getTime()) ? String(value) : date.toLocaleString();
}

function shortId(id) {
  return String(id || "").slice(0, 8);
}

function showError(err) {
  const banner = document.getElementById("error-banner");
  const what = err instanceof ApiError
    ? "The agent answered " + err.status + ": " + err.message
    : "Cannot reach the agent: " + (err && err.message ? err.message : String(err));
  banner.textContent = what;
  banner.hidden = false;
}

function clearError() {
  const banner = document.getElementById("error-banner");
  banner.hidden = true;
  banner.textContent = "";
}

// ---- views ---------------------------------------------------------------------------------

function jobsView(main, signal) {
  main.appendChild(el("h1", {}, "Jobs"));
  const [tbl, body] = table("jobs", ["ID", "Namespace", "Type", "Status", "Groups", "Submitted"]);
  const empty = emptyNote("jobs-empty", "No jobs visible with this token");
  main.append(tbl, empty);
  const show = (jobs) => {
    replaceRows(body, jobs.map((job) => el("tr", {
      "data-job-id": job.ID, "data-namespace": job.Namespace,
    }, [
      cell([link(job.ID, "jobs", job.Namespace, job.ID)]),
      cell(job.Namespace),
      cell(job.Type),
      cell([statusText(job.Status)]),
      cell(groupSummary(job.JobSummary)),
      cell(when(job.SubmitTime), "time"),
    ])));
    empty.hidden = jobs.length > 0;
  };
  watch(signal, "/v1/jobs?namespace=*", show, () => show([]));
}

function groupSummary(summary) {
  const groups = (summary && summary.Summary) || {};
  const names = Object.keys(groups);
  let running = 0;
  for (const name of names) {
    running += groups[name].Running || 0;
  }
  return names.length + " group(s), " + running + " running";
}

function allocRows(allocs, { node = true, job = false } = {}) {
  return allocs.map((alloc) => el("tr", { "data-alloc-id": alloc.ID }, [
    cell([link(shortId(alloc.ID), "allocations", alloc.ID)], "id"),
    job ? cell([link(alloc.JobID, "jobs", alloc.Namespace, alloc.JobID)]) : null,
    cell(alloc.TaskGroup),
    node ? cell([link(alloc.NodeName || shortId(alloc.NodeID), "nodes", alloc.NodeID)]) : null,
    cell([statusText(alloc.ClientStatus)]),
    cell(alloc.DesiredStatus),
    cell(alloc.JobVersion),
    cell(when(alloc.ModifyTime), "time"),
  ]));
}

const ALLOC_HEADINGS = ["ID", "Group", "Node", "Status", "Desired", "Version", "Modified"];

function jobView(main, signal, namespace, jobId) {
  const ns = "?namespace=" + encodeURIComponent(namespace);
  const base = "/v1/job/" + encodeURIComponent(jobId);
  const name = el("h1", { id: "job-name" }, jobId);
  const status = el("span", { id: "job-status", class: "status" }, "");
  const notice = el("p", { class: "empty" }, "");
  notice.hidden = true;
  const facts = el("div");
  const [metaTable, metaBody] = table("job-meta", ["Key", "Value"]);
  const [groupTable, groupBody] = table("job-groups",
    ["Group", "Count", "Tasks", "Running", "Complete", "Failed", "Lost"]);
  const [allocTable, allocBody] = table("job-allocations", ALLOC_HEADINGS);
  const versions = el("ol", { id: "job-versions", class: "versions" });
  const [evalTable, evalBody] = table("job-evaluations",
    ["ID", "Status", "Triggered by", "Description", "Created"]);
  const metaSection = section("Meta", [metaTable]);
  const groupsSection = section("Task groups", [groupTable]);
  const allocSection = section("Allocations", [allocTable]);
  const versionSection = section("Versions", [versions]);
  const evalSection = section("Evaluations", [evalTable]);
  main.append(name, el("p", {}, [el("span", { class: "muted" }, "Status: "), status]), notice,
    facts, groupsSection, allocSection, metaSection, versionSection, evalSection);

  let summary = {};
  let lastJob = null;
  const showGroups = () => {
    if (!lastJob) {
      return;
    }
    replaceRows(groupBody, (lastJob.TaskGroups || []).map((group) => {
      const counts = summary[group.Name] || {};
      return el("tr", { "data-key": group.Name }, [
        cell(group.Name), cell(group.Count),
        cell((group.Tasks || []).map((t) => t.Name + " (" + t.Driver + ")").join(", ")),
        cell(counts.Running || 0), cell(counts.Complete || 0), cell(counts.Failed || 0),
        cell(counts.Lost || 0),
      ]);
    }));
  };
  const refreshSide = async () => {
    try {
      const got = await api(base + "/summary" + ns, { signal });
      summary = got.body.Summary || {};
      showGroups();
    } catch (err) {
      if (!signal.aborted && !hiddenFromUs(err)) {
        showError(err);
      }
    }
    try {
      const got = await api(base + "/versions" + ns, { signal });
      showVersions(versions, got.body.Versions || []);
      versionSection.hidden = false;
    } catch (err) {
      if (hiddenFromUs(err)) {
        versionSection.hidden = true;
      } else if (!signal.aborted) {
        showError(err);
      }
    }
  };
  const hideAll = (text) => {
    notice.textContent = text;
    notice.hidden = false;
    for (const part of [groupsSection, allocSection, metaSection, versionSection, evalSection]) {
      part.hidden = true;
    }
  };

  watch(signal, base + ns, (job) => {
    lastJob = job;
    name.textContent = job.Name || job.ID;
    status.textContent = job.Status || "-";
    status.setAttribute("class", statusClass(job.Status));
    clear(facts);
    facts.appendChild(summaryList([
      ["ID", job.ID], ["Namespace", job.Namespace], ["Type", job.Type],
      ["Version", job.Version], ["Priority", job.Priority],
      ["Datacenters", (job.Datacenters || []).join(", ")], ["Node pool", job.NodePool],
      ["Submitted", when(job.SubmitTime)],
    ]));
    replaceRows(metaBody, keyValueRows(job.Meta));
    showGroups();
    refreshSide();
  }, (err) => hideAll(err.status === 404 ? "Job not found." : "This job is not visible with this token."));
  watch(signal, base + "/allocations" + ns, (allocs) => {
    replaceRows(allocBody, allocRows(allocs));
  }, () => { allocSection.hidden = true; });
  watch(signal, base + "/evaluations" + ns, (evals) => {
    replaceRows(evalBody, evals.map((ev) => el("tr", { "data-eval-id": ev.ID }, [
      cell(shortId(ev.ID), "id"), cell([statusText(ev.Status)]), cell(ev.TriggeredBy),
      cell(ev.StatusDescription), cell(when(ev.CreateTime), "time"),
    ])));
  }, () => { evalSection.hidden = true; });
}

function showVersions(list, versions) {
  clear(list);
  for (const job of versions) {
    const parts = ["v" + job.Version, "submitted " + when(job.SubmitTime)];
    if (job.Stable) {
      parts.push("stable");
    }
    list.appendChild(el("li", { "data-version": job.Version }, parts.join(" · ")));
  }
}

// -- an allocation --

function allocView(main, signal, allocId) {
  const base = "/v1/allocation/" + encodeURIComponent(allocId);
  const status = el("span", { id: "alloc-status", class: "status" }, "");
  const notice = el("p", { class: "empty" }, "");
  notice.hidden = true;
  const facts = el("div");
  const tasksBox = el("div");
  main.append(el("h1", {}, ["Allocation ", el("span", { id: "alloc-id", class: "mono" }, allocId)]),
    el("p", {}, [el("span", { class: "muted" }, "Status: "), status]), notice, facts,
    el("h2", {}, "Tasks"), tasksBox);
  const tasks = new Map(); // task name -> its section's parts

  watch(signal, base, (alloc) => {
    status.textContent = alloc.ClientStatus || "-";
    status.setAttribute("class", statusClass(alloc.ClientStatus));
    clear(facts);
    facts.appendChild(summaryList([
      ["Job", alloc.JobID ? link(alloc.JobID, "jobs", alloc.Namespace, alloc.JobID) : null],
      ["Namespace", alloc.Namespace], ["Group", alloc.TaskGroup], ["Name", alloc.Name],
      ["Node", alloc.NodeID ? link(alloc.NodeName || alloc.NodeID, "nodes", alloc.NodeID) : null],
      ["Desired", alloc.DesiredStatus], ["Client description", alloc.ClientDescription],
      ["Created", when(alloc.CreateTime)], ["Modified", when(alloc.ModifyTime)],
    ]));
    for (const name of taskNames(alloc)) {
      if (!tasks.has(name)) {
        const parts = taskSection(name);
        tasks.set(name, parts);
        tasksBox.appendChild(parts.root);
        followTask(signal, allocId, name, parts);
      }
      showTaskState(tasks.get(name), (alloc.TaskStates || {})[name]);
    }
  }, (err) => {
    notice.textContent = err.status === 404
      ? "Allocation not found." : "This allocation is not visible with this token.";
    notice.hidden = false;
  });
}

function taskNames(alloc) {
  const names = Object.keys(alloc.TaskStates || {});
  const job = alloc.Job || {};
  for (const group of job.TaskGroups || []) {
    if (group.Name === alloc.TaskGroup) {
      for (const task of group.Tasks || []) {
        if (!names.includes(task.Name)) {
          names.push(task.Name);
        }
      }
    }
  }
  return names.sort();
}

function taskSection(name) {
  const state = el("span", { id: "task-state-" + name, class: "status" }, "pending");
  const socket = el("span", { class: "taskapi-socket" }, "unknown");
  const [events, eventBody] = table(null, ["Time", "Type", "Message"], "task-events");
  const stdout = el("pre", { class: "log-stdout", "aria-label": "stdout" }, "");
  const stderr = el("pre", { class: "log-stderr", "aria-label": "stderr" }, "");
  const outBox = el("div", {}, [el("h3", {}, "stdout (last lines)"), stdout]);
  const errBox = el("div", {}, [el("h3", {}, "stderr (last lines)"), stderr]);
  const root = el("section", { "data-task": name, class: "task" }, [
    el("h3", {}, [el("span", {}, name), state]),
    el("p", {}, [el("span", { class: "muted" }, "Task API socket: "), socket]),
    el("h3", {}, "Events"), events, outBox, errBox,
  ]);
  return { root, state, socket, eventBody, stdout, stderr, outBox, errBox };
}

function showTaskState(parts, state) {
  const text = state ? (state.State || "pending") + (state.Failed ? " (failed)" : "") : "pending";
  parts.state.textContent = text;
  parts.state.setAttribute("class", statusClass(state && state.State ? state.State : "pending"));
  const events = (state && state.Events) || [];
  replaceRows(parts.eventBody, events.slice().reverse().map((ev) => el("tr", {}, [
    cell(when(ev.Time), "time"), cell(ev.Type, "type"),
    cell(ev.DisplayMessage || ev.Message || eventDetails(ev.Details), "message"),
  ])));
}

function eventDetails(details) {
  return Object.keys(details || {}).sort().map((k) => k + "=" + details[k]).join(" ");
}

// The last lines of a task's logs, re-read every LOG_REFRESH_MS while the page is shown, and
// now and then whether its Task API socket exists.
async function followTask(signal, allocId, task, parts) {
  const kinds = { stdout: { pre: parts.stdout, box: parts.outBox, on: true },
    stderr: { pre: parts.stderr, box: parts.errBox, on: true } };
  for (let tick = 0; !signal.aborted; tick++) {
    for (const [kind, log] of Object.entries(kinds)) {
      if (log.on) {
        log.on = await refreshLog(signal, allocId, task, kind, log);
      }
    }
    if (tick % SOCKET_EVERY === 0) {
      parts.socket.textContent = await socketState(signal, allocId, task);
    }
    await sleep(LOG_REFRESH_MS, signal);
  }
}

// False once the token may not read the logs: that part is then hidden, not retried.
async function refreshLog(signal, allocId, task, kind, log) {
  const path = "/v1/client/fs/logs/" + encodeURIComponent(allocId) + "?task=" +
    encodeURIComponent(task) + "&type=" + kind + "&origin=end&offset=" + LOG_TAIL_BYTES +
    "&plain=true";
  try {
    const got = await api(path, { signal, text: true });
    setLog(log.pre, lastLines(got.body));
  } catch (err) {
    if (signal.aborted) {
      return false;
    }
    if (err instanceof ApiError && err.status === 403) {
      log.box.hidden = true;
      return false;
    }
    if (!log.pre.textContent) {
      log.pre.textContent = "(no output yet)";
    }
  }
  return true;
}

function lastLines(text) {
  let lines = text.split("\n");
  if (text.length >= LOG_TAIL_BYTES && lines.length > 1) {
    lines = lines.slice(1); // the first line was cut by the byte offset
  }
  return lines.slice(-MAX_LOG_LINES).join("\n");
}

function setLog(pre, text) {
  if (pre.textContent === text) {
    return;
  }
  // Keep following the end if the reader was there; leave them alone if they scrolled up.
  const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
  pre.textContent = text;
  if (atEnd) {
    pre.scrollTop = pre.scrollHeight;
  }
}

async function socketState(signal, allocId, task) {
  const path = "/v1/client/fs/stat/" + encodeURIComponent(allocId) + "?path=" +
    encodeURIComponent(task + "/secrets/api.sock");
  try {
    await api(path, { signal });
    return "present";
  } catch (err) {
    return err instanceof ApiError && err.status === 404 ? "absent" : "unknown";
  }
}

// -- nodes --

function nodesView(main, signal) {
  main.appendChild(el("h1", {}, "Nodes"));
  const [tbl, body] = table("nodes",
    ["ID", "Name", "Datacenter", "Pool", "Status", "Eligibility", "Drain", "Address", "Version"]);
  const empty = emptyNote("nodes-empty", "No nodes visible with this token");
  main.append(tbl, empty);
  const show = (nodes) => {
    replaceRows(body, nodes.map((node) => el("tr", { "data-node-id": node.ID }, [
      cell([link(shortId(node.ID), "nodes", node.ID)], "id"), cell(node.Name),
      cell(node.Datacenter), cell(node.NodePool), cell([statusText(node.Status)]),
      cell(node.SchedulingEligibility), cell(node.Drain ? "yes" : "no"), cell(node.Address),
      cell(node.Version),
    ])));
    empty.hidden = nodes.length > 0;
  };
  watch(signal, "/v1/nodes", show, () => show([]));
}

function nodeView(main, signal, nodeId) {
  const base = "/v1/node/" + encodeURIComponent(nodeId);
  const name = el("h1", { id: "node-name" }, nodeId);
  const status = el("span", { class: "status" }, "");
  const notice = el("p", { class: "empty" }, "");
  notice.hidden = true;
  const facts = el("div");
  const [driverTable, driverBody] = table("node-drivers",
    ["Driver", "Detected", "Healthy", "Description", "Updated"]);
  const [metaTable, metaBody] = table("node-meta", ["Key", "Value", "Source"]);
  const [attrTable, attrBody] = table("node-attributes", ["Key", "Value"]);
  const [allocTable, allocBody] = table("node-allocations",
    ["ID", "Job", "Group", "Status", "Desired", "Version", "Modified"]);
  const allocSection = section("Allocations", [allocTable]);
  main.append(name, el("p", {}, [el("span", { class: "muted" }, "Status: "), status]), notice,
    facts, allocSection, section("Drivers", [driverTable]), section("Metadata", [metaTable]),
    section("Attributes", [attrTable]));

  watch(signal, base, (node) => {
    name.textContent = node.Name || node.ID;
    status.textContent = node.Status || "-";
    clear(facts);
    facts.appendChild(summaryList([
      ["ID", node.ID], ["Datacenter", node.Datacenter], ["Node pool", node.NodePool],
      ["Class", node.NodeClass], ["Address", node.HTTPAddr],
      ["Eligibility", node.SchedulingEligibility], ["Drain", node.Drain ? "yes" : "no"],
    ]));
    replaceRows(attrBody, keyValueRows(node.Attributes));
    const drivers = node.Drivers || {};
    replaceRows(driverBody, Object.keys(drivers).sort().map((key) => {
      const d = drivers[key] || {};
      return el("tr", { "data-key": key }, [
        cell(key, "key"), cell(d.Detected ? "yes" : "no"), cell(d.Healthy ? "yes" : "no"),
        cell(d.HealthDescription), cell(when(d.UpdateTime), "time"),
      ]);
    }));
    showNodeMeta(signal, metaBody, node);
  }, (err) => {
    notice.textContent = err.status === 404 ? "Node not found." : "This node is not visible with this token.";
    notice.hidden = false;
  });
  watch(signal, base + "/allocations", (allocs) => {
    replaceRows(allocBody, allocRows(allocs, { node: false, job: true }));
  }, () => { allocSection.hidden = true; });
}

// The node's metadata as it reports it; where the agent serving us runs that node (and the
// token may read it), which keys are dynamic (set through the API) and which static.
async function showNodeMeta(signal, body, node) {
  let local = null;
  try {
    local = (await api("/v1/client/metadata?node_id=" + encodeURIComponent(node.ID), { signal })).body;
  } catch (err) {
    if (signal.aborted) {
      return;
    }
  }
  const meta = local ? local.Meta || {} : node.Meta || {};
  const source = (key) => {
    if (!local) {
      return cell("node", "source");
    }
    return cell(key in (local.Dynamic || {}) ? "dynamic" : "static", "source");
  };
  replaceRows(body, keyValueRows(meta, source));
}

// -- variables --

function variablesView(main, signal) {
  main.appendChild(el("h1", {}, "Variables"));
  const [tbl, body] = table("variables", ["Path", "Namespace", "Modified"]);
  const empty = emptyNote("variables-empty", "No variables visible with this token");
  main.append(tbl, empty);
  const show = (vars) => {
    replaceRows(body, vars.map((v) => el("tr", { "data-var-path": v.Path, "data-namespace": v.Namespace }, [
      cell([link(v.Path, "variables", v.Namespace, v.Path)]), cell(v.Namespace),
      cell(when(v.ModifyTime), "time"),
    ])));
    empty.hidden = vars.length > 0;
  };
  watch(signal, "/v1/vars?namespace=*", show, () => show([]));
}

function variableView(main, signal, namespace, path) {
  const meta = el("div", { id: "var-meta" });
  const button = el("button", { id: "var-show-items", type: "button" }, "Show items");
  const items = el("div", { id: "var-items" });
  main.append(el("h1", {}, ["Variable ", el("span", { id: "var-path", class: "mono" }, path)]),
    meta, el("h2", {}, "Items"), button, items);
  const ns = "namespace=" + encodeURIComponent(namespace);

  // Metadata from the list (which never carries items): nothing secret is fetched unasked.
  watch(signal, "/v1/vars?" + ns + "&prefix=" + encodeURIComponent(path), (vars) => {
    const found = vars.find((v) => v.Path === path && v.Namespace === namespace);
    clear(meta);
    meta.appendChild(found ? summaryList([
      ["Namespace", found.Namespace], ["Created", when(found.CreateTime)],
      ["Modified", when(found.ModifyTime)], ["Create index", found.CreateIndex],
      ["Modify index", found.ModifyIndex], ["Locked", found.Lock ? "yes" : "no"],
    ]) : el("p", { class: "empty" }, "No such variable visible with this token."));
  }, () => {
    clear(meta);
    meta.appendChild(el("p", { class: "empty" }, "No such variable visible with this token."));
  });

  button.addEventListener("click", async () => {
    clear(items);
    const url = "/v1/var/" + path.split("/").map(encodeURIComponent).join("/") + "?" + ns;
    try {
      const got = await api(url, { signal });
      const [tbl, body] = table(null, ["Key", "Value"]);
      replaceRows(body, keyValueRows(got.body.Items));
      items.appendChild(tbl);
    } catch (err) {
      if (signal.aborted) {
        return;
      }
      if (hiddenFromUs(err)) {
        items.appendChild(el("p", { class: "empty" }, "This token may not read the items."));
      } else {
        showError(err);
      }
    }
  }, { signal });
}

// -- the token --

function tokenView(main, signal) {
  const input = el("input", {
    id: "token-input", type: "password", autocomplete: "off",
    placeholder: "Secret ID", "aria-label": "ACL token secret ID",
  });
  const save = el("button", { id: "token-save", type: "button" }, "Save");
  const forget = el("button", { id: "token-clear", type: "button" }, "Clear");
  const status = el("span", { id: "token-status" }, "");
  main.append(el("h1", {}, "ACL token"),
    el("p", { class: "muted" }, "The token is kept in this browser tab only and sent with every request the page makes."),
    el("div", { class: "token" }, [input, save, forget]),
    el("p", {}, [el("span", { class: "muted" }, "Current token: "), status]));

  save.addEventListener("click", () => {
    const value = input.value.trim();
    input.value = "";
    if (value) {
      sessionStorage.setItem(TOKEN_KEY, value);
    } else {
      sessionStorage.removeItem(TOKEN_KEY);
    }
    showTokenStatus(signal, status);
  }, { signal });
  forget.addEventListener("click", () => {
    input.value = "";
    sessionStorage.removeItem(TOKEN_KEY);
    showTokenStatus(signal, status);
  }, { signal });
  showTokenStatus(signal, status);
}

// Who the stored token is. Only its Name and Type are shown; the answer's SecretID is not
// kept or shown anywhere.
async function showTokenStatus(signal, status) {
  if (!token()) {
    status.textContent = "no token";
    showTokenIndicator("no token");
    return;
  }
  status.textContent = "checking…";
  try {
    const self = (await api("/v1/acl/token/self", { signal })).body;
    const text = self.AccessorID === "anonymous"
      ? "anonymous" : (self.Name || "(unnamed)") + " (" + self.Type + ")";
    status.textContent = text;
    showTokenIndicator(text);
  } catch (err) {
    if (signal.aborted) {
      return;
    }
    status.textContent = err instanceof ApiError
      ? "token not accepted (" + err.status + ")" : "cannot check the token";
    showTokenIndicator("token not accepted");
  }
}

function showTokenIndicator(text) {
  document.getElementById("token-indicator").textContent = "Token: " + text;
}

// ---- routing -------------------------------------------------------------------------------

const ROUTES = [
  { match: (p) => p.length === 1 && p[0] === "jobs", nav: "jobs", view: (m, s) => jobsView(m, s) },
  { match: (p) => p.length >= 3 && p[0] === "jobs", nav: "jobs",
    view: (m, s, p) => jobView(m, s, p[1], p.slice(2).join("/")) },
  { match: (p) => p.length === 2 && p[0] === "allocations", nav: "jobs",
    view: (m, s, p) => allocView(m, s, p[1]) },
  { match: (p) => p.length === 1 && p[0] === "nodes", nav: "nodes", view: (m, s) => nodesView(m, s) },
  { match: (p) => p.length === 2 && p[0] === "nodes", nav: "nodes",
    view: (m, s, p) => nodeView(m, s, p[1]) },
  { match: (p) => p.length === 1 && p[0] === "variables", nav: "variables",
    view: (m, s) => variablesView(m, s) },
  { match: (p) => p.length >= 3 && p[0] === "variables", nav: "variables",
    view: (m, s, p) => variableView(m, s, p[1], p.slice(2).join("/")) },
  { match: (p) => p.length === 1 && p[0] === "token", nav: "token", view: (m, s) => tokenView(m, s) },
];

let current = null; // the shown page's AbortController

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, "");
  if (!raw) {
    return null;
  }
  try {
    return raw.split("/").map(decodeURIComponent);
  } catch (err) {
    return null; // a malformed escape: not a route of ours
  }
}

function render() {
  const parts = parseHash();
  if (!parts) {
    location.replace("#/jobs");
    return;
  }
  if (current) {
    current.abort(); // stops the previous page's loops and fetches
  }
  current = new AbortController();
  clearError();
  const main = document.getElementById("main");
  clear(main);
  const found = ROUTES.find((r) => r.match(parts));
  for (const nav of document.querySelectorAll("a[data-nav]")) {
    nav.classList.toggle("active", Boolean(found) && nav.getAttribute("data-nav") === found.nav);
  }
  if (!found) {
    main.append(el("h1", {}, "Not found"), el("p", {}, [link("Back to the jobs", "jobs")]));
    return;
  }
  found.view(main, current.signal, parts);
}

window.addEventListener("hashchange", render);
render();
// The header shows whose token the page uses (the token page keeps it current).
showTokenStatus(new AbortController().signal, document.createElement("span"));

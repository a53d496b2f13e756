// Postern's dashboard: a small client over the REST API (/api/v1), no build step, no inline
// script (the page's Content-Security-Policy allows only this file). Every string that comes from
// the API is set as text (textContent, attribute values), never parsed as HTML.

const TOKEN_KEY = "postern.token";
const main = document.getElementById("main");

// What went wrong in the page, for the browser tests (and anyone looking).
window.__posternErrors = [];
window.addEventListener("error", (e) => window.__posternErrors.push(String(e.message)));
window.addEventListener("unhandledrejection", (e) => window.__posternErrors.push(String(e.reason)));
document.addEventListener("securitypolicyviolation", (e) =>
  window.__posternErrors.push("CSP: " + e.violatedDirective));

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || "HTTP " + status);
    this.status = status;
    this.body = body;
  }
}

async function api(method, path, body) {
  const headers = {};
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers["Authorization"] = "Bearer " + token;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch("/api/v1" + path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = text; }
  if (!r.ok) throw new ApiError(r.status, data);
  return data;
}

// h("tag", {attr: value, onclick: fn}, child, ...): children are nodes or text.
function h(tag, props, ...children) {
  const el = ["svg", "rect", "text", "line", "g", "title"].includes(tag)
    ? document.createElementNS("http://www.w3.org/2000/svg", tag)
    : document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const enc = encodeURIComponent;
const badge = (s) => h("span", { class: "badge " + s }, s);
const when = (t) => (t ? new Date(t).toLocaleString() : "–");
const link = (href, text) => h("a", { href }, text);
const age = (s) => (s < 90 ? `${s.toFixed(0)} s` : s < 5400 ? `${(s / 60).toFixed(0)} min` : `${(s / 3600).toFixed(1)} h`);

function show(...nodes) {
  main.replaceChildren(...nodes);
}

function errorBox(e) {
  const text = e instanceof ApiError ? `${e.status}: ${e.message}` : String(e);
  return h("p", { class: "error", role: "alert" }, text);
}

// Runs an action, showing its error (or `done`) in `out`, then reloads the page if asked.
async function act(out, fn, done, reload = true) {
  out.replaceChildren();
  try {
    const result = await fn();
    if (done) out.replaceChildren(h("p", { class: "notice" }, typeof done === "function" ? done(result) : done));
    if (reload) setTimeout(route, 300);
    return result;
  } catch (e) {
    out.replaceChildren(errorBox(e));
  }
}

// ---- sign-in ----

async function signedIn() {
  const auth = await (await fetch("/api/v1/auth")).json();
  if (!auth.token_required) return true;
  if (!sessionStorage.getItem(TOKEN_KEY)) return false;
  try {
    await api("GET", "/endpoints?limit=1");
    return true;
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) return false;
    throw e;
  }
}

function signIn(message) {
  document.getElementById("nav").hidden = true;
  const input = h("input", { type: "password", id: "token", autocomplete: "off", required: true });
  const out = h("div");
  const form = h("form", { class: "card", id: "sign-in" },
    h("h1", {}, "Sign in"),
    h("p", { class: "muted" }, "Paste an API token (api.tokens in Postern's config)."),
    h("label", { for: "token" }, "API token"), input, h("div", {}, h("button", { type: "submit" }, "Sign in")),
    out);
  if (message) out.append(h("p", { class: "error", role: "alert" }, message));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    if (await signedIn()) {
      location.hash = "#/";
      route();
    } else {
      sessionStorage.removeItem(TOKEN_KEY);
      signIn("That token was refused.");
    }
  });
  show(form);
}

// ---- charts ----

function chart(series) {
  const W = 900, H = 160, pad = 24;
  const buckets = series.buckets;
  const max = Math.max(1, ...buckets.map((b) => b.delivered + b.retried + b.failed));
  const bw = (W - pad) / Math.max(1, buckets.length);
  const svg = h("svg", { class: "chart", viewBox: `0 0 ${W} ${H + 20}`, role: "img",
    "aria-label": "deliveries per interval" });
  svg.append(h("line", { x1: pad, y1: H, x2: W, y2: H, stroke: "#ccc" }));
  svg.append(h("text", { x: 0, y: 12, "font-size": 11, fill: "#667085" }, String(max)));
  buckets.forEach((b, i) => {
    let y = H;
    for (const [key, color] of [["delivered", "#2e9d5b"], ["retried", "#d48a0c"], ["failed", "#c8372d"]]) {
      const hgt = (b[key] / max) * (H - 16);
      if (hgt > 0) {
        y -= hgt;
        svg.append(h("rect", { x: pad + i * bw + 1, y, width: Math.max(1, bw - 2), height: hgt, fill: color },
          h("title", {}, `${new Date(b.start).toLocaleString()}: ${b[key]} ${key}`)));
      }
    }
  });
  const first = buckets[0], last = buckets[buckets.length - 1];
  if (first) svg.append(h("text", { x: pad, y: H + 16, "font-size": 11, fill: "#667085" }, new Date(first.start).toLocaleString()));
  if (last) svg.append(h("text", { x: W, y: H + 16, "font-size": 11, fill: "#667085", "text-anchor": "end" }, new Date(last.start).toLocaleString()));
  const legend = h("div", { class: "legend" },
    ...["delivered", "retried", "failed"].map((k) =>
      h("span", {}, h("span", { class: "swatch " + k }), k)));
  return h("div", {}, svg, legend);
}

// ---- pages ----

async function overview() {
  const [list, series] = await Promise.all([
    api("GET", "/endpoints?limit=250"),
    api("GET", "/stats/timeseries?bucket=3600"),
  ]);
  const stats = await Promise.all(list.endpoints.map((e) =>
    api("GET", `/endpoints/${enc(e.id)}/stats`).catch(() => null)));
  const rows = list.endpoints.map((e, i) => {
    const s = stats[i];
    const state = !e.active ? (e.disabled_reason ? "disabled" : "paused") : "active";
    return h("tr", {},
      h("td", {}, link(`#/endpoints/${enc(e.id)}`, e.id)),
      h("td", {}, e.url),
      h("td", {}, badge(state), e.disabled_reason ? h("div", { class: "muted" }, e.disabled_reason) : null),
      h("td", {}, badge(e.circuit.state)),
      h("td", {}, s ? `${s.success_rate.toFixed(1)} %` : "–"),
      h("td", {}, s ? `${s.latency_ms.p50.toFixed(0)} / ${s.latency_ms.p95.toFixed(0)} ms` : "–"),
      h("td", {}, s ? String(s.pending) : "–"),
      h("td", {}, s ? `${s.due}${s.due ? ` (oldest ${age(s.oldest_due_s)})` : ""}` : "–"));
  });
  show(h("h1", {}, "Overview"),
    h("section", {}, h("h2", {}, "Deliveries per hour, last 24 h, all endpoints"), chart(series)),
    h("table", { id: "overview" },
      h("tr", {}, ...["Endpoint", "URL", "State", "Circuit", "Success (24 h)", "p50 / p95", "Unfinished (24 h)", "Due now"].map((t) => h("th", {}, t))),
      ...rows));
}

async function endpoints(params) {
  const tenant = params.get("tenant") || "";
  const active = params.get("active") || "";
  const q = new URLSearchParams({ limit: "250" });
  if (tenant) q.set("tenant", tenant);
  if (active) q.set("active", active);
  const [list, types] = await Promise.all([
    api("GET", "/endpoints?" + q), api("GET", "/event-types").catch(() => ({ event_types: [] }))]);
  const filter = h("form", { class: "row card", id: "filter" },
    h("div", {}, h("label", {}, "Tenant"), h("input", { name: "tenant", value: tenant })),
    h("div", {}, h("label", {}, "State"), h("select", { name: "active" },
      h("option", { value: "" }, "any"), h("option", { value: "true", selected: active === "true" }, "active"),
      h("option", { value: "false", selected: active === "false" }, "inactive"))),
    h("button", { type: "submit", class: "secondary" }, "Filter"));
  filter.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const f = new FormData(filter);
    const p = new URLSearchParams();
    for (const k of ["tenant", "active"]) if (f.get(k)) p.set(k, f.get(k));
    location.hash = "#/endpoints?" + p;
  });
  const out = h("div", { id: "create-result" });
  const datalist = h("datalist", { id: "event-types" }, ...types.event_types.map((t) => h("option", { value: t })));
  const create = h("form", { class: "card", id: "create" },
    h("h2", {}, "New endpoint"),
    h("label", {}, "URL"), h("input", { name: "url", required: true, placeholder: "https://example.com/webhooks" }),
    h("label", {}, "Event types (comma-separated patterns; * for all)"),
    h("input", { name: "events", value: "*", list: "event-types" }), datalist,
    h("label", {}, "Tenant"), h("input", { name: "tenant" }),
    h("label", {}, "Description"), h("input", { name: "description" }),
    h("label", {}, "Headers (one Name: value per line)"), h("textarea", { name: "headers", rows: 2 }),
    h("label", {}, "Retry schedule (comma-separated delays, e.g. 5s, 5m, 1h; empty: the default)"),
    h("input", { name: "retry" }),
    h("div", {}, h("button", { type: "submit" }, "Create")), out);
  create.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const f = new FormData(create);
    const body = { url: f.get("url"), events: String(f.get("events")).split(",").map((s) => s.trim()).filter(Boolean) };
    if (f.get("tenant")) body.tenant = f.get("tenant");
    if (f.get("description")) body.description = f.get("description");
    const headers = {};
    for (const line of String(f.get("headers")).split("\n")) {
      const i = line.indexOf(":");
      if (i > 0) headers[line.slice(0, i).trim()] = line.slice(i + 1).trim();
    }
    if (Object.keys(headers).length) body.headers = headers;
    if (f.get("retry")) body.retry = { schedule: String(f.get("retry")).split(",").map((s) => s.trim()) };
    act(out, () => api("POST", "/endpoints", body), (e) => secretOnce(e.id, e.secret,
      "Endpoint created. Its signing secret is shown this once:"), false);
  });
  show(h("h1", {}, "Endpoints"), filter,
    h("table", { id: "endpoints" },
      h("tr", {}, ...["Endpoint", "URL", "Events", "Tenant", "State", "Source"].map((t) => h("th", {}, t))),
      ...list.endpoints.map((e) => h("tr", {},
        h("td", {}, link(`#/endpoints/${enc(e.id)}`, e.id)), h("td", {}, e.url), h("td", {}, e.events.join(", ")),
        h("td", {}, e.tenant || "–"), h("td", {}, badge(e.active ? "active" : (e.disabled_reason ? "disabled" : "paused"))),
        h("td", {}, e.source)))),
    create);
}

function secretOnce(id, secret, text) {
  const code = h("code", { class: "secret", id: "secret" }, secret);
  const copy = h("button", { type: "button", class: "secondary", id: "copy-secret" }, "Copy");
  copy.addEventListener("click", () => navigator.clipboard.writeText(secret).then(
    () => { copy.textContent = "Copied"; }, () => { copy.textContent = "Copy failed: select the text"; }));
  return h("span", {}, text, " ", code, " ", copy, " ", id ? link(`#/endpoints/${enc(id)}`, "Open the endpoint") : null);
}

async function endpointDetail(id, params) {
  const status = params.get("status") || "", type = params.get("event_type") || "", since = params.get("since") || "";
  const cursor = params.get("cursor") || "";
  const q = new URLSearchParams({ limit: "50" });
  if (status) q.set("status", status);
  if (type) q.set("event_type", type);
  if (since) q.set("since", new Date(since).toISOString());
  if (cursor) q.set("cursor", cursor);
  const [e, page, series] = await Promise.all([
    api("GET", `/endpoints/${enc(id)}`),
    api("GET", `/endpoints/${enc(id)}/deliveries?${q}`),
    api("GET", `/stats/timeseries?bucket=3600&endpoint_id=${enc(id)}`),
  ]);
  const out = h("div", { id: "action-result" });
  const config = e.source === "config";
  const actions = h("div", { class: "row" },
    h("button", { id: e.active ? "pause" : "resume", class: "secondary", onclick: () =>
      act(out, () => api("PATCH", `/endpoints/${enc(id)}`, { active: !e.active }), e.active ? "Paused." : "Resumed.") },
      e.active ? "Pause" : "Resume"),
    h("button", { id: "send-test", class: "secondary", onclick: () =>
      act(out, () => api("POST", `/endpoints/${enc(id)}/test`), (r) => `Test event ${r.id} sent.`) }, "Send a test event"));
  if (!config) {
    const grace = h("input", { id: "grace", value: "24h", size: 6 });
    actions.append(h("span", {}, "Grace ", grace, " ",
      h("button", { id: "rotate", class: "secondary", onclick: () =>
        act(out, () => api("POST", `/endpoints/${enc(id)}/rotate-secret`, { grace: grace.value }),
          (r) => secretOnce(null, r.secret, "New secret (the old one signs alongside it until the grace ends):"), false) },
        "Rotate secret")));
    actions.append(h("button", { id: "delete", class: "danger", onclick: () => {
      if (!confirm(`Delete ${id}? Its unfinished deliveries (pending, paused, queued) become cancelled; they stay listed.`)) return;
      act(out, () => api("DELETE", `/endpoints/${enc(id)}`), "Deleted.", false).then(() => { location.hash = "#/endpoints"; });
    } }, "Delete"));
  }
  const edit = config ? h("p", { class: "muted" }, "Managed by the config file: only pause and resume apply here.") : (() => {
    const form = h("form", { class: "card", id: "edit" }, h("h2", {}, "Edit"),
      h("label", {}, "URL"), h("input", { name: "url", value: e.url }),
      h("label", {}, "Event types"), h("input", { name: "events", value: e.events.join(", ") }),
      h("label", {}, "Description"), h("input", { name: "description", value: e.description || "" }),
      h("div", {}, h("button", { type: "submit" }, "Save")));
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const f = new FormData(form);
      act(out, () => api("PATCH", `/endpoints/${enc(id)}`, {
        url: f.get("url"), events: String(f.get("events")).split(",").map((s) => s.trim()).filter(Boolean),
        description: f.get("description") || null }), "Saved.");
    });
    return form;
  })();
  const filter = h("form", { class: "row card", id: "delivery-filter" },
    h("div", {}, h("label", {}, "Status"), h("select", { name: "status" }, h("option", { value: "" }, "any"),
      ...["pending", "delivering", "delivered", "failed", "paused", "cancelled", "queued"].map((s) =>
        h("option", { value: s, selected: s === status }, s)))),
    h("div", {}, h("label", {}, "Event type"), h("input", { name: "event_type", value: type })),
    h("div", {}, h("label", {}, "Since"), h("input", { name: "since", type: "datetime-local", value: since })),
    h("button", { type: "submit", class: "secondary" }, "Filter"));
  filter.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const f = new FormData(filter), p = new URLSearchParams();
    for (const k of ["status", "event_type", "since"]) if (f.get(k)) p.set(k, f.get(k));
    location.hash = `#/endpoints/${enc(id)}?${p}`;
  });
  const replayOut = h("div");
  const replay = h("form", { class: "row card", id: "replay" },
    h("div", {}, h("label", {}, "Replay failed deliveries created since"), h("input", { name: "since", type: "datetime-local", required: true })),
    h("div", {}, h("label", {}, "until (empty: now)"), h("input", { name: "until", type: "datetime-local" })),
    h("button", { type: "submit", class: "secondary" }, "Replay"), replayOut);
  replay.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const f = new FormData(replay), body = { since: new Date(f.get("since")).toISOString() };
    if (f.get("until")) body.until = new Date(f.get("until")).toISOString();
    act(replayOut, () => api("POST", `/endpoints/${enc(id)}/replay`, body), (r) => `${r.requeued} deliveries due again.`);
  });
  const next = page.next_cursor ? (() => {
    const p = new URLSearchParams(params); p.set("cursor", page.next_cursor);
    return link(`#/endpoints/${enc(id)}?${p}`, "Older deliveries →");
  })() : null;
  show(h("h1", {}, "Endpoint ", h("span", { id: "endpoint-id" }, e.id)),
    h("section", {},
      h("p", {}, e.url), h("p", {}, badge(e.active ? "active" : (e.disabled_reason ? "disabled" : "paused")), " circuit ",
        badge(e.circuit.state), e.disabled_reason ? " " + e.disabled_reason : ""),
      h("p", { class: "muted" }, `events: ${e.events.join(", ")} · tenant: ${e.tenant || "–"} · source: ${e.source}`),
      actions, out),
    h("section", {}, h("h2", {}, "Deliveries per hour, last 24 h"), chart(series)),
    edit,
    h("h2", {}, "Deliveries"), filter,
    h("table", { id: "deliveries" },
      h("tr", {}, ...["Delivery", "Event type", "Status", "Attempts", "Last answer", "Created"].map((t) => h("th", {}, t))),
      ...page.deliveries.map((d) => h("tr", {},
        h("td", {}, link(`#/deliveries/${enc(d.id)}`, d.id.slice(0, 8))), h("td", {}, d.event_type),
        h("td", {}, badge(d.status)), h("td", {}, String(d.attempts)),
        h("td", {}, d.last_status_code ? String(d.last_status_code) : (d.last_error || "–")), h("td", {}, when(d.created_at))))),
    next, replay);
}

async function deliveryDetail(id) {
  const d = await api("GET", `/deliveries/${enc(id)}`);
  const event = await api("GET", `/events/${enc(d.event_id)}`).catch(() => null);
  const out = h("div", { id: "action-result" });
  const retry = h("button", { id: "retry", onclick: () =>
    act(out, () => api("POST", `/deliveries/${enc(id)}/retry`), "Due now: it is attempted again shortly.") }, "Retry now");
  show(h("h1", {}, "Delivery"),
    h("section", {},
      h("p", {}, "Status ", h("span", { id: "delivery-status" }, badge(d.status)), " · attempts ", String(d.attempts),
        " · endpoint ", link(`#/endpoints/${enc(d.endpoint_id)}`, d.endpoint_id)),
      h("p", {}, "Event ", link(`#/events/${enc(d.event_id)}`, d.event_id), " · type ", d.event_type,
        " · ordering key ", d.ordering_key || "–", event && event.tenant ? " · tenant " + event.tenant : ""),
      ["failed", "cancelled", "pending"].includes(d.status) ? retry : null, out),
    h("h2", {}, "Payload"),
    h("pre", { id: "payload" }, event ? JSON.stringify(event.payload, null, 2) : "(the event was pruned)"),
    h("h2", {}, "Attempts"),
    h("p", { class: "muted" }, "Signature headers as sent; the endpoint's custom header values are redacted and the secret is never shown."),
    h("table", { id: "attempts" },
      h("tr", {}, ...["#", "Started", "Duration", "Status", "Error", "Request headers", "Response body"].map((t) => h("th", {}, t))),
      ...d.attempt_log.map((a) => h("tr", {},
        h("td", {}, String(a.attempt)), h("td", {}, when(a.started_at)), h("td", {}, `${a.duration_ms} ms`),
        h("td", {}, a.status_code ? String(a.status_code) : "–"), h("td", { class: "attempt-error" }, a.error || "–"),
        h("td", {}, h("pre", { class: "attempt-headers" }, a.request_headers.map((x) => `${x.name}: ${x.value}`).join("\n") || "–")),
        h("td", {}, h("pre", { class: "attempt-body" }, a.response_body || ""))))));
}

async function eventLookup(id) {
  const input = h("input", { id: "event-id", value: id || "", placeholder: "the webhook-id a receiver logged", size: 40 });
  const form = h("form", { class: "row card", id: "lookup" }, h("div", {}, h("label", {}, "Event id"), input),
    h("button", { type: "submit" }, "Look up"));
  form.addEventListener("submit", (ev) => { ev.preventDefault(); location.hash = `#/events/${enc(input.value.trim())}`; });
  if (!id) return show(h("h1", {}, "Event lookup"), form);
  let body;
  try {
    const e = await api("GET", `/events/${enc(id)}`);
    body = h("div", { id: "event" },
      h("p", {}, "Type ", e.type, " · created ", when(e.created_at), " · tenant ", e.tenant || "–",
        " · ordering key ", e.ordering_key || "–"),
      h("pre", { id: "payload" }, JSON.stringify(e.payload, null, 2)),
      h("table", { id: "event-deliveries" },
        h("tr", {}, ...["Delivery", "Endpoint", "Status", "Attempts", "Last answer"].map((t) => h("th", {}, t))),
        ...e.deliveries.map((d) => h("tr", {},
          h("td", {}, link(`#/deliveries/${enc(d.id)}`, d.id.slice(0, 8))), h("td", {}, d.endpoint_id),
          h("td", {}, badge(d.status)), h("td", {}, String(d.attempts)),
          h("td", {}, d.last_status_code ? String(d.last_status_code) : (d.last_error || "–"))))));
  } catch (e) {
    body = errorBox(e);
  }
  show(h("h1", {}, "Event lookup"), form, body);
}

async function inbound() {
  const [decisions, inbox, messages] = await Promise.all([
    api("GET", "/inbound/stats"), api("GET", "/inbox/stats"), api("GET", "/inbox?limit=50")]);
  const out = h("div", { id: "action-result" });
  show(h("h1", {}, "Inbound"),
    h("h2", {}, "Requests per route, last 24 h (this replica)"),
    h("table", { id: "inbound-routes" },
      h("tr", {}, ...["Route", "Outcomes", "Refused or failed, by reason"].map((t) => h("th", {}, t))),
      ...decisions.routes.map((r) => h("tr", {}, h("td", {}, r.route),
        h("td", {}, Object.entries(r.outcomes).map(([k, v]) => `${k} ${v}`).join(" · ") || "–"),
        h("td", {}, Object.entries(r.reasons).map(([k, v]) => `${k} ${v}`).join(" · ") || "–")))),
    h("h2", {}, "Inbox per route"),
    h("table", { id: "inbox-routes" },
      h("tr", {}, ...["Route", "Received (24 h)", "Done (24 h)", "Pending", "Failed", "Oldest pending"].map((t) => h("th", {}, t))),
      ...inbox.routes.map((r) => h("tr", {}, h("td", {}, r.route), h("td", {}, String(r.received)), h("td", {}, String(r.done)),
        h("td", {}, String(r.pending)), h("td", {}, String(r.failed)), h("td", {}, `${r.oldest_pending_s.toFixed(0)} s`)))),
    h("h2", {}, "Inbox messages"), out,
    h("table", { id: "inbox-messages" },
      h("tr", {}, ...["Id", "Route", "Provider", "Dedupe key", "Status", "Attempts", "Received", ""].map((t) => h("th", {}, t))),
      ...messages.messages.map((m) => h("tr", {}, h("td", {}, String(m.id)), h("td", {}, m.route), h("td", {}, m.provider),
        h("td", {}, m.dedupe_key), h("td", {}, badge(m.status)), h("td", {}, String(m.attempts)), h("td", {}, when(m.received_at)),
        h("td", {}, ["done", "failed", "pending"].includes(m.status)
          ? h("button", { class: "secondary", onclick: () => act(out, () => api("POST", `/inbox/${m.id}/replay`), `Message ${m.id} handed to the app again.`) }, "Replay")
          : null)))));
}

// ---- routing ----

async function route() {
  const [path, query] = location.hash.slice(1).split("?");
  const params = new URLSearchParams(query || "");
  try {
    // A malformed escape (#/%) is an error shown on the page, not an unhandled rejection.
    const parts = (path || "/").split("/").filter(Boolean).map(decodeURIComponent);
    if (!(await signedIn())) return signIn();
    document.getElementById("nav").hidden = false;
    if (parts.length === 0) return await overview();
    if (parts[0] === "endpoints" && parts.length === 1) return await endpoints(params);
    if (parts[0] === "endpoints") return await endpointDetail(parts[1], params);
    if (parts[0] === "deliveries") return await deliveryDetail(parts[1]);
    if (parts[0] === "events") return await eventLookup(parts[1]);
    if (parts[0] === "inbound") return await inbound();
    show(h("h1", {}, "Not found"), h("p", {}, link("#/", "Overview")));
  } catch (e) {
    show(errorBox(e));
  }
}

document.getElementById("sign-out").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  signIn();
});
window.addEventListener("hashchange", route);
route();

// lowband coordinator dashboard: polls /api/status and /api/rounds, draws three uPlot charts, renders tables.
// Every value from the server is written with textContent (never as HTML). The read token, when the run has one,
// is kept in sessionStorage and sent as "Authorization: Bearer"; a "#token=..." fragment is taken once and cleared.
"use strict";

(function () {
  const POLL_MS = 2000;
  const state = { token: sessionStorage.getItem("lowband-token") || "", plots: {}, updates: 0, errors: 0 };
  window.lowbandDashboard = state; // read by tests and by curious people

  const hash = new URLSearchParams(window.location.hash.slice(1));
  if (hash.get("token")) {
    state.token = hash.get("token").slice(0, 256);
    sessionStorage.setItem("lowband-token", state.token);
    history.replaceState(null, "", window.location.pathname);
  }

  const $ = (id) => document.getElementById(id);

  function fmtBytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "kB", "MB", "GB", "TB"];
    let i = 0;
    while (Math.abs(n) >= 1000 && i < units.length - 1) { n /= 1000; i++; }
    return (i ? n.toFixed(1) : String(n)) + " " + units[i];
  }
  const fmt = (x, digits) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));

  // a cell is its text, or [text, class]
  function row(cells, cls) {
    const tr = document.createElement("tr");
    if (cls) tr.className = cls;
    for (const c of cells) {
      const td = document.createElement("td");
      if (Array.isArray(c)) {
        td.textContent = c[0];
        td.className = c[1];
      } else {
        td.textContent = c;
      }
      tr.appendChild(td);
    }
    return tr;
  }

  function fill(tableId, rows) {
    const body = $(tableId).tBodies[0];
    body.replaceChildren(...rows);
  }

  async function get(path) {
    const headers = state.token ? { Authorization: "Bearer " + state.token } : {};
    const res = await fetch(path, { headers, cache: "no-store" });
    if (res.status === 401) {
      const err = new Error("unauthorized");
      err.unauthorized = true;
      throw err;
    }
    if (!res.ok) throw new Error(path + ": HTTP " + res.status);
    return res.json();
  }

  function renderStatus(s) {
    $("run").textContent = s.run_id + " · " + s.recipe;
    $("summary").textContent = s.committed_rounds + " of " + s.rounds_total + " rounds committed · " +
      s.members.length + " members · reference " + s.reference_fingerprint;
    const banner = $("banner");
    banner.hidden = !s.persistence_error;
    banner.textContent = s.persistence_error ? "NOT SERVING ROUNDS: " + s.persistence_error : "";
    const deadline = s.deadline_in_s === null || s.deadline_in_s < 0 ? "no deadline yet (no payload)" :
      "deadline in " + s.deadline_in_s.toFixed(1) + " s";
    $("round").textContent = "round " + s.current_round + " open · " + deadline + " · payloads from " +
      (s.submitted.length ? s.submitted.join(", ") : "nobody yet");
    // accountability ([recipe.reduce] on): frames seen, clipped, rejected, latest norm ratio and cosine; evictions
    const evicted = s.evicted || [];
    const accountable = s.members.some((m) => m.frames_seen > 0) || evicted.length > 0;
    $("members").classList.toggle("with-acct", accountable);
    fill("members", s.members.map((m) => row([
      m.name, m.key_id, fmt(m.last_heartbeat_age_s, 1) + " s", String(m.rounds_contributed),
      String(m.first_round), fmtBytes(m.bytes_in), fmtBytes(m.bytes_out), fmt(m.last_loss, 4),
      [String(m.frames_seen), "acct"], [String(m.frames_clipped), "acct"], [String(m.frames_rejected), "acct"],
      [fmt(m.norm_ratio, 3), "acct"], [fmt(m.cosine, 2), "acct"],
    ], m.last_heartbeat_age_s > 10 ? "stale" : "")));
    $("evicted-section").hidden = evicted.length === 0;
    fill("evicted", evicted.map((e) => row([e.name, String(e.round), e.reason])));
    fill("recent", s.recent_rounds.slice(-10).reverse().map((r) => row([
      String(r.round), String(r.members.length), fmtBytes(r.bytes_in), fmtBytes(r.bytes_out), fmt(r.duration_s, 2),
      fmt(r.mean_loss, 4), fmt(r.val_loss, 4), r.reason,
    ])));
  }

  function plot(id, opts, data) {
    const el = $(id);
    if (!state.plots[id]) {
      const width = Math.max(420, Math.min(640, el.clientWidth || 520));
      state.plots[id] = new uPlot(Object.assign({ width, height: 240 }, opts), data, el);
    } else {
      state.plots[id].setData(data);
    }
    const n = data[0].length;
    el.dataset.points = String(n);
  }

  const axisBytes = { values: (u, ticks) => ticks.map(fmtBytes), size: 70 };

  function renderRounds(r) {
    // validation loss vs cumulative bytes: only rounds the evaluator scored
    const xs = [], ys = [];
    r.cumulative_bytes.forEach((b, i) => { if (r.val_loss[i] !== null) { xs.push(b); ys.push(r.val_loss[i]); } });
    plot("plot-loss", {
      scales: { x: { time: false } },
      axes: [axisBytes, {}],
      series: [{ label: "cumulative bytes", value: (u, v) => fmtBytes(v) },
        { label: "val loss", stroke: "#2563eb", width: 2, points: { show: true } }],
    }, [xs, ys]);
    plot("plot-time", {
      scales: { x: { time: false } },
      series: [{ label: "round" },
        { label: "round period (s)", stroke: "#059669", width: 2, spanGaps: true },
        { label: "first→last payload (s)", stroke: "#d97706", width: 1, spanGaps: true }],
    }, [r.round, r.period_s, r.spread_s]);
    plot("plot-bytes", {
      scales: { x: { time: false } },
      axes: [{}, axisBytes],
      series: [{ label: "round" },
        { label: "bytes in", stroke: "#7c3aed", width: 2, value: (u, v) => fmtBytes(v) },
        { label: "bytes out", stroke: "#db2777", width: 1, value: (u, v) => fmtBytes(v) }],
    }, [r.round, r.bytes_in, r.bytes_out]);
  }

  async function tick() {
    try {
      const [s, r] = await Promise.all([get("/api/status"), get("/api/rounds?points=500")]);
      $("login").hidden = true;
      $("main").hidden = false;
      renderStatus(s);
      renderRounds(r);
      state.updates += 1;
      $("updated").textContent = "updated " + new Date().toLocaleTimeString() + " (every " + POLL_MS / 1000 + " s)";
    } catch (err) {
      if (err.unauthorized) {
        $("login").hidden = false;
        $("main").hidden = true;
        return; // wait for the form
      }
      state.errors += 1;
      $("updated").textContent = "coordinator not answering (" + err.message + "); retrying";
    }
    setTimeout(tick, POLL_MS);
  }

  $("login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    state.token = $("token").value.trim().slice(0, 256);
    sessionStorage.setItem("lowband-token", state.token);
    tick();
  });

  tick();
})();

// The mplslb status page: polls status.json every second and updates the tables and charts in place.
// Everything from the daemon reaches the DOM as text (textContent, SVG attributes of numbers): never as markup.
"use strict";

(function () {
  const POLL_MS = 1000;
  const TIMEOUT_MS = 5000;
  const SVG = "http://www.w3.org/2000/svg";
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                   "#bcbd22", "#17becf"];
  const W = 480, H = 150, LEFT = 46, RIGHT = 8, TOP = 8, BOTTOM = 18;

  let points = [];      // the history, oldest first: as many as the daemon keeps
  let capacity = 300;
  const rowsById = new Map();
  const colours = new Map();  // server name -> colour, stable while the page lives

  // -- formatting --------------------------------------------------------------------------------------------
  function num(v) { return v === null || v === undefined ? "-" : String(v); }
  function rate(v) {
    if (v === null || v === undefined) return "-";
    return v < 100 ? v.toFixed(1) : Math.round(v).toString();
  }
  function si(v) {
    if (v === null || v === undefined) return "-";
    const units = ["", "K", "M", "G", "T"];
    let i = 0;
    while (Math.abs(v) >= 10000 && i < units.length - 1) { v /= 1000; i += 1; }
    return (i === 0 && v % 1 !== 0 ? v.toFixed(1) : Math.round(v).toString()) + units[i];
  }
  function ms(v) { return v === null || v === undefined ? "-" : v.toFixed(1); }

  // -- tables: rows kept by key and updated in place ---------------------------------------------------------
  // rows: [[key, [cell, ...], rowClass]], a cell is a value or [value, className].
  function syncTable(id, rows) {
    const tbody = document.querySelector("#" + id + " tbody");
    const old = rowsById.get(id) || new Map();
    const next = new Map();
    rows.forEach(function (row, i) {
      const key = row[0], cells = row[1], rowClass = row[2] || "";
      let tr = old.get(key);
      if (!tr) {
        tr = document.createElement("tr");
        tr.setAttribute("data-key", key);
      }
      while (tr.children.length < cells.length) tr.appendChild(document.createElement("td"));
      while (tr.children.length > cells.length) tr.removeChild(tr.lastChild);
      cells.forEach(function (cell, j) {
        const td = tr.children[j];
        const text = Array.isArray(cell) ? num(cell[0]) : num(cell);
        const cls = Array.isArray(cell) ? cell[1] : "";
        if (td.textContent !== text) td.textContent = text;
        if (td.className !== cls) td.className = cls;
      });
      if (tr.className !== rowClass) tr.className = rowClass;
      if (tbody.children[i] !== tr) tbody.insertBefore(tr, tbody.children[i] || null);
      next.set(key, tr);
    });
    old.forEach(function (tr, key) { if (!next.has(key)) tr.remove(); });
    rowsById.set(id, next);
  }

  function render(snap) {
    const rates = snap.rates || {};
    const srates = rates.servers || {};
    const meta = ["scheduler " + snap.algorithm];
    if (snap.health) {
      const h = snap.health;
      meta.push("health check " + h.kind + " :" + h.port + (h.path || "") + " every " + h.interval + " s");
    }
    if (snap.offload) meta.push("offload " + snap.offload.kind);
    document.getElementById("meta").textContent = meta.join(" · ");

    syncTable("servers", snap.servers.map(function (s) {
      const r = srates[s.name];
      const h = s.health;
      let state = s.status + (s.down_reason ? " (" + s.down_reason + ")" : "");
      if (s.overloaded) state += " overloaded";
      let last = "-";
      if (h && h.last_ok !== null) last = (h.last_ok ? "ok" : "FAIL") + (h.last_detail ? ": " + h.last_detail : "");
      return ["server:" + s.name, [
        [s.name, "name"], s.address, s.line_card + "/" + s.port, [state, "state state-" + s.status], s.weight,
        s.active, s.total, rate(r && r.sessions_per_s), rate(r && r.packets_in_per_s),
        rate(r && r.packets_out_per_s), ms(s.rt_ms), s.refused,
        h ? [h.label, h.up ? "" : "fail"] : "not checked", h ? h.checks + " (" + h.failed_checks + ")" : "-",
        [last, h && h.last_ok === false ? "fail" : ""], h ? ms(h.last_rtt_ms) : "-",
      ], "status-" + s.status];
    }));

    const vips = [];
    snap.vips.forEach(function (v) {
      const literal = v.address.indexOf(":") >= 0 ? "[" + v.address + "]" : v.address;
      v.services.forEach(function (svc) {
        const name = svc.proto.toUpperCase() + " " + literal + ":" + svc.port;
        vips.push(["vip:" + name, [name, svc.active]]);
      });
    });
    vips.push(["vip:all", ["all services", snap.sessions.active]]);
    syncTable("vips", vips);

    const f = snap.frames, ss = snap.sessions;
    const paths = f.fast_path + f.slow_path;
    const share = function (n) { return paths ? " (" + (100 * n / paths).toFixed(1) + "%)" : ""; };
    syncTable("totals", [
      ["sessions-active", ["sessions active (peak)", ss.active + " (" + ss.peak + ")", ""]],
      ["sessions-started", ["sessions started", ss.started, rate(rates.sessions_per_s)]],
      ["frames-in", ["frames in", f.in, rate(rates.frames_in_per_s)]],
      ["frames-out", ["frames out", f.out, rate(rates.frames_out_per_s)]],
      ["fast", ["fast path (label switched)", f.fast_path + share(f.fast_path), rate(rates.fast_path_per_s)]],
      ["slow", ["slow path (analysed)", f.slow_path + share(f.slow_path), rate(rates.slow_path_per_s)]],
    ]);

    const l = snap.labels;
    syncTable("labels", [
      ["in_use", "in use"], ["free", "free"], ["quarantined", "in quarantine"], ["capacity", "capacity"],
      ["peak", "peak in use"], ["allocated_total", "allocated"], ["withdrawn_total", "withdrawn"],
      ["exhausted", "allocation failed"], ["installed", "installed (switching table)"],
    ].map(function (k) { return ["label:" + k[0], [k[1], l[k[0]]]]; }));

    const drops = Object.keys(snap.drops).map(function (k) { return ["drop:" + k, [k, snap.drops[k]]]; });
    const ports = snap.ports || {};
    Object.keys(ports).forEach(function (p) {
      if (ports[p].kernel_dropped) {
        drops.push(["kdrop:" + p, ["kernel, before the daemon read them: " + p, ports[p].kernel_dropped]]);
      }
    });
    if (!drops.length) drops.push(["none", ["(none)", 0]]);
    syncTable("drops", drops);

    const ended = [];
    Object.keys(ss.ended).forEach(function (k) { ended.push(["ended:" + k, ["ended: " + k, ss.ended[k]]]); });
    Object.keys(ss.refused).forEach(function (k) { ended.push(["refused:" + k, ["refused: " + k, ss.refused[k]]]); });
    if (!ended.length) ended.push(["none", ["(none)", 0]]);
    syncTable("ended", ended);
  }

  // -- charts: inline SVG ------------------------------------------------------------------------------------
  function svgEl(tag, attrs, text) {
    const e = document.createElementNS(SVG, tag);
    Object.keys(attrs).forEach(function (k) { e.setAttribute(k, String(attrs[k])); });
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    const steps = [1, 2, 2.5, 5, 10];
    for (let i = 0; i < steps.length; i++) if (v <= steps[i] * p) return steps[i] * p;
    return 10 * p;
  }
  function colour(name) {
    if (!colours.has(name)) colours.set(name, PALETTE[colours.size % PALETTE.length]);
    return colours.get(name);
  }

  // series: [{name, colour, values: [[t, v or null], ...]}]; a null value breaks the line.
  function drawChart(id, legendId, series, span, now) {
    const svg = document.getElementById(id);
    let max = 0;
    series.forEach(function (s) { s.values.forEach(function (p) { if (p[1] !== null && p[1] > max) max = p[1]; }); });
    max = niceMax(max);
    const x = function (t) { return LEFT + (W - LEFT - RIGHT) * (1 - (now - t) / span); };
    const y = function (v) { return TOP + (H - TOP - BOTTOM) * (1 - v / max); };
    const nodes = [];
    [0, max / 2, max].forEach(function (v) {
      nodes.push(svgEl("line", { x1: LEFT, x2: W - RIGHT, y1: y(v), y2: y(v), class: "axis" }));
      nodes.push(svgEl("text", { x: LEFT - 4, y: y(v) + 3, "text-anchor": "end", class: "tick" }, si(v)));
    });
    nodes.push(svgEl("text", { x: LEFT, y: H - 4, class: "tick" }, "-" + Math.round(span) + " s"));
    nodes.push(svgEl("text", { x: W - RIGHT, y: H - 4, "text-anchor": "end", class: "tick" }, "now"));
    series.forEach(function (s) {
      let run = [];
      const flush = function () {
        if (run.length > 1) {
          nodes.push(svgEl("polyline", { points: run.join(" "), stroke: s.colour, class: "line" }));
        }
        run = [];
      };
      s.values.forEach(function (p) {
        if (p[1] === null || now - p[0] > span) { flush(); return; }
        run.push(x(p[0]).toFixed(1) + "," + y(p[1]).toFixed(1));
      });
      flush();
    });
    svg.replaceChildren.apply(svg, nodes);
    const legend = document.getElementById(legendId);
    legend.replaceChildren.apply(legend, series.map(function (s) {
      const li = document.createElement("li");
      const sw = document.createElement("span");
      sw.className = "swatch";
      sw.style.background = s.colour;
      li.appendChild(sw);
      li.appendChild(document.createTextNode(s.name));
      return li;
    }));
  }

  function charts() {
    if (!points.length) return;
    const now = points[points.length - 1].t;
    const span = Math.max(60, Math.min(capacity, now - points[0].t));
    const series = function (name, c, pick) {
      return { name: name, colour: c, values: points.map(function (p) { return [p.t, pick(p)]; }) };
    };
    drawChart("chart-sessions", "legend-sessions",
      [series("active", PALETTE[0], function (p) { return p.sessions; })], span, now);
    drawChart("chart-frames", "legend-frames", [
      series("in", PALETTE[0], function (p) { return p.frames_in_per_s; }),
      series("out", PALETTE[1], function (p) { return p.frames_out_per_s; }),
      series("slow path", PALETTE[3], function (p) { return p.slow_path_per_s; }),
    ], span, now);
    const names = Object.keys(points[points.length - 1].servers);
    drawChart("chart-servers", "legend-servers", names.map(function (n) {
      return series(n, colour(n), function (p) {
        const s = p.servers[n];
        return s ? s.sessions_per_s : null;
      });
    }), span, now);
  }

  // -- polling -----------------------------------------------------------------------------------------------
  function setConn(text, cls) {
    const c = document.getElementById("conn");
    c.textContent = text;
    c.className = "conn " + cls;
  }

  function merge(history) {
    capacity = history.capacity || capacity;
    const last = points.length ? points[points.length - 1].t : -Infinity;
    history.points.forEach(function (p) { if (p.t > last) points.push(p); });
    if (points.length > capacity) points = points.slice(points.length - capacity);
  }

  function poll() {
    const since = points.length ? "?since=" + encodeURIComponent(points[points.length - 1].t) : "";
    const ctl = new AbortController();
    const timer = setTimeout(function () { ctl.abort(); }, TIMEOUT_MS);
    fetch("status.json" + since, { cache: "no-store", signal: ctl.signal })
      .then(function (r) {
        return r.json().then(function (body) {
          if (!r.ok || !body.ok) throw new Error(body.error || ("HTTP " + r.status));
          return body;
        });
      })
      .then(function (body) {
        merge(body.history);
        render(body.status);
        charts();
        setConn("live", "ok");
      })
      .catch(function (err) { setConn("no answer (" + err.message + "), retrying", "bad"); })
      .finally(function () { clearTimeout(timer); setTimeout(poll, POLL_MS); });
  }

  poll();
})();

// The Gantt chart of an rlm_async trace. Data comes from the JSON block above, written by
// rlm_async/trace_view.py; nothing is fetched. Bars are packed into lanes per depth so a
// run of thousands of calls stays a few hundred pixels tall, and the SVG is rebuilt as one
// string (not node by node) on zoom, which keeps 10k bars interactive.
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("trace-data").textContent);
  // Columns of data.calls (see trace_view.py _call_row).
  var START = 0, END = 1, DEPTH = 2, MODEL = 3, STATUS = 4, KIND = 5, ID = 6, NODE = 7,
      PROMPT = 8, CACHED = 9, COMPLETION = 10, COST = 11, ATTEMPTS = 12, ERROR = 13, CRIT = 14, TEXT = 15,
      HEDGES = 16, HEDGE_WON = 17;
  var PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
                 "#9c755f", "#bab0ac", "#e15759"];
  var STATUS_COLOUR = { ok: "#59a14f", error: "#e15759", budget: "#b07aa1", cancelled: "#9c9c9c",
                        unfinished: "#edc948" };
  var KIND_COLOUR = { root: "#4e79a7", sub: "#76b7b2", child: "#f28e2b", "final": "#b07aa1" };
  var calls = data.calls, cells = data.cells;
  var gantt = document.getElementById("gantt");
  var concEl = document.getElementById("concurrency");
  var axisEl = document.getElementById("axis");
  var scroller = document.getElementById("scroller");
  var tip = document.getElementById("tip");
  var colourBy = "model", zoom = 1;
  var PAD_L = 70, PAD_R = 16, AXIS_H = 22;

  function esc(s) {
    return String(s).replace(/[&<>"']/g, function (c) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c];
    });
  }
  function fmtS(s) {
    if (s >= 100) return s.toFixed(0) + " s";
    if (s >= 1) return s.toFixed(2) + " s";
    return (s * 1000).toFixed(0) + " ms";
  }
  function fmtN(n) {
    if (n >= 1e6) return (n / 1e6).toFixed(2) + "M";
    if (n >= 1e4) return (n / 1e3).toFixed(1) + "k";
    return String(n);
  }
  function fmtUsd(x) { return "$" + (x >= 10 ? x.toFixed(2) : x.toFixed(5)); }

  function colour(c) {
    if (colourBy === "status") return STATUS_COLOUR[data.statuses[c[STATUS]]] || "#e15759";
    if (colourBy === "kind") return KIND_COLOUR[c[KIND]] || "#999";
    return PALETTE[c[MODEL] % PALETTE.length];
  }

  // Greedy first-fit lane packing; input sorted by start. Returns lane per item and count.
  function pack(items, s, e) {
    var laneEnds = [], lanes = new Array(items.length);
    for (var i = 0; i < items.length; i++) {
      var it = items[i], lane = -1;
      for (var l = 0; l < laneEnds.length; l++) {
        if (laneEnds[l] <= it[s]) { lane = l; break; }
      }
      if (lane < 0) { lane = laneEnds.length; laneEnds.push(0); }
      laneEnds[lane] = it[e];
      lanes[i] = lane;
    }
    return { lanes: lanes, count: laneEnds.length };
  }

  // Layout does not depend on zoom: compute it once.
  var depths = [];
  calls.forEach(function (c) { if (depths.indexOf(c[DEPTH]) < 0) depths.push(c[DEPTH]); });
  cells.forEach(function (c) { if (depths.indexOf(c[2]) < 0) depths.push(c[2]); });
  depths.sort(function (a, b) { return a - b; });
  var sections = depths.map(function (d) {
    var cs = [], ks = [];
    calls.forEach(function (c, i) { if (c[DEPTH] === d) cs.push(i); });
    cells.forEach(function (c, i) { if (c[2] === d) ks.push(i); });
    var callPack = pack(cs.map(function (i) { return calls[i]; }), START, END);
    var cellPack = pack(ks.map(function (i) { return cells[i]; }), 0, 1);
    return { depth: d, calls: cs, cells: ks, callPack: callPack, cellPack: cellPack };
  });
  var totalLanes = sections.reduce(function (n, s) { return n + s.callPack.count; }, 0);
  var BAR = totalLanes > 400 ? 2 : totalLanes > 200 ? 3 : totalLanes > 100 ? 5 : totalLanes > 40 ? 8 : 12;
  var GAP = BAR >= 8 ? 2 : 1;
  var CELL = Math.max(BAR, 6);
  var HEAD = 18;

  function niceStep(span, px) {
    var raw = span / Math.max(1, px / 90), pow = Math.pow(10, Math.floor(Math.log10(raw)));
    var steps = [1, 2, 5, 10];
    for (var i = 0; i < steps.length; i++) if (steps[i] * pow >= raw) return steps[i] * pow;
    return 10 * pow;
  }

  function plural(n, word) { return n + " " + word + (n === 1 ? "" : "s"); }

  function render() {
    var viewW = Math.max(600, scroller.clientWidth || 1000);
    var width = Math.round(viewW * zoom);
    var wall = Math.max(data.wall_s, 1e-6);
    for (var q = 0; q < calls.length; q++) wall = Math.max(wall, calls[q][END]);
    var plotW = width - PAD_L - PAD_R;
    var sx = plotW / wall;
    var X = function (t) { return PAD_L + t * sx; };
    var y = 0, bars = 0, crit = 0, body = [];
    sections.forEach(function (sec) {
      body.push('<line class="sep" x1="0" x2="' + width + '" y1="' + y + '" y2="' + y + '"/>');
      body.push('<text class="depth-lbl" x="4" y="' + (y + 13) + '">depth ' + sec.depth + "</text>");
      body.push('<text class="lbl" x="' + PAD_L + '" y="' + (y + 13) + '">' + plural(sec.calls.length, "call") +
                " · " + plural(sec.cells.length, "cell") + "</text>");
      y += HEAD;
      var cellTop = y;
      sec.cells.forEach(function (ci, k) {
        var c = cells[ci], yy = cellTop + sec.cellPack.lanes[k] * (CELL + GAP);
        body.push('<rect class="cell' + (c[7] ? " crit" : "") + '" data-c="' + ci + '" x="' + X(c[0]).toFixed(1) +
                  '" y="' + yy + '" width="' + Math.max(1, (c[1] - c[0]) * sx).toFixed(1) + '" height="' + CELL + '"/>');
      });
      y += sec.cellPack.count * (CELL + GAP) + (sec.cellPack.count ? 2 : 0);
      var callTop = y;
      sec.calls.forEach(function (i, k) {
        var c = calls[i], yy = callTop + sec.callPack.lanes[k] * (BAR + GAP);
        var cls = "bar" + (c[CRIT] ? " crit" : "") + (data.statuses[c[STATUS]] !== "ok" ? " failed" : "");
        body.push('<rect class="' + cls + '" data-i="' + i + '" x="' + X(c[START]).toFixed(1) + '" y="' + yy +
                  '" width="' + Math.max(1, (c[END] - c[START]) * sx).toFixed(1) + '" height="' + BAR +
                  '" fill="' + colour(c) + '"/>');
        // A hedge copy: a tick where it was sent, to the bar's end (solid if it won).
        (c[HEDGES] || []).forEach(function (t) {
          body.push('<line class="hedge' + (c[HEDGE_WON] ? " won" : "") + '" x1="' + X(t).toFixed(1) + '" x2="' +
                    X(c[END]).toFixed(1) + '" y1="' + (yy + BAR - 1) + '" y2="' + (yy + BAR - 1) + '"/>');
        });
        bars++;
        if (c[CRIT]) crit++;
      });
      y += sec.callPack.count * (BAR + GAP) + 8;
    });
    var height = y + 4;
    var step = niceStep(wall, plotW), grid = [], ticks = [];
    for (var t = 0; t <= wall + 1e-9; t += step) {
      var x = X(t).toFixed(1);
      grid.push('<line class="grid" x1="' + x + '" x2="' + x + '" y1="0" y2="' + height + '"/>');
      ticks.push('<text x="' + x + '" y="14" text-anchor="middle">' + fmtS(t) + "</text>");
    }
    var classes = (BAR < 6 ? "thin " : "") + (document.getElementById("crit-only").checked ? "crit-only" : "");
    gantt.innerHTML = '<svg xmlns="http://www.w3.org/2000/svg" width="' + width + '" height="' + height +
      '" class="' + classes + '"><g>' + grid.join("") + "</g>" + body.join("") + "</svg>";
    axisEl.innerHTML = '<svg xmlns="http://www.w3.org/2000/svg" class="axis" width="' + width + '" height="' +
      AXIS_H + '">' + ticks.join("") + "</svg>";
    gantt.setAttribute("data-bar-count", String(bars));
    gantt.setAttribute("data-critical-count", String(crit));
    gantt.setAttribute("data-rendered", "1");
    renderConcurrency(width, X, wall);
    renderLegend();
    syncScroll();
  }

  function syncScroll() {
    axisEl.scrollLeft = scroller.scrollLeft;
    concEl.scrollLeft = scroller.scrollLeft;
  }

  function renderConcurrency(width, X, wall) {
    var pts = data.concurrency, H = 56, peak = Math.max(1, data.peak_in_flight);
    if (!pts.length) { concEl.innerHTML = ""; return; }
    var Y = function (n) { return H - 4 - (n / peak) * (H - 16); };
    var d = "M" + X(0).toFixed(1) + "," + Y(0).toFixed(1), prev = 0;
    pts.forEach(function (p) {
      d += "L" + X(p[0]).toFixed(1) + "," + Y(prev).toFixed(1) + "L" + X(p[0]).toFixed(1) + "," + Y(p[1]).toFixed(1);
      prev = p[1];
    });
    d += "L" + X(wall).toFixed(1) + "," + Y(prev).toFixed(1);
    var area = d + "L" + X(wall).toFixed(1) + "," + Y(0).toFixed(1) + "Z";
    concEl.innerHTML = '<svg xmlns="http://www.w3.org/2000/svg" width="' + width + '" height="' + H + '">' +
      '<line class="sep" x1="0" x2="' + width + '" y1="0.5" y2="0.5"/>' +
      '<text class="depth-lbl" x="4" y="14">in flight</text>' +
      '<text class="lbl" x="4" y="28">peak ' + data.peak_in_flight + "</text>" +
      '<path class="conc-area" d="' + area + '"/><path class="conc-line" d="' + d + '"/></svg>';
  }

  function renderLegend() {
    var items = [];
    if (colourBy === "model") {
      data.models.forEach(function (m, i) { items.push([PALETTE[i % PALETTE.length], m]); });
    } else if (colourBy === "status") {
      data.statuses.forEach(function (s) { items.push([STATUS_COLOUR[s] || "#e15759", s]); });
    } else {
      Object.keys(KIND_COLOUR).forEach(function (k) { items.push([KIND_COLOUR[k], k]); });
    }
    items.push(["#fff; outline: 1.5px solid #111", "critical path"]);
    document.getElementById("legend").innerHTML = items.map(function (it) {
      return '<span><span class="sw" style="background:' + it[0] + '"></span>' + esc(it[1]) + "</span>";
    }).join("");
  }

  function callTip(c) {
    var uncached = c[PROMPT] - c[CACHED];
    var h = "<b>" + esc(c[ID]) + "</b> · " + esc(c[KIND]) + " call · depth " + c[DEPTH] + "<br>" +
      "model " + esc(data.models[c[MODEL]]) + " · node " + esc(c[NODE]) + "<br>" +
      "start " + fmtS(c[START]) + " · took " + fmtS(c[END] - c[START]) + " · " + esc(data.statuses[c[STATUS]]) +
      (c[ATTEMPTS] > 1 ? " after " + c[ATTEMPTS] + " attempts" : "") +
      ((c[HEDGES] || []).length ? " · " + c[HEDGES].length + " hedge(s)" + (c[HEDGE_WON] ? ", a hedge won" : "") : "") +
      "<br>" +
      "tokens in " + fmtN(c[PROMPT]) + " (" + fmtN(c[CACHED]) + " cached, " + fmtN(uncached) + " new) · out " +
      fmtN(c[COMPLETION]) + "<br>cost " + fmtUsd(c[COST]);
    if (c[CRIT]) h += "<br><b>on the critical path</b>";
    if (c[ERROR]) h += "<br>error: " + esc(c[ERROR]);
    if (c[TEXT]) h += '<div class="t">' + esc(c[TEXT]) + "</div>";
    return h;
  }
  function cellTip(c) {
    return "<b>cell " + esc(c[4]) + "." + esc(c[5]) + "</b> of " + esc(c[3]) + " · depth " + c[2] + "<br>" +
      "start " + fmtS(c[0]) + " · took " + fmtS(c[1] - c[0]) + " · " + esc(c[6]) +
      (c[7] ? "<br><b>on the critical path</b>" : "");
  }

  gantt.addEventListener("mousemove", function (ev) {
    var t = ev.target, html = null;
    if (t.getAttribute && t.getAttribute("data-i") !== null) html = callTip(calls[+t.getAttribute("data-i")]);
    else if (t.getAttribute && t.getAttribute("data-c") !== null) html = cellTip(cells[+t.getAttribute("data-c")]);
    if (html === null) { tip.hidden = true; return; }
    tip.innerHTML = html;
    tip.hidden = false;
    var x = ev.clientX + 14, y = ev.clientY + 14;
    if (x + tip.offsetWidth > window.innerWidth) x = ev.clientX - tip.offsetWidth - 14;
    if (y + tip.offsetHeight > window.innerHeight) y = ev.clientY - tip.offsetHeight - 14;
    tip.style.left = x + "px";
    tip.style.top = y + "px";
  });
  gantt.addEventListener("mouseleave", function () { tip.hidden = true; });
  document.getElementById("colour-by").addEventListener("change", function (ev) {
    colourBy = ev.target.value; render();
  });
  document.getElementById("crit-only").addEventListener("change", function (ev) {
    var svg = gantt.querySelector("svg");
    if (svg) svg.classList.toggle("crit-only", ev.target.checked);
  });
  document.getElementById("zoom-in").addEventListener("click", function () { zoom = Math.min(zoom * 2, 256); render(); });
  document.getElementById("zoom-out").addEventListener("click", function () { zoom = Math.max(zoom / 2, 1); render(); });
  document.getElementById("zoom-fit").addEventListener("click", function () { zoom = 1; render(); });
  scroller.addEventListener("scroll", syncScroll);
  var resizeTimer = null;
  window.addEventListener("resize", function () {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(render, 150);
  });
  render();
})();

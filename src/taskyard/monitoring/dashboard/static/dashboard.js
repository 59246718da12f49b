// taskyard dashboard: draws the time charts (figure.tchart, data as JSON) with the vendored
// uPlot and refreshes the board in place. Served by the stats API; fetches nothing elsewhere.
(function () {
  "use strict";

  // Significant digits without trailing zeros after a decimal point ("1.50" -> "1.5").
  function sig(v) {
    var s = v.toPrecision(3);
    if (s.indexOf("e") >= 0) s = String(Number(s));
    return s.indexOf(".") >= 0 ? s.replace(/\.?0+$/, "") : s;
  }

  function fmt(v, unit) {
    if (v === null || v === undefined || !isFinite(v)) return "-";
    if (unit === "s") {
      if (v === 0) return "0 s";
      if (Math.abs(v) < 1) return sig(v * 1000) + " ms";
      return sig(v) + " s";
    }
    var suffix = unit && unit !== "%" ? " " + unit : unit || "";
    var m = Math.abs(v);
    if (m >= 1e6) return sig(v / 1e6) + "M" + suffix;
    if (m >= 1e4) return sig(v / 1e3) + "k" + suffix;
    if (m >= 100 || v === Math.round(v)) return v.toFixed(0) + suffix;
    return sig(v) + suffix;
  }

  function niceCeiling(v) {
    if (!(v > 0) || !isFinite(v)) return 1;
    var e = Math.floor(Math.log10(v));
    var steps = [1, 2, 2.5, 5, 10];
    for (var i = 0; i < steps.length; i++) {
      var c = steps[i] * Math.pow(10, e);
      if (c >= v * (1 - 1e-12)) return c;
    }
    return Math.pow(10, e + 1);
  }

  function clock(t) {
    return new Date(t * 1000).toISOString().substr(11, 8) + " UTC";
  }

  function draw(fig) {
    if (fig.dataset.drawn || typeof uPlot === "undefined") return;
    var spec = JSON.parse(fig.querySelector("script").textContent);
    var top = 0;
    spec.series.forEach(function (s) {
      s.values.forEach(function (v) { if (v !== null && v > top) top = v; });
    });
    spec.thresholds.forEach(function (t) { if (t.value > top) top = t.value; });
    top = niceCeiling(top);
    var series = [{ label: "time", value: function (u, v) { return v == null ? "-" : clock(v); } }];
    spec.series.forEach(function (s) {
      series.push({
        label: s.label, stroke: s.color, width: 2, spanGaps: false,
        dash: s.dash ? [5, 3] : undefined, points: { size: 4 },
        value: function (u, v) { return fmt(v, spec.unit); }
      });
    });
    var opts = {
      width: Math.max(320, fig.clientWidth || 560), height: spec.height,
      tzDate: function (ts) { return uPlot.tzDate(new Date(ts * 1000), "Etc/UTC"); },
      legend: { live: true },
      cursor: { drag: { x: true, y: false } },
      scales: { x: { time: true, min: spec.start, max: spec.end },
                y: { range: function () { return [0, top]; } } },
      // Times on the axis as the tables show them: 24-hour UTC (with the date past a day).
      axes: [{ values: function (u, vals) {
        var long = u.scales.x.max - u.scales.x.min > 86400;
        return vals.map(function (v) {
          var iso = new Date(v * 1000).toISOString();
          return long ? iso.substr(5, 5) + " " + iso.substr(11, 5) : iso.substr(11, 5);
        });
      } }, { size: 56, values: function (u, vals) {
        return vals.map(function (v) { return fmt(v, spec.unit === "s" || spec.unit === "%" ? spec.unit : ""); });
      } }],
      series: series,
      hooks: { draw: [function (u) {
        var ctx = u.ctx;
        spec.thresholds.forEach(function (t) {
          var y = u.valToPos(t.value, "y", true);
          ctx.save();
          ctx.strokeStyle = t.color; ctx.setLineDash([6, 4]); ctx.lineWidth = 1;
          ctx.beginPath(); ctx.moveTo(u.bbox.left, y); ctx.lineTo(u.bbox.left + u.bbox.width, y);
          ctx.stroke(); ctx.restore();
        });
      }] }
    };
    var data = [spec.x].concat(spec.series.map(function (s) { return s.values; }));
    fig.uplot = new uPlot(opts, data, fig);
    fig.dataset.drawn = "1";
  }

  function drawAll(root) {
    (root || document).querySelectorAll("figure.tchart").forEach(draw);
  }
  window.taskyardCharts = drawAll;
  // The same short numbers as the server's format_value (hover titles), for tests.
  window.taskyardFormat = fmt;

  function refresh() {
    var body = document.body;
    var seconds = parseInt(body.dataset.refresh || "0", 10);
    var board = document.getElementById("board");
    var stale = document.getElementById("stale");
    if (!seconds || !board) return;
    setInterval(function () {
      var url = new URL(location.href);
      url.searchParams.set("fragment", "1");
      fetch(url).then(function (r) {
        if (!r.ok) throw r.status;
        return r.text();
      }).then(function (text) {
        board.innerHTML = text;
        drawAll(board);
        if (stale) stale.textContent = "";
      }).catch(function (e) {
        if (stale) stale.textContent = "refresh failed (" + e + ")";
      });
    }, seconds * 1000);
  }

  function start() { drawAll(document); refresh(); }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();

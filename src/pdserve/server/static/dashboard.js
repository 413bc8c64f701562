// pdserve dashboard: polls /v1/cluster (the figures /metrics exports) and draws them. No dependencies.
"use strict";

(() => {
  const KEY_STORE = "pdserve-api-key";
  const POLL_MS = 2000;
  const MAX_POINTS = 450;
  const COLORS = ["var(--c0)", "var(--c1)", "var(--c2)", "var(--c3)"];
  const SVG_NS = "http://www.w3.org/2000/svg";
  let history = [];
  let lastUnix = null;

  const $ = (id) => document.getElementById(id);

  // ---- formatting ---------------------------------------------------------------------------------
  const isNum = (x) => typeof x === "number" && Number.isFinite(x);
  function num(x, digits = 2) {
    if (!isNum(x)) return "-";
    const a = Math.abs(x);
    if (a >= 1000) return x.toFixed(0);
    if (a >= 100) return x.toFixed(1);
    return x.toFixed(digits);
  }
  function secs(x) {
    if (!isNum(x)) return "-";
    return x < 1 ? `${(x * 1000).toFixed(x < 0.01 ? 1 : 0)} ms` : `${x.toFixed(2)} s`;
  }
  const pct = (x) => (isNum(x) ? `${(100 * x).toFixed(1)}%` : "-");
  const usd = (x, digits = 3) => (isNum(x) ? `$${x < 0.01 && x > 0 ? x.toPrecision(2) : x.toFixed(digits)}` : "-");

  // ---- fetching -----------------------------------------------------------------------------------
  function headers() {
    const key = sessionStorage.getItem(KEY_STORE);
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  async function poll() {
    const url = new URL("v1/cluster", document.baseURI);
    if (lastUnix !== null) url.searchParams.set("history_since", String(lastUnix));
    let response;
    try {
      response = await fetch(url, { headers: headers(), cache: "no-store" });
    } catch (e) {
      showError("cannot reach the frontend");
      return;
    }
    if (response.status === 401) {
      $("key-form").hidden = false;
      showError("this cluster needs an API key");
      return;
    }
    if (!response.ok) {
      showError(`/v1/cluster answered ${response.status}`);
      return;
    }
    const body = await response.json();
    $("key-form").hidden = true;
    showError("");
    if (lastUnix === null) history = [];
    history = history.concat(body.history || []).slice(-MAX_POINTS);
    if (history.length) lastUnix = history[history.length - 1].unix_s;
    render(body);
  }

  function showError(text) {
    $("error").textContent = text;
    $("error").hidden = !text;
  }

  // ---- rendering ----------------------------------------------------------------------------------
  function render(body) {
    const mode = $("mode");
    const alive = (body.workers || []).filter((w) => w.alive).length;
    mode.textContent = body.mode ? `${body.mode} · ${alive} live worker${alive === 1 ? "" : "s"}` : "no workers";
    mode.classList.toggle("down", !alive);
    $("updated").textContent = `updated ${new Date(body.unix_s * 1000).toLocaleTimeString()}`;
    renderCards(body);
    renderWorkers(body.workers || []);
    renderElastic(body.elastic);
    renderCharts(body);
  }

  function renderCards(body) {
    const rates = body.rates || {};
    const tok = rates.tokens_per_s || {};
    $("req-rate").textContent = num(rates.requests_per_s);
    $("out-rate").textContent = num(tok.output, 1);
    const input = isNum(tok.input) && isNum(tok.cached_input) ? tok.input + tok.cached_input : null;
    $("in-rate").textContent = isNum(input) ? `${num(input, 1)} (${num(tok.cached_input, 1)})` : "-";
    const lat = body.latency || {};
    const q = (h) => (h ? `${secs(h.p50)} / ${secs(h.p90)}` : "-");
    $("ttft").textContent = q(lat.ttft_s);
    $("tpot").textContent = q(lat.tpot_s);
    const slo = body.slo;
    if (!slo) $("slo").textContent = "no objectives set";
    else $("slo").textContent = slo.attainment ? pct(slo.attainment.both) : "no requests yet";
    const cost = body.cost || {};
    const per = ((cost.windows || {}).total || {}).cost_per_million_tokens || {};
    $("cost").textContent = `${usd(per.input)} · ${usd(per.cached_input)} · ${usd(per.output)}`;
    const planned = cost.planned && cost.planned.cost_per_million_tokens;
    $("planned-card").hidden = !planned;
    if (planned) {
      $("planned").textContent = `${usd(planned.input)} · ${usd(planned.cached_input)} · ${usd(planned.output)}`;
    }
    $("spend").textContent = `${usd(cost.price_per_hour)}/h · ${usd(cost.cost_usd, 4)}`;
    const tokens = ((cost.windows || {}).total || {}).tokens;
    $("tokens").textContent = tokens ? `${tokens.input} · ${tokens.cached_input} · ${tokens.output}` : "-";
  }

  function renderWorkers(workers) {
    const tbody = $("workers").querySelector("tbody");
    tbody.replaceChildren();
    for (const w of workers) {
      const tr = document.createElement("tr");
      tr.dataset.worker = w.worker_id || w.address;
      if (!w.alive) tr.className = "dead";
      const tiers = Object.entries(w.tier_hit_rates || {}).map(([k, v]) => `${k} ${pct(v)}`).join(", ");
      const cells = [w.worker_id || w.address, w.role || "-", device(w),
                     String((w.num_waiting || 0) + (w.num_awaiting_kv || 0)), String(w.num_running || 0), null,
                     pct(w.prefix_cache_hit_rate), tiers || "-", secs(w.step_target_s), pct(w.busy_fraction),
                     usd(w.price_per_hour)];
      for (const text of cells) {
        const td = document.createElement("td");
        if (text === null) {
          const meter = document.createElement("span");
          meter.className = "meter";
          const fill = document.createElement("span");
          fill.style.width = `${Math.min(100, 100 * (w.kv_usage || 0))}%`;
          meter.appendChild(fill);
          td.append(meter, pct(w.kv_usage));
        } else {
          td.textContent = text;
        }
        tr.appendChild(td);
      }
      tbody.appendChild(tr);
    }
    if (!workers.length) {
      const tr = document.createElement("tr");
      const td = document.createElement("td");
      td.colSpan = 11;
      td.className = "muted";
      td.textContent = "no worker has connected yet";
      tr.appendChild(td);
      tbody.appendChild(tr);
    }
  }

  // "cpu · cores 0-1 · AMD EPYC", "cpu · parked", "cuda · NVIDIA H100 80GB HBM3"
  function device(w) {
    let text = w.device || "?";
    if (w.is_parked) text += " · parked";
    else if (Array.isArray(w.cores) && w.cores.length) text += ` · core${w.cores.length === 1 ? "" : "s"} ${ranges(w.cores)}`;
    else if (w.num_cores) text += ` · ${w.num_cores} core${w.num_cores === 1 ? "" : "s"}`;
    if (w.device_name) text += ` · ${w.device_name}`;
    return text;
  }

  function ranges(cores) {
    const sorted = [...cores].sort((a, b) => a - b);
    const out = [];
    let start = sorted[0];
    sorted.forEach((c, i) => {
      if (i + 1 === sorted.length || sorted[i + 1] !== c + 1) {
        out.push(start === c ? String(c) : `${start}-${c}`);
        start = sorted[i + 1];
      }
    });
    return out.join(",");
  }

  // The elastic controller (/v1/cluster's "elastic"): its objectives, the window it judges, its decisions.
  function renderElastic(elastic) {
    const list = $("decisions");
    list.replaceChildren();
    const muted = (text) => {
      const li = document.createElement("li");
      li.className = "muted";
      li.textContent = text;
      list.appendChild(li);
    };
    if (!elastic) {
      $("elastic-status").textContent = "";
      muted("the elastic controller is off (pdserve up --mode auto runs it)");
      return;
    }
    const o = elastic.objectives || {};
    const win = elastic.window || {};
    const parts = [`objectives TTFT ${secs(o.ttft_s)}, TPOT ${secs(o.tpot_s)}`];
    if (isNum(o.itl_p99_s)) parts.push(`ITL p99 ${secs(o.itl_p99_s)}`);
    parts.push(win.num_requests ? `last window: ${pct(win.slo_attainment)} of ${win.num_requests} requests met both`
                                : "no finished request in the last window");
    if (elastic.starving) parts.push(`starving: ${elastic.starving}`);
    $("elastic-status").textContent = parts.join(" · ");
    const decisions = elastic.decisions || [];
    if (!decisions.length) {
      muted("none yet");
      return;
    }
    for (const d of decisions.slice(-20).reverse()) {
      const li = document.createElement("li");
      li.dataset.kind = d.kind || "";
      const when = isNum(d.unix_s) ? new Date(d.unix_s * 1000).toLocaleTimeString() + " " : "";
      li.textContent = `${when}${d.kind || ""}${d.reason ? `: ${d.reason}` : ""}`;
      list.appendChild(li);
    }
  }

  function renderCharts(body) {
    const t = history.map((p) => p.unix_s);
    const get = (f) => history.map((p) => { const v = f(p); return isNum(v) ? v : null; });
    lineChart($("chart-rates"), t, [
      { name: "requests/s", values: get((p) => p.rates.requests_per_s) },
      { name: "output tok/s", values: get((p) => p.rates.tokens_per_s.output) },
      { name: "input tok/s", values: get((p) => p.rates.tokens_per_s.input + p.rates.tokens_per_s.cached_input) },
    ], { format: (v) => num(v, 1) });
    const slo = body.slo || {};
    for (const [id, key, target] of [["chart-ttft", "ttft_s", slo.ttft_s], ["chart-tpot", "tpot_s", slo.tpot_s]]) {
      lineChart($(id), t, ["p50", "p90", "p99"].map((q) => ({ name: q, values: get((p) => p.latency[key][q]) })),
                { format: secs, target });
    }
    lineChart($("chart-slo"), t, [
      { name: "both", values: get((p) => p.slo_attainment && p.slo_attainment.both) },
      { name: "TTFT", values: get((p) => p.slo_attainment && p.slo_attainment.ttft) },
      { name: "TPOT", values: get((p) => p.slo_attainment && p.slo_attainment.tpot) },
    ], { format: pct, max: 1, target: body.slo ? 0.9 : undefined,
         empty: body.slo ? "no finished requests yet" : "no objectives set (--slo-ttft, --slo-tpot)" });
    const per = (k) => get((p) => p.cost.cost_per_million_tokens[k]);
    lineChart($("chart-cost"), t, [
      { name: "input", values: per("input") },
      { name: "cached input", values: per("cached_input") },
      { name: "output", values: per("output") },
    ], { format: (v) => usd(v), target: plannedOutput(body) });  // dashed: the planner's output cost
    lineChart($("chart-load"), t, [
      { name: "running", values: get((p) => p.load && p.load.num_running) },
      { name: "waiting", values: get((p) => p.load && p.load.num_waiting) },
    ], { format: (v) => num(v, Number.isInteger(v) ? 0 : 1) });
  }

  function plannedOutput(body) {
    const planned = body.cost && body.cost.planned;
    return planned ? planned.cost_per_million_tokens.output : undefined;
  }

  // ---- a small SVG line chart -----------------------------------------------------------------------
  function el(name, attrs, text) {
    const node = document.createElementNS(SVG_NS, name);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function lineChart(svg, times, series, opts) {
    const width = svg.clientWidth || 420;
    const height = svg.clientHeight || 170;
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    svg.replaceChildren();
    const left = 58, right = 8, top = 18, bottom = 18;
    const values = series.flatMap((s) => s.values).filter(isNum);
    if (!values.length || times.length < 2) {
      svg.appendChild(el("text", { x: width / 2, y: height / 2, "text-anchor": "middle" },
                         opts.empty || "waiting for data"));
      return;
    }
    const t0 = times[0], t1 = times[times.length - 1];
    let vmax = opts.max !== undefined ? opts.max : Math.max(...values, isNum(opts.target) ? opts.target : 0);
    if (!(vmax > 0)) vmax = 1;
    const x = (t) => left + (width - left - right) * (t1 > t0 ? (t - t0) / (t1 - t0) : 1);
    const y = (v) => top + (height - top - bottom) * (1 - v / vmax);
    svg.appendChild(el("line", { class: "axis", x1: left, x2: width - right, y1: y(0), y2: y(0) }));
    for (const v of [0, vmax / 2, vmax]) {
      svg.appendChild(el("text", { x: left - 4, y: y(v) + 3, "text-anchor": "end" }, opts.format(v)));
      svg.appendChild(el("line", { class: "axis", x1: left, x2: width - right, y1: y(v), y2: y(v), opacity: 0.5 }));
    }
    const span = t1 - t0;
    svg.appendChild(el("text", { x: left, y: height - 4 }, `-${span >= 120 ? `${(span / 60).toFixed(0)} min` : `${span.toFixed(0)} s`}`));
    svg.appendChild(el("text", { x: width - right, y: height - 4, "text-anchor": "end" }, "now"));
    if (isNum(opts.target)) {
      svg.appendChild(el("line", { class: "target", x1: left, x2: width - right, y1: y(opts.target), y2: y(opts.target) }));
    }
    series.forEach((s, i) => {
      let d = "";
      let pen = false;
      s.values.forEach((v, j) => {
        if (!isNum(v)) { pen = false; return; }
        d += `${pen ? "L" : "M"}${x(times[j]).toFixed(1)},${y(Math.min(v, vmax)).toFixed(1)}`;
        pen = true;
      });
      if (d) svg.appendChild(el("path", { class: "series", d, stroke: COLORS[i % COLORS.length] }));
      svg.appendChild(el("text", { class: "legend", x: left + 4 + i * 95, y: 11, style: `fill: ${COLORS[i % COLORS.length]}` },
                         `— ${s.name}`));
    });
  }

  // ---- start --------------------------------------------------------------------------------------
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORE, $("api-key").value.trim());
    $("api-key").value = "";
    lastUnix = null;
    poll();
  });

  async function loop() {
    await poll();
    setTimeout(loop, POLL_MS);
  }
  loop();
})();

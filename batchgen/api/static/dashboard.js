// The batchgen dashboard: polls the server's JSON routes and draws tables and two canvas charts
// (throughput over time, shards on a timeline). No library, no build step: the machine may be offline.
"use strict";

const Dashboard = (() => {
  const REFRESH_MS = 1000;
  const COLORS = ["#3b82f6", "#f59e0b", "#10b981", "#ef4444", "#8b5cf6", "#0ea5e9", "#84cc16", "#ec4899"];
  const AXIS = "#8a90a0";

  function cell(text, className) {
    const td = document.createElement("td");
    if (text instanceof Node) td.appendChild(text); else td.textContent = text;
    if (className) td.className = className;
    return td;
  }

  function number(value, digits = 1) {
    return value === null || value === undefined ? "-" :
      value.toLocaleString(undefined, {maximumFractionDigits: digits});
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "-";
    seconds = Math.round(seconds);
    if (seconds >= 3600) return `${Math.floor(seconds / 3600)}h${String(Math.floor(seconds % 3600 / 60)).padStart(2, "0")}m`;
    return seconds >= 60 ? `${Math.floor(seconds / 60)}m${String(seconds % 60).padStart(2, "0")}s` : `${seconds}s`;
  }

  function time(iso) {
    return iso ? new Date(iso).toLocaleTimeString() : "-";
  }

  function progressBar(container, job) {
    container.className = "progress";
    container.replaceChildren();
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.style.width = `${(100 * job.progress).toFixed(1)}%`;
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = `${Math.floor(100 * job.progress)}% · ${job.rows_done.toLocaleString()}/${job.rows_total.toLocaleString()} rows`;
    container.append(bar, label);
    return container;
  }

  // Fetch `url` every REFRESH_MS and hand the JSON to `render`; a failed fetch is retried at the next tick.
  function poll(url, render) {
    const tick = async () => {
      try {
        const response = await fetch(url, {cache: "no-store"});
        if (response.ok) {
          render(await response.json());
          document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
        }
      } finally {
        setTimeout(tick, REFRESH_MS);
      }
    };
    tick();
  }

  function jobsPage() {
    poll("/dashboard/jobs", jobs => {
      const body = document.querySelector("#jobs tbody");
      body.replaceChildren(...jobs.map(job => {
        const row = document.createElement("tr");
        row.dataset.jobId = job.job_id;
        const link = document.createElement("a");
        link.href = `/jobs/${encodeURIComponent(job.job_id)}`;
        link.textContent = job.job_id;
        row.append(cell(link), cell(job.status, `status-${job.status}`), cell(job.model),
          cell(progressBar(document.createElement("div"), job)), cell(number(job.rows_per_s, 2), "num"),
          cell(number(job.tokens_per_s), "num"), cell(duration(job.eta_s), "num"),
          cell(job.workers.join(", ") || "-"), cell(time(job.created_at)));
        return row;
      }));
      document.getElementById("empty").hidden = jobs.length > 0;
    });
  }

  function jobPage(jobId) {
    document.getElementById("title").textContent = `job ${jobId}`;
    poll(`/dashboard/jobs/${encodeURIComponent(jobId)}`, job => {
      progressBar(document.querySelector("#job-view .progress"), job);
      const stats = [["status", job.status], ["model", job.model], ["input", job.input], ["output", job.output],
        ["rows", `${job.rows_done.toLocaleString()} of ${job.rows_total.toLocaleString()} (${job.rows_failed.toLocaleString()} failed)`],
        ["shards", `${job.shards_done} of ${job.shards_total}`],
        ["tokens", `${job.prompt_tokens.toLocaleString()} prompt, ${job.completion_tokens.toLocaleString()} generated`],
        ["rows/s", number(job.rows_per_s, 2)], ["tokens/s", number(job.tokens_per_s)], ["ETA", duration(job.eta_s)],
        ["workers on it", job.workers.join(", ") || "-"], ["created", time(job.created_at)],
        ["started", time(job.started_at)], ["finished", time(job.finished_at)], ["error", job.error || "-"]];
      document.querySelector("#stats tbody").replaceChildren(...stats.map(([name, value]) => {
        const row = document.createElement("tr");
        const th = document.createElement("th");
        th.textContent = name;
        row.append(th, cell(value));
        return row;
      }));
      document.querySelector("#shards tbody").replaceChildren(...job.shards.map(shard => {
        const row = document.createElement("tr");
        row.append(cell(shard.shard_index, "num"), cell(shard.state), cell(shard.worker || "-"),
          cell(shard.attempts, "num"), cell(number(shard.rows, 0), "num"), cell(number(shard.rows_failed, 0), "num"),
          cell(number(shard.completion_tokens, 0), "num"), cell(number(shard.tokens_per_s), "num"),
          cell(time(shard.started_at)), cell(time(shard.finished_at)));
        return row;
      }));
      lineChart(document.getElementById("throughput"), job.throughput);
      timeline(document.getElementById("timeline"), job);
    });
  }

  function niceMax(value) {
    if (value <= 0) return 1;
    const magnitude = 10 ** Math.floor(Math.log10(value));
    return [1, 2, 5, 10].map(step => step * magnitude).find(step => step >= value);
  }

  // Output tokens/s against seconds since the job started, as a filled line.
  function lineChart(canvas, points) {
    const context = canvas.getContext("2d");
    const [width, height, left, bottom, top, right] = [canvas.width, canvas.height, 56, 28, 12, 16];
    context.clearRect(0, 0, width, height);
    canvas.dataset.points = points.length;
    context.font = "12px system-ui, sans-serif";
    context.fillStyle = AXIS;
    if (!points.length) {
      context.fillText("no finished shard yet", left, height / 2);
      return;
    }
    const xMax = points[points.length - 1].t + points[0].t;
    const yMax = niceMax(Math.max(...points.map(p => p.tokens_per_s)));
    const x = t => left + (width - left - right) * t / xMax;
    const y = v => height - bottom - (height - bottom - top) * v / yMax;
    context.strokeStyle = "#e4e6ea";
    context.textAlign = "right";
    for (let i = 0; i <= 4; i++) {
      const value = yMax * i / 4;
      context.beginPath();
      context.moveTo(left, y(value));
      context.lineTo(width - right, y(value));
      context.stroke();
      context.fillText(number(value), left - 6, y(value) + 4);
    }
    context.textAlign = "center";
    for (let i = 0; i <= 5; i++) context.fillText(duration(xMax * i / 5), x(xMax * i / 5), height - 8);
    context.beginPath();
    context.moveTo(x(0), y(0));
    points.forEach(p => context.lineTo(x(p.t), y(p.tokens_per_s)));
    context.lineTo(x(xMax), y(0));
    context.closePath();
    context.fillStyle = "rgba(59, 130, 246, 0.18)";
    context.fill();
    context.beginPath();
    points.forEach((p, i) => (i ? context.lineTo : context.moveTo).call(context, x(p.t), y(p.tokens_per_s)));
    context.strokeStyle = COLORS[0];
    context.lineWidth = 2;
    context.stroke();
    context.lineWidth = 1;
  }

  // One lane per shard from its start to its end (to now while it runs), coloured by worker.
  function timeline(canvas, job) {
    const context = canvas.getContext("2d");
    const started = job.shards.filter(s => s.started_at);
    const lane = Math.max(4, Math.min(18, 160 / Math.max(started.length, 1)));
    canvas.height = 50 + lane * started.length;
    const [width, left, right] = [canvas.width, 56, 16];
    context.clearRect(0, 0, width, canvas.height);
    context.font = "12px system-ui, sans-serif";
    context.fillStyle = AXIS;
    if (!started.length) {
      context.fillText("no shard started yet", left, 24);
      return;
    }
    const origin = Date.parse(job.started_at || started[0].started_at);
    const end = Date.parse(job.finished_at || job.now);
    const span = Math.max(end - origin, 1);
    const x = ms => left + (width - left - right) * (ms - origin) / span;
    const workers = [...new Set(started.map(s => s.worker))];
    started.forEach((shard, i) => {
      const from = Date.parse(shard.started_at), to = shard.finished_at ? Date.parse(shard.finished_at) : end;
      context.fillStyle = COLORS[workers.indexOf(shard.worker) % COLORS.length];
      context.globalAlpha = shard.state === "done" ? 1 : 0.45;
      context.fillRect(x(from), 8 + i * lane, Math.max(x(to) - x(from), 2), lane - 2);
    });
    context.globalAlpha = 1;
    context.fillStyle = AXIS;
    context.textAlign = "right";
    context.fillText(`shard 0`, left - 6, 8 + lane - 3);
    context.fillText(`${started.length - 1}`, left - 6, 8 + started.length * lane - 3);
    context.textAlign = "center";
    for (let i = 0; i <= 5; i++) context.fillText(duration(span / 1000 * i / 5), x(origin + span * i / 5), canvas.height - 8);
    context.textAlign = "left";
    workers.forEach((worker, i) => {
      context.fillStyle = COLORS[i % COLORS.length];
      context.fillText(`■ ${worker}`, left + i * 180, canvas.height - 22);
    });
  }

  // One page for both views: /jobs/<id> shows a job, anything else the list.
  function start() {
    const match = location.pathname.match(/^\/jobs\/([^/]+)$/);
    document.getElementById(match ? "job-view" : "jobs-view").hidden = false;
    if (match) jobPage(decodeURIComponent(match[1])); else jobsPage();
  }

  return {start};
})();

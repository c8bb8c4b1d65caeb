// /dashboard: polls /ws/status and /metrics/* (same origin, JSON) every second and draws
// messages/s on a <canvas> by hand. No dependencies.
// Channel names are not public: /metrics/channels lists them only to an admin token, which
// the page asks for and keeps in sessionStorage (this tab only; sent to this server only).
const POLL_MS = 1000;
const HISTORY = 120; // samples kept for the chart (two minutes)
const rates = []; // {t, mps}

const $ = (id) => document.getElementById(id);
const fmt = new Intl.NumberFormat('en', { maximumFractionDigits: 2 });

const TOKEN_KEY = 'aether-admin-token';
let tokenRefused = false;

function adminToken() {
  return sessionStorage.getItem(TOKEN_KEY) || '';
}

async function getJson(path) {
  const resp = await fetch(path, { cache: 'no-store', headers: { Accept: 'application/json' } });
  if (!resp.ok && resp.status !== 503) throw new Error(`${path}: HTTP ${resp.status}`);
  return resp.json();
}

// /metrics/channels: with the admin token the per-channel list, else counts only. A refused
// token is forgotten (and said so) rather than sent again every second.
async function getChannels() {
  const token = adminToken();
  if (!token) return getJson('/metrics/channels');
  const resp = await fetch('/metrics/channels', {
    cache: 'no-store',
    headers: { Accept: 'application/json', Authorization: `Bearer ${token}` },
  });
  if (resp.status === 401 || resp.status === 403) {
    sessionStorage.removeItem(TOKEN_KEY);
    tokenRefused = true;
    return getJson('/metrics/channels');
  }
  if (!resp.ok) throw new Error(`/metrics/channels: HTTP ${resp.status}`);
  return resp.json();
}

function showAdmin() {
  const token = adminToken();
  $('channels-locked').hidden = Boolean(token);
  $('admin-token').hidden = Boolean(token);
  $('admin-save').hidden = Boolean(token);
  $('admin-forget').hidden = !token;
  $('admin-token').placeholder = tokenRefused ? 'token refused: admin token' : 'admin token';
}

$('admin-form').addEventListener('submit', (event) => {
  event.preventDefault();
  const value = $('admin-token').value.trim();
  $('admin-token').value = '';
  if (!value) return;
  sessionStorage.setItem(TOKEN_KEY, value);
  tokenRefused = false;
  showAdmin();
  poll();
});

$('admin-forget').addEventListener('click', () => {
  sessionStorage.removeItem(TOKEN_KEY);
  showAdmin();
  poll();
});

function setText(id, value) {
  const el = $(id);
  const text = typeof value === 'number' ? fmt.format(value) : String(value ?? '–');
  if (el.textContent !== text) el.textContent = text;
}

function duration(seconds) {
  const s = Math.floor(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
}

function fillRows(tbodyId, emptyId, rows) {
  const body = $(tbodyId);
  body.replaceChildren(
    ...rows.map((cells) => {
      const tr = document.createElement('tr');
      for (const [value, numeric] of cells) {
        const td = document.createElement('td');
        td.textContent = typeof value === 'number' ? fmt.format(value) : String(value ?? '');
        if (numeric) td.className = 'num';
        tr.append(td);
      }
      return tr;
    }),
  );
  $(emptyId).hidden = rows.length > 0;
}

function showStatus(state) {
  const badge = $('status');
  badge.textContent = state;
  badge.className = `badge ${state}`;
  document.body.dataset.status = state;
}

function render(status, messages, channels, errors) {
  showStatus(status.status);
  setText('connections-active', status.connections.active);
  setText('connections-total', status.connections.total);
  setText('channels-active', status.channels.active);
  setText('messages-per-second', status.channels.messages_per_second);
  setText('uptime', duration(status.uptime_s ?? 0));
  const workers = status.workers ?? [];
  setText('workers-summary', `${workers.length} worker${workers.length === 1 ? '' : 's'} · ${status.broker ?? ''}`);
  $('node').textContent = status.node ? `node ${status.node}` : '';
  setText('messages-published', messages.published);
  setText('rate-limited', messages.rate_limited);
  setText('errors-total', errors.total);
  fillRows(
    'channels',
    'channels-empty',
    (channels.channels ?? []).map((c) => [[c.name], [c.members, true], [c.messages, true]]),
  );
  if (!channels.channels) $('channels-empty').hidden = true; // not empty: not shown to us
  fillRows(
    'errors',
    'errors-empty',
    Object.entries(errors.by_code ?? {})
      .sort((a, b) => b[1] - a[1])
      .map(([code, n]) => [[code], [n, true]]),
  );
  fillRows(
    'workers',
    'workers-empty',
    workers.map((w) => [
      [w.worker ?? '–'],
      [String(w.pid ?? '–')],
      [w.connections_active, true],
      [w.messages_per_second, true],
      [w.deliveries, true],
      [w.errors, true],
    ]),
  );
}

function drawChart() {
  const canvas = $('rate-chart');
  const dpr = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 600;
  const height = canvas.clientHeight || 220;
  if (canvas.width !== Math.round(width * dpr) || canvas.height !== Math.round(height * dpr)) {
    canvas.width = Math.round(width * dpr);
    canvas.height = Math.round(height * dpr);
  }
  const ctx = canvas.getContext('2d');
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const left = 48;
  const right = 10;
  const top = 10;
  const bottom = 24;
  const w = width - left - right;
  const h = height - top - bottom;
  const max = niceMax(Math.max(1, ...rates.map((r) => r.mps)));

  ctx.font = '11px system-ui, sans-serif';
  ctx.fillStyle = '#667085';
  ctx.strokeStyle = '#e3e6ec';
  ctx.lineWidth = 1;
  ctx.textAlign = 'right';
  ctx.textBaseline = 'middle';
  for (let i = 0; i <= 4; i++) {
    const y = top + h - (h * i) / 4;
    ctx.beginPath();
    ctx.moveTo(left, Math.round(y) + 0.5);
    ctx.lineTo(left + w, Math.round(y) + 0.5);
    ctx.stroke();
    ctx.fillText(fmt.format((max * i) / 4), left - 6, y);
  }
  ctx.textAlign = 'center';
  ctx.textBaseline = 'top';
  for (const ago of [120, 90, 60, 30, 0]) {
    const x = left + w - (w * ago) / HISTORY;
    ctx.fillText(ago ? `-${ago}s` : 'now', x, top + h + 6);
  }
  if (rates.length < 2) return;
  const now = rates[rates.length - 1].t;
  const xOf = (t) => left + w - (w * (now - t)) / (HISTORY * 1000);
  const yOf = (v) => top + h - (h * v) / max;
  ctx.beginPath();
  rates.forEach((r, i) => (i ? ctx.lineTo(xOf(r.t), yOf(r.mps)) : ctx.moveTo(xOf(r.t), yOf(r.mps))));
  ctx.strokeStyle = '#2f6fed';
  ctx.lineWidth = 2;
  ctx.stroke();
  ctx.lineTo(xOf(now), top + h);
  ctx.lineTo(xOf(rates[0].t), top + h);
  ctx.closePath();
  ctx.fillStyle = 'rgba(47, 111, 237, 0.12)';
  ctx.fill();
}

function niceMax(v) {
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

let updates = 0;

async function poll() {
  try {
    const [status, messages, channels, errors] = await Promise.all([
      getJson('/ws/status'),
      getJson('/metrics/messages'),
      getChannels(),
      getJson('/metrics/errors'),
    ]);
    render(status, messages, channels, errors);
    showAdmin();
    rates.push({ t: Date.now(), mps: Number(status.channels.messages_per_second) || 0 });
    while (rates.length > HISTORY + 1) rates.shift();
    updates += 1;
    document.body.dataset.updates = String(updates);
    $('updated').textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (err) {
    showStatus('unreachable');
    $('updated').textContent = `server unreachable: ${err.message}`;
  }
  drawChart();
}

async function loop() {
  const started = Date.now();
  await poll();
  setTimeout(loop, Math.max(0, POLL_MS - (Date.now() - started)));
}

window.addEventListener('resize', drawChart);
showAdmin();
loop();

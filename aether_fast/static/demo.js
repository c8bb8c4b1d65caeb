// /demo: a minimal chat on the JS client (served at /client.js). Settings come from the form
// or the URL fragment (#token=…&channel=…&client_id=…&ws=/ws), which never reaches the server.
import { AetherClient } from '/client.js';

const $ = (id) => document.getElementById(id);
let client = null;
let channel = 'demo';

function wsUrl(path) {
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  return `${scheme}://${location.host}${path.startsWith('/') ? path : `/${path}`}`;
}

function time(iso) {
  const d = iso ? new Date(iso) : new Date();
  return d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit' });
}

function scrollDown() {
  const list = $('messages');
  list.scrollTop = list.scrollHeight;
}

function addLine({ who, text, when, cls = '', data = {} }) {
  const li = document.createElement('li');
  li.className = cls;
  for (const [k, v] of Object.entries(data)) li.dataset[k] = String(v);
  const whoEl = document.createElement('span');
  whoEl.className = 'who';
  whoEl.textContent = who;
  const textEl = document.createElement('span');
  textEl.className = 'text';
  textEl.textContent = text; // text, never HTML
  const whenEl = document.createElement('span');
  whenEl.className = 'when';
  whenEl.textContent = when;
  li.append(whoEl, textEl, whenEl);
  $('messages').append(li);
  scrollDown();
  return li;
}

function system(text) {
  addLine({ who: '·', text, when: time(), cls: 'system' });
}

function showState(state) {
  const badge = $('state');
  badge.textContent = state;
  badge.className = `badge ${state}`;
  document.body.dataset.state = state;
  const live = state !== 'idle' && state !== 'closed';
  $('connect').disabled = live;
  $('disconnect').disabled = !live;
  $('text').disabled = !live;
  $('send').disabled = !live;
}

function showPending() {
  const n = client ? client.pending : 0;
  $('pending').textContent = n ? `${n} waiting for ack` : '';
  document.body.dataset.pending = String(n);
}

function start(settings) {
  if (client) client.close();
  channel = settings.channel || 'demo';
  client = new AetherClient(wsUrl(settings.ws || '/ws'), {
    token: settings.token || undefined,
    clientId: settings.client_id || sessionStorage.getItem('aether-demo-client-id') || undefined,
    channels: [channel],
  });
  window.aether = client; // for the console (and the browser tests)
  client.on('state', (state) => {
    showState(state);
    if (state === 'open') {
      $('who').textContent = `${client.userId ?? 'anonymous'} · ${client.clientId} · #${channel}`;
      sessionStorage.setItem('aether-demo-client-id', client.clientId);
    }
    if (state === 'reconnecting') system('connection lost, reconnecting…');
    showPending();
  });
  client.on('join', (j) => {
    if (j.recovered === true) system(`reconnected to #${j.channel}; missed messages recovered`);
    else if (j.recovered === false) system(`reconnected to #${j.channel}; some messages could not be recovered`);
  });
  client.on('message', (m) => {
    addLine({
      who: m.userId ?? 'anonymous',
      text: m.content,
      when: time(m.timestamp),
      cls: 'other',
      data: { offset: m.offset, user: m.userId ?? '', from: m.clientId ?? '' },
    });
  });
  client.on('system', (msg) => {
    if (msg.type === 'system' && msg.data?.message) system(msg.data.message);
    else if (msg.type === 'connection') system(`${msg.data.user_id ?? 'anonymous'} ${msg.action === 'connect' ? 'joined' : 'left'}`);
  });
  client.on('error', (e) => system(`error ${e.code}: ${e.details?.reason ?? e.message}`));
  client.connect().catch((e) => system(`stopped: ${e.message}`));
}

function send(text) {
  const li = addLine({ who: 'you', text, when: time(), cls: 'own pending', data: { own: 1 } });
  const acked = client.publish(channel, text);
  showPending();
  acked.then(
    (ack) => {
      li.classList.remove('pending');
      li.dataset.offset = String(ack.offset);
      li.querySelector('.when').textContent = time(ack.timestamp);
      showPending();
    },
    (err) => {
      li.classList.remove('pending');
      li.querySelector('.when').textContent = `not sent: ${err.code}`;
      showPending();
    },
  );
}

function fromFragment() {
  const params = new URLSearchParams(location.hash.slice(1));
  for (const [key, id] of [['token', 'token'], ['channel', 'channel'], ['client_id', 'client-id'], ['ws', 'ws-path']]) {
    if (params.has(key)) $(id).value = params.get(key);
  }
  return params.has('token') || params.get('autoconnect') === '1';
}

$('settings').addEventListener('submit', (ev) => {
  ev.preventDefault();
  start({
    token: $('token').value.trim(),
    channel: $('channel').value.trim(),
    client_id: $('client-id').value.trim(),
    ws: $('ws-path').value.trim(),
  });
});
$('disconnect').addEventListener('click', () => {
  if (client) client.close();
  system('disconnected');
});
$('composer').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const text = $('text').value;
  if (!text.trim() || !client) return;
  send(text);
  $('text').value = '';
});
showState('idle');
if (fromFragment()) $('settings').requestSubmit();

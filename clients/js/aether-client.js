// aether-client.js: the JavaScript client of aether-fast (an ES module, no dependencies).
//
// One *logical* connection that outlives its sockets: it reconnects with exponential
// backoff, jitter and a cap; keeps its client_id (the server's dedupe key); numbers every
// publication and keeps it until its ack, resending unacked ones with `retry` after a
// reconnect; queues publications while disconnected; rejoins every channel with
// since + epoch and drops anything already delivered; refreshes its token before expiry.
// No reconnect after close 4001/4003 unless a new token is supplied (tokenRefresh or
// setToken), none after 4009 (replaced by a newer connection).
// Each offset is delivered once, and only when its publication came (with echo off, also
// when it is our own, acked: its copy never comes), never because an ack came first (with
// Redis an ack may beat its own copy and lower offsets, docs/protocol.md §7). A channel's
// position (since of a recovery) is the last offset with no gap below it; a gap that stays
// while GAP_WINDOW later offsets come is asked for at once (joined again with since).
// Pacing: every frame costs the user's budget on the server (10 refusals, or one budget's
// worth when that is more, refilled at 3x the budget's rate, close the socket with 1008), so
// joins, leaves and publications go out through one window (maxInFlight frames awaiting their
// answer); one refused with RATE_LIMITED / SERVER_BUSY is sent again after retry_after_ms,
// before anything newer, no frame of ours is sent until then (status requests and token
// refreshes wait too; pings are the browser's), and the window then opens one answer at a
// time (pump). A slot with no answer for IN_FLIGHT_TIMEOUT_MS is freed (a join or leave is
// sent again), so that nothing can jam the window for good.
// Protocol: docs/protocol.md;
// usage: docs/clients.md. Served by the server at /client.js.
//
//   import { AetherClient } from '/client.js';
//   const client = new AetherClient('wss://host/ws', { token, clientId: 'web-1', channels: ['chat'] });
//   client.on('message', (m) => console.log(m.channel, m.userId, m.content));
//   await client.connect();
//   const ack = await client.publish('chat', 'hello');   // { channel, sequence, offset, timestamp }

const AUTH_CLOSE_CODES = new Set([4001, 4003]);
const FINAL_CLOSE_CODES = new Set([1000, 4009]);
const RETRYABLE_CODES = new Set(['RATE_LIMITED', 'SERVER_BUSY', 'INTERNAL_ERROR']);
const RETRYABLE_JOIN_CODES = new Set(['RATE_LIMITED', 'SERVER_BUSY']);
const SEEN_WINDOW = 4096;
// offsets a channel keeps above one that has not come (its position stays below it: a
// reconnect's recovery asks for it). One more, and the channel is joined again with since at
// once, so the server replays what is missing; at twice as many (that join waits too long)
// the socket is dropped: the reconnect's recovery asks for it then
const GAP_WINDOW = 1024;
// a join, leave or publication still unanswered after this frees its place in the window (a
// join or leave is sent again; a publication waits for its answer or the next socket): a
// safety net, the server answers every one of them
const IN_FLIGHT_TIMEOUT_MS = 30000;
const EVENTS = ['message', 'system', 'error', 'state', 'join'];

/** An error message of the server (docs/protocol.md §11), or a refusal of the client itself. */
export class AetherError extends Error {
  constructor(code, message, details = {}) {
    super(`${code}: ${message}`);
    this.name = 'AetherError';
    this.code = code;
    this.details = details;
  }
}

/** The client stopped: closed by the application, or refused with 4001/4003/4009. */
export class ClientClosed extends AetherError {
  constructor(message, closeCode = null) {
    super('CLOSED', message, { closeCode });
    this.name = 'ClientClosed';
    this.closeCode = closeCode;
  }
}

/** The `exp` claim of a JWT in seconds, read without verifying it (the server does). */
export function tokenExpiry(token) {
  try {
    const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    const padded = part + '='.repeat((4 - (part.length % 4)) % 4);
    const text = typeof atob === 'function' ? atob(padded) : Buffer.from(padded, 'base64').toString('latin1');
    const exp = JSON.parse(text).exp;
    return typeof exp === 'number' ? exp : null;
  } catch {
    return null;
  }
}

/** Per-channel delivery state: offsets delivered, senders' sequences seen, recovery. */
class ChannelState {
  constructor(name, floor = null, epoch = null) {
    this.name = name;
    this.epoch = epoch;
    // the position: every offset <= floor was received (or, with echo off, is one of our
    // own, acked); `above` holds the later ones received, above one that has not come yet
    this.floor = floor;
    this.above = new Set();
    this.seen = new Set(); // "user|client|sequence" keys, insertion-ordered window
    this.asked = false; // this socket's join sent `since`
    this.resyncing = false; // a second join (since=0 in a new epoch) is under way
    this.newEpoch = false;
    this.held = []; // live messages held while resyncing
    this.replayUntil = 0;
  }

  /** Record `offset` as received; false when it already was. The floor only moves over
   * offsets received: one that has not come holds it (and `since`) below it, however many
   * later ones come (the client bounds them: GAP_WINDOW). */
  takeOffset(offset) {
    if (this.floor === null) this.floor = offset - 1;
    if (offset <= this.floor || this.above.has(offset)) return false;
    this.above.add(offset);
    this.advance();
    return true;
  }

  /** Move the floor over the offsets received right above it. */
  advance() {
    while (this.above.has(this.floor + 1)) {
      this.floor += 1;
      this.above.delete(this.floor);
    }
  }

  /** After the floor jumped forward (a join reply): forget what is below it, then advance. */
  settle() {
    for (const o of this.above) if (o <= this.floor) this.above.delete(o);
    this.advance();
  }

  takeKey(key) {
    if (this.seen.has(key)) return false;
    this.seen.add(key);
    if (this.seen.size > SEEN_WINDOW) this.seen.delete(this.seen.values().next().value);
    return true;
  }
}

export class AetherClient {
  /**
   * @param {string} url  ws:// or wss:// URL of the server's WebSocket path (e.g. ws://host:8000/ws)
   * @param {object} [options]
   * @param {string} [options.token]  a JWT
   * @param {string} [options.clientId]  kept across reconnects; made by the server when absent
   * @param {string[]} [options.channels]  joined at every connect
   * @param {() => (string|null|Promise<string|null>)} [options.tokenRefresh]  a new token,
   *   asked for before expiry, on the server's expiry notice, and after a 4001/4003 close
   * @param {boolean} [options.echo]  also receive your own publications
   * @param {{initial?: number, max?: number, factor?: number, jitter?: number}} [options.backoff]
   *   reconnect delays in ms (default 500 doubling to 30000, jitter 0.5)
   * @param {number} [options.refreshBeforeMs]  refresh this long before exp (default 30000)
   * @param {number} [options.maxPending]  publications waiting for acks at most (default 10000)
   * @param {number} [options.maxInFlight]  joins and publications sent and not answered yet, at
   *   most (default 8: fewer than the 10 strikes that close a socket)
   * @param {number} [options.firstSequence]  default: the clock in µs
   * @param {typeof WebSocket} [options.WebSocketImpl]  default: the global WebSocket
   */
  constructor(url, options = {}) {
    this.url = url;
    this.token = options.token ?? null;
    this.clientId = options.clientId ?? null;
    this.userId = null;
    this.tokenRefresh = options.tokenRefresh ?? null;
    this.echo = Boolean(options.echo);
    const b = options.backoff ?? {};
    this.backoff = { initial: b.initial ?? 500, max: b.max ?? 30000, factor: b.factor ?? 2, jitter: b.jitter ?? 0.5 };
    this.refreshBeforeMs = options.refreshBeforeMs ?? 30000;
    this.maxPending = options.maxPending ?? 10000;
    this.maxInFlight = options.maxInFlight ?? 8;
    if (!(this.maxInFlight >= 1)) throw new Error('maxInFlight must be at least 1');
    this.WebSocketImpl = options.WebSocketImpl ?? globalThis.WebSocket;
    if (!this.WebSocketImpl) throw new Error('no WebSocket: pass options.WebSocketImpl (e.g. the ws package)');
    // Sequences start at the clock (µs) so a reloaded page with the same clientId does not
    // reuse sequences the server still remembers (DEDUP_TTL_S).
    this.sequence = (options.firstSequence ?? Date.now() * 1000) - 1;
    this.channelStates = new Map((options.channels ?? []).map((n) => [n, new ChannelState(n)]));
    this.pendingMap = new Map(); // sequence -> {sequence, channel, content, resolve, reject, sent, socket, action}
    this.joinWaiters = new Map(); // channel -> [{resolve, reject}]
    this.leaveWaiters = new Map();
    this.syncing = new Set(); // joins of this socket still unanswered
    // pacing (pump): joins and leaves to send on this socket, those sent and unanswered
    // (name -> Date.now() when sent), publications to send (sequences, kept sorted: the oldest
    // first), publications sent and unanswered, the window, frames that take no place in it
    // (status, refresh) but wait for the pause too, and nothing sent before pausedUntil
    // (Date.now() ms)
    this.joinQueue = [];
    this.joinsOut = new Map();
    this.leaveQueue = [];
    this.leavesOut = new Map();
    this.control = [];
    this.refreshOut = null; // a refresh sent (or to send), unanswered
    this.toSend = [];
    this.pubsOut = 0;
    this.window = this.maxInFlight;
    this.pausedUntil = 0;
    this.listeners = new Map(EVENTS.map((e) => [e, new Set()]));
    this.state = 'idle';
    this.attempts = 0;
    this.lastCloseCode = null;
    this.generation = 0;
    this.ws = null;
    this.firstFrame = false;
    this.ready = false;
    this.closing = false;
    this.refusedToken = null;
    this.timers = { reconnect: null, refresh: null, resend: null, stall: null };
    this.refreshing = false;
    this.openWaiters = [];
    this.onOnline = () => {
      if (this.state === 'reconnecting') this.reconnect();
    };
  }

  // -- public API ---------------------------------------------------------------------------

  /** Subscribe to 'message' | 'system' | 'error' | 'state' | 'join'; returns an unsubscribe function. */
  on(event, fn) {
    const set = this.listeners.get(event);
    if (!set) throw new Error(`unknown event ${event}`);
    set.add(fn);
    return () => set.delete(fn);
  }

  off(event, fn) {
    this.listeners.get(event)?.delete(fn);
  }

  get channels() {
    return [...this.channelStates.keys()];
  }

  /** Publications not acknowledged yet (queued or in flight). */
  get pending() {
    return this.pendingMap.size;
  }

  /** {offset, epoch} of a joined channel: the last offset with none missing below it
   * (received, or with echo off our own, acked), the since of its next recovery. */
  position(channel) {
    const ch = this.channelStates.get(channel);
    return ch ? { offset: ch.floor, epoch: ch.epoch } : null;
  }

  /** Start (or restart after a refused token was replaced) and resolve once connected and
   * joined; rejects with ClientClosed when refused for good. Reconnects meanwhile. */
  connect() {
    if (this.state === 'closed' && !this.restart()) {
      return Promise.reject(new ClientClosed('client is closed', this.lastCloseCode));
    }
    if (this.state === 'open') return Promise.resolve();
    const opened = new Promise((resolve, reject) => this.openWaiters.push({ resolve, reject }));
    if (this.state === 'idle') {
      if (typeof window !== 'undefined' && window.addEventListener) window.addEventListener('online', this.onOnline);
      this.openSocket();
    }
    return opened;
  }

  /** Publish and resolve with the ack. Queued while disconnected; resent with `retry` after a
   * reconnect when unacked. Rejects with AetherError when refused for good. */
  publish(channel, content) {
    if (this.state === 'closed') return Promise.reject(new ClientClosed('client is closed', this.lastCloseCode));
    if (this.pendingMap.size >= this.maxPending) {
      return Promise.reject(new AetherError('QUEUE_FULL', `${this.maxPending} messages are waiting for acks`));
    }
    this.sequence += 1;
    const sequence = this.sequence;
    let item;
    const promise = new Promise((resolve, reject) => {
      item = { sequence, channel, content: String(content), resolve, reject, sent: false, socket: 0, action: 'send' };
    });
    item.settled = promise.then(
      () => undefined,
      () => undefined,
    );
    this.pendingMap.set(sequence, item);
    this.toSend.push(sequence); // the newest: the list stays sorted
    if (this.ready) this.pump();
    return promise;
  }

  /** Join a channel (rejoined after every reconnect). With since + epoch (a position kept
   * from earlier) the missed messages are replayed. Resolves with {channel, offset, epoch, recovered, newEpoch}. */
  join(channel, { since = null, epoch = null } = {}) {
    let ch = this.channelStates.get(channel);
    if (!ch) {
      ch = new ChannelState(channel, since, epoch);
      this.channelStates.set(channel, ch);
    }
    return new Promise((resolve, reject) => {
      if (!this.joinWaiters.has(channel)) this.joinWaiters.set(channel, []);
      this.joinWaiters.get(channel).push({ resolve, reject });
      if (this.firstFrame) {
        this.queueJoin(ch);
        this.pump();
      }
    });
  }

  /** Leave a channel; it is no longer rejoined. */
  leave(channel) {
    if (!this.channelStates.delete(channel)) return Promise.resolve();
    this.syncing.delete(channel);
    this.joinQueue = this.joinQueue.filter((name) => name !== channel);
    if (!this.firstFrame) return Promise.resolve();
    return new Promise((resolve, reject) => {
      if (!this.leaveWaiters.has(channel)) this.leaveWaiters.set(channel, []);
      this.leaveWaiters.get(channel).push({ resolve, reject });
      // through the window, like a join
      if (!this.leavesOut.has(channel) && !this.leaveQueue.includes(channel)) this.leaveQueue.push(channel);
      this.pump();
    });
  }

  /** Ask the server for a status notice (arrives as a 'system' event); sent once no rate
   * limit's retry_after_ms runs. */
  requestStatus() {
    this.sendControl({ type: 'system', action: 'status', data: {} });
  }

  /** Use a new token: refresh the live connection with it, or reconnect with it when the
   * client was stopped by 4001/4003. */
  setToken(token) {
    this.token = token;
    if (this.state === 'closed') {
      if (this.restart()) this.openSocket();
      return;
    }
    if (this.firstFrame) this.sendRefresh(token);
    this.armRefresh();
  }

  /** Drop the socket and connect again at once; nothing is lost. */
  reconnect() {
    if (this.state === 'closed' || this.state === 'idle') return;
    this.attempts = 0;
    clearTimeout(this.timers.reconnect);
    this.timers.reconnect = null;
    this.dropSocket(4000, 'reconnect');
    this.socketGone(null, 0, true);
  }

  /** Resolve once every publication so far is acknowledged or refused. */
  flush() {
    return Promise.all([...this.pendingMap.values()].map((p) => p.settled)).then(() => undefined);
  }

  /** Close with 1000 and stop. Unacked publications are rejected (await flush() first). */
  close() {
    this.closing = true;
    this.dropSocket(1000, 'client closing');
    this.stop('client closed', 1000);
    return Promise.resolve();
  }

  /** Milliseconds before reconnect attempt `attempt` (1, 2, ...): exponential up to the cap,
   * a random part (jitter) spread so that clients dropped together do not return together. */
  backoffDelay(attempt) {
    const { initial, max, factor, jitter } = this.backoff;
    const base = Math.min(max, initial * factor ** (attempt - 1));
    return base * (1 - jitter) + base * jitter * Math.random();
  }

  // -- sockets ----------------------------------------------------------------------------

  buildUrl() {
    const params = new URLSearchParams();
    if (this.token) params.set('token', this.token);
    if (this.clientId) params.set('client_id', this.clientId);
    if (this.echo) params.set('echo', '1');
    const query = params.toString();
    return query ? `${this.url}${this.url.includes('?') ? '&' : '?'}${query}` : this.url;
  }

  openSocket() {
    this.setState(this.generation === 0 ? 'connecting' : 'reconnecting');
    this.generation += 1;
    const generation = this.generation;
    this.firstFrame = false;
    this.ready = false;
    let ws;
    try {
      ws = new this.WebSocketImpl(this.buildUrl());
    } catch (err) {
      this.emit('error', new AetherError('CONNECT_FAILED', String(err)));
      this.socketGone(null, generation);
      return;
    }
    this.ws = ws;
    ws.onmessage = (ev) => {
      if (generation === this.generation) this.onFrame(ev.data);
    };
    ws.onclose = (ev) => {
      if (generation === this.generation) this.socketGone(ev.code, generation);
    };
    ws.onerror = () => {
      /* a close event follows */
    };
  }

  /** Detach the current socket, if any, and close it with `code`. */
  dropSocket(code, reason) {
    const ws = this.ws;
    if (!ws) return;
    this.detach(ws);
    try {
      ws.close(code, reason);
    } catch {
      /* already closing or closed */
    }
  }

  detach(ws) {
    ws.onmessage = null;
    ws.onclose = null;
    ws.onerror = null;
    if (this.ws === ws) this.ws = null;
  }

  socketGone(code, generation, immediate = false) {
    if (generation && generation !== this.generation) return;
    this.ws = null;
    this.firstFrame = false;
    this.ready = false;
    this.syncing.clear();
    this.joinQueue = [];
    this.joinsOut.clear();
    this.leaveQueue = [];
    this.leavesOut.clear();
    this.control = [];
    this.refreshOut = null;
    this.refreshing = false; // a new token, if any, is used at the next connect
    this.pubsOut = 0;
    clearTimeout(this.timers.resend);
    this.timers.resend = null;
    clearTimeout(this.timers.stall);
    this.timers.stall = null;
    for (const item of this.pendingMap.values()) item.socket = 0; // unacked: resend on the next socket
    for (const ch of this.channelStates.values()) {
      ch.resyncing = false;
      ch.held = [];
    }
    for (const waiters of this.leaveWaiters.values()) for (const w of waiters) w.resolve(); // membership ends with the socket
    this.leaveWaiters.clear();
    this.lastCloseCode = code;
    if (this.closing) return;
    if (FINAL_CLOSE_CODES.has(code)) {
      this.stop(code === 4009 ? 'replaced by a newer connection' : 'closed by the server', code);
      return;
    }
    if (AUTH_CLOSE_CODES.has(code)) {
      this.newTokenAfter(code);
      return;
    }
    if (code === 4029) this.attempts = Math.max(this.attempts, 5); // it will recur: wait long
    this.attempts += 1;
    this.setState('reconnecting');
    const delay = immediate ? 0 : this.backoffDelay(this.attempts);
    clearTimeout(this.timers.reconnect);
    this.timers.reconnect = setTimeout(() => {
      this.timers.reconnect = null;
      if (!this.closing) this.openSocket();
    }, delay);
  }

  async newTokenAfter(code) {
    const refused = this.token;
    clearTimeout(this.timers.refresh);
    let fresh = null;
    if (this.tokenRefresh) {
      try {
        fresh = await this.tokenRefresh();
      } catch (err) {
        this.emit('error', new AetherError('REFRESH_FAILED', String(err)));
      }
    }
    if (this.closing) return;
    if (typeof fresh === 'string' && fresh && fresh !== refused) {
      this.token = fresh;
      this.openSocket();
      return;
    }
    this.refusedToken = refused;
    this.stop(`refused with close code ${code}; no new token`, code);
  }

  restart() {
    if (!AUTH_CLOSE_CODES.has(this.lastCloseCode) || this.token === this.refusedToken) return false;
    this.closing = false;
    this.attempts = 0;
    this.setState('idle');
    return true;
  }

  stop(reason, code) {
    if (this.state === 'closed') return;
    this.closing = true;
    this.lastCloseCode = code;
    for (const t of Object.keys(this.timers)) {
      clearTimeout(this.timers[t]);
      this.timers[t] = null;
    }
    if (typeof window !== 'undefined' && window.removeEventListener) window.removeEventListener('online', this.onOnline);
    const error = new ClientClosed(reason, code);
    for (const item of this.pendingMap.values()) item.reject(error);
    this.pendingMap.clear();
    for (const waiters of [...this.joinWaiters.values(), ...this.leaveWaiters.values()]) {
      for (const w of waiters) w.reject(error);
    }
    this.joinWaiters.clear();
    this.leaveWaiters.clear();
    for (const w of this.openWaiters.splice(0)) w.reject(error);
    this.setState('closed');
  }

  // -- frames in ----------------------------------------------------------------------------

  onFrame(raw) {
    let msg;
    try {
      msg = JSON.parse(typeof raw === 'string' ? raw : new TextDecoder().decode(raw));
    } catch {
      return;
    }
    if (!msg || typeof msg !== 'object') return;
    try {
      this.dispatch(msg);
    } catch (err) {
      // a failing handler must not break the connection
      if (typeof console !== 'undefined') console.error('aether-client:', err);
    }
  }

  dispatch(msg) {
    const { type, action } = msg;
    const data = msg.data && typeof msg.data === 'object' ? msg.data : {};
    if (type === 'message' && action === 'send') this.onPublication(data);
    else if (type === 'message' && action === 'ack') this.onAck(data);
    else if (type === 'connection' && action === 'connect') {
      if (!this.firstFrame) this.onOpen(data);
      else if ('epoch' in data) this.onJoinReply(data);
      else this.emit('system', msg); // presence
    } else if (type === 'connection' && action === 'disconnect') this.onLeave(msg, data);
    else if (type === 'connection' && action === 'refresh') {
      this.refreshing = false;
      this.refreshOut = null;
      this.armRefresh();
    } else if (type === 'system') {
      if (action === 'status' && 'expires_at' in data) this.refreshNow();
      this.emit('system', msg);
    } else if (type === 'error') this.onErrorFrame(msg);
  }

  onOpen(data) {
    this.firstFrame = true;
    if (typeof data.client_id === 'string') this.clientId = data.client_id; // the dedupe key: keep it
    this.userId = data.user_id ?? null;
    this.attempts = 0;
    this.armRefresh();
    // every unacked publication is sent again on this socket, oldest first
    this.toSend = [...this.pendingMap.keys()]; // ascending sequences
    for (const ch of this.channelStates.values()) this.queueJoin(ch);
    this.pump();
    this.maybeReady();
  }

  /** (Re)join a channel on this socket when the window lets it (pump). */
  queueJoin(ch) {
    this.syncing.add(ch.name);
    // else on its way: its reply answers every waiter
    if (!this.joinsOut.has(ch.name) && !this.joinQueue.includes(ch.name)) this.joinQueue.push(ch.name);
  }

  sendJoin(ch) {
    const data = { channel: ch.name };
    ch.asked = ch.floor !== null;
    if (ch.floor !== null) {
      data.since = ch.floor;
      if (ch.epoch !== null) data.epoch = ch.epoch;
    }
    ch.resyncing = false;
    ch.newEpoch = false;
    ch.held = [];
    if (this.send({ type: 'connection', action: 'connect', data })) this.joinsOut.set(ch.name, Date.now());
  }

  onJoinReply(data) {
    const ch = this.channelStates.get(data.channel);
    if (!ch) {
      this.answeredJoin(data.channel); // left meanwhile
      return;
    }
    const offset = Number(data.offset || 0);
    const epoch = String(data.epoch);
    const recovered = data.recovered;
    if (recovered === false && ch.epoch !== epoch && !ch.resyncing && offset > 0) {
      // The server started a new epoch (it lost its history, e.g. restarted) and has
      // published `offset` messages in it since: we saw none of them, so ask for all.
      ch.resyncing = true;
      ch.newEpoch = true;
      this.send({ type: 'connection', action: 'connect', data: { channel: ch.name, since: 0, epoch } });
      return;
    }
    const newEpoch = ch.newEpoch || (ch.epoch !== null && ch.epoch !== epoch);
    if (ch.epoch !== epoch) {
      ch.floor = recovered === true ? 0 : null;
      ch.above.clear();
    }
    ch.epoch = epoch;
    ch.resyncing = false;
    if (recovered === true) {
      // the missed messages follow this reply, before any live one
      ch.replayUntil = offset;
      this.flushHeld(ch);
    } else {
      const held = ch.held;
      ch.held = [];
      if (held.length) ch.floor = null;
      for (const pub of held) this.deliver(ch, pub);
      ch.floor = ch.floor === null ? offset : Math.max(ch.floor, offset);
      ch.settle();
      ch.replayUntil = 0;
    }
    const result = {
      channel: ch.name,
      offset,
      epoch,
      recovered: ch.asked ? recovered : null,
      newEpoch: newEpoch && ch.asked,
    };
    ch.newEpoch = false;
    this.syncing.delete(ch.name);
    for (const w of this.joinWaiters.get(ch.name) ?? []) w.resolve(result);
    this.joinWaiters.delete(ch.name);
    this.emit('join', result);
    this.answeredJoin(ch.name);
    this.maybeReady();
  }

  /** A join of this socket was answered: its place in the window is free. */
  answeredJoin(name) {
    if (!this.joinsOut.delete(name)) return;
    this.window = Math.min(this.maxInFlight, this.window + 1);
    this.pump();
  }

  flushHeld(ch) {
    if (ch.held.length && (ch.floor ?? 0) >= ch.replayUntil) {
      const held = ch.held;
      ch.held = [];
      for (const pub of held) this.deliver(ch, pub);
    }
  }

  onLeave(msg, data) {
    if (data.client_id !== this.clientId || typeof data.channel !== 'string') {
      this.emit('system', msg); // presence
      return;
    }
    if (data.reason) {
      this.channelStates.delete(data.channel); // removed by an admin: do not rejoin
      this.emit('system', msg);
    }
    this.answeredLeave(data.channel);
  }

  /** A leave of this socket was answered (or refused for good): its waiters are done, its
   * place in the window is free. */
  answeredLeave(name) {
    for (const w of this.leaveWaiters.get(name) ?? []) w.resolve();
    this.leaveWaiters.delete(name);
    if (!this.leavesOut.delete(name)) return;
    this.window = Math.min(this.maxInFlight, this.window + 1);
    this.pump();
  }

  onPublication(data) {
    const ch = this.channelStates.get(data.channel);
    if (!ch) return;
    if (ch.resyncing) {
      ch.held.push(data);
      return;
    }
    this.deliver(ch, data);
    this.flushHeld(ch);
  }

  deliver(ch, data) {
    const meta = data.metadata;
    if (!meta || !Number.isInteger(meta.offset) || !Number.isInteger(meta.sequence)) return;
    const freshOffset = ch.takeOffset(meta.offset);
    this.mindGap(ch);
    if (!freshOffset || !ch.takeKey(`${meta.user_id}|${meta.client_id}|${meta.sequence}`)) return;
    if (!this.echo && meta.client_id === this.clientId && meta.user_id === this.userId) return; // ours, replayed
    this.emit('message', {
      channel: ch.name,
      content: String(data.content ?? ''),
      offset: meta.offset,
      sequence: meta.sequence,
      clientId: meta.client_id ?? null,
      userId: meta.user_id ?? null,
      timestamp: meta.timestamp ?? '',
      replayed: meta.offset <= ch.replayUntil,
    });
  }

  onAck(data) {
    const meta = data.metadata;
    const item = meta && this.pendingMap.get(meta.sequence);
    if (!item) return; // an ack repeated for a retry already settled
    this.pendingMap.delete(item.sequence);
    if (item.socket === this.generation) {
      this.pubsOut -= 1;
      this.window = Math.min(this.maxInFlight, this.window + 1);
    }
    const ack = { channel: item.channel, sequence: item.sequence, offset: meta.offset, timestamp: meta.timestamp };
    const ch = this.channelStates.get(item.channel);
    if (!this.echo && ch && ch.floor !== null && !ch.resyncing && !this.syncing.has(item.channel)) {
      // echo off: our own message never comes as a copy; its offset is not missed, so the
      // position passes it and a recovery does not ask for it. With echo on the copy comes,
      // maybe after this ack (Redis, docs/protocol.md §7) or after lower offsets: it counts
      // when it comes, so that it is not taken for a double.
      ch.takeOffset(ack.offset);
      this.mindGap(ch);
      this.flushHeld(ch);
    }
    item.resolve(ack);
    this.pump();
  }

  /** Bound the offsets kept above one that has not come (GAP_WINDOW): the server missed it
   * for this socket (its Redis subscriber was lost a while, say). Join again with since (the
   * floor): the server replays what is missing (or answers recovered: false, which the join
   * event says). If that join is still not answered at twice the bound, drop the socket: the
   * reconnect's recovery asks again. */
  mindGap(ch) {
    if (ch.above.size <= GAP_WINDOW || (ch.floor ?? 0) < ch.replayUntil) return; // few, or a replay is coming in
    if (!this.syncing.has(ch.name) && !ch.resyncing) {
      this.queueJoin(ch);
      this.pump();
    } else if (ch.above.size > 2 * GAP_WINDOW && this.ws) this.reconnect();
  }

  onErrorFrame(msg) {
    const details = msg.details && typeof msg.details === 'object' ? msg.details : {};
    const code = String(msg.code);
    const error = new AetherError(code, String(msg.message ?? ''), details);
    let item = Number.isInteger(details.sequence) ? this.pendingMap.get(details.sequence) : undefined;
    let channel = details.channel;
    if (code === 'MESSAGE_TOO_LARGE' && Number.isInteger(details.limit)) {
      // the error names no publication: it answers the oldest one out over the limit
      const encoder = new TextEncoder();
      for (const p of this.pendingMap.values()) {
        if (p.socket !== this.generation || encoder.encode(publicationFrame(p)).length <= details.limit) continue;
        if (!item || p.sequence < item.sequence) item = p;
      }
      channel = item?.channel;
    }
    if (item && item.channel === channel) {
      if (item.socket === this.generation) this.pubsOut -= 1;
      if (RETRYABLE_CODES.has(code)) {
        // sent again after the wait, before anything newer
        item.socket = 0;
        this.toSend.splice(sortedIndex(this.toSend, item.sequence), 0, item.sequence);
        this.holdOff(details);
        return;
      }
      this.pendingMap.delete(item.sequence);
      item.reject(error);
      this.pump();
      return;
    }
    if (
      typeof channel === 'string' &&
      this.joinsOut.has(channel) &&
      RETRYABLE_JOIN_CODES.has(code) &&
      !Number.isInteger(details.sequence)
    ) {
      // a join refused by a rate limit: sent again after the wait
      this.joinsOut.delete(channel);
      if (this.syncing.has(channel)) this.joinQueue.unshift(channel);
      this.holdOff(details);
      return;
    }
    if (typeof channel === 'string' && this.leavesOut.has(channel) && !Number.isInteger(details.sequence)) {
      if (RETRYABLE_JOIN_CODES.has(code)) {
        // a leave refused by a rate limit: sent again after the wait
        this.leavesOut.delete(channel);
        this.leaveQueue.unshift(channel);
        this.holdOff(details);
        return;
      }
      this.answeredLeave(channel); // refused for good (not a member...): done
    }
    if (RETRYABLE_JOIN_CODES.has(code) && channel == null && details.sequence == null) {
      // a rate limit refused a frame it cannot name (a status request, a token refresh, a
      // frame over MAX_MESSAGE_BYTES...): hold off all the same, and send a refresh that is
      // still unanswered again after the wait
      if (this.refreshOut !== null) {
        this.control.push(refreshFrame(this.refreshOut));
        this.holdOff(details);
        return;
      }
      this.holdOff(details);
    }
    if (
      typeof channel === 'string' &&
      this.syncing.has(channel) &&
      code !== 'RATE_LIMITED' &&
      code !== 'SERVER_BUSY' &&
      (details.component !== 'auth' || code === 'AUTH_REQUIRED')
    ) {
      // a refused join (CHANNEL_FULL, FORBIDDEN, ...): stop waiting for it
      this.syncing.delete(channel);
      this.answeredJoin(channel);
      for (const w of this.joinWaiters.get(channel) ?? []) w.reject(error);
      this.joinWaiters.delete(channel);
      this.channelStates.delete(channel);
      this.maybeReady();
    } else if (details.component === 'auth' && msg.message === 'refresh token refused') {
      this.refreshing = false;
      this.refreshOut = null;
    }
    this.emit('error', error);
  }

  // -- frames out ---------------------------------------------------------------------------

  send(obj) {
    const ws = this.ws;
    if (!ws || !this.firstFrame || ws.readyState !== 1) return false;
    ws.send(JSON.stringify(obj));
    return true;
  }

  sendPublication(item) {
    item.action = item.sent ? 'retry' : 'send';
    const ws = this.ws;
    if (!ws || !this.firstFrame || ws.readyState !== 1) return false;
    ws.send(publicationFrame(item));
    item.sent = true;
    item.socket = this.generation;
    item.sentAt = Date.now();
    this.pubsOut += 1;
    return true;
  }

  maybeReady() {
    if (this.ready || !this.firstFrame || this.syncing.size) return;
    this.ready = true;
    this.pump();
    this.setState('open');
    for (const w of this.openWaiters.splice(0)) w.resolve();
  }

  /** Send what the window lets out: status requests and refreshes (no place in it), queued
   * leaves and joins, then (once every join of this socket is answered) pending publications,
   * oldest first; nothing while a rate limit's retry_after_ms runs. */
  pump() {
    if (!this.firstFrame || !this.ws) return;
    const wait = this.pausedUntil - Date.now();
    if (wait > 0) {
      if (this.timers.resend === null) {
        this.timers.resend = setTimeout(() => {
          this.timers.resend = null;
          this.pump();
        }, wait);
      }
      return;
    }
    while (this.control.length) this.send(this.control.shift());
    while (this.leaveQueue.length && this.inFlight() < this.window) {
      const name = this.leaveQueue.shift();
      if (this.send({ type: 'connection', action: 'disconnect', data: { channel: name } })) {
        this.leavesOut.set(name, Date.now());
      }
    }
    while (this.joinQueue.length && this.inFlight() < this.window) {
      const ch = this.channelStates.get(this.joinQueue.shift());
      if (ch && this.syncing.has(ch.name) && !this.joinsOut.has(ch.name)) this.sendJoin(ch);
    }
    if (this.ready) {
      while (this.toSend.length && this.inFlight() < this.window) {
        const item = this.pendingMap.get(this.toSend.shift());
        if (!item || item.socket === this.generation) continue; // settled meanwhile, or already out
        if (!this.sendPublication(item)) {
          this.toSend.unshift(item.sequence);
          break;
        }
      }
    }
    if (this.timers.stall === null && this.inFlight()) {
      this.timers.stall = setTimeout(() => this.unstall(), IN_FLIGHT_TIMEOUT_MS);
    }
  }

  inFlight() {
    return this.joinsOut.size + this.leavesOut.size + this.pubsOut;
  }

  /** The safety net: free the places of frames unanswered for IN_FLIGHT_TIMEOUT_MS. */
  unstall() {
    this.timers.stall = null;
    const cutoff = Date.now() - IN_FLIGHT_TIMEOUT_MS;
    let stale = 0;
    for (const item of this.pendingMap.values()) {
      if (item.socket !== this.generation || item.sentAt > cutoff) continue;
      item.socket = -1; // still awaited (a late ack settles it), resent on the next socket
      this.pubsOut -= 1;
      stale += 1;
    }
    for (const [name, at] of [...this.joinsOut]) {
      if (at > cutoff) continue;
      this.joinsOut.delete(name);
      if (this.syncing.has(name)) this.joinQueue.push(name);
      stale += 1;
    }
    for (const [name, at] of [...this.leavesOut]) {
      if (at > cutoff) continue;
      this.leavesOut.delete(name);
      this.leaveQueue.push(name);
      stale += 1;
    }
    if (stale) this.window = Math.min(this.maxInFlight, this.window + stale);
    this.pump();
  }

  /** A frame that takes no place in the window, sent once no pause runs. */
  sendControl(frame) {
    this.control.push(frame);
    this.pump();
  }

  /** Refresh this socket's token (sent again if a rate limit refuses it); false when there is
   * no socket (the token is used at the next connect). */
  sendRefresh(token) {
    if (!this.firstFrame || !this.ws || this.ws.readyState !== 1) return false;
    this.refreshOut = token;
    this.sendControl(refreshFrame(token));
    return true;
  }

  /** A rate limit refused a frame: send nothing for retry_after_ms, then one frame at a time,
   * the window growing by one per answer. */
  holdOff(details) {
    const ms = details.retry_after_ms;
    const delay = Number.isInteger(ms) && ms >= 0 ? ms : 1000;
    this.pausedUntil = Math.max(this.pausedUntil, Date.now() + delay);
    this.window = 1;
    this.pump();
  }

  // -- token refresh ----------------------------------------------------------------------

  armRefresh() {
    clearTimeout(this.timers.refresh);
    this.timers.refresh = null;
    if (!this.tokenRefresh || !this.token) return;
    const exp = tokenExpiry(this.token);
    if (exp === null) return;
    const left = exp * 1000 - Date.now();
    const delay = Math.max(0, left - Math.min(this.refreshBeforeMs, left / 2));
    this.timers.refresh = setTimeout(() => this.refreshNow(), delay);
  }

  async refreshNow() {
    if (!this.tokenRefresh || this.refreshing || this.closing) return;
    this.refreshing = true;
    let fresh = null;
    try {
      fresh = await this.tokenRefresh();
    } catch (err) {
      this.refreshing = false;
      this.emit('error', new AetherError('REFRESH_FAILED', String(err)));
      return;
    }
    if (typeof fresh !== 'string' || !fresh || fresh === this.token) {
      this.refreshing = false;
      return;
    }
    this.token = fresh;
    if (!this.sendRefresh(fresh)) this.refreshing = false; // used at the next connect
  }

  // -- helpers ------------------------------------------------------------------------------

  setState(state) {
    if (state === this.state) return;
    this.state = state;
    this.emit('state', state);
  }

  emit(event, value) {
    for (const fn of this.listeners.get(event)) {
      try {
        fn(value);
      } catch (err) {
        if (typeof console !== 'undefined') console.error(`aether-client: ${event} handler failed:`, err);
      }
    }
  }
}

/** The text of a publication's frame, as `sendPublication` sends it. */
function refreshFrame(token) {
  return { type: 'connection', action: 'refresh', data: { token } };
}

function publicationFrame(item) {
  return JSON.stringify({
    type: 'message',
    action: item.action,
    data: { channel: item.channel, content: item.content, metadata: { sequence: item.sequence } },
  });
}

/** Where `value` goes in the ascending array `list`. */
function sortedIndex(list, value) {
  let lo = 0;
  let hi = list.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (list[mid] < value) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

export default AetherClient;

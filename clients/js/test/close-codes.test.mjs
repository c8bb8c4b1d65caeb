// The JS client's answers to the close codes that must stop it or slow it down (4003, 4009,
// 4029), and its queue limit, against real aether-fast servers (node --test).
import assert from 'node:assert/strict';
import { after, afterEach, before, describe, test } from 'node:test';
import WebSocket from 'ws';

import { AetherClient, AetherError, ClientClosed } from '../aether-client.js';
import { disposeClean, FAST, makeClient as makeRecorded, mintToken, Server, sleep, until } from '../support/helpers.mjs';

/** Every client a test made: closed after it, so that one the code under test failed to stop
 * does not keep reconnecting (and the test process alive) after a failure. */
const everyClient = [];
afterEach(async () => {
  for (const c of everyClient.splice(0)) await c.close();
});

function makeClient(...args) {
  const client = makeRecorded(...args);
  everyClient.push(client);
  return client;
}

/** `promise`, or a rejection after `ms`: a client that never settles fails the test instead
 * of hanging it. */
function within(promise, ms, what) {
  let timer;
  const late = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: nothing within ${ms} ms`)), ms);
  });
  return Promise.race([promise, late]).finally(() => clearTimeout(timer));
}

const LIMIT = { timeout: 30000 };

/** A WebSocket class that records when each socket is made: the client's connection attempts. */
function counting() {
  const made = [];
  class Counted extends WebSocket {
    constructor(...args) {
      super(...args);
      made.push(Date.now());
    }
  }
  return { Counted, made };
}

/** A client like makeClient's, on its own URL, counting its connection attempts. */
function clientAt(url, token, options = {}) {
  const { Counted, made } = counting();
  const client = new AetherClient(url, { token, WebSocketImpl: Counted, backoff: FAST, ...options });
  const rec = { states: [], errors: [], system: [], made };
  client.on('state', (s) => rec.states.push([s, Date.now()]));
  client.on('error', (e) => rec.errors.push(e));
  client.on('system', (s) => rec.system.push(s));
  client.rec = rec;
  everyClient.push(client);
  return client;
}

async function withServer(env, body) {
  const server = await new Server(env).start();
  try {
    await body(server);
  } finally {
    await disposeClean(server);
  }
}

describe('close codes that stop the client', () => {
  let server;
  before(async () => {
    server = await new Server({ RATE_LIMIT_MESSAGES: '100000' }).start();
  });
  after(() => disposeClean(server));

  test('4003 (a URL channel the token does not allow): stops, no reconnect with that token', LIMIT, async () => {
    // the clients join with messages; only a URL that names a channel can earn a 4003
    const url = `${server.url}?channel=js.secret`;
    const c = clientAt(url, mintToken('ivy', { channels: ['js.open'] }));
    await assert.rejects(within(c.connect(), 10000, 'connect'), (e) => e instanceof ClientClosed && e.closeCode === 4003);
    assert.equal(c.state, 'closed');
    assert.deepEqual(c.rec.errors.map((e) => e.code), ['FORBIDDEN']);
    await sleep(500); // time for a reconnect that must not come
    assert.equal(c.rec.made.length, 1);
    assert.ok(!c.rec.states.some(([s]) => s === 'reconnecting'), JSON.stringify(c.rec.states));
    await assert.rejects(c.publish('js.open', 'x'), (e) => e instanceof ClientClosed && e.closeCode === 4003);

    // with a refresh callback, a token that allows the channel reconnects at once
    let calls = 0;
    const refreshed = clientAt(url, mintToken('ivy', { channels: ['js.open'] }), {
      tokenRefresh: () => {
        calls += 1;
        return mintToken('ivy', { channels: ['js.open', 'js.secret'] });
      },
    });
    await within(refreshed.connect(), 10000, 'connect');
    assert.deepEqual([refreshed.state, refreshed.userId, calls, refreshed.rec.made.length], ['open', 'ivy', 1, 2]);
    await refreshed.close();
  });

  test('4009 (replaced by a newer connection): stops for good, the newer one stays', LIMIT, async () => {
    const older = clientAt(server.url, mintToken('jo'), { clientId: 'js-dup', channels: ['js.dup'] });
    await older.connect();
    const newer = makeClient(server, 'jo', { clientId: 'js-dup', channels: ['js.dup'] });
    await newer.connect();
    await until(() => older.state === 'closed', 10000, 'the older client stopped');
    assert.equal(older.lastCloseCode, 4009);
    assert.ok(
      older.rec.system.some((m) => m.type === 'system' && /replaced/.test(m.data.message)),
      JSON.stringify(older.rec.system),
    );
    await sleep(500); // time for a reconnect that must not come
    assert.equal(older.rec.made.length, 1);
    assert.ok(!older.rec.states.some(([s]) => s === 'reconnecting'), JSON.stringify(older.rec.states));
    await assert.rejects(older.publish('js.dup', 'x'), (e) => e instanceof ClientClosed && e.closeCode === 4009);
    assert.equal(newer.state, 'open');
    assert.equal((await newer.publish('js.dup', 'still mine')).offset, 1);
    await newer.close();
  });

  test('the queue limit: the publication past maxPending is refused at once, the queued ones are sent', LIMIT, async () => {
    const watcher = makeClient(server, 'lee-w', { channels: ['js.qfull'] });
    await watcher.connect();
    const c = makeClient(server, 'lee', { channels: ['js.qfull'], maxPending: 3 });
    const queued = ['q0', 'q1', 'q2'].map((t) => c.publish('js.qfull', t)); // before connecting
    assert.equal(c.pending, 3);
    const q3 = within(c.publish('js.qfull', 'q3'), 2000, 'q3');
    await assert.rejects(q3, (e) => e instanceof AetherError && e.code === 'QUEUE_FULL');
    assert.equal(c.pending, 3); // the refused one took no place, and pushed none out
    await within(c.connect(), 10000, 'connect');
    assert.deepEqual((await within(Promise.all(queued), 10000, 'acks')).map((a) => a.offset), [1, 2, 3]);
    assert.equal(c.pending, 0);
    // acked publications free their places
    assert.equal((await c.publish('js.qfull', 'q4')).offset, 4);
    await until(() => watcher.rec.messages.length === 4);
    assert.deepEqual(watcher.rec.messages.map((m) => m.content), ['q0', 'q1', 'q2', 'q4']);
    await Promise.all([c.close(), watcher.close()]);
  });
});

describe('4029 (connection limit)', () => {
  test('the client waits long before its next attempt, then gets in once there is room', { timeout: 60000 }, async () => {
    await withServer({ RATE_LIMIT_CONNECTIONS: '1' }, async (server) => {
      const holder = makeClient(server, 'kai');
      await holder.connect();
      // initial 50 ms: after an ordinary drop the next attempt comes within 50 ms; after a
      // 4029 the backoff starts at its 6th step (50 * 2**5 = 1.6 s, at least 0.8 s with jitter)
      const over = clientAt(server.url, mintToken('kai'), { backoff: { initial: 50, max: 2000, factor: 2, jitter: 0.5 } });
      const opened = over.connect();
      opened.catch(() => {}); // awaited below; a failure before that must not go unhandled
      await until(() => over.rec.states.some(([s]) => s === 'reconnecting'), 10000, 'the 4029');
      assert.equal(over.lastCloseCode, 4029);
      assert.ok(over.attempts >= 6, `attempts ${over.attempts}`);
      assert.deepEqual(over.rec.errors.map((e) => e.code), ['CONNECTION_LIMIT']);
      const refusedAt = over.rec.states.find(([s]) => s === 'reconnecting')[1];
      await until(() => over.rec.made.length >= 2, 10000, 'a second attempt');
      // both times taken in the client's own callbacks: the gap is its backoff, never less
      assert.ok(over.rec.made[1] - refusedAt >= 750, `next attempt after ${over.rec.made[1] - refusedAt} ms`);
      await holder.close();
      await within(opened, 20000, 'connect once there is room');
      assert.equal(over.state, 'open');
      assert.equal(over.attempts, 0);
      await over.close();
    });
  });
});

// The JS client against a real aether-fast server (node --test).
import assert from 'node:assert/strict';
import net from 'node:net';
import { after, before, describe, test } from 'node:test';

import { AetherClient, AetherError, ClientClosed, tokenExpiry } from '../aether-client.js';
import {
  disposeClean,
  makeClient,
  mintToken,
  onceInOrder,
  RedisServer,
  Server,
  SlowPubSubRelay,
  sleep,
  until,
} from '../support/helpers.mjs';

describe('without a server', () => {
  test('backoff grows exponentially up to its cap, with jitter', () => {
    const c = new AetherClient('ws://127.0.0.1:1/ws', {
      WebSocketImpl: class {},
      backoff: { initial: 100, max: 1000, factor: 2, jitter: 0.5 },
    });
    for (let attempt = 1; attempt <= 10; attempt++) {
      const base = Math.min(1000, 100 * 2 ** (attempt - 1));
      const samples = Array.from({ length: 50 }, () => c.backoffDelay(attempt));
      for (const d of samples) assert.ok(d >= base / 2 && d <= base, `${attempt}: ${d}`);
      assert.ok(new Set(samples).size > 1, 'jitter spreads the delays');
    }
    const none = new AetherClient('ws://x/ws', { WebSocketImpl: class {}, backoff: { jitter: 0 } });
    assert.deepEqual([1, 2, 3, 7, 8, 20].map((a) => none.backoffDelay(a)), [500, 1000, 2000, 30000, 30000, 30000]);
  });

  test('tokenExpiry reads exp without verifying', () => {
    const tok = mintToken('a', { ttl: 100 });
    assert.ok(Math.abs(tokenExpiry(tok) - (Date.now() / 1000 + 100)) < 5);
    assert.equal(tokenExpiry('garbage'), null);
  });

  test('no WebSocket at all is a clear error', () => {
    const saved = globalThis.WebSocket;
    try {
      globalThis.WebSocket = undefined;
      assert.throws(() => new AetherClient('ws://x/ws'), /WebSocketImpl/);
    } finally {
      globalThis.WebSocket = saved;
    }
  });
});

describe('against a server', () => {
  let server;
  before(async () => {
    server = await new Server({ RATE_LIMIT_MESSAGES: '100000' }).start();
  });
  after(() => disposeClean(server));

  test('connect, join, publish: acks with offsets, fan-out in order', async () => {
    const alice = makeClient(server, 'alice', { clientId: 'js-a', channels: ['js.basic'] });
    const bob = makeClient(server, 'bob', { clientId: 'js-b', channels: ['js.basic'] });
    await Promise.all([alice.connect(), bob.connect()]);
    assert.equal(alice.state, 'open');
    assert.equal(alice.userId, 'alice');
    const sent = Array.from({ length: 20 }, (_, i) => `m${i}`);
    const acks = [];
    for (const text of sent) acks.push(await alice.publish('js.basic', text));
    assert.deepEqual(acks.map((a) => a.offset), Array.from({ length: 20 }, (_, i) => i + 1));
    assert.equal(new Set(acks.map((a) => a.sequence)).size, 20);
    await until(() => bob.rec.messages.length === 20);
    onceInOrder(bob.rec.messages.map((m) => m.content), sent);
    const first = bob.rec.messages[0];
    assert.deepEqual([first.userId, first.clientId, first.offset, first.replayed], ['alice', 'js-a', 1, false]);
    assert.deepEqual(bob.position('js.basic').offset, 20);
    assert.deepEqual(alice.rec.messages, []); // no echo by default
    await Promise.all([alice.close(), bob.close()]);
    assert.equal(bob.rec.states.at(-1), 'closed');
  });

  test('publications made before connecting are queued and sent in order', async () => {
    const bob = makeClient(server, 'bob', { channels: ['js.queue'] });
    await bob.connect();
    const alice = makeClient(server, 'alice', { channels: ['js.queue'] });
    const acks = ['q0', 'q1', 'q2'].map((t) => alice.publish('js.queue', t));
    assert.equal(alice.pending, 3);
    await alice.connect();
    assert.deepEqual((await Promise.all(acks)).map((a) => a.offset), [1, 2, 3]);
    await until(() => bob.rec.messages.length === 3);
    assert.deepEqual(bob.rec.messages.map((m) => m.content), ['q0', 'q1', 'q2']);
    await Promise.all([alice.close(), bob.close()]);
  });

  test('join, leave, refusals', async () => {
    const c = makeClient(server, 'erin', { channels: ['js.jl1'] });
    await c.connect();
    const joined = await c.join('js.jl2');
    assert.deepEqual([joined.channel, joined.offset, joined.recovered], ['js.jl2', 0, null]);
    await c.leave('js.jl2');
    assert.deepEqual(c.channels, ['js.jl1']);
    await assert.rejects(c.publish('js.jl2', 'x'), (e) => e instanceof AetherError && e.code === 'NOT_A_MEMBER');
    assert.equal(c.pending, 0);
    await c.close();

    const limited = makeClient(server, null, { token: mintToken('frank', { channels: ['js.ok.*'] }) });
    await limited.connect();
    await assert.rejects(limited.join('js.other'), (e) => e.code === 'FORBIDDEN');
    assert.ok(!limited.channels.includes('js.other'));
    assert.equal((await limited.join('js.ok.1')).channel, 'js.ok.1');
    await limited.close();
  });

  test('a dropped socket: missed messages are recovered with since/epoch', async () => {
    const alice = makeClient(server, 'alice', { channels: ['js.rec'] });
    // a slow first reconnect, so bob misses messages while away
    const bob = makeClient(server, 'bob', { channels: ['js.rec'], backoff: { initial: 600, max: 600, jitter: 0 } });
    await Promise.all([alice.connect(), bob.connect()]);
    await alice.publish('js.rec', 'before');
    await until(() => bob.rec.messages.length === 1);
    bob.ws.terminate(); // the network drops (no close frame)
    await until(() => bob.state === 'reconnecting');
    for (let i = 0; i < 5; i++) await alice.publish('js.rec', `missed${i}`);
    await bob.connect();
    await alice.publish('js.rec', 'after');
    await until(() => bob.rec.messages.length === 7);
    onceInOrder(
      bob.rec.messages.map((m) => m.content),
      ['before', 'missed0', 'missed1', 'missed2', 'missed3', 'missed4', 'after'],
    );
    assert.deepEqual(bob.rec.messages.map((m) => m.replayed), [false, true, true, true, true, true, false]);
    const last = bob.rec.joins.at(-1);
    assert.deepEqual([last.recovered, last.newEpoch, last.offset], [true, false, 6]);
    await Promise.all([alice.close(), bob.close()]);
  });

  test('unacked messages are resent with retry after a reconnect: none lost, none doubled', async () => {
    // alice talks through a relay that records the frames both ways: the retries are on
    // the wire and the server acks each once
    const tap = await wireTap(server.port);
    const bob = makeClient(server, 'bob', { channels: ['js.retry'] });
    const alice = makeClient({ url: tap.url }, 'alice', { clientId: 'js-retry', channels: ['js.retry'] });
    try {
      await Promise.all([alice.connect(), bob.connect()]);
      const sent = Array.from({ length: 200 }, (_, i) => `r${i}`);
      const acks = sent.map((t) => alice.publish('js.retry', t));
      alice.reconnect(); // the socket goes while acks are on their way
      const got = await Promise.all(acks);
      const offsets = got.map((a) => a.offset).sort((a, b) => a - b);
      assert.deepEqual(offsets, Array.from({ length: 200 }, (_, i) => i + 1));
      await until(() => bob.rec.messages.length >= 200);
      await sleep(200);
      onceInOrder(bob.rec.messages.map((m) => m.content), sent);
      await Promise.all([alice.close(), bob.close()]);
      assertRetriedAndAckedOnce(tap.connections, new Map(got.map((a) => [a.sequence, a.offset])));
    } finally {
      tap.close();
    }
  });

  test('too large publications are refused and hold nothing up', { timeout: 30000 }, async () => {
    // MESSAGE_TOO_LARGE names no publication: it is tied to the oldest one out over `limit`;
    // more of them than the window (8) do not stop the publications behind them
    const c = makeClient(server, 'ivy', { channels: ['js.big'] });
    await c.connect();
    const big = Array.from({ length: 10 }, () => c.publish('js.big', 'x'.repeat(70000)));
    const settled = Promise.allSettled(big);
    assert.equal((await c.publish('js.big', 'small')).offset, 1);
    for (const r of await settled) {
      assert.equal(r.status, 'rejected');
      assert.equal(r.reason.code, 'MESSAGE_TOO_LARGE');
      assert.equal(r.reason.details.limit, 65536);
    }
    assert.equal(c.pending, 0);
    await c.close();
  });

  test('no reconnect after 4001 unless a new token is supplied', async () => {
    const bad = makeClient(server, null, { token: 'not-a-jwt' });
    await assert.rejects(bad.connect(), (e) => e instanceof ClientClosed && e.closeCode === 4001);
    assert.equal(bad.state, 'closed');
    assert.deepEqual(bad.rec.errors.map((e) => e.code), ['AUTH_INVALID']);
    await sleep(300);
    assert.equal(bad.rec.states.filter((s) => s === 'connecting').length, 1);
    await assert.rejects(bad.publish('x', 'y'), ClientClosed);
    bad.setToken(mintToken('alice'));
    await bad.connect();
    assert.equal(bad.userId, 'alice');
    await bad.close();

    let calls = 0;
    const refreshed = makeClient(server, null, {
      token: mintToken('gina', { ttl: -60 }),
      tokenRefresh: async () => {
        calls += 1;
        return mintToken('gina');
      },
    });
    await refreshed.connect();
    assert.deepEqual([refreshed.userId, calls], ['gina', 1]);
    await refreshed.close();
  });

  test('the token is refreshed before it expires, on the same connection', async () => {
    let calls = 0;
    const c = makeClient(server, null, {
      token: mintToken('hana', { ttl: 3 }),
      tokenRefresh: () => {
        calls += 1;
        return mintToken('hana', { ttl: 3600 });
      },
      refreshBeforeMs: 1500,
      channels: ['js.tok'],
    });
    await c.connect();
    await sleep(4500); // past the first token's exp
    assert.equal(calls, 1);
    assert.equal(c.state, 'open');
    assert.equal(c.rec.states.filter((s) => s === 'open').length, 1); // never reconnected
    assert.equal((await c.publish('js.tok', 'still here')).offset, 1);
    await c.close();
  });
});

describe('server restart', () => {
  test('mid-stream: both clients reconnect, nothing lost, nothing doubled', async () => {
    const server = await new Server({ RATE_LIMIT_MESSAGES: '100000' }).start();
    try {
      const alice = makeClient(server, 'alice', { clientId: 'js-alice', channels: ['js.restart'] });
      const bob = makeClient(server, 'bob', { clientId: 'js-bob', channels: ['js.restart'] });
      await Promise.all([alice.connect(), bob.connect()]);
      const sent = [];
      const acks = [];
      const stream = (async () => {
        for (let i = 0; i < 300; i++) {
          sent.push(`s${i}`);
          acks.push(alice.publish('js.restart', `s${i}`));
          await sleep(10);
        }
      })();
      await sleep(800);
      await server.restart();
      await stream;
      await Promise.all(acks);
      await until(() => bob.rec.messages.length >= 300, 30000, 'all 300 at bob');
      await sleep(300);
      onceInOrder(bob.rec.messages.map((m) => m.content), sent);
      assert.ok(bob.rec.states.includes('reconnecting'));
      assert.ok(bob.rec.joins.some((j) => j.newEpoch), JSON.stringify(bob.rec.joins));
      await Promise.all([alice.close(), bob.close()]);
      assert.deepEqual(server.errors(), []);
    } finally {
      await server.dispose();
    }
  });
});


describe('a small budget (RATE_LIMIT_MESSAGES 5 per 2 s: 10 strikes, refilled at 7.5 a second, close with 1008)', () => {
  let server;
  before(async () => {
    server = await new Server({ RATE_LIMIT_MESSAGES: '5', RATE_LIMIT_WINDOW_S: '2' }).start();
  });
  after(async () => {
    const errors = server.errors();
    const floodCloses = server.log().split('\n').filter((line) => line.includes('rate_limit_close'));
    await server.dispose();
    assert.deepEqual(errors, []);
    assert.deepEqual(floodCloses, [], 'no connection was closed as a flood');
  });

  async function members(channels) {
    const token = mintToken('root', { admin: true });
    return Promise.all(
      channels.map(async (name) => {
        const res = await fetch(`http://127.0.0.1:${server.port}/ws/channels/${name}`, {
          headers: { Authorization: `Bearer ${token}` },
        });
        return res.status === 200 ? (await res.json()).members : -1;
      }),
    );
  }

  test('more channels than the budget: joined, and rejoined after a drop, paced and retried', { timeout: 60000 }, async () => {
    const channels = Array.from({ length: 12 }, (_, i) => `js.many.${i}`);
    const c = makeClient(server, 'alice', { clientId: 'js-many', channels });
    await c.connect();
    assert.deepEqual(c.rec.joins.map((j) => j.channel).sort(), [...channels].sort());
    assert.deepEqual(await members(channels), Array(12).fill(1));
    c.ws.terminate(); // the network drops; the budget is still spent
    await until(() => c.rec.states.filter((s) => s === 'open').length === 2, 30000, 'reopened');
    const again = c.rec.joins.slice(12);
    assert.deepEqual(again.map((j) => j.channel).sort(), [...channels].sort());
    assert.ok(again.every((j) => j.recovered === true), JSON.stringify(again));
    assert.deepEqual(await members(channels), Array(12).fill(1));
    assert.deepEqual(c.rec.errors, []); // refusals were retried, not reported
    assert.equal(c.rec.states.filter((s) => s === 'reconnecting').length, 1); // only our drop
    await c.close();
  });

  test('a burst bigger than the budget: every message acked and delivered once', { timeout: 60000 }, async () => {
    const bob = makeClient(server, 'bob', { channels: ['js.burst'] });
    const alice = makeClient(server, 'alice2', { clientId: 'js-burst', channels: ['js.burst'] });
    await Promise.all([alice.connect(), bob.connect()]);
    const sent = Array.from({ length: 20 }, (_, i) => `b${i}`);
    const acks = await Promise.all(sent.map((t) => alice.publish('js.burst', t)));
    assert.deepEqual(acks.map((a) => a.offset).sort((a, b) => a - b), Array.from({ length: 20 }, (_, i) => i + 1));
    assert.equal(new Set(acks.map((a) => a.sequence)).size, 20);
    await until(() => bob.rec.messages.length >= 20, 10000, 'all 20 at bob');
    await sleep(300);
    assert.deepEqual(bob.rec.messages.map((m) => m.content).sort(), [...sent].sort()); // each once
    assert.equal(alice.rec.states.filter((s) => s === 'open').length, 1); // never dropped
    assert.deepEqual(alice.rec.errors, []);
    await Promise.all([alice.close(), bob.close()]);
  });
});

// -- a relay that records the WebSocket text messages crossing it ------------------------------

/** Relay 127.0.0.1:<port> to the server; each connection's JSON text messages are kept in
 * `up` (client to server) and `down` (server to client, also what the server wrote after the
 * client had gone). It skips the HTTP upgrade, then parses frames (the server negotiates no
 * compression). Setting a connection's `stalled` makes the network lose what its client
 * sends from then on (recorded in `up`, never passed on). Same as
 * tests/integration/wiretap.py. */
async function wireTap(targetPort) {
  const connections = [];
  const sockets = new Set();
  const listener = net.createServer((client) => {
    const upstream = net.connect(targetPort, '127.0.0.1');
    const tapped = { up: [], down: [], stalled: false };
    connections.push(tapped);
    for (const [src, dst, out] of [[client, upstream, tapped.up], [upstream, client, tapped.down]]) {
      sockets.add(src);
      const parse = frameParser(out);
      src.on('data', (data) => {
        parse(data);
        if (out === tapped.up && tapped.stalled) return;
        if (!dst.destroyed) dst.write(data);
      });
      src.on('end', () => dst.end());
      src.on('error', () => dst.destroy());
      src.on('close', () => sockets.delete(src));
    }
  });
  await new Promise((resolve) => listener.listen(0, '127.0.0.1', resolve));
  return {
    url: `ws://127.0.0.1:${listener.address().port}/ws`,
    connections,
    close() {
      listener.close();
      for (const s of sockets) s.destroy();
    },
  };
}

function frameParser(out) {
  let buf = Buffer.alloc(0);
  let inHead = true;
  let parts = null;
  return (data) => {
    buf = Buffer.concat([buf, data]);
    if (inHead) {
      const end = buf.indexOf('\r\n\r\n');
      if (end < 0) return;
      buf = buf.subarray(end + 4);
      inHead = false;
    }
    for (;;) {
      if (buf.length < 2) return;
      const fin = (buf[0] & 0x80) !== 0;
      const opcode = buf[0] & 0x0f;
      const masked = (buf[1] & 0x80) !== 0;
      let length = buf[1] & 0x7f;
      let pos = 2;
      if (length === 126) {
        if (buf.length < 4) return;
        length = buf.readUInt16BE(2);
        pos = 4;
      } else if (length === 127) {
        if (buf.length < 10) return;
        length = Number(buf.readBigUInt64BE(2));
        pos = 10;
      }
      const maskAt = pos;
      if (masked) pos += 4;
      if (buf.length < pos + length) return;
      const payload = Buffer.from(buf.subarray(pos, pos + length));
      if (masked) for (let i = 0; i < length; i++) payload[i] ^= buf[maskAt + (i % 4)];
      buf = buf.subarray(pos + length);
      if (opcode === 0x1) parts = [payload];
      else if (opcode === 0x0 && parts) parts.push(payload);
      else continue; // binary, ping, pong, close
      if (fin) {
        out.push(JSON.parse(Buffer.concat(parts).toString('utf8')));
        parts = null;
      }
    }
  };
}

/** The first socket carried `send`s, the next one `retry`s of some of those sequences, each
 * acked once by the server with the offset the client reported (the original one when the
 * server had already published it on the first socket). */
function assertRetriedAndAckedOnce(connections, final) {
  assert.ok(connections.length >= 2, `${connections.length} connection(s)`);
  const pubs = (msgs, action) =>
    msgs.filter((m) => m.type === 'message' && m.action === action).map((m) => m.data.metadata.sequence);
  const acks = (msgs) =>
    msgs.filter((m) => m.type === 'message' && m.action === 'ack').map((m) => m.data.metadata);
  const [first, second] = connections;
  const sentFirst = new Set(pubs(first.up, 'send'));
  assert.ok(sentFirst.size > 0 && pubs(first.up, 'retry').length === 0);
  const retried = pubs(second.up, 'retry');
  assert.ok(retried.length > 0, 'no retry on the second socket');
  assert.equal(new Set(retried).size, retried.length);
  for (const seq of retried) assert.ok(sentFirst.has(seq), `retry of ${seq} never sent before`);
  for (const seq of pubs(second.up, 'send')) assert.ok(!sentFirst.has(seq), `send of ${seq} again`);
  const firstAcks = new Map(acks(first.down).map((a) => [a.sequence, a.offset]));
  const secondAcks = acks(second.down);
  for (const seq of retried) {
    const got = secondAcks.filter((a) => a.sequence === seq).map((a) => a.offset);
    assert.deepEqual(got, [final.get(seq)], `acks of ${seq}`);
    if (firstAcks.has(seq)) assert.equal(firstAcks.get(seq), final.get(seq), `offset of ${seq}`);
  }
}

describe('budget refusals that used to jam the client', () => {
  async function withServer(env, body) {
    const server = await new Server(env).start();
    try {
      await body(server);
    } finally {
      const errors = server.errors();
      const floodCloses = server.log().split('\n').filter((line) => line.includes('rate_limit_close'));
      await server.dispose();
      assert.deepEqual(errors, []);
      assert.deepEqual(floodCloses, [], 'no connection was closed as a flood');
    }
  }

  test('too large publications on an empty budget hold nothing up', { timeout: 30000 }, async () => {
    // 3 per 3 s: the join and two publications spend it; the eight oversized ones after (the
    // whole window) are refused MESSAGE_TOO_LARGE all the same, and the last one is acked
    await withServer({ RATE_LIMIT_MESSAGES: '3', RATE_LIMIT_WINDOW_S: '3' }, async (server) => {
      const c = makeClient(server, 'ann', { channels: ['js.bigempty'] });
      await c.connect();
      const small = [c.publish('js.bigempty', 's0'), c.publish('js.bigempty', 's1')];
      const big = Promise.allSettled(Array.from({ length: 8 }, () => c.publish('js.bigempty', 'x'.repeat(70000))));
      const last = c.publish('js.bigempty', 'last');
      const ack = await Promise.race([last, sleep(15000).then(() => null)]);
      assert.ok(ack, 'the publication after the oversized ones was not acked within 15 s');
      assert.equal(ack.offset, 3);
      assert.deepEqual((await Promise.all(small)).map((a) => a.offset), [1, 2]);
      for (const r of await big) {
        assert.equal(r.status, 'rejected');
        assert.equal(r.reason.code, 'MESSAGE_TOO_LARGE');
      }
      assert.equal(c.pending, 0);
      await c.close();
    });
  });

  test('a leave refused by the budget is sent again', { timeout: 30000 }, async () => {
    // 2 per 4 s: the join and a publication spend it; the leave is refused, then sent again
    await withServer({ RATE_LIMIT_MESSAGES: '2', RATE_LIMIT_WINDOW_S: '4' }, async (server) => {
      const c = makeClient(server, 'ann', { channels: ['js.leave'] });
      await c.connect();
      await c.publish('js.leave', 's1');
      const left = await Promise.race([c.leave('js.leave').then(() => true), sleep(15000).then(() => false)]);
      assert.ok(left, 'leave() did not return within 15 s');
      assert.deepEqual(c.channels, []);
      const res = await fetch(`http://127.0.0.1:${server.port}/ws/channels/js.leave`, {
        headers: { Authorization: `Bearer ${mintToken('root', { admin: true })}` },
      });
      assert.ok(res.status === 404 || (await res.json()).members === 0);
      assert.deepEqual(c.rec.errors, []); // the refusal was retried, not reported
      await c.close();
    });
  });
});

describe('with Redis: acks before copies (docs/protocol.md §7)', () => {
  // Redis behind a relay that delays its pub/sub: an ack (the publish's reply) beats its own
  // copy and the copies of lower offsets, which come back through pub/sub
  let redis;
  let db = 0;
  before(async () => {
    redis = await new RedisServer().start();
  });
  after(async () => {
    await redis.dispose();
  });

  async function withRelay(delayMs, env, body, expectedErrors = []) {
    const relay = await new SlowPubSubRelay(redis.port, delayMs).start();
    const server = await new Server({ BROKER_URL: relay.url(db++), RATE_LIMIT_MESSAGES: '100000', ...env }).start();
    try {
      await body(server, relay);
    } finally {
      const errors = server.errors().filter((line) => !expectedErrors.some((e) => line.includes(`"${e}"`)));
      await server.dispose();
      relay.close();
      assert.deepEqual(errors, []);
    }
  }

  test('echo on, two members, 20 channels: every copy, own and other, once, in order', { timeout: 60000 }, async () => {
    await withRelay(150, {}, async (server) => {
      const channels = Array.from({ length: 20 }, (_, i) => `js.race.${i}`);
      const rounds = 4;
      const acked = { a: new Set(), b: new Set() };
      const top = new Map(); // "member|channel" -> highest offset acked
      const beaten = { own: 0, lower: 0 };
      const members = {};
      for (const me of ['a', 'b']) {
        members[me] = makeClient(server, `race-${me}`, { clientId: `js-race-${me}`, channels, echo: true });
        members[me].on('message', (m) => {
          if (acked[me].has(m.content)) beaten.own += 1;
          else if (m.offset < (top.get(`${me}|${m.channel}`) ?? 0)) beaten.lower += 1;
        });
      }
      const { a, b } = members;
      await Promise.all([a.connect(), b.connect()]);
      const acks = [];
      for (let r = 0; r < rounds; r++) {
        for (const ch of channels) {
          for (const [me, c] of [['a', a], ['b', b]]) {
            const content = `${me}:${ch}:${r}`;
            acks.push(
              c.publish(ch, content).then((ack) => {
                acked[me].add(content);
                const key = `${me}|${ch}`;
                top.set(key, Math.max(top.get(key) ?? 0, ack.offset));
              }),
            );
          }
        }
      }
      await Promise.all(acks);
      const total = 2 * rounds * channels.length;
      await until(() => a.rec.messages.length >= total && b.rec.messages.length >= total, 20000, 'every copy').catch(() => {});
      await sleep(300); // a double would show
      const want = Array.from({ length: 2 * rounds }, (_, i) => i + 1);
      for (const [me, c] of [['a', a], ['b', b]]) {
        for (const ch of channels) {
          const offsets = c.rec.messages.filter((m) => m.channel === ch).map((m) => m.offset);
          assert.deepEqual(offsets, want, `${me} on ${ch}: lost or doubled`);
          assert.equal(c.position(ch).offset, 2 * rounds);
        }
      }
      // the races this test is about did happen
      assert.ok(beaten.own > 0 && beaten.lower > 0, JSON.stringify(beaten));
      await Promise.all([a.close(), b.close()]);
    });
  });

  test('echo off: the position passes its own offsets, a recovery replays none of them', { timeout: 60000 }, async () => {
    await withRelay(150, {}, async (server) => {
      const channels = Array.from({ length: 5 }, (_, i) => `js.quiet.${i}`);
      const rounds = 4;
      const tap = await wireTap(server.port);
      try {
        const a = makeClient({ url: tap.url }, 'quiet-a', { clientId: 'js-quiet-a', channels });
        const b = makeClient(server, 'quiet-b', { clientId: 'js-quiet-b', channels });
        await Promise.all([a.connect(), b.connect()]);
        const acks = [];
        for (let r = 0; r < rounds; r++) {
          for (const ch of channels) for (const [who, c] of [['a', a], ['b', b]]) acks.push(c.publish(ch, `${who}:${ch}:${r}`));
        }
        await Promise.all(acks);
        const theirs = channels.flatMap((ch) => Array.from({ length: rounds }, (_, r) => `b:${ch}:${r}`)).sort();
        await until(() => a.rec.messages.length >= theirs.length, 20000, 'the other member’s messages');
        const epochs = {};
        for (const ch of channels) {
          const pos = a.position(ch);
          assert.equal(pos.offset, 2 * rounds, `${ch}: ${JSON.stringify(pos)}`);
          epochs[ch] = pos.epoch;
        }
        a.reconnect();
        await until(() => a.rec.joins.length === 2 * channels.length, 20000, 'rejoined');
        await sleep(300); // a replayed message would show
        assert.ok(a.rec.joins.slice(channels.length).every((j) => j.recovered === true), JSON.stringify(a.rec.joins));
        assert.deepEqual(a.rec.messages.map((m) => m.content).sort(), theirs); // once each, none of its own
        assert.equal(tap.connections.length, 2);
        const [, second] = tap.connections;
        const since = Object.fromEntries(
          second.up
            .filter((m) => m.type === 'connection' && m.action === 'connect')
            .map((m) => [m.data.channel, [m.data.since, m.data.epoch]]),
        );
        assert.deepEqual(since, Object.fromEntries(channels.map((ch) => [ch, [2 * rounds, epochs[ch]]])));
        assert.deepEqual(second.down.filter((m) => m.type === 'message' && m.action === 'send'), []);
        await Promise.all([a.close(), b.close()]);
      } finally {
        tap.close();
      }
    });
  });

  /** b publishes on `ch` three messages that a gets, then five (offsets 4 to 8) while the
   * server's Redis subscriber is cut, which never reach a, then more until one reaches a above
   * that gap: a's position stays 3. Returns what b sent. */
  async function openAGap(relay, a, b, ch) {
    const sent = Array.from({ length: 8 }, (_, i) => `m${i}`);
    for (const t of sent.slice(0, 3)) await b.publish(ch, t);
    await until(() => a.rec.messages.length === 3);
    relay.cutSubscribers();
    const missed = [];
    for (const t of sent.slice(3, 8)) missed.push((await b.publish(ch, t)).offset);
    assert.deepEqual(missed, [4, 5, 6, 7, 8]);
    relay.refusing = false;
    // the server subscribes again: what it publishes now comes, above the gap
    while (a.rec.messages.length === 3) {
      sent.push(`m${sent.length}`);
      await b.publish(ch, sent.at(-1));
      await sleep(50);
    }
    assert.equal(a.position(ch).offset, 3);
    return sent;
  }

  /** b publishes `n` more messages on `ch`; a gets every message of `sent` once, in order,
   * its position is the last, the gap's five were replayed. */
  async function allComeOnce(a, b, ch, sent, n) {
    const more = Array.from({ length: n }, (_, i) => `m${sent.length + i}`);
    sent.push(...more);
    await Promise.all(more.map((t) => b.publish(ch, t)));
    await until(() => a.rec.messages.length >= sent.length, 30000, 'every message');
    await sleep(300); // a double would show
    onceInOrder([...a.rec.messages].sort((x, y) => x.offset - y.offset).map((m) => m.content), sent);
    assert.equal(a.position(ch).offset, sent.length);
    assert.deepEqual(a.rec.joins.map((j) => j.recovered), [null, true]);
    const replayed = new Set(a.rec.messages.filter((m) => m.replayed).map((m) => m.content));
    for (const t of sent.slice(3, 8)) assert.ok(replayed.has(t), `${t} replayed`);
  }

  test('a gap on a live socket (the server’s subscriber cut) is asked for again', { timeout: 60000 }, async () => {
    await withRelay(
      20,
      { HISTORY_SIZE: '5000' },
      async (server, relay) => {
        const a = makeClient(server, 'gap-a', { clientId: 'js-gap-a', channels: ['js.gap'] });
        const b = makeClient(server, 'gap-b', { clientId: 'js-gap-b', channels: ['js.gap'] });
        await Promise.all([a.connect(), b.connect()]);
        const sent = await openAGap(relay, a, b, 'js.gap');
        await allComeOnce(a, b, 'js.gap', sent, 1024 + 20); // GAP_WINDOW + 20 above the gap
        assert.equal(a.rec.states.filter((s) => s === 'open').length, 1); // no reconnect
        await Promise.all([a.close(), b.close()]);
      },
      ['broker_degraded'],
    );
  });

  test('a gap whose join with since goes unanswered is recovered by a reconnect', { timeout: 60000 }, async () => {
    await withRelay(
      20,
      { HISTORY_SIZE: '5000' },
      async (server, relay) => {
        const tap = await wireTap(server.port);
        try {
          const a = makeClient({ url: tap.url }, 'gap-a', { clientId: 'js-gap2-a', channels: ['js.gap2'] });
          const b = makeClient(server, 'gap-b', { clientId: 'js-gap2-b', channels: ['js.gap2'] });
          await Promise.all([a.connect(), b.connect()]);
          const sent = await openAGap(relay, a, b, 'js.gap2');
          tap.connections[0].stalled = true; // the server hears nothing more of a's first socket
          await allComeOnce(a, b, 'js.gap2', sent, 2 * 1024 + 20); // twice GAP_WINDOW + 20
          assert.equal(a.rec.states.filter((s) => s === 'open').length, 2); // one reconnect
          // the first join, the join with since that was lost, the reconnect's join
          const since = tap.connections
            .slice(0, 2)
            .flatMap((c) => c.up.filter((m) => m.type === 'connection' && m.action === 'connect'))
            .map((m) => m.data.since ?? null);
          assert.deepEqual(since, [null, 3, 3]);
          await Promise.all([a.close(), b.close()]);
        } finally {
          tap.close();
        }
      },
      ['broker_degraded'],
    );
  });
});

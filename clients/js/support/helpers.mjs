// Test helpers: a real aether-fast server process, HS256 tokens, and small waits.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { mkdtempSync, openSync, readFileSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import WebSocket from 'ws';

import { AetherClient } from '../aether-client.js';

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const ROOT = path.resolve(HERE, '../../..');
const PYTHON = process.env.AETHER_PYTHON || path.join(ROOT, '.venv/bin/python');
export const SECRET = 'js-test-secret-js-test-secret-0123456789';

/** Fast reconnects for tests (the default starts at 500 ms and caps at 30 s). */
export const FAST = { initial: 50, max: 500, factor: 2, jitter: 0.5 };

export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

function b64url(buf) {
  return Buffer.from(buf).toString('base64').replace(/=+$/, '').replace(/\+/g, '-').replace(/\//g, '_');
}

/** An HS256 JWT signed with the test secret. */
export function mintToken(sub, { ttl = 3600, secret = SECRET, ...claims } = {}) {
  const now = Math.floor(Date.now() / 1000);
  const head = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const body = b64url(JSON.stringify({ sub, iat: now, exp: now + ttl, ...claims }));
  const sig = b64url(createHmac('sha256', secret).update(`${head}.${body}`).digest());
  return `${head}.${body}.${sig}`;
}

function canConnect(port) {
  return new Promise((resolve) => {
    const sock = net.connect(port, '127.0.0.1');
    sock.once('connect', () => {
      sock.destroy();
      resolve(true);
    });
    sock.once('error', () => resolve(false));
  });
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export async function until(cond, timeoutMs = 10000, what = 'condition') {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`${what} not met within ${timeoutMs} ms`);
    await sleep(20);
  }
}

/** `aether-fast serve` on free ports with its own DATA_DIR; stop/start/restart keep the port. */
export class Server {
  constructor(env = {}) {
    this.extraEnv = env;
    this.dir = mkdtempSync(path.join(tmpdir(), 'aether-js-'));
    this.logPath = path.join(this.dir, 'server.log');
    this.proc = null;
  }

  get url() {
    return `ws://127.0.0.1:${this.port}/ws`;
  }

  async start() {
    if (!this.port) {
      this.port = await freePort();
      this.metricsPort = await freePort();
    }
    const log = openSync(this.logPath, 'a');
    this.proc = spawn(PYTHON, ['-m', 'aether_fast', 'serve'], {
      cwd: this.dir,
      env: {
        ...process.env,
        PYTHONPATH: ROOT,
        WS_HOST: '127.0.0.1',
        WS_PORT: String(this.port),
        METRICS_PORT: String(this.metricsPort),
        JWT_SECRET: SECRET,
        DATA_DIR: path.join(this.dir, 'data'),
        LOG_LEVEL: 'info',
        ...this.extraEnv,
      },
      stdio: ['ignore', log, log],
    });
    const exited = new Promise((resolve) => this.proc.once('exit', (code) => resolve(code)));
    this.exited = exited;
    const deadline = Date.now() + 15000;
    while (Date.now() < deadline) {
      if (this.proc.exitCode !== null) throw new Error(`server exited: ${this.log()}`);
      if (await canConnect(this.port)) return this;
      await sleep(50);
    }
    throw new Error(`server did not start: ${this.log()}`);
  }

  async stop() {
    if (!this.proc || this.proc.exitCode !== null) return this.proc?.exitCode;
    this.proc.kill('SIGTERM');
    const code = await Promise.race([this.exited, sleep(15000).then(() => 'timeout')]);
    if (code === 'timeout') {
      this.proc.kill('SIGKILL');
      await this.exited;
    }
    return code;
  }

  async restart() {
    const code = await this.stop();
    if (code !== 0) throw new Error(`server stopped with ${code}: ${this.log()}`);
    await this.start();
  }

  log() {
    try {
      return readFileSync(this.logPath, 'utf8');
    } catch {
      return '';
    }
  }

  /** Error-level lines of the server's JSON log (a crash in the server). */
  errors() {
    return this.log()
      .split('\n')
      .filter(Boolean)
      .filter((line) => {
        try {
          return JSON.parse(line).level === 'error';
        } catch {
          return true;
        }
      });
  }

  async dispose() {
    await this.stop();
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** Dispose of `server`, then fail if it logged errors while it ran. */
export async function disposeClean(server) {
  const errors = server.errors();
  await server.dispose();
  assert.deepEqual(errors, []);
}

/** A client on the ws package with fast backoff, recording what it is given. */
export function makeClient(server, sub, options = {}) {
  const client = new AetherClient(server.url, {
    token: sub === null ? undefined : mintToken(sub),
    WebSocketImpl: WebSocket,
    backoff: FAST,
    ...options,
  });
  const rec = { messages: [], states: [], joins: [], errors: [], system: [] };
  client.on('message', (m) => rec.messages.push(m));
  client.on('state', (s) => rec.states.push(s));
  client.on('join', (j) => rec.joins.push(j));
  client.on('error', (e) => rec.errors.push(e));
  client.on('system', (s) => rec.system.push(s));
  client.rec = rec;
  return client;
}

/** Every item of `sent` arrived once, in order. */
export function onceInOrder(got, sent) {
  const counts = new Map();
  for (const c of got) counts.set(c, (counts.get(c) ?? 0) + 1);
  const doubled = [...counts].filter(([, n]) => n > 1).map(([c]) => c);
  if (doubled.length) throw new Error(`delivered twice: ${doubled.slice(0, 5)}`);
  const missing = sent.filter((c) => !counts.has(c));
  if (missing.length) throw new Error(`lost ${missing.length}: ${missing.slice(0, 5)}`);
  if (JSON.stringify(got) !== JSON.stringify(sent)) throw new Error('out of order');
}

/** A redis-server of its own on a free port (no persistence), stopped by its PID. A missing
 * redis-server fails the tests that need it: they are not skipped. */
export class RedisServer {
  constructor() {
    this.dir = mkdtempSync(path.join(tmpdir(), 'aether-js-redis-'));
    this.proc = null;
  }

  url(db = 0) {
    return `redis://127.0.0.1:${this.port}/${db}`;
  }

  async start() {
    this.port = await freePort();
    const args = ['--port', String(this.port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'];
    this.proc = spawn('redis-server', [...args, '--dir', this.dir], { stdio: 'ignore' });
    const failed = new Promise((_, reject) =>
      this.proc.once('error', (err) => reject(new Error(`redis-server (apt-get install redis-server): ${err.message}`))),
    );
    const ready = (async () => {
      const deadline = Date.now() + 10000;
      while (!(await canConnect(this.port))) {
        if (Date.now() > deadline) throw new Error('redis-server did not start');
        await sleep(20);
      }
    })();
    await Promise.race([ready, failed]);
    return this;
  }

  async dispose() {
    if (this.proc && this.proc.exitCode === null) {
      const gone = new Promise((resolve) => this.proc.once('exit', resolve));
      this.proc.kill('SIGKILL');
      await gone;
    }
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/**
 * A TCP relay to a redis-server that makes its pub/sub slow: what Redis sends to a
 * subscriber connection reaches the server `delayMs` late (in order, nothing dropped);
 * publishes and their replies (the acks) pass at once. So acks beat the copies they
 * acknowledge, and copies of lower offsets, as they may with Redis (docs/protocol.md §7).
 * A connection is a subscriber from its first SUBSCRIBE. `cutSubscribers()` closes those
 * and refuses new connections until `refusing` is false again: what is published meanwhile
 * never reaches the server's members (a gap on their live sockets).
 * Same as tests/integration/slow_pubsub.py.
 */
export class SlowPubSubRelay {
  constructor(targetPort, delayMs = 150) {
    this.targetPort = targetPort;
    this.delayMs = delayMs;
    this.refusing = false;
    this.links = new Set();
  }

  url(db = 0) {
    return `redis://127.0.0.1:${this.port}/${db}`;
  }

  async start() {
    this.listener = net.createServer((client) => this.relay(client));
    await new Promise((resolve) => this.listener.listen(0, '127.0.0.1', resolve));
    this.port = this.listener.address().port;
    return this;
  }

  relay(client) {
    if (this.refusing) {
      client.destroy();
      return;
    }
    const upstream = net.connect(this.targetPort, '127.0.0.1');
    const link = { client, upstream, subscriber: false };
    this.links.add(link);
    const late = []; // [due, data] of a subscriber, released in order
    let timer = null;
    const release = () => {
      timer = null;
      while (late.length && late[0][0] <= Date.now()) {
        const [, data] = late.shift();
        if (!client.destroyed) client.write(data);
      }
      if (late.length) timer = setTimeout(release, late[0][0] - Date.now());
    };
    let tail = '';
    client.on('data', (data) => {
      const text = tail + data.toString('latin1');
      if (!link.subscriber && text.toUpperCase().includes('SUBSCRIBE')) link.subscriber = true;
      tail = text.slice(-16);
      if (!upstream.destroyed) upstream.write(data);
    });
    upstream.on('data', (data) => {
      if (!link.subscriber) {
        if (!client.destroyed) client.write(data);
        return;
      }
      late.push([Date.now() + this.delayMs, data]);
      if (timer === null) timer = setTimeout(release, this.delayMs);
    });
    const end = () => {
      clearTimeout(timer);
      client.destroy();
      upstream.destroy();
      this.links.delete(link);
    };
    for (const s of [client, upstream]) {
      s.on('error', end);
      s.on('close', end);
    }
  }

  cutSubscribers() {
    this.refusing = true;
    for (const link of this.links) if (link.subscriber) link.client.destroy();
  }

  close() {
    this.listener.close();
    for (const link of this.links) link.client.destroy();
  }
}

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

// Peer: Node's `ws` library, the broadcast pattern of its README.
// Each connection joins the channel named by the `channel` query parameter of its URL. Every
// text message is parsed with JSON.parse, re-serialized with JSON.stringify and sent to every
// open member of the sender's channel.
// Run: node ws_app.js PORT
'use strict';

const { WebSocketServer, WebSocket } = require('ws');

const port = Number(process.argv[2]);
const channels = new Map();
const wss = new WebSocketServer({ host: '127.0.0.1', port, perMessageDeflate: false, maxPayload: 1 << 20, backlog: 4096 });

wss.on('connection', (ws, req) => {
  const name = new URL(req.url, 'http://localhost').searchParams.get('channel') || 'default';
  let members = channels.get(name);
  if (!members) {
    members = new Set();
    channels.set(name, members);
  }
  members.add(ws);
  ws.on('error', () => {});
  ws.on('close', () => members.delete(ws));
  ws.on('message', (data, isBinary) => {
    if (isBinary) return;
    const out = Buffer.from(JSON.stringify(JSON.parse(data)));
    for (const member of members) {
      if (member.readyState === WebSocket.OPEN) member.send(out, { binary: false });
    }
  });
});

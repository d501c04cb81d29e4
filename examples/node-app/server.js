// A small Node web server for trying corral: `/`, `/health` and a Server-Sent Events stream.
// It listens on $PORT (and $HOST), as corral and PM2 expect, and stops cleanly on SIGTERM/SIGINT.
'use strict';
const http = require('node:http');

const port = Number(process.env.PORT || 3000);
const host = process.env.HOST || '127.0.0.1';
const instance = process.env.NODE_APP_INSTANCE ?? '-';

const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://x');
  if (url.pathname === '/health') {
    res.writeHead(200, { 'content-type': 'text/plain' });
    res.end('ok\n');
  } else if (url.pathname === '/sse') {
    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
    let n = 0;
    const tick = () => res.write(`id: ${n}\ndata: ${JSON.stringify({ n: n++, instance, pid: process.pid })}\n\n`);
    tick();
    const timer = setInterval(tick, 1000);
    req.on('close', () => clearInterval(timer));
  } else if (url.pathname === '/') {
    res.writeHead(200, { 'content-type': 'text/plain' });
    res.end(`hello from worker ${instance} (pid ${process.pid})\n`);
  } else {
    res.writeHead(404, { 'content-type': 'text/plain' });
    res.end('not found\n');
  }
});

server.listen(port, host, () => console.log(`worker ${instance} listening on http://${host}:${port}`));

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    console.log(`worker ${instance}: ${signal}, closing`);
    server.close(() => process.exit(0));
    server.closeIdleConnections();
  });
}

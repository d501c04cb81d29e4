// The benchmark worker: a plain Node hello-world on $PORT, the same for every proxy measured.
// It shuts down the way a well-behaved app does: on SIGTERM/SIGINT it stops accepting, lets
// in-flight requests finish, and exits.
'use strict';
const http = require('node:http');
const body = Buffer.from('hello world\n');
const server = http
  .createServer((req, res) => {
    res.writeHead(200, { 'content-type': 'text/plain', 'content-length': body.length });
    res.end(body);
  })
  .listen(Number(process.env.PORT), process.env.HOST || '127.0.0.1', () => {
    if (process.send) process.send('ready');
  });
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    server.close(() => process.exit(0));
    server.closeIdleConnections();
  });
}

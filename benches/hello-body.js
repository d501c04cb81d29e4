// The abuse benchmark's worker: benches/hello.js, except that it answers once it has read the
// request body, as an app's upload or JSON handler does (hello.js answers on the head alone, so
// an upload the client abandons never keeps it waiting). GET requests have no body: they are
// answered at once.
'use strict';
const http = require('node:http');
const body = Buffer.from('hello world\n');
const server = http
  .createServer((req, res) => {
    req.on('end', () => {
      res.writeHead(200, { 'content-type': 'text/plain', 'content-length': body.length });
      res.end(body);
    });
    req.resume();
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

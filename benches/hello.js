// The benchmark worker: a plain Node hello-world on $PORT, the same for every proxy measured.
'use strict';
const http = require('node:http');
const body = Buffer.from('hello world\n');
http
  .createServer((req, res) => {
    res.writeHead(200, { 'content-type': 'text/plain', 'content-length': body.length });
    res.end(body);
  })
  .listen(Number(process.env.PORT), process.env.HOST || '127.0.0.1');
process.on('SIGTERM', () => process.exit(0));
process.on('SIGINT', () => process.exit(0));

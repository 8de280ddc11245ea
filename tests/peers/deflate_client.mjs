// Connects to URL with permessage-deflate offered (Node `ws`), sends a text and a binary
// message that compress well, and prints what was agreed and whether the echoes were exact,
// as JSON. A tcp upstream may give an echo back in several binary messages.
import WebSocket from 'ws';

const url = process.argv[2];
const text = 'compress me '.repeat(2000) + '✓';
const binary = Buffer.alloc(256 * 64, 0).map((_, i) => i % 256);
const ws = new WebSocket(url, { perMessageDeflate: true });
const queue = [];
let waiting = null;
ws.on('message', (data) => {
  queue.push(Buffer.from(data));
  if (waiting) waiting();
});
const next = () => new Promise((resolve) => {
  if (queue.length) resolve(queue.shift());
  else waiting = () => { waiting = null; resolve(queue.shift()); };
});
const echoOf = async (sent) => {
  let got = Buffer.alloc(0);
  while (got.length < sent.length) got = Buffer.concat([got, await next()]);
  return got;
};
ws.on('open', async () => {
  const agreed = ws.extensions;
  ws.send(text);
  const gotText = await echoOf(Buffer.from(text));
  ws.send(binary);
  const gotBinary = await echoOf(binary);
  console.log(JSON.stringify({
    extensions: agreed,
    text_exact: gotText.equals(Buffer.from(text)),
    binary_exact: gotBinary.equals(binary),
  }));
  ws.close(1000);
});
ws.on('error', (e) => { console.error(String(e)); process.exit(1); });

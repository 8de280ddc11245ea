// Starts the backend under test (a TCP echo service here) and wsgate in front of it, each on
// a free port, before any test runs. wsgate reports where it listens in the ready file; the
// tests read it from the environment. `--exit-on-eof` ties wsgate's life to this process:
// if the runner dies, wsgate's standard input closes and it exits by itself.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';

export default async function globalSetup() {
  const echo = net.createServer((socket) => socket.pipe(socket));
  await new Promise((resolve) => echo.listen(0, '127.0.0.1', resolve));

  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'wsgate-playwright-'));
  const config = path.join(dir, 'gateway.toml');
  fs.writeFileSync(
    config,
    `[gateway]
allow_faults = true          # POST /faults/close on the admin listener, for the reconnect test

[admin]
bind = "127.0.0.1:0"

[[listener]]
bind = "127.0.0.1:0"
tls = { self_signed = true } # a CA and certificate made in memory, for localhost

[[route]]
path = "/echo"
upstream = "tcp://127.0.0.1:${echo.address().port}"
`,
  );
  const readyFile = path.join(dir, 'ready.json');
  const binary = process.env.WSGATE_BIN ?? path.resolve('../../target/debug/wsgate');
  const gateway = spawn(
    binary,
    ['--config', config, '--ready-file', readyFile, '--exit-on-eof'],
    { stdio: ['pipe', 'inherit', 'inherit'] },
  );
  const ready = await waitForReady(readyFile, gateway);
  process.env.WSGATE_URL = ready.listeners[0].url;
  process.env.WSGATE_SPKI = ready.listeners[0].spki_sha256;
  process.env.WSGATE_ADMIN = ready.admin;

  return async () => {
    const exited = new Promise((resolve) => gateway.once('exit', resolve));
    gateway.stdin.end(); // wsgate drains and exits
    if (gateway.exitCode === null) await exited;
    echo.close();
    fs.rmSync(dir, { recursive: true, force: true });
  };
}

async function waitForReady(file, gateway) {
  const deadline = Date.now() + 10_000;
  while (Date.now() < deadline) {
    if (gateway.exitCode !== null) throw new Error(`wsgate exited with ${gateway.exitCode}`);
    if (fs.existsSync(file)) return JSON.parse(fs.readFileSync(file, 'utf8'));
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  throw new Error(`no ${file} within 10 s`);
}

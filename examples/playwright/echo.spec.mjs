import { test as base, expect } from '@playwright/test';

// Debian's Chromium, trusting exactly the gateway's key (nothing else is exempted from
// certificate checks): the SPKI hash comes from wsgate's ready file.
const test = base.extend({
  launchOptions: [
    async ({}, use) => {
      await use({
        executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
        args: [`--ignore-certificate-errors-spki-list=${process.env.WSGATE_SPKI}`],
      });
    },
    { scope: 'worker' },
  ],
});

// The application under test, in miniature: a page that keeps a WebSocket open and
// reconnects when the server closes it.
const PAGE = `<!doctype html><title>wsgate example</title><script>
  window.events = [];
  window.connect = (url) => {
    const ws = new WebSocket(url);
    ws.binaryType = 'arraybuffer';
    window.ws = ws;
    ws.onopen = () => events.push('open');
    ws.onmessage = (e) => events.push('message:' + new TextDecoder().decode(e.data));
    ws.onclose = (e) => {
      events.push('close:' + e.code);
      setTimeout(() => connect(url), 100);
    };
  };
</script>`;

const events = (page) => page.evaluate(() => window.events);

test('a page echoes through wss://', async ({ page }) => {
  await page.setContent(PAGE);
  await page.evaluate((url) => connect(url), `${process.env.WSGATE_URL}/echo`);
  await expect.poll(() => events(page)).toContain('open');
  await page.evaluate(() => ws.send('hello through wsgate'));
  await expect.poll(() => events(page)).toContain('message:hello through wsgate');
});

test('the page reconnects after a server restart', async ({ page }) => {
  await page.setContent(PAGE);
  await page.evaluate((url) => connect(url), `${process.env.WSGATE_URL}/echo`);
  await expect.poll(() => events(page)).toEqual(['open']);

  // What a client sees when its server restarts: Close 1012 on every connection.
  const response = await fetch(
    `http://${process.env.WSGATE_ADMIN}/faults/close?route=/echo&code=1012`,
    { method: 'POST' },
  );
  expect(response.status).toBe(200);
  await expect.poll(() => events(page)).toEqual(['open', 'close:1012', 'open']);

  await page.evaluate(() => ws.send('after the restart'));
  await expect.poll(() => events(page)).toContain('message:after the restart');
});

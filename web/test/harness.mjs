// Shared by the browser tests and benchmarks/browser_latency.mjs: the system's Chromium (never a
// downloaded one), the built page on a local server, and a proxy that catches any request made
// to another origin by any part of the browser (page, workers, service worker).
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import puppeteer from 'puppeteer-core';
import { serve } from '../serve.mjs';

export const WEB = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
export const ROOT = path.resolve(WEB, '..');
export const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

// Every request that reaches it was bound for another origin: the local server is on loopback,
// which Chromium never sends through a proxy. It records the target and refuses.
async function spyProxy() {
  const seen = [];
  const server = http.createServer((req, res) => { seen.push(`${req.method} ${req.url}`); res.writeHead(403); res.end(); });
  server.on('connect', (req, socket) => { seen.push(`CONNECT ${req.url}`); socket.end('HTTP/1.1 403 Forbidden\r\n\r\n'); });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return { server, seen, port: server.address().port };
}

export async function start({ dist = path.join(WEB, 'dist') } = {}) {
  if (!fs.existsSync(CHROMIUM)) throw new Error(`no Chromium at ${CHROMIUM} (apt-get install chromium, or set CHROMIUM)`);
  if (!fs.existsSync(path.join(dist, 'index.html'))) throw new Error(`no build in ${dist} (npm run build)`);
  const site = await serve(dist, 0);
  const spy = await spyProxy();
  const browser = await puppeteer.launch({
    executablePath: CHROMIUM,
    headless: true,
    // The proxy is set on the pages' browser context only (below), so Chromium's own background
    // services (updates, sign-in) do not reach it; those that run anyway find no name resolving.
    args: ['--no-sandbox', '--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1', '--no-first-run', '--disable-sync',
      '--disable-background-networking', '--disable-component-update', '--disable-domain-reliability',
      '--disable-client-side-phishing-detection', '--no-pings', '--disable-default-apps',
      '--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication,' +
        'SigninInterceptBubbleV2,ChromeSignin,AccountConsistency,PrivacySandboxSettings4'],
  });
  const context = await browser.createBrowserContext({ proxyServer: `http://127.0.0.1:${spy.port}` });
  const close = async () => { await browser.close(); site.server.close(); spy.server.close(); };
  return { browser, context, url: site.url, spy, close };
}

// A page that records every request it (and its workers) makes.
export async function openPage(context, { viewport = { width: 1280, height: 900 }, before } = {}) {
  const page = await context.newPage();
  await page.setViewport(viewport);
  const requests = [];
  page.on('request', (r) => requests.push(r.url()));
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  page.on('console', (m) => { if (m.type() === 'error') errors.push(m.text()); });
  if (before) await before(page);
  return { page, requests, errors };
}

export async function waitState(page, states, timeout = 60_000) {
  await page.waitForFunction((s) => s.includes(document.body.dataset.state), { timeout }, states);
  return page.evaluate(() => document.body.dataset.state);
}

// Give the page a file through its "Choose a photo" input and wait for the outcome.
export async function upload(page, file) {
  await page.evaluate(() => { document.body.dataset.state = 'waiting'; });
  const input = await page.$('#file');
  await input.uploadFile(file);
  return waitState(page, ['done', 'error'], 120_000);
}

export async function downloadedMask(page) {
  const b64 = await page.evaluate(async () => {
    const bytes = new Uint8Array(await (await fetch(document.getElementById('download-mask').href)).arrayBuffer());
    let s = '';
    for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
    return btoa(s);
  });
  return Buffer.from(b64, 'base64');
}

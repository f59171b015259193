// npm run build: web/src + the runtime + the model -> web/dist, a folder any static host can serve.
// Refuses to build with a missing or stale model (scripts/web_model.py --check).
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import zlib from 'node:zlib';
import { crc32 } from './src/png.js';

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, '..');
const dist = path.join(here, 'dist');
const ORT_FILES = ['ort.wasm.min.mjs', 'ort-wasm-simd-threaded.mjs', 'ort-wasm-simd-threaded.wasm'];
const SAMPLE = path.join(root, 'src/scsonet/samples/ISIC_0012656.jpg');

function checkModel() {
  const python = path.join(root, '.venv/bin/python');
  try {
    execFileSync(python, [path.join(root, 'scripts/web_model.py'), '--check'], { stdio: 'inherit' });
  } catch {
    console.error('build: error: the model is missing or stale; run `npm run model` (bash scripts/web_model)');
    process.exit(2);
  }
}

// A square PNG icon: the accent colour with a lesion-brown disc ringed in the outline green.
function icon(size) {
  const rgba = Buffer.alloc(size * size * 4), c = size / 2;
  const cover = (d) => Math.min(1, Math.max(0, d + 0.5));  // antialiasing over one pixel
  for (let y = 0; y < size; y++) {
    for (let x = 0; x < size; x++) {
      const dx = (x + 0.5 - c) / (size * 0.30), dy = (y + 0.5 - c) / (size * 0.25);
      const r = Math.hypot(dx, dy) * size * 0.27;  // roughly pixels from the centre
      let px = [11, 93, 75];
      const disc = cover(size * 0.22 - r), ring = cover(size * 0.035 - Math.abs(r - size * 0.255));
      px = px.map((v, i) => v + ([138, 90, 68][i] - v) * disc);
      px = px.map((v, i) => v + ([0, 255, 0][i] - v) * ring);
      rgba.set([...px.map(Math.round), 255], (y * size + x) * 4);
    }
  }
  const rows = Buffer.alloc((size * 4 + 1) * size);
  for (let y = 0; y < size; y++) rgba.copy(rows, y * (size * 4 + 1) + 1, y * size * 4, (y + 1) * size * 4);
  const chunk = (type, data) => {
    const out = Buffer.alloc(12 + data.length);
    out.writeUInt32BE(data.length, 0);
    out.write(type, 4, 'latin1');
    data.copy(out, 8);
    out.writeUInt32BE((crc32(out.subarray(4, 8 + data.length)) ^ 0xffffffff) >>> 0, 8 + data.length);
    return out;
  };
  const header = Buffer.alloc(13);
  header.writeUInt32BE(size, 0);
  header.writeUInt32BE(size, 4);
  header.set([8, 6, 0, 0, 0], 8);  // 8-bit RGBA
  return Buffer.concat([Buffer.from([137, 80, 78, 71, 13, 10, 26, 10]), chunk('IHDR', header),
    chunk('IDAT', zlib.deflateSync(rows, { level: 9 })), chunk('IEND', Buffer.alloc(0))]);
}

// Headers for hosts that read a _headers file (Netlify, Cloudflare Pages): isolation for threads.
const HEADERS = `/*
  Cross-Origin-Opener-Policy: same-origin
  Cross-Origin-Embedder-Policy: require-corp
  Cross-Origin-Resource-Policy: same-origin
  Referrer-Policy: no-referrer
`;

function build() {
  checkModel();
  fs.rmSync(dist, { recursive: true, force: true });
  fs.mkdirSync(path.join(dist, 'ort'), { recursive: true });
  fs.mkdirSync(path.join(dist, 'model'), { recursive: true });
  for (const name of fs.readdirSync(path.join(here, 'src'))) {
    if (name !== 'sw.js') fs.copyFileSync(path.join(here, 'src', name), path.join(dist, name));
  }
  const ortDir = path.join(here, 'node_modules/onnxruntime-web/dist');
  for (const name of ORT_FILES) {
    // Drop the source-map comment: the map is not shipped, so nothing should ask for it.
    const data = fs.readFileSync(path.join(ortDir, name));
    const out = name.endsWith('.mjs') ? data.toString('utf8').replace(/\n?\/\/# sourceMappingURL=\S+\s*$/, '\n') : data;
    fs.writeFileSync(path.join(dist, 'ort', name), out);
  }
  for (const name of ['scsonet.onnx', 'scsonet.json']) {
    fs.copyFileSync(path.join(here, 'model', name), path.join(dist, 'model', name));
  }
  fs.copyFileSync(SAMPLE, path.join(dist, 'sample.jpg'));
  fs.writeFileSync(path.join(dist, 'icon-192.png'), icon(192));
  fs.writeFileSync(path.join(dist, 'icon-512.png'), icon(512));
  fs.writeFileSync(path.join(dist, '_headers'), HEADERS);
  // The service worker caches every file; its version is a hash of them all, so a new build replaces the cache.
  const assets = [];
  const walk = (dir) => {
    for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
      const full = path.join(dir, entry.name);
      if (entry.isDirectory()) walk(full);
      else if (entry.name !== '_headers') assets.push(path.relative(dist, full).split(path.sep).join('/'));
    }
  };
  walk(dist);
  assets.sort();
  const hash = createHash('sha256');
  for (const a of assets) hash.update(a).update(fs.readFileSync(path.join(dist, a)));
  const version = hash.digest('hex').slice(0, 16);
  const sw = fs.readFileSync(path.join(here, 'src/sw.js'), 'utf8')
    .replace('%VERSION%', version).replace('%ASSETS%', JSON.stringify(['./', ...assets]));
  fs.writeFileSync(path.join(dist, 'sw.js'), sw);
  const bytes = assets.reduce((n, a) => n + fs.statSync(path.join(dist, a)).size, 0);
  console.log(`build: web/dist (${assets.length + 1} files, ${(bytes / 2 ** 20).toFixed(1)} MiB, version ${version})`);
}

build();

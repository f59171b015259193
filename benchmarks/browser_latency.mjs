// SCSONet in headless Chromium (the system's) against Python ONNX Runtime: model-only inference at
// 256 x 256 and photo-to-outline for a 12 MP JPEG, with 1 and 2 threads.
//
//   node benchmarks/browser_latency.mjs [--repeats 50] [--photos 5] [--variants] [--out docs/benchmarks/browser_latency.md]
//
// Needs `bash scripts/web_model && (cd web && npm ci && npm run build)` first. Model-only times a
// session.run on a fixed input inside the page; photo-to-outline is the page's own timing from the
// file to the outline drawn (decode, resize, model, resize back, threshold, outline). --variants
// also times the other export (`scsonet export` with and without --no-reparameterize).
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ROOT, WEB, openPage, start, upload, waitState } from '../web/test/harness.mjs';

const arg = (name, fallback) => { const i = process.argv.indexOf(name); return i > 0 ? process.argv[i + 1] : fallback; };
const REPEATS = Number(arg('--repeats', 50));
const PHOTOS = Number(arg('--photos', 5));
const OUT = arg('--out', null);
const THREADS = [1, 2];
const PYTHON = path.join(ROOT, '.venv/bin/python');
const WORK = fs.mkdtempSync(path.join(os.tmpdir(), 'scsonet-bench-'));
const SAMPLE = path.join(ROOT, 'src/scsonet/samples/ISIC_0014765.jpg');
const PHOTO = path.join(WORK, 'photo_12mp.jpg');

const median = (xs) => { const s = [...xs].sort((a, b) => a - b); const m = s.length >> 1; return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2; };
const fmt = (x) => (x === undefined || Number.isNaN(x) ? '–' : x.toFixed(1));

function python(code) {
  const r = spawnSync(PYTHON, ['-c', code], { encoding: 'utf8', cwd: ROOT });
  if (r.status !== 0) throw new Error(`python failed:\n${r.stderr}`);
  return JSON.parse(r.stdout.trim().split('\n').pop());
}

// Python ONNX Runtime: OrtSegmenter.logits on one image, and read_image .. draw_overlay on the photo.
function pythonTimes(model, threads) {
  return python(`
import json, time, numpy as np
from scsonet.onnx_runtime import OrtSegmenter
from scsonet.imageio import read_image
from scsonet.inference import predict_probabilities
from scsonet.postprocess import draw_overlay
seg = OrtSegmenter(${JSON.stringify(model)}, threads=${threads})
x = np.random.default_rng(0).standard_normal((1, 3, 256, 256)).astype(np.float32)
for _ in range(5): seg.logits(x)
model = []
cpu = time.process_time()
for _ in range(${REPEATS}):
    t = time.perf_counter(); seg.logits(x); model.append(1e3 * (time.perf_counter() - t))
cpu = 1e3 * (time.process_time() - cpu) / ${REPEATS}
photo = []
for _ in range(${PHOTOS}):
    t = time.perf_counter()
    rgb = read_image(${JSON.stringify(PHOTO)})
    mask = predict_probabilities([rgb], seg)[0] >= seg.threshold
    draw_overlay(rgb, mask)
    photo.append(1e3 * (time.perf_counter() - t))
print(json.dumps({"model": model, "cpu": cpu, "photo": photo}))`);
}

// CPU seconds used so far by Chromium's renderer processes (the page's, while only it works).
async function rendererCpu(cdp) {
  const { processInfo } = await cdp.send('SystemInfo.getProcessInfo');
  return processInfo.filter((p) => p.type === 'renderer').reduce((sum, p) => sum + p.cpuTime, 0);
}

async function browserModelTimes(browser, context, url, threads, modelUrl) {
  const { page } = await openPage(context);
  await page.goto(`${url}?threads=${threads}`);
  if ((await waitState(page, ['ready', 'error'], 120_000)) !== 'ready') throw new Error(await page.$eval('#error', (e) => e.textContent));
  await page.evaluate(async (modelUrl) => {
    const { ort, model } = window.scsonet;
    const session = modelUrl ? await ort.InferenceSession.create(modelUrl, {
      executionProviders: ['wasm'], graphOptimizationLevel: 'all',
      freeDimensionOverrides: { batch: 1, height: 256, width: 256 } }) : model.session;
    const x = new Float32Array(3 * 256 * 256).map((_, i) => Math.sin(i));
    window.bench = { session, feeds: { [session.inputNames[0]]: new ort.Tensor('float32', x, [1, 3, 256, 256]) } };
    for (let i = 0; i < 5; i++) await session.run(window.bench.feeds);
  }, modelUrl);
  const cdp = await browser.target().createCDPSession();
  const cpu0 = await rendererCpu(cdp);
  const times = await page.evaluate(async (repeats) => {
    const { session, feeds } = window.bench, out = [];
    for (let i = 0; i < repeats; i++) { const t = performance.now(); await session.run(feeds); out.push(performance.now() - t); }
    return out;
  }, REPEATS);
  const cpuMs = (1e3 * ((await rendererCpu(cdp)) - cpu0)) / REPEATS;
  await cdp.detach();
  return { page, times, cpuMs };
}

async function main() {
  python(`from PIL import Image; import json; Image.open(${JSON.stringify(SAMPLE)}).convert('RGB').resize((4000, 3000), Image.BICUBIC).save(${JSON.stringify(PHOTO)}, quality=90); print(json.dumps(1))`);
  const served = path.join(WEB, 'dist/model/scsonet.onnx');
  const variants = [{ name: 'served', file: served, url: null, args: JSON.parse(fs.readFileSync(path.join(WEB, 'dist/model/scsonet.json'))).export_args.join(' ') || '(default)' }];
  const h = await start();
  const rows = [];
  const stages = {};
  try {
    if (process.argv.includes('--variants')) {
      // The other export, served beside the page for the duration of the benchmark.
      const other = variants[0].args.includes('--no-reparameterize') ? [] : ['--no-reparameterize'];
      const file = path.join(WEB, 'dist/model/bench-variant.onnx');
      const r = spawnSync(path.join(ROOT, '.venv/bin/scsonet'), ['export', '--weights', 'scsonet-isic2017', ...other, '--out', file], { encoding: 'utf8' });
      if (r.status !== 0) throw new Error(r.stderr);
      variants.push({ name: 'other', file, url: 'model/bench-variant.onnx', args: other.join(' ') || '(default)' });
    }
    for (const threads of THREADS) {
      for (const v of variants) {
        const { page, times, cpuMs } = await browserModelTimes(h.browser, h.context, h.url, threads, v.url);
        const py = pythonTimes(v.file, threads);
        const row = { threads, variant: v.args, browserModel: times, browserCpu: cpuMs, pythonModel: py.model,
          pythonCpu: py.cpu, pythonPhoto: py.photo };
        if (v.name === 'served') {
          row.browserPhoto = [];
          for (let i = 0; i < PHOTOS; i++) {
            if ((await upload(page, PHOTO)) !== 'done') throw new Error(await page.$eval('#error', (e) => e.textContent));
            const d = await page.$eval('#result', (e) => ({ ...e.dataset }));
            row.browserPhoto.push(Number(d.totalMs));
            (row.browserFigures ??= []).push(Number(d.figuresMs));
            for (const [k, ms] of Object.entries(JSON.parse(d.timings))) (stages[threads] ??= {})[k] = [...(stages[threads]?.[k] ?? []), ms];
          }
        }
        await page.close();
        rows.push(row);
        console.error(`threads ${threads}, ${v.args}: browser model ${fmt(median(times))} ms, python ${fmt(median(py.model))} ms`);
      }
    }
  } finally {
    await h.close();
    fs.rmSync(path.join(WEB, 'dist/model/bench-variant.onnx'), { force: true });
  }
  const chromium = spawnSync(process.env.CHROMIUM || '/usr/bin/chromium', ['--version'], { encoding: 'utf8' }).stdout.trim();
  const load = os.loadavg()[0].toFixed(1);
  const lines = [
    '```', `$ node benchmarks/browser_latency.mjs ${process.argv.slice(2).join(' ')}`.trim(), '```', '',
    `${chromium} headless, onnxruntime-web ${JSON.parse(fs.readFileSync(path.join(WEB, 'node_modules/onnxruntime-web/package.json'))).version} ` +
      `(WebAssembly SIMD${THREADS.some((t) => t > 1) ? ', threads in a cross-origin isolated page' : ''}); ${os.cpus().length} CPUs, ` +
      `load average ${load} at the end. Model-only: median (best) of ${REPEATS} runs at 1x3x256x256 after 5 warm-up runs; ` +
      'CPU ms: CPU time per run of the renderer processes (browser) or the Python process, all threads together ' +
      '(on a shared machine, closer to what a run costs on an idle core than the wall clock). ' +
      `Photo to outline: median (best) of ${PHOTOS} for a 4000 x 3000 JPEG, from the file to the outline drawn ` +
      '(Python: read_image, predict_probabilities, threshold, draw_overlay); the page then computes the ' +
      'mask at the photo\'s own size (area, download): photo to full-size mask.', '',
    '| threads | export | browser model ms | browser model CPU ms | Python ORT model ms | Python ORT model CPU ms | browser photo-to-outline ms | browser photo-to-full-size-mask ms | Python ORT photo-to-outline ms |',
    '| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
    ...rows.map((r) => `| ${r.threads} | ${r.variant} | ${fmt(median(r.browserModel))} (${fmt(Math.min(...r.browserModel))}) | ` +
      `${fmt(r.browserCpu)} | ${fmt(median(r.pythonModel))} (${fmt(Math.min(...r.pythonModel))}) | ${fmt(r.pythonCpu)} | ` +
      `${r.browserPhoto ? `${fmt(median(r.browserPhoto))} (${fmt(Math.min(...r.browserPhoto))})` : '–'} | ` +
      `${r.browserFigures ? `${fmt(median(r.browserFigures))} (${fmt(Math.min(...r.browserFigures))})` : '–'} | ` +
      `${fmt(median(r.pythonPhoto))} (${fmt(Math.min(...r.pythonPhoto))}) |`),
    '', 'Browser photo-to-outline by stage (median ms):', '',
    `| threads | ${Object.keys(stages[THREADS[0]] ?? {}).join(' | ')} |`,
    `| ---: |${Object.keys(stages[THREADS[0]] ?? {}).map(() => ' ---: |').join('')}`,
    ...THREADS.map((t) => `| ${t} | ${Object.values(stages[t] ?? {}).map((xs) => fmt(median(xs))).join(' | ')} |`),
  ];
  const text = lines.join('\n') + '\n';
  process.stdout.write(text);
  if (OUT) { fs.mkdirSync(path.dirname(path.resolve(ROOT, OUT)), { recursive: true }); fs.writeFileSync(path.resolve(ROOT, OUT), text); }
}

main().catch((err) => { console.error(`browser_latency: error: ${err.stack || err}`); process.exit(1); });

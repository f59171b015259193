// The page in real headless Chromium (the system's): masks against `scsonet predict --backend
// onnxruntime` (masks, two-pass, reliability and review), no request to another origin, offline use,
// bad files, a 12 MP photo, a browser without WebAssembly, and screenshots.
// `node test/browser.test.mjs [--screenshots DIR] [--work DIR]` (after `npm run model && npm run build`);
// exit status 1 when a check fails. Screenshots go to a temporary folder unless --screenshots or
// $SCREENSHOTS names one: `SCREENSHOTS=docs/web bash scripts/web_test` refreshes the README's.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ROOT, WEB, downloadedMask, openPage, start, upload, waitState } from './harness.mjs';
import { reliabilityModel, resizeRGBA } from '../src/pipeline.js';
import { readPNG, readPNGChannel0, readPNGSize } from './pngread.mjs';

const arg = (name, fallback) => { const i = process.argv.indexOf(name); return i > 0 ? process.argv[i + 1] : fallback; };
const KEEP = process.argv.includes('--work');  // a temporary folder is removed after a clean run
const WORK = path.resolve(arg('--work', fs.mkdtempSync(path.join(os.tmpdir(), 'scsonet-web-'))));
// Not into the tree by default: a test run leaves the committed screenshots as they are.
const SHOTS = path.resolve(arg('--screenshots', process.env.SCREENSHOTS || path.join(WORK, 'screenshots')));
const PYTHON = path.join(ROOT, '.venv/bin/python');
const MIN_AGREEMENT = 0.999;
const RELIABILITY_TOLERANCE = 0.01;
const SAMPLES = fs.readdirSync(path.join(ROOT, 'src/scsonet/samples')).filter((f) => f.endsWith('.jpg')).sort()
  .map((f) => path.join(ROOT, 'src/scsonet/samples', f));

const results = [];
function check(name, ok, detail = '') {
  results.push({ name, ok: Boolean(ok), detail });
  console.log(`${ok ? 'ok  ' : 'FAIL'} ${name}${detail ? `: ${detail}` : ''}`);
}

function run(cmd, args) {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.status}):\n${r.stdout}\n${r.stderr}`);
  return r.stdout;
}

// The inputs besides the samples: a 12 MP JPEG (a sample enlarged to 4000 x 3000), a text file,
// and a "JPEG" that is not one.
function makeInputs() {
  const big = path.join(WORK, 'large_12mp.jpg');
  run(PYTHON, ['-c', `from PIL import Image; Image.open(${JSON.stringify(SAMPLES[1])}).convert('RGB')` +
    `.resize((4000, 3000), Image.BICUBIC).save(${JSON.stringify(big)}, quality=90)`]);
  // Resized both ways exactly as Pillow does (the samples are 256 x 256, the model's own size).
  const odd = path.join(WORK, 'odd_size.png');
  run(PYTHON, ['-c', `from PIL import Image; Image.open(${JSON.stringify(SAMPLES[2])}).convert('RGB')` +
    `.resize((1531, 1017), Image.BICUBIC).save(${JSON.stringify(odd)})`]);
  run(PYTHON, ['-c', `from PIL import Image; Image.open(${JSON.stringify(odd)}).resize((256, 256), Image.BILINEAR)` +
    `.save(${JSON.stringify(odd.replace('.png', '_256.png'))})`]);
  // A lesion small in a big frame: a sample pasted at 200 x 200 on a 1024 x 768 skin-coloured canvas,
  // which both `scsonet predict` and the page outline again on a crop (pass 2).
  const small = path.join(WORK, 'small_lesion.png');
  run(PYTHON, ['-c', `from PIL import Image; c = Image.new('RGB', (1024, 768), (224, 172, 140)); ` +
    `c.paste(Image.open(${JSON.stringify(SAMPLES[1])}).convert('RGB').resize((200, 200), Image.BICUBIC), (600, 300)); ` +
    `c.save(${JSON.stringify(small)})`]);
  const text = path.join(WORK, 'notes.txt');
  fs.writeFileSync(text, 'not a photo\n');
  const broken = path.join(WORK, 'broken.jpg');
  fs.writeFileSync(broken, Buffer.concat([Buffer.from([0xff, 0xd8, 0xff, 0xe0]), Buffer.alloc(2000, 7)]));
  return { big, odd, small, text, broken };
}

function pythonMasks(inputs) {
  const out = path.join(WORK, 'python');
  run(path.join(ROOT, '.venv/bin/scsonet'), ['predict', '--backend', 'onnxruntime', '--weights',
    path.join(WEB, 'dist/model/scsonet.onnx'), '--batch-size', '1', '--quiet', '--out', out, ...inputs]);
  const rows = JSON.parse(fs.readFileSync(path.join(out, 'results.json'), 'utf8')).images;
  const byName = Object.fromEntries(rows.map((r) => [path.basename(r.file), r]));
  const reference = (file) => readPNGChannel0(fs.readFileSync(path.join(out, `${path.parse(file).name}_mask.png`)));
  reference.row = (file) => byName[path.basename(file)];
  return reference;
}

function agreement(a, b) {
  if (a.width !== b.width || a.height !== b.height) return 0;
  let same = 0;
  for (let i = 0; i < a.data.length; i++) same += (a.data[i] > 127) === (b.data[i] > 127);
  return same / a.data.length;
}

async function segmentAndCompare(page, file, reference, label) {
  const state = await upload(page, file);
  if (state !== 'done') {
    check(`${label} ${path.basename(file)} outlined`, false, await page.$eval('#error', (e) => e.textContent));
    return null;
  }
  const mask = readPNGChannel0(await downloadedMask(page));
  const fraction = agreement(mask, reference(file));
  const ms = await page.$eval('#result', (e) => Number(e.dataset.totalMs));
  check(`${label} ${path.basename(file)}: mask agrees with scsonet predict --backend onnxruntime`,
    fraction >= MIN_AGREEMENT, `${(100 * fraction).toFixed(4)} % of ${mask.width}x${mask.height} px, ${ms.toFixed(0)} ms`);
  const page_ = await page.$eval('#result', (e) => ({ ...e.dataset }));
  return { fraction, ms, page: page_, python: reference.row(file) };
}

// The page's reliability, review flag and second pass against results.json's.
function checkVerdict(label, got) {
  if (!got) return;
  const { page, python } = got, reliability = Number(page.reliability);
  check(`${label}: reliability ${page.reliability} and review ${page.review} equal results.json's`,
    page.reliability !== '' && Math.abs(reliability - python.reliability) <= RELIABILITY_TOLERANCE &&
    page.review === String(python.review), `results.json: ${python.reliability}, review ${python.review}`);
  check(`${label}: second pass ${page.twoPass} (${page.twoPassReason}) as scsonet predict's`,
    page.twoPass === String(python.two_pass), `results.json two_pass: ${python.two_pass}`);
}

// The page's check of the embedded reliability model (pipeline.js in Node): ReliabilityModel.from_dict's rules.
function checkReliabilityValidation() {
  const good = { format: 'scsonet-reliability-v1', features: ['margin', 'empty'], mean: [0.8, 0], std: [0.1, 1],
    coef: [1.8, -0.1], intercept: 1.2, review_threshold: 0.8 };
  const message = (data) => { try { reliabilityModel({ reliability: typeof data === 'string' ? data : JSON.stringify(data) }); return ''; } catch (e) { return e.message; } };
  const cases = [['not JSON', '{', /malformed/], ['another format', { ...good, format: 'x' }, /expected format/],
    ['an unknown feature', { ...good, features: ['margin', 'colour'] }, /unknown features colour/],
    ['a short coef', { ...good, coef: [1] }, /'coef' must be a list of 2/], ['a zero std', { ...good, std: [0, 1] }, /'std' must be positive/],
    ['a string intercept', { ...good, intercept: '1' }, /finite numbers/], ['a threshold of 2', { ...good, review_threshold: 2 }, /0\.\.1/]];
  const wrong = cases.filter(([, data, re]) => !re.test(message(data))).map(([name]) => name);
  check('an invalid reliability model in the metadata is refused, each with its reason',
    message(good) === '' && reliabilityModel({}) === null && wrong.length === 0, wrong.length ? `not refused as expected: ${wrong.join(', ')}` : '');
}

// The page's resize (pipeline.js, run here in Node) against Pillow's, byte for byte.
function checkResize(odd) {
  const src = readPNG(fs.readFileSync(odd)), want = readPNG(fs.readFileSync(odd.replace('.png', '_256.png')));
  const rgba = new Uint8Array(src.width * src.height * 4);
  for (let i = 0; i < src.width * src.height; i++) rgba.set(src.data.subarray(i * 3, i * 3 + 3), i * 4);
  const got = resizeRGBA(rgba, src.width, src.height, 256, 256);
  let differ = 0;
  for (let i = 0; i < got.length; i++) differ += got[i] !== want.data[i];
  check('resize to 256 x 256 equals Pillow\'s BILINEAR byte for byte', differ === 0 && got.length === want.data.length,
    `${differ} of ${got.length} bytes differ`);
}

async function main() {
  const inputs = makeInputs();
  checkResize(inputs.odd);
  checkReliabilityValidation();
  const reference = pythonMasks([...SAMPLES, inputs.odd, inputs.small, inputs.big]);
  const h = await start();
  try {
    const { page, requests, errors } = await openPage(h.context);
    await page.goto(h.url);
    check('page loads the model', (await waitState(page, ['ready', 'error'], 120_000)) === 'ready',
      await page.$eval('#model-info', (e) => e.textContent));
    check('page is cross-origin isolated (threads)', await page.evaluate(() => self.crossOriginIsolated));
    check('page says nothing leaves the device', /never leaves this device/.test(await page.$eval('#privacy', (e) => e.textContent)));

    check('the page reads the reliability model from the metadata', /reliability model fitted for/.test(
      await page.$eval('#model-info', (e) => e.textContent)));
    for (const file of SAMPLES) checkVerdict(`online ${path.basename(file)}`, await segmentAndCompare(page, file, reference, 'online'));

    const small = await segmentAndCompare(page, inputs.small, reference, 'small lesion on a 1024 x 768 canvas');
    checkVerdict('small lesion on a 1024 x 768 canvas', small);
    check('small lesion: pass 2 ran in both', small?.page.twoPass === 'true' && small?.python.two_pass === true);

    // A sample the reliability model marks for review, for the picture: the banner and the panel.
    const marked = SAMPLES.find((f) => reference.row(f).review);
    if (marked) {
      await upload(page, marked);
      const shown = await page.evaluate(() => ({ hidden: document.getElementById('review').hidden,
        text: document.getElementById('review-text').textContent }));
      check(`review mark shown for ${path.basename(marked)}`, !shown.hidden && /Review: the outline may be wrong/.test(shown.text), shown.text);
      // The amber banner on the view: its bottom-left pixels are (255, 176, 0).
      const px = await page.evaluate(() => { const c = document.getElementById('view');
        return [...c.getContext('2d').getImageData(1, c.height - 2, 1, 1).data.slice(0, 3)]; });
      check('the amber REVIEW banner is on the outlined photo', px.join() === '255,176,0', px.join());
    }
    await page.screenshot({ path: path.join(SHOTS, 'desktop.png'), fullPage: true });
    await upload(page, SAMPLES[1]);  // a clear case: no mark
    check('no review mark for a reliable outline', await page.$eval('#review', (e) => e.hidden));

    await segmentAndCompare(page, inputs.odd, reference, '1531 x 1017 PNG (resized by the page as by Pillow)');
    const big = await segmentAndCompare(page, inputs.big, reference, '12 MP JPEG');
    if (big) {
      const size = await page.$eval('#size', (e) => e.textContent);
      check('12 MP JPEG outlined at its own size', /4000 × 3000/.test(size), `${size}, ${big.ms.toFixed(0)} ms photo to outline`);
      // The outlined photo's download, at the photo's own size.
      const downloads = path.join(WORK, 'downloads');
      const cdp = await h.browser.target().createCDPSession();
      await cdp.send('Browser.setDownloadBehavior', { behavior: 'allow', downloadPath: downloads, browserContextId: h.context.id });
      await page.click('#download-overlay');
      const file = path.join(downloads, 'large_12mp_overlay.png');
      for (let i = 0; i < 240 && !fs.existsSync(file); i++) await new Promise((r) => setTimeout(r, 250));
      const overlay = fs.existsSync(file) ? readPNGSize(fs.readFileSync(file)) : null;
      check('the outlined photo downloads as a PNG at the photo\'s size', overlay?.width === 4000 && overlay?.height === 3000,
        overlay ? `${overlay.width}x${overlay.height}` : 'no file');
    }

    check('a text file gets its message', (await upload(page, inputs.text)) === 'error' &&
      /is not an image/.test(await page.$eval('#error', (e) => e.textContent)), await page.$eval('#error', (e) => e.textContent));
    check('an undecodable .jpg gets its message', (await upload(page, inputs.broken)) === 'error' &&
      /cannot be read as an image/.test(await page.$eval('#error', (e) => e.textContent)), await page.$eval('#error', (e) => e.textContent));

    // Offline: the service worker has cached everything; reload with the network off.
    await page.evaluate(() => navigator.serviceWorker.ready);
    const pageCdp = await page.createCDPSession();
    const manifest = await pageCdp.send('Page.getAppManifest');
    // The test's browser context is an incognito one (for its proxy), which Chromium never installs from.
    const installabilityErrors = (await pageCdp.send('Page.getInstallabilityErrors')).installabilityErrors
      .filter((e) => e.errorId !== 'in-incognito');
    check('installable: a valid manifest and no installability errors', manifest.errors.length === 0 &&
      installabilityErrors.length === 0, JSON.stringify([...manifest.errors, ...installabilityErrors]));
    await pageCdp.detach();
    await page.setOfflineMode(true);
    const response = await page.reload();
    check('offline reload is served by the service worker', response?.fromServiceWorker(), `status ${response?.status()}`);
    check('offline: the model loads', (await waitState(page, ['ready', 'error'], 120_000)) === 'ready');
    for (const file of SAMPLES.slice(0, 2)) await segmentAndCompare(page, file, reference, 'offline');
    await page.setOfflineMode(false);

    const foreign = requests.filter((u) => !u.startsWith(h.url) && !u.startsWith('blob:') && !u.startsWith('data:'));
    check('no request to another origin (page and workers)', foreign.length === 0, `${requests.length} requests, foreign: ${foreign.join(' ') || 'none'}`);
    check('no request reached the outside (proxy of the browser context)', h.spy.seen.length === 0, h.spy.seen.join(' ') || 'none');
    check('no error in the page console', errors.length === 0, errors.join(' | '));
    await page.close();

    // The detector itself: a request to another origin from a page without the CSP does reach it.
    const probe = await openPage(h.context, { before: (p) => p.setBypassCSP(true) });
    await probe.page.goto(h.url);
    await probe.page.evaluate(() => fetch('http://example.invalid/probe').catch(() => null));
    check('the proxy sees a request to another origin when one is made', h.spy.seen.some((s) => s.includes('example.invalid')));
    await probe.page.close();

    // Phone-sized screenshot, the sample outlined through the keyboard ("Try the sample" by Tab + Enter).
    const phone = await openPage(h.context, { viewport: { width: 390, height: 844, deviceScaleFactor: 2, isMobile: true, hasTouch: true } });
    await phone.page.goto(h.url);
    await waitState(phone.page, ['ready'], 120_000);
    let focused = '';
    for (let i = 0; i < 6 && focused !== 'sample'; i++) {
      await phone.page.keyboard.press('Tab');
      focused = await phone.page.evaluate(() => document.activeElement?.id);
    }
    await phone.page.keyboard.press('Enter');
    check('keyboard: Tab reaches "Try the sample" and Enter outlines it',
      focused === 'sample' && (await waitState(phone.page, ['done', 'error'])) === 'done', `focused #${focused}`);
    await phone.page.type('#scale', '20');
    check('area in mm² from the scale', /mm²/.test(await phone.page.$eval('#area-mm', (e) => e.textContent)),
      await phone.page.$eval('#area-mm', (e) => e.textContent));
    await phone.page.screenshot({ path: path.join(SHOTS, 'phone.png'), fullPage: true });
    await phone.page.close();

    // A model whose embedded reliability model is invalid (its format name changed, same length): the
    // page says so, outlines all the same, and marks nothing. A context of its own: no service worker.
    // With ?twopass=0 also: the second pass is off, as `scsonet predict --no-two-pass`.
    const plain = await h.browser.createBrowserContext();
    const model = fs.readFileSync(path.join(WEB, 'dist/model/scsonet.onnx'));
    const at = model.indexOf('scsonet-reliability-v1');
    const broken = Buffer.from(model);
    broken.write('scsonet-reliability-v9', at);
    const bad = await openPage(plain, { before: async (p) => {
      await p.setRequestInterception(true);
      p.on('request', (r) => (r.url().endsWith('/model/scsonet.onnx')
        ? r.respond({ status: 200, contentType: 'application/octet-stream', body: broken }) : r.continue()));
    } });
    await bad.page.goto(`${h.url}?twopass=0`);
    await waitState(bad.page, ['ready', 'error'], 120_000);
    const warning = await bad.page.$eval('#error', (e) => (e.hidden ? '' : e.textContent));
    check('an invalid reliability model in the ONNX metadata: the page says so and does not use it',
      at > 0 && /reliability model is invalid.*expected format/.test(warning), warning || 'no message');
    const state = await upload(bad.page, inputs.small);
    const shown = await bad.page.evaluate(() => ({ ...document.getElementById('result').dataset,
      text: document.getElementById('reliability').textContent, hidden: document.getElementById('review').hidden }));
    check('... it outlines all the same, with no score and no review mark', state === 'done' && shown.reliability === '' &&
      shown.hidden && /not available/.test(shown.text), shown.text);
    check('?twopass=0: no second pass', shown.twoPassReason === 'off' && shown.twoPass === '', shown.twoPassReason);
    await plain.close();

    // A browser without WebAssembly.
    const nowasm = await openPage(h.context, { before: (p) => p.evaluateOnNewDocument(() => { delete globalThis.WebAssembly; }) });
    await nowasm.page.goto(h.url);
    check('no WebAssembly: the page says so', (await waitState(nowasm.page, ['error'])) === 'error' &&
      /no WebAssembly/.test(await nowasm.page.$eval('#error', (e) => e.textContent)));
    await nowasm.page.close();
  } finally {
    await h.close();
  }
  const failed = results.filter((r) => !r.ok);
  fs.writeFileSync(path.join(WORK, 'report.json'), JSON.stringify(results, null, 2));
  if (!failed.length && !KEEP) fs.rmSync(WORK, { recursive: true, force: true });
  console.log(`browser tests: ${results.length - failed.length} passed, ${failed.length} failed` +
    (failed.length || KEEP ? ` (details in ${WORK}/report.json)` : ''));
  process.exit(failed.length ? 1 : 0);
}

fs.mkdirSync(SHOTS, { recursive: true });
fs.mkdirSync(WORK, { recursive: true });
main().catch((err) => { console.error(`browser tests: error: ${err.stack || err}`); process.exit(1); });

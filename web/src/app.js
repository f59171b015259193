// The page: load the model once, then photo -> outline, all in this tab. Nothing is sent anywhere.
import * as ort from './ort/ort.wasm.min.mjs';
import { REVIEW_COLOR, assess, maskAtSize, modelInfo, normalize, onnxMetadata, paintOutline, reliabilityFeatures,
  reliabilityModel, resizeFloat, resizeRGBA, sigmoid, twoPass } from './pipeline.js';
import { encodeGrayPNG } from './png.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const MODEL_URL = 'model/scsonet.onnx';
const DISPLAY_MAX = 1280;  // longest side drawn on the page; downloads keep the photo's own size
// Up to this many pixels the model's input is resized from the photo's own pixels, exactly as
// `scsonet predict` does; a larger photo is decoded by the browser straight to DECODE_MAX on its
// longest side, which saves reading back and resizing 12 MP in JavaScript (its mask still agrees
// on > 99.9 %: 99.96 % for the 12 MP test photo).
const EXACT_MAX_PIXELS = 2048 * 2048;
const DECODE_MAX = 2048;
const DECODE = { imageOrientation: 'from-image', colorSpaceConversion: 'none', premultiplyAlpha: 'none' };

class UserError extends Error {}

function setStatus(text) { $('status').textContent = text; }

function showError(text) {
  $('error').textContent = text;
  $('error').hidden = !text;
  document.body.dataset.state = text ? 'error' : document.body.dataset.state;
}

function hasWebAssembly() {
  try {
    // The smallest valid module: magic number and version.
    return typeof WebAssembly === 'object' && WebAssembly.validate(new Uint8Array([0, 97, 115, 109, 1, 0, 0, 0]));
  } catch { return false; }
}

// Threads need a cross-origin isolated page (SharedArrayBuffer); one core is left to the page,
// whose resizing and outlining run while the runtime's threads still spin after a run (on two
// cores, one thread outlines a 12 MP photo faster than two). `?threads=N` overrides.
function threadCount() {
  if (params.has('threads')) return Math.max(1, Number(params.get('threads')) | 0);
  return self.crossOriginIsolated ? Math.max(1, Math.min(4, (navigator.hardwareConcurrency || 1) - 1)) : 1;
}

async function loadModel() {
  const response = await fetch(MODEL_URL);
  if (!response.ok) throw new Error(`cannot load the model (${MODEL_URL}: HTTP ${response.status})`);
  const bytes = new Uint8Array(await response.arrayBuffer());
  const meta = onnxMetadata(bytes), info = modelInfo(meta);
  // A broken reliability model is left out (with a message on the page), not trusted, not fatal.
  let reliability = null, reliabilityError = null;
  try { reliability = reliabilityModel(meta); } catch (err) { reliabilityError = err.message; }
  ort.env.wasm.numThreads = threadCount();
  ort.env.wasm.wasmPaths = new URL('./ort/', import.meta.url).href;
  const session = await ort.InferenceSession.create(bytes, {
    executionProviders: ['wasm'],
    graphOptimizationLevel: 'all',
    // Pinning every axis lets the optimiser fold the shape arithmetic away.
    freeDimensionOverrides: { batch: 1, height: info.height, width: info.width },
  });
  const model = { session, info, reliability, reliabilityError, input: session.inputNames[0], output: session.outputNames[0] };
  await runModel(model, new Float32Array(3 * info.height * info.width));  // the first run allocates
  return model;
}

async function runModel(model, x) {
  const { info } = model;
  const feeds = { [model.input]: new ort.Tensor('float32', x, [1, 3, info.height, info.width]) };
  const results = await model.session.run(feeds);
  return results[model.output].data;
}

function badFile(file) {
  const name = file.name || 'the file';
  if (file.type && !file.type.startsWith('image/')) {
    return new UserError(`“${name}” is not an image (${file.type}). Choose a photo: JPEG, PNG or WebP.`);
  }
  return new UserError(`“${name}” cannot be read as an image: it is not one, it is damaged, or its format ` +
    'is one this browser cannot decode (such as HEIC). Choose a JPEG, PNG or WebP photo.');
}

// The photo's size after its EXIF orientation, from its header (an <img> loads it without decoding).
async function photoSize(file) {
  const url = URL.createObjectURL(file), img = new Image();
  try {
    img.src = url;
    await new Promise((resolve, reject) => { img.onload = resolve; img.onerror = reject; });
    return { width: img.naturalWidth, height: img.naturalHeight };
  } finally { URL.revokeObjectURL(url); }
}

// { bitmap, width, height }: the photo's own size, and a bitmap of it at that size or, for a
// photo over EXACT_MAX_PIXELS, at DECODE_MAX on its longest side.
async function decode(file) {
  try {
    const { width, height } = await photoSize(file);
    if (width * height <= EXACT_MAX_PIXELS) {
      const bitmap = await createImageBitmap(file, DECODE);
      return { bitmap, width: bitmap.width, height: bitmap.height };
    }
    const s = DECODE_MAX / Math.max(width, height);
    const bitmap = await createImageBitmap(file, { ...DECODE, resizeWidth: Math.max(1, Math.round(width * s)),
      resizeHeight: Math.max(1, Math.round(height * s)), resizeQuality: 'high' });
    return { bitmap, width, height };
  } catch {
    throw badFile(file);
  }
}

function rgbaOf(bitmap, width = bitmap.width, height = bitmap.height) {
  const canvas = new OffscreenCanvas(width, height);
  const ctx = canvas.getContext('2d', { willReadFrequently: true });
  ctx.imageSmoothingQuality = 'high';
  ctx.drawImage(bitmap, 0, 0, width, height);
  return ctx.getImageData(0, 0, width, height).data;
}

// The model's probabilities of an RGB image at the model's size (normalise, model, sigmoid).
async function probabilities(model, rgb) {
  const { info } = model;
  return sigmoid(await runModel(model, normalize(rgb, info.width, info.height, info.mean, info.std)));
}

// `scsonet predict` for one photo: pass 1 on the whole frame, pass 2 on a crop around a lesion that
// is small in the frame (two-pass, on unless turned off), and the reliability score. Returns the
// final probabilities as `source` ({ probs, width, height }, which maskAtSize resizes to any size
// and thresholds): pass 1's at the model's size, or the pasted-back map at the bitmap's size.
// For a photo decoded smaller than its own size (over EXACT_MAX_PIXELS) the crop and the
// reliability features come from the decoded pixels.
async function segment(model, { bitmap, width, height }, timings = {}, usePass2 = true) {
  const { info } = model;
  let t = performance.now();
  const lap = (name) => { const now = performance.now(); timings[name] = now - t; t = now; };
  const rgba = rgbaOf(bitmap), bw = bitmap.width, bh = bitmap.height;
  lap('pixels');
  const rgb = resizeRGBA(rgba, bw, bh, info.width, info.height);
  lap('resize');
  const p1 = await probabilities(model, rgb);
  lap('model');
  const modelMs = timings.model;
  let source = { probs: p1, width: info.width, height: info.height }, pass = null, finalProbs;
  if (usePass2) {
    const tp = await twoPass(rgba, bw, bh, p1, info, (x) => probabilities(model, x));
    pass = tp.info;
    finalProbs = tp.probs;
    if (pass.second_pass) source = { probs: tp.probs, width: bw, height: bh };
    lap('two-pass');
  }
  let verdict = null;
  if (model.reliability) {
    finalProbs ??= bw === info.width && bh === info.height ? p1 : resizeFloat(p1, info.width, info.height, bw, bh);
    verdict = assess(model.reliability, reliabilityFeatures(finalProbs, bw, bh, pass, info.threshold));
    lap('reliability');
  }
  // The photo's pixels, when they are at its own size (for the outlined photo's download).
  const full = bw === width && bh === height ? rgba : null;
  return { rgba: full, source, pass, verdict, modelMs, timings };
}

function noLesionLabel(ctx, height) {
  const size = Math.max(12, Math.floor(height / 16)), margin = Math.max(2, Math.floor(height / 64));
  ctx.font = `${size}px sans-serif`;
  ctx.textBaseline = 'top';
  const w = ctx.measureText('no lesion found').width;
  ctx.fillStyle = '#000';
  ctx.fillRect(0, 0, w + 2 * margin + margin, size + 3 * margin);
  ctx.fillStyle = '#ff0';
  ctx.fillText('no lesion found', margin, margin);
}

// The amber banner along the bottom edge of an outline to review, as scsonet.postprocess.draw_overlay:
// the longest of its texts that fits the width.
function reviewBanner(ctx, width, height, reliability) {
  const size = Math.max(12, Math.floor(height / 16)), margin = Math.max(2, Math.floor(height / 64));
  const score = reliability === null ? '' : ` (reliability ${reliability.toFixed(2)})`;
  ctx.font = `${size}px sans-serif`;
  ctx.textBaseline = 'top';
  const texts = [`REVIEW: outline may be wrong${score}`, `REVIEW${score}`, 'REVIEW'];
  const text = texts.find((s) => ctx.measureText(s).width + 2 * margin <= width) ?? texts[texts.length - 1];
  ctx.fillStyle = `rgb(${REVIEW_COLOR.join(',')})`;
  ctx.fillRect(0, height - size - 2 * margin, width, size + 2 * margin);
  ctx.fillStyle = '#000';
  ctx.fillText(text, margin, height - size - margin);
}

function viewSize(width, height) {
  const scale = Math.min(1, DISPLAY_MAX / Math.max(width, height));
  return [Math.max(1, Math.round(width * scale)), Math.max(1, Math.round(height * scale))];
}

// The photo with the outline, at most DISPLAY_MAX on its longest side: `mask` is at that size (for a
// large photo, from the probabilities resized to it; the downloads are at the photo's own size).
// The outline is a layer drawn over the photo, so no pixels are read back for the view.
function drawView(bitmap, mask, w, h, verdict) {
  const canvas = $('view');
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext('2d');
  ctx.imageSmoothingQuality = 'high';
  ctx.drawImage(bitmap, 0, 0, w, h);
  if (!mask.includes(1)) noLesionLabel(ctx, h);
  else {
    const layer = new OffscreenCanvas(w, h);
    layer.getContext('2d').putImageData(new ImageData(paintOutline(new Uint8ClampedArray(w * h * 4), mask, w, h), w, h), 0, 0);
    ctx.drawImage(layer, 0, 0);
  }
  if (verdict?.review) reviewBanner(ctx, w, h, verdict.reliability);
}

function fmt(n, digits = 0) { return n.toLocaleString('en', { maximumFractionDigits: digits, minimumFractionDigits: digits }); }

function showFigures() {
  const s = state.result?.summary;
  if (!s) return;
  $('area-px').textContent = `${fmt(s.lesion_area_px)} px`;
  const perMm = Number($('scale').value);
  $('area-mm').textContent = perMm > 0 ? `${fmt(s.lesion_area_px / (perMm * perMm), 1)} mm²` : 'no scale given';
  $('fraction').textContent = `${fmt(100 * s.lesion_fraction, 1)} %`;
  $('confidence').textContent = s.mean_confidence === null ? '–' : `${fmt(100 * s.mean_confidence, 1)} %`;
  $('size').textContent = `${s.width} × ${s.height} px`;
  const { verdict, pass } = state.result;
  const threshold = state.model.reliability?.reviewThreshold;
  $('reliability').textContent = verdict ? `${fmt(verdict.reliability, 2)}${verdict.review ? ' (review)' : ''}`
    : state.model.reliabilityError ? 'not available (invalid in the model)' : 'not available (none in the model)';
  $('review').hidden = !verdict?.review;
  $('review-text').textContent = verdict?.review ? `Review: the outline may be wrong (reliability ${fmt(verdict.reliability, 2)}, ` +
    `below ${fmt(threshold, 2)}). Check it by eye before using the area.` : '';
  $('second-pass').textContent = !pass ? 'off' : pass.second_pass ? `ran on a crop (${fmt(100 * pass.crop_share, 0)} % of the photo)`
    : { 'no lesion': 'not run (no lesion in pass 1)', 'fills frame': 'not needed (the lesion fills the frame)',
      'crop rejected': 'not run (the crop would cover most of the photo)' }[pass.reason] ?? pass.reason;
}

const state = { model: null, busy: false, pending: null, result: null, name: 'photo', maskUrl: null };

async function handle(file) {
  if (!state.model) return;
  if (state.busy) { state.pending = file; return; }
  state.busy = true;
  document.body.dataset.state = 'busy';
  showError('');
  setStatus(`Outlining ${file.name || 'the photo'}…`);
  const t0 = performance.now();
  try {
    const photo = await decode(file);
    const timings = { decode: performance.now() - t0 };
    const result = await segment(state.model, photo, timings, $('two-pass').checked);
    const { info } = state.model, { width, height } = photo, src = result.source;
    const maskOf = (outW, outH) => maskAtSize(src.probs, src.width, src.height, outW, outH, info.threshold);
    let t = performance.now();
    const [w, h] = viewSize(width, height);
    // At its own size the view's mask is the mask; a larger photo gets the full-size mask (area,
    // download) after its outline is on the screen.
    let full = w === width && h === height ? maskOf(width, height) : null;
    const viewMask = full ? full.mask : maskOf(w, h).mask;
    timings['view mask'] = performance.now() - t;
    t = performance.now();
    drawView(photo.bitmap, viewMask, w, h, result.verdict);
    const totalMs = performance.now() - t0;
    timings['view draw'] = performance.now() - t;
    t = performance.now();
    full ??= maskOf(width, height);
    timings['full-size mask'] = performance.now() - t;
    const figuresMs = performance.now() - t0;
    photo.bitmap.close();
    Object.assign(result, full);
    state.result = { ...result, width, height, file };
    state.name = (file.name || 'photo').replace(/\.[^.]*$/, '') || 'photo';
    $('result').hidden = false;
    $('caption').textContent = result.summary.lesion_found
      ? `${file.name || 'Photo'}: the lesion outlined in green.` : `${file.name || 'Photo'}: no lesion found.`;
    showFigures();
    const mask = result.mask.map((v) => v * 255);
    if (state.maskUrl) URL.revokeObjectURL(state.maskUrl);
    state.maskUrl = URL.createObjectURL(await encodeGrayPNG(mask, result.summary.width, result.summary.height));
    $('download-mask').href = state.maskUrl;
    $('download-mask').download = `${state.name}_mask.png`;
    Object.assign($('result').dataset, { totalMs: totalMs.toFixed(1), modelMs: result.modelMs.toFixed(1),
      figuresMs: figuresMs.toFixed(1),
      areaPx: result.summary.lesion_area_px, file: file.name || '',
      reliability: result.verdict ? result.verdict.reliability : '', review: result.verdict ? result.verdict.review : '',
      twoPass: result.pass ? result.pass.second_pass : '', twoPassReason: result.pass ? result.pass.reason : 'off',
      timings: JSON.stringify(Object.fromEntries(Object.entries(timings).map(([k, v]) => [k, Math.round(v * 10) / 10]))) });
    setStatus(`Outlined in ${fmt(totalMs)} ms (the model itself: ${fmt(result.modelMs, 1)} ms), on this device.`);
    document.body.dataset.state = 'done';
  } catch (err) {
    setStatus('');
    $('result').hidden = true;  // the previous photo's result would read as this one's
    state.result = null;
    showError(err instanceof UserError ? err.message : `Something went wrong: ${err.message || err}`);
    if (!(err instanceof UserError)) console.error(err);
  } finally {
    state.busy = false;
    if (state.pending) { const next = state.pending; state.pending = null; handle(next); }
  }
}

async function downloadOverlay() {
  const r = state.result, status = $('status').textContent;
  if (!r) return;
  setStatus('Preparing the outlined photo…');
  try {
    await saveOverlay(r);
    setStatus(status);
  } catch (err) {
    setStatus('');
    showError(`The outlined photo could not be made: ${err.message || err}`);
  }
}

async function saveOverlay(r) {
  const canvas = new OffscreenCanvas(r.width, r.height), ctx = canvas.getContext('2d');
  let rgba;
  if (r.rgba) rgba = new Uint8ClampedArray(r.rgba);
  else {  // a large photo: decoded at its own size only now
    const bitmap = await createImageBitmap(r.file, DECODE);
    rgba = rgbaOf(bitmap);
    bitmap.close();
  }
  if (r.summary.lesion_found) paintOutline(rgba, r.mask, r.width, r.height);
  ctx.putImageData(new ImageData(rgba, r.width, r.height), 0, 0);
  if (!r.summary.lesion_found) noLesionLabel(ctx, r.height);
  if (r.verdict?.review) reviewBanner(ctx, r.width, r.height, r.verdict.reliability);
  const url = URL.createObjectURL(await canvas.convertToBlob({ type: 'image/png' }));
  const a = Object.assign(document.createElement('a'), { href: url, download: `${state.name}_overlay.png` });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

function wire() {
  for (const id of ['file', 'camera']) {
    $(id).addEventListener('change', (e) => { const f = e.target.files[0]; if (f) handle(f); e.target.value = ''; });
  }
  $('sample').addEventListener('click', async () => {
    const blob = await (await fetch('sample.jpg')).blob();
    handle(new File([blob], 'ISIC_0012656.jpg', { type: blob.type }));
  });
  $('scale').addEventListener('input', showFigures);
  // As `scsonet predict --no-two-pass`; the reliability score was fitted on two-pass outlines.
  if (params.get('twopass') === '0') $('two-pass').checked = false;
  $('two-pass').addEventListener('change', () => { if (state.result?.file) handle(state.result.file); });
  $('download-overlay').addEventListener('click', downloadOverlay);
  const drop = $('drop');
  document.addEventListener('dragover', (e) => { e.preventDefault(); drop.classList.add('over'); });
  document.addEventListener('dragleave', (e) => { if (!e.relatedTarget) drop.classList.remove('over'); });
  document.addEventListener('drop', (e) => {
    e.preventDefault();
    drop.classList.remove('over');
    const f = e.dataTransfer?.files?.[0];
    if (f) handle(f);
  });
}

async function main() {
  if (!hasWebAssembly()) {
    setStatus('');
    showError('This browser cannot run the model: it has no WebAssembly (or it is switched off, as some ' +
      'strict security settings do). Use a current Chrome, Edge, Firefox or Safari.');
    for (const el of document.querySelectorAll('#input input, #input button')) el.disabled = true;
    return;
  }
  wire();
  if ('serviceWorker' in navigator) {
    navigator.serviceWorker.register('sw.js').catch((err) => console.warn('no offline copy:', err));
  }
  try {
    state.model = await loadModel();
  } catch (err) {
    setStatus('');
    showError(`The model could not be loaded: ${err.message || err}`);
    return;
  }
  const { info } = state.model;
  $('model-info').textContent = `Model ${info.arch} (${info.weights}, scsonet ${info.version}), ` +
    `${info.width}×${info.height} input, threshold ${info.threshold}; onnxruntime-web ${ort.env.versions?.web ?? ''} ` +
    `WebAssembly, ${ort.env.wasm.numThreads} thread(s)${self.crossOriginIsolated ? '' : ' (page not cross-origin isolated)'}; ` +
    (state.model.reliability ? `reliability model fitted for ${state.model.reliability.meta.weights ?? '?'} on ` +
      `${state.model.reliability.meta.split ?? '?'}, review below ${state.model.reliability.reviewThreshold}.`
      : 'no reliability model in this export.');
  if (state.model.reliabilityError) {
    showError(`The model's reliability model is invalid and is not used, so no outline gets a review mark: ` +
      `${state.model.reliabilityError}. Re-export the model with \`scsonet export\`.`);
  }
  setStatus('Ready: choose, drop or take a photo.');
  document.body.dataset.state = 'ready';
  // For automation (tests, benchmarks): the loaded model and the pipeline.
  window.scsonet = { ort, model: state.model, runModel: (x) => runModel(state.model, x), handle, decode,
    segment: (photo) => segment(state.model, photo) };
}

main();

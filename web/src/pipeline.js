// The steps of `scsonet predict` (src/scsonet/postprocess.py, inference.py, onnx_runtime.py) in
// plain JavaScript, with no DOM: the model's metadata, Pillow's resampling, normalisation, the
// sigmoid, thresholding, lesion figures and the outline. Each matches the Python step bit for bit
// where Python's result is integer (resized pixels, masks) and in float32 where it is float.

// ---- ONNX metadata: ModelProto field 14, repeated StringStringEntryProto {1: key, 2: value} ----

function readVarint(bytes, pos) {
  let value = 0, shift = 1;
  for (;;) {
    const b = bytes[pos++];
    value += (b & 0x7f) * shift;  // arithmetic, not <<: lengths can pass 2^31 in theory
    if (b < 0x80) return [value, pos];
    shift *= 128;
  }
}

// Calls visit(field, wireType, start, end) for each length-delimited field of a protobuf message;
// skips the others. The graph (field 7) is skipped by its length, so this is fast on any model.
function eachField(bytes, start, end, visit) {
  let pos = start;
  while (pos < end) {
    let key;
    [key, pos] = readVarint(bytes, pos);
    const field = Math.floor(key / 8), wire = key & 7;
    if (wire === 0) [, pos] = readVarint(bytes, pos);
    else if (wire === 1) pos += 8;
    else if (wire === 5) pos += 4;
    else if (wire === 2) {
      let len;
      [len, pos] = readVarint(bytes, pos);
      visit(field, pos, pos + len);
      pos += len;
    } else throw new Error(`not an ONNX model (protobuf wire type ${wire})`);
  }
  if (pos !== end) throw new Error('not an ONNX model (truncated)');
}

export function onnxMetadata(buffer) {
  const bytes = new Uint8Array(buffer), text = new TextDecoder(), meta = {};
  eachField(bytes, 0, bytes.length, (field, start, end) => {
    if (field !== 14) return;
    let key = '', value = '';
    eachField(bytes, start, end, (f, s, e) => {
      if (f === 1) key = text.decode(bytes.subarray(s, e));
      if (f === 2) value = text.decode(bytes.subarray(s, e));
    });
    meta[key] = value;
  });
  return meta;
}

// What the page needs from the metadata (as scsonet.onnx_runtime.ModelInfo reads it).
export function modelInfo(meta) {
  const missing = ['resize_size', 'mean', 'std', 'threshold'].filter((k) => !(k in meta));
  if (missing.length) throw new Error(`the model's metadata lacks ${missing.join(', ')}; export it with \`scsonet export\``);
  const [height, width] = JSON.parse(meta.resize_size);
  return {
    height, width, mean: JSON.parse(meta.mean), std: JSON.parse(meta.std), threshold: Number(meta.threshold),
    arch: meta.arch || '?', weights: meta.weights || '?', version: meta.scsonet_version || '?',
  };
}

// ---- Pillow's resampling (Resample.c), BILINEAR filter: antialiased when shrinking ----

// For each output index: first input index, count, and normalised weights (ImagingResample's
// precompute_coeffs); the same double arithmetic as the C code.
function coefficients(inSize, outSize) {
  const scale = inSize / outSize, filterscale = Math.max(scale, 1), support = filterscale;  // bilinear support 1
  const ksize = Math.ceil(support) * 2 + 1;
  const weights = new Float64Array(outSize * ksize), bounds = new Int32Array(outSize * 2);
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale, ss = 1 / filterscale;
    const xmin = Math.max(0, Math.trunc(center - support + 0.5));
    const xmax = Math.min(inSize, Math.trunc(center + support + 0.5)) - xmin;
    let ww = 0;
    for (let x = 0; x < xmax; x++) {
      const w = Math.max(0, 1 - Math.abs((x + xmin - center + 0.5) * ss));
      weights[xx * ksize + x] = w;
      ww += w;
    }
    if (ww !== 0) for (let x = 0; x < xmax; x++) weights[xx * ksize + x] /= ww;
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  return { ksize, weights, bounds };
}

const PRECISION_BITS = 22;  // 32 - 8 - 2, as Pillow's 8-bit path

function fixedPoint(weights) {
  const out = new Int32Array(weights.length);
  for (let i = 0; i < weights.length; i++) {
    out[i] = Math.trunc(weights[i] < 0 ? -0.5 + weights[i] * (1 << PRECISION_BITS) : 0.5 + weights[i] * (1 << PRECISION_BITS));
  }
  return out;
}

const clip8 = (v) => (v <= 0 ? 0 : v >= (256 << PRECISION_BITS) ? 255 : v >> PRECISION_BITS);

// RGBA uint8 (width x height, 4 channels; alpha ignored) -> RGB uint8 (outW x outH x 3), as
// Image.fromarray(rgb).resize((outW, outH), Image.BILINEAR): horizontal pass over the rows the
// vertical pass reads, rounded to uint8, then the vertical pass.
export function resizeRGBA(src, width, height, outW, outH) {
  const needH = width !== outW, needV = height !== outH;
  const vert = coefficients(height, outH);
  const first = needH ? vert.bounds[0] : 0;
  const last = needH ? vert.bounds[outH * 2 - 2] + vert.bounds[outH * 2 - 1] : height;
  let tmp = new Uint8Array((last - first) * outW * 3), tmpW = outW;
  if (needH) {
    const { ksize, weights, bounds } = coefficients(width, outW), k = fixedPoint(weights);
    const half = 1 << (PRECISION_BITS - 1);
    for (let y = first, o = 0; y < last; y++) {
      const row = y * width * 4;
      for (let xx = 0; xx < outW; xx++, o += 3) {
        const xmin = bounds[xx * 2], xmax = bounds[xx * 2 + 1], kb = xx * ksize;
        let s0 = half, s1 = half, s2 = half;
        for (let x = 0, p = row + xmin * 4; x < xmax; x++, p += 4) {
          const w = k[kb + x];
          s0 += src[p] * w; s1 += src[p + 1] * w; s2 += src[p + 2] * w;
        }
        tmp[o] = clip8(s0); tmp[o + 1] = clip8(s1); tmp[o + 2] = clip8(s2);
      }
    }
  } else {  // the rows as they are, without alpha
    tmpW = width;
    for (let i = 0, o = 0; i < width * height * 4; i += 4, o += 3) { tmp[o] = src[i]; tmp[o + 1] = src[i + 1]; tmp[o + 2] = src[i + 2]; }
  }
  if (!needV) return tmp;
  const out = new Uint8Array(outW * outH * 3), k = fixedPoint(vert.weights), half = 1 << (PRECISION_BITS - 1);
  const rowLen = tmpW * 3;
  for (let yy = 0; yy < outH; yy++) {
    const ymin = vert.bounds[yy * 2] - first, ymax = vert.bounds[yy * 2 + 1], kb = yy * vert.ksize;
    for (let c = 0; c < rowLen; c++) {
      let s = half;
      for (let y = 0, p = ymin * rowLen + c; y < ymax; y++, p += rowLen) s += tmp[p] * k[kb + y];
      out[yy * rowLen + c] = clip8(s);
    }
  }
  return out;
}

// Pillow's float vertical pass, one output row at a time (row(yy, Float32Array of width values)):
// the same sums in the same order as the C loop, but along rows, which suits the cache.
function verticalRows(src, width, height, outH, row) {
  const { ksize, weights, bounds } = coefficients(height, outH);
  const acc = new Float64Array(width), out = new Float32Array(width);
  for (let yy = 0; yy < outH; yy++) {
    const ymin = bounds[yy * 2], ymax = bounds[yy * 2 + 1], kb = yy * ksize;
    // Taps of weight 0 add nothing; the usual upsampling row has two others, done in one loop.
    const taps = [];
    for (let y = 0; y < ymax; y++) if (weights[kb + y] !== 0) taps.push([(ymin + y) * width, weights[kb + y]]);
    if (taps.length === 2) {
      const [[a, wa], [b, wb]] = taps;
      for (let x = 0; x < width; x++) out[x] = src[a + x] * wa + src[b + x] * wb;
    } else {
      acc.fill(0);
      for (const [base, w] of taps) for (let x = 0; x < width; x++) acc[x] += src[base + x] * w;
      out.set(acc);  // rounds to float32, as Pillow stores each pass
    }
    row(yy, out);
  }
}

function horizontalFloat(src, width, height, outW) {
  if (width === outW) return src;
  const { ksize, weights, bounds } = coefficients(width, outW);
  const out = new Float32Array(outW * height);
  for (let y = 0; y < height; y++) {
    const row = y * width;
    for (let xx = 0; xx < outW; xx++) {
      const xmin = bounds[xx * 2], xmax = bounds[xx * 2 + 1], kb = xx * ksize;
      let s = 0;
      for (let x = 0; x < xmax; x++) s += src[row + xmin + x] * weights[kb + x];
      out[y * outW + xx] = s;
    }
  }
  return out;
}

// Float32 map (width x height) -> (outW x outH), as Image.fromarray(float32).resize(..., BILINEAR):
// double sums, stored as float32 after each pass.
export function resizeFloat(src, width, height, outW, outH) {
  let cur = horizontalFloat(src, width, height, outW);
  const curW = outW;
  if (height !== outH) {
    const out = new Float32Array(curW * outH);
    verticalRows(cur, curW, height, outH, (yy, row) => out.set(row, yy * curW));
    cur = out;
  }
  return cur;
}

// ---- the model's input and output ----

// RGB uint8 (HWC) -> float32 NCHW, (x - 255 mean) / (255 std) in float32 as OrtSegmenter.normalize.
export function normalize(rgb, width, height, mean, std) {
  const n = width * height, out = new Float32Array(3 * n), f = Math.fround;
  for (let c = 0; c < 3; c++) {
    const shift = f(f(mean[c]) * 255), scale = f(f(std[c]) * 255);
    for (let i = 0; i < n; i++) out[c * n + i] = f(rgb[i * 3 + c] - shift) / scale;
  }
  return out;
}

// Logits -> float32 probabilities (scsonet.onnx_runtime.sigmoid, in float32).
export function sigmoid(logits) {
  const out = new Float32Array(logits.length);
  for (let i = 0; i < logits.length; i++) {
    const f = Math.fround, e = f(Math.exp(-Math.abs(logits[i]))), d = f(1 + e);
    out[i] = logits[i] >= 0 ? 1 / d : e / d;  // float32 steps, as numpy on float32 arrays
  }
  return out;
}

// Mask (0/1 bytes) and its figures, as scsonet.postprocess.summarize, built row by row.
function maskBuilder(width, height, t) {
  const mask = new Uint8Array(width * height);
  let area = 0, sum = 0, x0 = width, y0 = height, x1 = -1, y1 = -1;
  return {
    row(y, values) {
      const base = y * width;
      let n = 0, s = 0;
      for (let x = 0; x < width; x++) {  // without branches: lesion and skin interleave unpredictably
        const v = values[x], m = +(v >= t);
        mask[base + x] = m;
        n += m;
        s += v * m;
      }
      if (n === 0) return;
      const line = mask.subarray(base, base + width);
      x0 = Math.min(x0, line.indexOf(1));
      x1 = Math.max(x1, line.lastIndexOf(1));
      if (y < y0) y0 = y;
      y1 = y;
      area += n;
      sum += s;
    },
    done: () => ({ mask, summary: {
      width, height, lesion_found: area > 0, lesion_area_px: area, lesion_fraction: area / (width * height),
      bbox: area ? [x0, y0, x1 + 1, y1 + 1] : null, mean_confidence: area ? Math.round(sum / area * 1e6) / 1e6 : null,
    } }),
  };
}

export function threshold(probs, width, height, t) {
  const b = maskBuilder(width, height, t);
  for (let y = 0; y < height; y++) b.row(y, probs.subarray(y * width, (y + 1) * width));
  return b.done();
}

// threshold(resizeFloat(probs, ...)) without holding the full-size float map.
export function maskAtSize(probs, width, height, outW, outH, t) {
  const b = maskBuilder(outW, outH, t);
  const cur = horizontalFloat(probs, width, height, outW);
  if (height === outH) for (let y = 0; y < outH; y++) b.row(y, cur.subarray(y * outW, (y + 1) * outW));
  else verticalRows(cur, outW, height, outH, (y, row) => b.row(y, row));
  return b.done();
}

// ---- the outline (scsonet.postprocess.outline_width, erode, outline) ----

// Python's round(): halves go to the even neighbour.
function roundHalfEven(x) {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

export const outlineWidth = (height, width) => Math.max(3, roundHalfEven(Math.max(height, width) / 512));

// Erosion by a (2r+1) square with the border repeated: a pixel stays when its window, clipped to
// the image, holds no background. Rows by runs of lesion; columns by counting lesion above and
// below (capped: only "at least r + 1, or up to the border" matters).
export function erode(mask, width, height, r) {
  const rows = new Uint8Array(mask.length);
  for (let y = 0; y < height; y++) {
    const base = y * width;
    for (let x = 0; x < width;) {
      if (!mask[base + x]) { x++; continue; }
      let end = x;
      while (end < width && mask[base + end]) end++;
      const from = x === 0 ? 0 : x + r, to = end === width ? width : end - r;  // survivors: [from, to)
      for (let i = from; i < to; i++) rows[base + i] = 1;
      x = end;
    }
  }
  const FAR = 255, need = Math.min(r + 1, FAR);  // r < 255 for any photo up to 130 000 px
  const up = new Uint8Array(mask.length);
  for (let x = 0; x < width; x++) up[x] = rows[x] ? FAR : 0;
  for (let y = 1; y < height; y++) {
    for (let x = 0, i = y * width; x < width; x++, i++) up[i] = rows[i] ? Math.min(FAR, up[i - width] + 1) : 0;
  }
  const down = new Uint8Array(width), out = up;  // up is read once per pixel, then overwritten
  for (let y = height - 1; y >= 0; y--) {
    for (let x = 0, i = y * width; x < width; x++, i++) {
      down[x] = rows[i] ? (y === height - 1 ? FAR : Math.min(FAR, down[x] + 1)) : 0;
      out[i] = up[i] >= need && down[x] >= need ? 1 : 0;
    }
  }
  return out;
}

// The band of `width` pixels just inside the mask's edge (0/1 bytes); the image border is no edge.
export function outline(mask, w, h, band) {
  const eroded = erode(mask, w, h, band);
  for (let i = 0; i < eroded.length; i++) eroded[i] = mask[i] & (eroded[i] ^ 1);
  return eroded;
}

export const OUTLINE_COLOR = [0, 255, 0];

// RGBA image with the outline painted in (in place), as scsonet.postprocess.draw_overlay; on a
// transparent (zero) image, the outline alone.
export function paintOutline(rgba, mask, width, height) {
  const band = outline(mask, width, height, outlineWidth(height, width));
  for (let i = 0, p = 0; i < band.length; i++, p += 4) {
    if (band[i]) { rgba[p] = OUTLINE_COLOR[0]; rgba[p + 1] = OUTLINE_COLOR[1]; rgba[p + 2] = OUTLINE_COLOR[2]; rgba[p + 3] = 255; }
  }
  return rgba;
}


// ---- two-pass prediction (scsonet.twopass.two_pass_batch, for one image) ----

export const TWO_PASS = { CONTEXT: [1.5, 3.0], GATE_BORDER: 0.02, GATE_SHRINK: 0.8, MAX_CROP_SHARE: 0.7,
  MIN_CROP_FRACTION: 0.125, MIN_COMPONENT_PX: 4 };

const round6 = (x) => Math.round(x * 1e6) / 1e6;

// 4-connected components of a 0/1 mask: labels numbered in raster order of each component's first
// pixel (as scsonet.twopass.label_components), and their sizes (sizes[0] unused).
export function labelComponents(mask, w, h) {
  const labels = new Int32Array(w * h), sizes = [0], stack = new Int32Array(w * h);
  for (let start = 0; start < mask.length; start++) {
    if (!mask[start] || labels[start]) continue;
    const label = sizes.length;
    let top = 0, n = 0;
    stack[top++] = start;
    labels[start] = label;
    while (top) {
      const i = stack[--top], x = i % w;
      n++;
      if (x > 0 && mask[i - 1] && !labels[i - 1]) { labels[i - 1] = label; stack[top++] = i - 1; }
      if (x < w - 1 && mask[i + 1] && !labels[i + 1]) { labels[i + 1] = label; stack[top++] = i + 1; }
      if (i >= w && mask[i - w] && !labels[i - w]) { labels[i - w] = label; stack[top++] = i - w; }
      if (i + w < w * h && mask[i + w] && !labels[i + w]) { labels[i + w] = label; stack[top++] = i + w; }
    }
    sizes.push(n);
  }
  return { labels, sizes };
}

// The largest component's bounding box [x0, y0, x1, y1] (exclusive) and size; ties go to the
// first in raster order, as numpy's argmax.
function largestComponentBox(mask, w, h) {
  const { labels, sizes } = labelComponents(mask, w, h);
  let best = 0;
  for (let k = 1; k < sizes.length; k++) if (sizes[k] > (best ? sizes[best] : 0)) best = k;
  if (!best) return { size: 0 };
  let x0 = w, y0 = h, x1 = -1, y1 = -1;
  for (let i = 0; i < labels.length; i++) {
    if (labels[i] !== best) continue;
    const x = i % w, y = (i - x) / w;
    if (x < x0) x0 = x; if (x > x1) x1 = x; if (y < y0) y0 = y; if (y > y1) y1 = y;
  }
  return { size: sizes[best], box: [x0, y0, x1 + 1, y1 + 1] };
}

// Square window [x0, y0, x1, y1] around `box` (image pixels), as scsonet.twopass.crop_window.
export function cropWindow(box, height, width, context, minFraction = TWO_PASS.MIN_CROP_FRACTION) {
  const [x0, y0, x1, y1] = box;
  const side = Math.max(context * Math.max(x1 - x0, y1 - y0), minFraction * Math.min(height, width), 1);
  const out = [];
  for (const [lo, hi, extent] of [[x0, x1, width], [y0, y1, height]]) {
    const length = Math.min(roundHalfEven(side), extent);
    const start = Math.min(Math.max(roundHalfEven((lo + hi) / 2 - length / 2), 0), extent - length);
    out.push([start, start + length]);
  }
  return [out[0][0], out[1][0], out[0][1], out[1][1]];
}

// Share of a 0/1 mask's border pixels that are set, counted as numpy's concatenate of the first and
// last rows and the inner first and last columns.
function borderShare(mask, w, h) {
  let n = 0;
  for (let x = 0; x < w; x++) n += mask[x] + mask[(h - 1) * w + x];
  for (let y = 1; y < h - 1; y++) n += mask[y * w] + mask[y * w + w - 1];
  const total = 2 * w + 2 * Math.max(0, h - 2);
  return total ? n / total : 0;
}

const countAtLeast = (values, t) => { let n = 0; for (let i = 0; i < values.length; i++) n += values[i] >= t; return n; };

// RGBA region [x0, y0, x1, y1] of an RGBA image of width `width`.
function cropRGBA(rgba, width, [x0, y0, x1, y1]) {
  const cw = x1 - x0, out = new Uint8Array(cw * (y1 - y0) * 4);
  for (let y = y0; y < y1; y++) out.set(rgba.subarray((y * width + x0) * 4, (y * width + x1) * 4), (y - y0) * cw * 4);
  return out;
}

// Two-pass probabilities of one image (RGBA, width x height) from pass 1's probabilities `p1` at the
// model's size; `predict(rgb)` runs the model on an RGB uint8 image at its size and returns
// probabilities. Returns { probs: float32 at the image's size, info: as TwoPassInfo.to_dict() }.
export async function twoPass(rgba, width, height, p1, info, predict) {
  const { width: mw, height: mh, threshold: t } = info;
  const full = width === mw && height === mh ? p1 : resizeFloat(p1, mw, mh, width, height);
  const result = { second_pass: false, reason: 'no lesion', crop: null, crop_share: null, agreement: null,
    context: null, pass2_border: null };
  const lesion = largestComponentBox(p1.map((v) => v >= t), mw, mh);
  if (lesion.size < TWO_PASS.MIN_COMPONENT_PX) return { probs: full, info: result };
  result.reason = 'fills frame';
  const sx = width / mw, sy = height / mh, [bx0, by0, bx1, by1] = lesion.box;
  const box = [bx0 * sx, by0 * sy, bx1 * sx, by1 * sy];
  let pass1Area = null;
  for (let step = 0; step < TWO_PASS.CONTEXT.length; step++) {
    const ctx = TWO_PASS.CONTEXT[step], last = step === TWO_PASS.CONTEXT.length - 1;
    const win = cropWindow(box, height, width, ctx), [x0, y0, x1, y1] = win, cw = x1 - x0, ch = y1 - y0;
    const share = cw * ch / (width * height);
    Object.assign(result, { crop: win, crop_share: round6(share) });
    if (share > TWO_PASS.MAX_CROP_SHARE) {
      if (step) result.reason = 'crop rejected';  // a tighter crop was rejected, this one covers too much
      break;
    }
    const small = await predict(resizeRGBA(cropRGBA(rgba, width, win), cw, ch, mw, mh));
    const p2 = cw === mw && ch === mh ? small : resizeFloat(small, mw, mh, cw, ch);
    const p2mask = p2.map((v) => v >= t);
    if (!last) {
      pass1Area ??= countAtLeast(full, t);
      const keep = borderShare(p2mask, cw, ch) <= TWO_PASS.GATE_BORDER && countAtLeast(p2, t) <= TWO_PASS.GATE_SHRINK * pass1Area;
      if (!keep) continue;
    }
    const probs = new Float32Array(width * height);
    let both = 0, a = 0, b = 0;
    for (let y = 0; y < ch; y++) {
      probs.set(p2.subarray(y * cw, (y + 1) * cw), (y0 + y) * width + x0);
      for (let x = 0; x < cw; x++) {
        const m1 = full[(y0 + y) * width + x0 + x] >= t, m2 = p2mask[y * cw + x];
        a += m1; b += m2; both += m1 & m2;
      }
    }
    Object.assign(result, { second_pass: true, reason: 'ran', context: ctx, agreement: round6(a + b ? 2 * both / (a + b) : 1),
      pass2_border: round6(borderShare(p2mask, cw, ch)) });
    return { probs, info: result };
  }
  return { probs: full, info: result };
}

// ---- the reliability score (scsonet.reliability) ----

export const RELIABILITY_FORMAT = 'scsonet-reliability-v1';
export const RELIABILITY_FEATURES = ['border_touch', 'lesion_share', 'lesion_share_sq', 'log_components', 'largest_share',
  'margin', 'empty', 'pass_disagreement', 'flip_disagreement'];
const FEATURE_SIZE = 256, EDGE_BAND = 4, MIN_COMPONENT_SHARE = 0.001;

// The reliability model embedded by `scsonet export` (metadata key `reliability`), checked as
// ReliabilityModel.from_dict does; null when the export has none; an Error saying what is wrong.
export function reliabilityModel(meta) {
  if (!('reliability' in meta)) return null;
  const fail = (what) => { throw new Error(`${what} (ONNX metadata 'reliability')`); };
  let data;
  try { data = JSON.parse(meta.reliability); } catch (err) { fail(`malformed reliability model: ${err.message}`); }
  if (!data || typeof data !== 'object' || Array.isArray(data) || data.format !== RELIABILITY_FORMAT) {
    fail(`not a reliability model: expected format '${RELIABILITY_FORMAT}'`);
  }
  const names = data.features;
  if (!Array.isArray(names) || !names.length || new Set(names).size !== names.length) fail("'features' must be a non-empty list of distinct names");
  const unknown = names.filter((n) => !RELIABILITY_FEATURES.includes(n));
  if (unknown.length) fail(`unknown features ${unknown.join(', ')}; known: ${RELIABILITY_FEATURES.join(', ')}`);
  for (const key of ['mean', 'std', 'coef']) {
    if (!Array.isArray(data[key]) || data[key].length !== names.length) fail(`'${key}' must be a list of ${names.length} numbers, one per feature`);
  }
  const numbers = [...data.mean, ...data.std, ...data.coef, data.intercept, data.review_threshold];
  if (!numbers.every((v) => typeof v === 'number' && Number.isFinite(v))) {
    fail('coefficients, means, stds, intercept and review_threshold must be finite numbers');
  }
  if (data.std.some((v) => v <= 0)) fail("'std' must be positive");
  if (!(data.review_threshold >= 0 && data.review_threshold <= 1)) fail("'review_threshold' must lie in 0..1");
  return { features: names, mean: data.mean, std: data.std, coef: data.coef, intercept: data.intercept,
    reviewThreshold: data.review_threshold, meta: data.meta || {} };
}

// scsonet.reliability.reliability_features of the final probabilities (width x height) and the
// two-pass info (null when two-pass was off); no flipped predictions.
export function reliabilityFeatures(probs, width, height, passInfo, t) {
  const n = FEATURE_SIZE * FEATURE_SIZE;
  const p = width === FEATURE_SIZE && height === FEATURE_SIZE ? probs : resizeFloat(probs, width, height, FEATURE_SIZE, FEATURE_SIZE);
  const mask = p.map((v) => v >= t), f = Math.fround;
  const area = countAtLeast(mask, 1), share = area / n;
  let components = 0, largest = 0, sum = 0, count = 0;
  if (area) {
    const { sizes } = labelComponents(mask, FEATURE_SIZE, FEATURE_SIZE);
    for (let k = 1; k < sizes.length; k++) { components += sizes[k] >= MIN_COMPONENT_SHARE * n; largest = Math.max(largest, sizes[k]); }
    largest /= area;
    const kept = erode(mask.map((v) => 1 - v), FEATURE_SIZE, FEATURE_SIZE, EDGE_BAND);  // background that stays background
    for (let i = 0; i < n; i++) if (mask[i] || !kept[i]) { sum += Math.abs(f(f(2 * p[i]) - 1)); count++; }
  } else {
    for (let i = 0; i < n; i++) sum += Math.abs(f(f(2 * p[i]) - 1));
    count = n;
  }
  const agreement = passInfo?.agreement;
  return { border_touch: borderShare(mask, FEATURE_SIZE, FEATURE_SIZE), lesion_share: share, lesion_share_sq: share * share,
    log_components: Math.log1p(components), largest_share: largest, margin: sum / count, empty: area ? 0 : 1,
    pass_disagreement: agreement === null || agreement === undefined ? 0 : 1 - agreement, flip_disagreement: 0 };
}

// { reliability: 0..1 (3 decimals, as results.json), score (unrounded), review } of one image.
export function assess(model, features) {
  let z = model.intercept;
  model.features.forEach((name, k) => { z += (features[name] - model.mean[k]) / model.std[k] * model.coef[k]; });
  const score = 0.5 * (1 + Math.tanh(0.5 * z));
  return { reliability: Math.round(Math.round(score * 1e4) / 10) / 1e3, score, review: score < model.reviewThreshold };
}

export const REVIEW_COLOR = [255, 176, 0];

/* Direct 2-D convolution (stride 1, zero padding, any dilation) for thin layers, float32.
 *
 * oneDNN vectorises over output channels, so a convolution with one to a few output channels
 * (the attention bridge's 2->1 dilated 7x7, EMA's 4-channel 3x3) uses a fraction of each
 * vector. These loops vectorise along image rows instead: every kernel tap is one
 * multiply-add over a contiguous run of a row, whatever the channel counts, and each output
 * row stays in the L1 cache while all its taps accumulate. Single-threaded.
 *
 * Layouts are contiguous NCHW; weights are (O, C, KH, KW). The output is
 * HO = H + 2 * ph - dh * (KH - 1) by WO = W + 2 * pw - dw * (KW - 1).
 * Built at run time by scsonet/_native/__init__.py; every caller has a PyTorch fallback.
 */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

typedef ptrdiff_t idx;

enum { LANES = 16 };  /* independent partial sums: vectorisable without reassociating floats */

/* The range [*lo, *hi) of j in [0, n_out) whose j + off lies in [0, n_in). */
static void overlap(idx n_in, idx n_out, idx off, idx *lo, idx *hi) {
    *lo = off < 0 ? -off : 0;
    *hi = n_in - off < n_out ? n_in - off : n_out;
    if (*hi < *lo) *hi = *lo;
}

/* out = bias + the correlation of in (N, C, H, W) with w (O, C, KH, KW): out is (N, O, HO, WO). */
static void correlate(const float *in, const float *w, const float *bias, float *out,
                      idx N, idx C, idx H, idx W, idx O, idx HO, idx WO, idx KH, idx KW,
                      idx ph, idx pw, idx dh, idx dw) {
    for (idx n = 0; n < N; ++n)
        for (idx o = 0; o < O; ++o)
            for (idx h = 0; h < HO; ++h) {
                float *restrict yr = out + ((n * O + o) * HO + h) * WO;
                float b = bias ? bias[o] : 0.0f;
                for (idx j = 0; j < WO; ++j) yr[j] = b;
                for (idx c = 0; c < C; ++c)
                    for (idx ky = 0; ky < KH; ++ky) {
                        idx hi = h + ky * dh - ph;
                        if (hi < 0 || hi >= H) continue;
                        const float *restrict xr = in + ((n * C + c) * H + hi) * W;
                        const float *wk = w + ((o * C + c) * KH + ky) * KW;
                        for (idx kx = 0; kx < KW; ++kx) {
                            idx off = kx * dw - pw, lo, hi_j;
                            overlap(W, WO, off, &lo, &hi_j);
                            float k = wk[kx];
                            for (idx j = lo; j < hi_j; ++j) yr[j] += k * xr[j + off];
                        }
                    }
            }
}

/* y = conv(x, w) + bias (bias may be NULL). Returns 0 (as the other kernels, which can fail). */
int direct_conv_forward(const float *x, const float *w, const float *bias, float *y,
                        idx N, idx C, idx H, idx W, idx O, idx KH, idx KW,
                        idx ph, idx pw, idx dh, idx dw) {
    idx HO = H + 2 * ph - dh * (KH - 1), WO = W + 2 * pw - dw * (KW - 1);
    correlate(x, w, bias, y, N, C, H, W, O, HO, WO, KH, KW, ph, pw, dh, dw);
    return 0;
}

/* gx = the gradient of x given gy: gx[c, r] = sum_{o, ky} w[o, c, ky] gy[o, r - ky dh + ph], which
 * with ky' = KH - 1 - ky is the correlation of gy with the flipped, transposed kernels and the
 * padding dh (KH - 1) - ph. Returns 0, or -1 when out of memory. */
int direct_conv_grad_input(const float *gy, const float *w, float *gx,
                           idx N, idx C, idx H, idx W, idx O, idx KH, idx KW,
                           idx ph, idx pw, idx dh, idx dw) {
    idx HO = H + 2 * ph - dh * (KH - 1), WO = W + 2 * pw - dw * (KW - 1);
    float *flipped = malloc(sizeof(float) * (size_t)(C * O * KH * KW));  /* (C, O, KH, KW) */
    if (!flipped) return -1;
    for (idx o = 0; o < O; ++o)
        for (idx c = 0; c < C; ++c)
            for (idx ky = 0; ky < KH; ++ky)
                for (idx kx = 0; kx < KW; ++kx)
                    flipped[((c * O + o) * KH + (KH - 1 - ky)) * KW + (KW - 1 - kx)] = w[((o * C + c) * KH + ky) * KW + kx];
    correlate(gy, flipped, NULL, gx, N, O, HO, WO, C, H, W, KH, KW, dh * (KH - 1) - ph, dw * (KW - 1) - pw, dh, dw);
    free(flipped);
    return 0;
}

/* gw = the gradient of w given gy and x. Returns 0, or -1 when out of memory.
 * Output rows go in blocks of ROWS: each tap sums over a block with its lanes in registers,
 * while the block's rows of gy and x stay in the L1 cache. */
int direct_conv_grad_weight(const float *gy, const float *x, float *gw,
                            idx N, idx C, idx H, idx W, idx O, idx KH, idx KW,
                            idx ph, idx pw, idx dh, idx dw) {
    enum { ROWS = 8 };
    idx HO = H + 2 * ph - dh * (KH - 1), WO = W + 2 * pw - dw * (KW - 1);
    idx taps = O * C * KH * KW;
    float *acc = calloc((size_t)(taps * LANES), sizeof(float));
    float *tail = calloc((size_t)taps, sizeof(float));
    if (!acc || !tail) {
        free(acc);
        free(tail);
        return -1;
    }
    for (idx n = 0; n < N; ++n)
        for (idx o = 0; o < O; ++o)
            for (idx h0 = 0; h0 < HO; h0 += ROWS) {
                idx h1 = h0 + ROWS < HO ? h0 + ROWS : HO;
                for (idx c = 0; c < C; ++c)
                    for (idx ky = 0; ky < KH; ++ky)
                        for (idx kx = 0; kx < KW; ++kx) {
                            idx t = ((o * C + c) * KH + ky) * KW + kx;
                            idx off = kx * dw - pw, lo, hi_j;
                            overlap(W, WO, off, &lo, &hi_j);
                            float lanes[LANES];
                            for (idx l = 0; l < LANES; ++l) lanes[l] = 0.0f;
                            float rest = 0.0f;
                            for (idx h = h0; h < h1; ++h) {
                                idx hi = h + ky * dh - ph;
                                if (hi < 0 || hi >= H) continue;
                                const float *restrict gyr = gy + ((n * O + o) * HO + h) * WO;
                                const float *restrict xr = x + ((n * C + c) * H + hi) * W + off;
                                idx j = lo;
                                for (; j + LANES <= hi_j; j += LANES)
                                    for (idx l = 0; l < LANES; ++l) lanes[l] += gyr[j + l] * xr[j + l];
                                for (; j < hi_j; ++j) rest += gyr[j] * xr[j];
                            }
                            for (idx l = 0; l < LANES; ++l) acc[t * LANES + l] += lanes[l];
                            tail[t] += rest;
                        }
            }
    for (idx t = 0; t < taps; ++t) {
        float total = tail[t];
        for (idx l = 0; l < LANES; ++l) total += acc[t * LANES + l];
        gw[t] = total;
    }
    free(acc);
    free(tail);
    return 0;
}

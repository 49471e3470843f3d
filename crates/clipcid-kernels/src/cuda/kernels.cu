/* clipcid's CUDA kernels (f32, bf16 and f16, arithmetic in f32); see mod.rs. */

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
/* The block's total, the same in every thread, added in a fixed order. */
__device__ float block_sum(float v, float *sh) {
    v = warp_sum(v);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    float t = 0.0f;
    for (int i = 0; i < warps; ++i) t += sh[i];
    return t;
}

/* AdamW for one element, shared by the per-tensor kernels and the many-tensor one. Rounded
   products and sums (no contraction into fused multiply-adds), and IEEE division and square
   root: the same bits as the CPU kernel's, whatever the compiler chooses. */
__device__ __forceinline__ float adamw_moment_of(const float acc, const float x,
                                                 const float decay, const float rest,
                                                 const int square) {
    const float y = square ? __fmul_rn(__fmul_rn(rest, x), x) : __fmul_rn(rest, x);
    return __fadd_rn(__fmul_rn(decay, acc), y);
}
__device__ __forceinline__ float adamw_param_of(const float p, const float m, const float v,
                                                const float keep, const float lr,
                                                const float inv_bias1, const float inv_bias2,
                                                const float eps) {
    const float update = __fdiv_rn(__fmul_rn(m, inv_bias1),
                                   __fadd_rn(__fsqrt_rn(__fmul_rn(v, inv_bias2)), eps));
    return __fsub_rn(__fmul_rn(p, keep), __fmul_rn(lr, update));
}

extern "C" __global__ void clipcid_adamw_moment(float *acc, const float *g, const unsigned int n,
                                                const float decay, const float rest,
                                                const int square, const float scale) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += blockDim.x * gridDim.x) {
        acc[i] = adamw_moment_of(acc[i], __fmul_rn(g[i], scale), decay, rest, square);
    }
}

extern "C" __global__ void clipcid_adamw_apply(float *p, const float *m, const float *v,
                                               const unsigned int n, const float keep,
                                               const float lr, const float inv_bias1,
                                               const float inv_bias2, const float eps) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += blockDim.x * gridDim.x) {
        p[i] = adamw_param_of(p[i], m[i], v[i], keep, lr, inv_bias1, inv_bias2, eps);
    }
}

/* A value of dtype code `c` (0: f32, 1: bf16, 2: f16) at element i of x, widened to f32; and
   the store of v there, rounded to nearest-even (the many-tensor kernels, whose tensors'
   dtypes come in their table). */
__device__ __forceinline__ float ld_code(const void *x, const unsigned int i, const int c) {
    if (c == 1) return ld(((const bf16_t *)x)[i]);
    if (c == 2) return ld(((const f16_t *)x)[i]);
    return ((const float *)x)[i];
}
__device__ __forceinline__ void st_code(void *x, const unsigned int i, const int c,
                                        const float v) {
    if (c == 1) st((bf16_t *)x + i, v);
    else if (c == 2) st((f16_t *)x + i, v);
    else ((float *)x)[i] = v;
}

/* AdamW over many parameters in one launch (an optimizer step; see adamw_many). Block b
   takes chunk b of the table, seven words: the device addresses of the chunk's parameter
   values, first moments and second moments (f32), its gradient, and its working copy (0 for
   none); then the chunk's length (low 32 bits) with its parameter's decay factor `keep`
   (high 32 bits, the f32's bits); then the dtype codes of the gradient (bits 0-7) and of the
   copy (bits 8-15). The copy receives the updated parameter rounded to its dtype. */
extern "C" __global__ void clipcid_adamw_many(const unsigned long long *table, const float decay1,
                                              const float rest1, const float decay2,
                                              const float rest2, const float scale,
                                              const float lr, const float inv_bias1,
                                              const float inv_bias2, const float eps) {
    const unsigned long long *e = table + 7ull * blockIdx.x;
    float *p = (float *)e[0];
    float *m = (float *)e[1];
    float *v = (float *)e[2];
    const void *g = (const void *)e[3];
    void *copy = (void *)e[4];
    const unsigned int n = (unsigned int)(e[5] & 0xffffffffull);
    const float keep = __uint_as_float((unsigned int)(e[5] >> 32));
    const int gc = (int)(e[6] & 0xffull), cc = (int)((e[6] >> 8) & 0xffull);
    for (unsigned int i = threadIdx.x; i < n; i += blockDim.x) {
        const float x = __fmul_rn(ld_code(g, i, gc), scale);
        const float mi = adamw_moment_of(m[i], x, decay1, rest1, 0);
        const float vi = adamw_moment_of(v[i], x, decay2, rest2, 1);
        const float pi = adamw_param_of(p[i], mi, vi, keep, lr, inv_bias1, inv_bias2, eps);
        m[i] = mi;
        v[i] = vi;
        p[i] = pi;
        if (copy) st_code(copy, i, cc, pi);
    }
}

/* The sum of squares of each chunk of many tensors in one launch (a gradient norm; see
   squares_many): block b reads the address table[2 b] and, in table[2 b + 1], the count
   (low 32 bits) and the dtype code (high 32), and writes its f32 total, added in a fixed
   order, to partials[b]. */
extern "C" __global__ void clipcid_squares_many(const unsigned long long *table,
                                                float *partials) {
    __shared__ float sh[32];
    const void *x = (const void *)table[2ull * blockIdx.x];
    const unsigned int n = (unsigned int)(table[2ull * blockIdx.x + 1] & 0xffffffffull);
    const int c = (int)(table[2ull * blockIdx.x + 1] >> 32);
    float s = 0.0f;
    for (unsigned int i = threadIdx.x; i < n; i += blockDim.x) {
        const float y = ld_code(x, i, c);
        s += y * y;
    }
    s = block_sum(s, sh);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

/* One block per row: mean, then variance about it (two passes, as PyTorch). */
template <typename T>
__device__ void row_stats(const T *xr, const unsigned int d, const float eps, float *sh,
                          float *mean, float *rstd) {
    float s = 0.0f;
    for (unsigned int i = threadIdx.x; i < d; i += blockDim.x) s += ld(xr[i]);
    const float m = block_sum(s, sh) / (float)d;
    float q = 0.0f;
    for (unsigned int i = threadIdx.x; i < d; i += blockDim.x) {
        const float c = ld(xr[i]) - m;
        q += c * c;
    }
    *mean = m;
    *rstd = 1.0f / sqrtf(block_sum(q, sh) / (float)d + eps);
}

template <typename T>
__device__ void ln_fwd(const T *x, const T *w, const T *b, T *y, const unsigned int d,
                       const float eps) {
    __shared__ float sh[32];
    const size_t off = (size_t)blockIdx.x * d;
    float mean, rstd;
    row_stats(x + off, d, eps, sh, &mean, &rstd);
    for (unsigned int i = threadIdx.x; i < d; i += blockDim.x)
        st(&y[off + i], (ld(x[off + i]) - mean) * rstd * ld(w[i]) + ld(b[i]));
}

/* One warp per row of at most 1024 (blockDim.x / 32 rows per block): the row stays in
   registers, read once, where the block-per-row form reads it three times. */
template <typename T>
__device__ void ln_fwd_warp(const T *x, const T *w, const T *b, T *y, const unsigned int rows,
                            const unsigned int d, const float eps) {
    const unsigned int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const unsigned int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const size_t off = (size_t)row * d;
    float v[32];
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < 32; ++k) {
        const unsigned int i = lane + 32 * k;
        v[k] = i < d ? ld(x[off + i]) : 0.0f;
        s += v[k];
    }
    const float mean = warp_sum(s) / (float)d;
    float q = 0.0f;
#pragma unroll
    for (int k = 0; k < 32; ++k) {
        const float c = lane + 32 * k < d ? v[k] - mean : 0.0f;
        q += c * c;
    }
    const float rstd = 1.0f / sqrtf(warp_sum(q) / (float)d + eps);
#pragma unroll
    for (int k = 0; k < 32; ++k) {
        const unsigned int i = lane + 32 * k;
        if (i < d) st(&y[off + i], (v[k] - mean) * rstd * ld(w[i]) + ld(b[i]));
    }
}

/* dx = rstd (gh - mean(gh) - xh mean(gh xh)), gh = g w, xh = (x - mean) rstd; each row's
   mean and rstd kept for the column sums. */
template <typename T>
__device__ void ln_bwd_rows(const T *x, const T *w, const T *g, T *dx, float *stats,
                            const unsigned int d, const float eps) {
    __shared__ float sh[32];
    const size_t off = (size_t)blockIdx.x * d;
    float mean, rstd;
    row_stats(x + off, d, eps, sh, &mean, &rstd);
    float a = 0.0f, c = 0.0f;
    for (unsigned int i = threadIdx.x; i < d; i += blockDim.x) {
        const float gh = ld(g[off + i]) * ld(w[i]);
        a += gh;
        c += gh * ((ld(x[off + i]) - mean) * rstd);
    }
    const float mean_gh = block_sum(a, sh) / (float)d;
    const float mean_ghxh = block_sum(c, sh) / (float)d;
    for (unsigned int i = threadIdx.x; i < d; i += blockDim.x) {
        const float gh = ld(g[off + i]) * ld(w[i]);
        const float xh = (ld(x[off + i]) - mean) * rstd;
        st(&dx[off + i], rstd * (gh - mean_gh - xh * mean_ghxh));
    }
    if (threadIdx.x == 0) {
        stats[2 * blockIdx.x] = mean;
        stats[2 * blockIdx.x + 1] = rstd;
    }
}

/* Block (32, 8) over 32 columns and a chunk of rows: the chunk's sum of g xh (dw) and of g
   (db) per column, into partial[chunk][0..d] and partial[chunk][d..2d]. */
template <typename T>
__device__ void ln_bwd_columns(const T *x, const T *g, const float *stats, float *partial,
                               const unsigned int rows, const unsigned int d,
                               const unsigned int chunk) {
    __shared__ float sw[8][33];
    __shared__ float sb[8][33];
    const unsigned int col = blockIdx.x * 32 + threadIdx.x;
    const unsigned int r0 = blockIdx.y * chunk;
    const unsigned int r1 = (r0 + chunk < rows) ? r0 + chunk : rows;
    float dw = 0.0f, db = 0.0f;
    if (col < d) {
        for (unsigned int r = r0 + threadIdx.y; r < r1; r += blockDim.y) {
            const float gv = ld(g[(size_t)r * d + col]);
            dw += gv * ((ld(x[(size_t)r * d + col]) - stats[2 * r]) * stats[2 * r + 1]);
            db += gv;
        }
    }
    sw[threadIdx.y][threadIdx.x] = dw;
    sb[threadIdx.y][threadIdx.x] = db;
    __syncthreads();
    if (threadIdx.y == 0 && col < d) {
        float a = 0.0f, b = 0.0f;
        for (unsigned int k = 0; k < blockDim.y; ++k) {
            a += sw[k][threadIdx.x];
            b += sb[k][threadIdx.x];
        }
        partial[(size_t)blockIdx.y * 2 * d + col] = a;
        partial[(size_t)blockIdx.y * 2 * d + d + col] = b;
    }
}

/* The chunks' partial sums added in chunk order: out[j] for j < n2 (dw then db). */
template <typename T>
__device__ void ln_bwd_total(const float *partial, T *out, const unsigned int chunks,
                             const unsigned int n2) {
    const unsigned int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n2) return;
    float s = 0.0f;
    for (unsigned int k = 0; k < chunks; ++k) s += partial[(size_t)k * n2 + j];
    st(&out[j], s);
}

/* One warp per row (blockDim.x / 32 rows per block). */
template <typename T>
__device__ void softmax_fwd(const T *x, T *y, const unsigned int rows, const unsigned int n) {
    const unsigned int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const unsigned int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const size_t off = (size_t)row * n;
    float m = -__int_as_float(0x7f800000);
    for (unsigned int i = lane; i < n; i += 32) m = fmaxf(m, ld(x[off + i]));
    m = warp_max(m);
    float s = 0.0f;
    for (unsigned int i = lane; i < n; i += 32) s += expf(ld(x[off + i]) - m);
    s = warp_sum(s);
    for (unsigned int i = lane; i < n; i += 32) st(&y[off + i], expf(ld(x[off + i]) - m) / s);
}

/* dx = y (g - sum(g y)) per row. */
template <typename T>
__device__ void softmax_bwd(const T *y, const T *g, T *dx, const unsigned int rows,
                            const unsigned int n) {
    const unsigned int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const unsigned int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const size_t off = (size_t)row * n;
    float s = 0.0f;
    for (unsigned int i = lane; i < n; i += 32) s += ld(g[off + i]) * ld(y[off + i]);
    s = warp_sum(s);
    for (unsigned int i = lane; i < n; i += 32)
        st(&dx[off + i], ld(y[off + i]) * (ld(g[off + i]) - s));
}

/* y = x + b[column] over a contiguous [rows, n] x. */
template <typename T>
__device__ void bias_add(const T *x, const T *b, T *y, const unsigned int total,
                         const unsigned int n) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += blockDim.x * gridDim.x)
        st(&y[i], ld(x[i]) + ld(b[i % n]));
}

/* y = x + b[column] + r: a linear layer's bias and the residual added in one pass. */
template <typename T>
__device__ void bias_residual(const T *x, const T *b, const T *r, T *y, const unsigned int total,
                              const unsigned int n) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += blockDim.x * gridDim.x)
        st(&y[i], ld(x[i]) + ld(b[i % n]) + ld(r[i]));
}

/* y = h sigmoid(1.702 h), h = x + b[column]. */
template <typename T>
__device__ void bias_quick_gelu(const T *x, const T *b, T *y, const unsigned int total,
                                const unsigned int n) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += blockDim.x * gridDim.x) {
        const float h = ld(x[i]) + ld(b[i % n]);
        st(&y[i], h / (1.0f + expf(-1.702f * h)));
    }
}

/* dh = g (s + 1.702 h s (1 - s)), s = sigmoid(1.702 h), h = x + b[column]. */
template <typename T>
__device__ void bias_quick_gelu_bwd(const T *x, const T *b, const T *g, T *dh,
                                    const unsigned int total, const unsigned int n) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += blockDim.x * gridDim.x) {
        const float h = ld(x[i]) + ld(b[i % n]);
        const float s = 1.0f / (1.0f + expf(-1.702f * h));
        st(&dh[i], ld(g[i]) * (s + 1.702f * h * s * (1.0f - s)));
    }
}

/* Block (32, 8) over 32 columns and a chunk of rows of a contiguous [rows, n] g: the chunk's
   column sums into partial[chunk][0..n]. */
template <typename T>
__device__ void column_partial(const T *g, float *partial, const unsigned int rows,
                               const unsigned int n, const unsigned int chunk) {
    __shared__ float sh[8][33];
    const unsigned int col = blockIdx.x * 32 + threadIdx.x;
    const unsigned int r0 = blockIdx.y * chunk;
    const unsigned int r1 = (r0 + chunk < rows) ? r0 + chunk : rows;
    float acc = 0.0f;
    if (col < n)
        for (unsigned int r = r0 + threadIdx.y; r < r1; r += blockDim.y)
            acc += ld(g[(size_t)r * n + col]);
    sh[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && col < n) {
        float a = 0.0f;
        for (unsigned int k = 0; k < blockDim.y; ++k) a += sh[k][threadIdx.x];
        partial[(size_t)blockIdx.y * n + col] = a;
    }
}

/* A gathered table's gradient (`gather_rows`), first half: partial[p][c] = the sum of
   g[order[i]][c] over i in [piece[p], piece[p + 1]) (at most 64 positions of one row), in i
   order; a block per piece, its threads across the row of w. */
template <typename T>
__device__ void row_sum_pieces(const T *g, const unsigned int *order, const unsigned int *piece,
                               float *partial, const unsigned int w) {
    const unsigned int p = blockIdx.x, a = piece[p], b = piece[p + 1];
    for (unsigned int c = threadIdx.x; c < w; c += blockDim.x) {
        float s = 0.0f;
        for (unsigned int i = a; i < b; ++i) s += ld(g[(size_t)order[i] * w + c]);
        partial[(size_t)p * w + c] = s;
    }
}

/* Second half: out[rows[k]][c] = the sum of partial[p][c] over p in [first[k], first[k + 1]),
   in p order; a block per row read (the other rows of out stay as they are: zero). */
template <typename T>
__device__ void row_sum_rows(const float *partial, const unsigned int *first,
                             const unsigned int *rows, T *out, const unsigned int w) {
    const unsigned int k = blockIdx.x, a = first[k], b = first[k + 1];
    T *o = out + (size_t)rows[k] * w;
    for (unsigned int c = threadIdx.x; c < w; c += blockDim.x) {
        float s = 0.0f;
        for (unsigned int p = a; p < b; ++p) s += partial[(size_t)p * w + c];
        st(&o[c], s);
    }
}

/* y[a][c][b][d] = x[a][b][c][d], x of dims (n0, n1, n2, n3): attention's head split
   [B, T, H, D] -> [B, H, T, D] and its inverse, with 32-bit index arithmetic. */
template <typename T>
__device__ void swap_middle(const T *x, T *y, const unsigned int n0, const unsigned int n1,
                            const unsigned int n2, const unsigned int n3) {
    const unsigned int total = n0 * n1 * n2 * n3;
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += blockDim.x * gridDim.x) {
        const unsigned int d = i % n3;
        unsigned int r = i / n3;
        const unsigned int b = r % n1;
        r /= n1;
        const unsigned int c = r % n2;
        const unsigned int a = r / n2;
        y[i] = x[((a * n1 + b) * n2 + c) * n3 + d];
    }
}

/* The patch matrix of [B, C, S, S] images, patch p, g = S / p: patches[(b g + gy) g + gx]
   [(c p + py) p + px] = image[b][c][gy p + py][gx p + px]; with scatter, the image from the
   patch matrix (the inverse permutation). */
template <typename T>
__device__ void patchify(const T *src, T *dst, const unsigned int B, const unsigned int C,
                         const unsigned int S, const unsigned int p, const int scatter) {
    const unsigned int g = S / p, cpp = C * p * p, total = B * C * S * S;
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += blockDim.x * gridDim.x) {
        const unsigned int col = i % cpp, row = i / cpp;
        const unsigned int px = col % p, py = (col / p) % p, c = col / (p * p);
        const unsigned int gx = row % g, gy = (row / g) % g, b = row / (g * g);
        const unsigned int j = ((b * C + c) * S + gy * p + py) * S + gx * p + px;
        if (scatter) dst[j] = src[i]; else dst[i] = src[j];
    }
}

/* Multi-head self-attention on packed q/k/v rows: qkv [B * t, 3W], head h in columns
   h*D..(h+1)*D of each third (W = H D). One block per (batch item, head) holds the head's
   rows in shared memory as f32, each row padded to D + 1 floats so that lane j reading row
   j's column d hits bank (j + d) % 32. Each warp takes 4 query (or key) rows at once, their
   values side by side in float4s, so that each value a lane loads from a row in shared
   memory feeds 4 products (one load per product was what bounded a first version). The
   first `tq` positions are the queries; `causal`: position i sees positions <= i. Rows past
   the end are zeros in the tile and are never written. */
CLIPCID_DYNAMIC_SHARED(float4, attn_sh);

/* rows x D values from src (rows row_stride apart) into dst [rows][D + 1], times mul. Eight
   loads in flight per thread before their stores: one at a time, each waited for its global
   load's latency. */
template <typename T>
__device__ void attn_load(const T *src, const unsigned int row_stride, const unsigned int rows,
                          const unsigned int D, float *dst, const float mul) {
    const unsigned int n = rows * D;
    for (unsigned int i0 = threadIdx.x; i0 < n; i0 += 8 * blockDim.x) {
        float v[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const unsigned int i = i0 + k * blockDim.x, r = i / D;
            v[k] = i < n ? ld(src[(size_t)r * row_stride + (i - r * D)]) : 0.0f;
        }
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const unsigned int i = i0 + k * blockDim.x, r = i / D;
            if (i < n) dst[r * (D + 1) + (i - r * D)] = mul * v[k];
        }
    }
}

/* Rows r0..r0+3 (those below `rows`) of a matrix whose rows lie `stride` apart, columns
   d = lane, lane + 32, ... < D, into tile[d] (times mul), zeros past `rows`. */
template <typename T>
__device__ void attn_tile(const T *src, const size_t stride, const unsigned int r0,
                          const unsigned int rows, const unsigned int D, float4 *tile,
                          const float mul) {
    for (unsigned int d = threadIdx.x & 31; d < D; d += 32) {
        float v[4];
#pragma unroll
        for (int r = 0; r < 4; ++r)
            v[r] = r0 + r < rows ? mul * ld(src[(size_t)(r0 + r) * stride + d]) : 0.0f;
        tile[d] = make_float4(v[0], v[1], v[2], v[3]);
    }
}

__device__ __forceinline__ void fma4(float a[4], const float4 w, const float x) {
    a[0] += w.x * x;
    a[1] += w.y * x;
    a[2] += w.z * x;
    a[3] += w.w * x;
}

/* a[r] = sum_d tile[d].r row[d]. */
__device__ __forceinline__ void attn_dot4(float a[4], const float4 *tile, const float *row,
                                          const unsigned int D) {
    a[0] = a[1] = a[2] = a[3] = 0.0f;
#pragma unroll 4
    for (unsigned int d = 0; d < D; ++d) fma4(a, tile[d], row[d]);
}

/* a[r] = sum_{j0 <= j < n} w[j].r m[j][d], rows of m `stride` apart. */
__device__ __forceinline__ void attn_column4(float a[4], const float4 *w, const float *m,
                                             const unsigned int stride, const unsigned int d,
                                             const unsigned int j0, const unsigned int n) {
    a[0] = a[1] = a[2] = a[3] = 0.0f;
#pragma unroll 4
    for (unsigned int j = j0; j < n; ++j) fma4(a, w[j], m[j * stride + d]);
}

__device__ __forceinline__ float4 f4(const float a[4]) {
    return make_float4(a[0], a[1], a[2], a[3]);
}
__device__ __forceinline__ void un4(const float4 v, float a[4]) {
    a[0] = v.x;
    a[1] = v.y;
    a[2] = v.z;
    a[3] = v.w;
}

/* Scores of the warp's query rows i0..i0+3 against keys j = lane, lane + 32, ... < n into
   pt[j] (masked ones -inf), then exp(s - max) in place; m and z get each row's max and sum. */
__device__ __forceinline__ void attn_softmax4(const float4 *qt, const float *ks, float4 *pt,
                                              const unsigned int P, const unsigned int D,
                                              const unsigned int n, const unsigned int i0,
                                              const int causal, float m[4], float z[4]) {
    const unsigned int lane = threadIdx.x & 31;
    const float inf = __int_as_float(0x7f800000);
    m[0] = m[1] = m[2] = m[3] = -inf;
    for (unsigned int j = lane; j < n; j += 32) {
        float s[4];
        attn_dot4(s, qt, ks + j * P, D);
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            if (causal && j > i0 + r) s[r] = -inf;
            m[r] = fmaxf(m[r], s[r]);
        }
        pt[j] = f4(s);
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        m[r] = warp_max(m[r]);
        z[r] = 0.0f;
    }
    for (unsigned int j = lane; j < n; j += 32) {
        float s[4];
        un4(pt[j], s);
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            s[r] = expf(s[r] - m[r]);
            z[r] += s[r];
        }
        pt[j] = f4(s);
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) z[r] = warp_sum(z[r]);
}

/* out [B * tq, W]: softmax(scale q k^T) v per head. Shared: per warp q [D] and p [t]
   (float4 each), then K and V [t][D + 1]. */
template <typename T>
__device__ void attention_fwd(const T *qkv, T *out, const unsigned int t, const unsigned int tq,
                              const unsigned int H, const unsigned int D, const int causal,
                              const float scale) {
    const unsigned int b = blockIdx.x, h = blockIdx.y, W = H * D, P = D + 1;
    const unsigned int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float4 *qt = attn_sh + warp * (D + t), *pt = qt + D;
    float *ks = (float *)(attn_sh + warps * (D + t)), *vs = ks + t * P;
    const T *base = qkv + (size_t)b * t * 3 * W;
    attn_load(base + W + h * D, 3 * W, t, D, ks, 1.0f);
    attn_load(base + 2 * W + h * D, 3 * W, t, D, vs, 1.0f);
    __syncthreads();
    for (unsigned int i0 = 4 * warp; i0 < tq; i0 += 4 * warps) {
        attn_tile(base + h * D, 3 * W, i0, tq, D, qt, scale);
        __syncwarp();
        const unsigned int n = causal ? min(i0 + 4, tq) : t;
        float m[4], z[4];
        attn_softmax4(qt, ks, pt, P, D, n, i0, causal, m, z);
        __syncwarp();
        for (unsigned int d = lane; d < D; d += 32) {
            float a[4];
            attn_column4(a, pt, vs, P, d, 0, n);
#pragma unroll
            for (int r = 0; r < 4; ++r)
                if (i0 + r < tq) st(&out[((size_t)b * tq + i0 + r) * W + h * D + d], a[r] / z[r]);
        }
        __syncwarp();
    }
}

/* Backward, first half: dq (the head's columns of dqkv's first third) for each query row,
   and the row's log-sum-exp and sum_j p dp into stats[((b H + h) tq + i) 2 + 0/1] for the
   second half. Shared: per warp q [D], dO [D], p [t], dp then ds [t] (float4 each), then
   K and V [t][D + 1]. */
template <typename T>
__device__ void attention_dq(const T *qkv, const T *g, T *dqkv, float *stats,
                             const unsigned int t, const unsigned int tq, const unsigned int H,
                             const unsigned int D, const int causal, const float scale) {
    const unsigned int b = blockIdx.x, h = blockIdx.y, W = H * D, P = D + 1;
    const unsigned int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float4 *qt = attn_sh + warp * (2 * D + 2 * t), *gt = qt + D, *pt = gt + D, *st4 = pt + t;
    float *ks = (float *)(attn_sh + warps * (2 * D + 2 * t)), *vs = ks + t * P;
    const T *base = qkv + (size_t)b * t * 3 * W;
    attn_load(base + W + h * D, 3 * W, t, D, ks, 1.0f);
    attn_load(base + 2 * W + h * D, 3 * W, t, D, vs, 1.0f);
    __syncthreads();
    for (unsigned int i0 = 4 * warp; i0 < tq; i0 += 4 * warps) {
        attn_tile(base + h * D, 3 * W, i0, tq, D, qt, scale);
        attn_tile(g + (size_t)b * tq * W + h * D, W, i0, tq, D, gt, 1.0f);
        __syncwarp();
        const unsigned int n = causal ? min(i0 + 4, tq) : t;
        float m[4], z[4], dsum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        attn_softmax4(qt, ks, pt, P, D, n, i0, causal, m, z);
        for (unsigned int j = lane; j < n; j += 32) {
            float p[4], dp[4];
            un4(pt[j], p);
            attn_dot4(dp, gt, vs + j * P, D);
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                p[r] /= z[r];
                dsum[r] += p[r] * dp[r];
            }
            pt[j] = f4(p);
            st4[j] = f4(dp);
        }
#pragma unroll
        for (int r = 0; r < 4; ++r) dsum[r] = warp_sum(dsum[r]);
        for (unsigned int j = lane; j < n; j += 32) {
            float p[4], ds[4];
            un4(pt[j], p);
            un4(st4[j], ds);
#pragma unroll
            for (int r = 0; r < 4; ++r) ds[r] = p[r] * (ds[r] - dsum[r]);
            st4[j] = f4(ds);
        }
        __syncwarp();
        for (unsigned int d = lane; d < D; d += 32) {
            float a[4];
            attn_column4(a, st4, ks, P, d, 0, n);
#pragma unroll
            for (int r = 0; r < 4; ++r)
                if (i0 + r < tq)
                    st(&dqkv[((size_t)b * t + i0 + r) * 3 * W + h * D + d], scale * a[r]);
        }
        if (lane < 4 && i0 + lane < tq) {
            float *sr = stats + (((size_t)b * H + h) * tq + i0 + lane) * 2;
            /* lane r writes row r's pair (m, z and dsum are the same in every lane) */
            float mr = m[0], zr = z[0], dr = dsum[0];
            if (lane == 1) { mr = m[1]; zr = z[1]; dr = dsum[1]; }
            if (lane == 2) { mr = m[2]; zr = z[2]; dr = dsum[2]; }
            if (lane == 3) { mr = m[3]; zr = z[3]; dr = dsum[3]; }
            sr[0] = mr + logf(zr);
            sr[1] = dr;
        }
        __syncwarp();
    }
}

/* Backward, second half: dk and dv for each key row j from the query rows that see it.
   Shared: per warp k [D], v [D], p [tq], ds [tq] (float4 each), then scale q and dO
   [tq][D + 1], log-sum-exp and sum p dp [tq] each. */
template <typename T>
__device__ void attention_dkv(const T *qkv, const T *g, T *dqkv, const float *stats,
                              const unsigned int t, const unsigned int tq, const unsigned int H,
                              const unsigned int D, const int causal, const float scale) {
    const unsigned int b = blockIdx.x, h = blockIdx.y, W = H * D, P = D + 1;
    const unsigned int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float4 *kt = attn_sh + warp * (2 * D + 2 * tq), *vt = kt + D, *pt = vt + D, *st4 = pt + tq;
    float *qs = (float *)(attn_sh + warps * (2 * D + 2 * tq)), *gs = qs + tq * P;
    float *lse = gs + tq * P, *dsum = lse + tq;
    const T *base = qkv + (size_t)b * t * 3 * W;
    attn_load(base + h * D, 3 * W, tq, D, qs, scale);
    attn_load(g + (size_t)b * tq * W + h * D, W, tq, D, gs, 1.0f);
    const float *sr = stats + ((size_t)b * H + h) * tq * 2;
    for (unsigned int i = threadIdx.x; i < tq; i += blockDim.x) {
        lse[i] = sr[2 * i];
        dsum[i] = sr[2 * i + 1];
    }
    __syncthreads();
    for (unsigned int j0 = 4 * warp; j0 < t; j0 += 4 * warps) {
        attn_tile(base + W + h * D, 3 * W, j0, t, D, kt, 1.0f);
        attn_tile(base + 2 * W + h * D, 3 * W, j0, t, D, vt, 1.0f);
        __syncwarp();
        const unsigned int i1 = causal ? j0 : 0;
        for (unsigned int i = i1 + lane; i < tq; i += 32) {
            float s[4] = {0.0f, 0.0f, 0.0f, 0.0f}, dp[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            const float *qr = qs + i * P, *gr = gs + i * P;
#pragma unroll 4
            for (unsigned int d = 0; d < D; ++d) {
                fma4(s, kt[d], qr[d]);
                fma4(dp, vt[d], gr[d]);
            }
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                s[r] = (causal && i < j0 + r) ? 0.0f : expf(s[r] - lse[i]);
                dp[r] = s[r] * (dp[r] - dsum[i]);
            }
            pt[i] = f4(s);
            st4[i] = f4(dp);
        }
        __syncwarp();
        for (unsigned int d = lane; d < D; d += 32) {
            float dk[4], dv[4];
            attn_column4(dk, st4, qs, P, d, i1, tq);
            attn_column4(dv, pt, gs, P, d, i1, tq);
#pragma unroll
            for (int r = 0; r < 4; ++r)
                if (j0 + r < t) {
                    T *row = dqkv + ((size_t)b * t + j0 + r) * 3 * W + W + h * D;
                    st(&row[d], dk[r]);
                    st(&row[W + d], dv[r]);
                }
        }
        __syncwarp();
    }
}

#define CLIPCID_TYPED(T, S)                                                                     \
extern "C" __global__ void clipcid_ln_fwd_##S(const T *x, const T *w, const T *b, T *y,        \
                                              const unsigned int d, const float eps) {          \
    ln_fwd(x, w, b, y, d, eps);                                                                 \
}                                                                                               \
extern "C" __global__ void clipcid_ln_fwd_warp_##S(const T *x, const T *w, const T *b, T *y,   \
                                                   const unsigned int rows,                     \
                                                   const unsigned int d, const float eps) {     \
    ln_fwd_warp(x, w, b, y, rows, d, eps);                                                      \
}                                                                                               \
extern "C" __global__ void clipcid_ln_bwd_rows_##S(const T *x, const T *w, const T *g, T *dx,  \
                                                   float *stats, const unsigned int d,          \
                                                   const float eps) {                           \
    ln_bwd_rows(x, w, g, dx, stats, d, eps);                                                    \
}                                                                                               \
extern "C" __global__ void clipcid_ln_bwd_columns_##S(const T *x, const T *g,                  \
                                                      const float *stats, float *partial,       \
                                                      const unsigned int rows,                  \
                                                      const unsigned int d,                     \
                                                      const unsigned int chunk) {               \
    ln_bwd_columns(x, g, stats, partial, rows, d, chunk);                                       \
}                                                                                               \
extern "C" __global__ void clipcid_ln_bwd_total_##S(const float *partial, T *out,              \
                                                    const unsigned int chunks,                  \
                                                    const unsigned int n2) {                    \
    ln_bwd_total(partial, out, chunks, n2);                                                     \
}                                                                                               \
extern "C" __global__ void clipcid_softmax_fwd_##S(const T *x, T *y, const unsigned int rows,  \
                                                   const unsigned int n) {                      \
    softmax_fwd(x, y, rows, n);                                                                 \
}                                                                                               \
extern "C" __global__ void clipcid_softmax_bwd_##S(const T *y, const T *g, T *dx,              \
                                                   const unsigned int rows,                     \
                                                   const unsigned int n) {                      \
    softmax_bwd(y, g, dx, rows, n);                                                             \
}                                                                                               \
extern "C" __global__ void clipcid_bias_add_##S(const T *x, const T *b, T *y,                  \
                                                const unsigned int total,                       \
                                                const unsigned int n) {                         \
    bias_add(x, b, y, total, n);                                                                \
}                                                                                               \
extern "C" __global__ void clipcid_bias_residual_##S(const T *x, const T *b, const T *r, T *y, \
                                                     const unsigned int total,                  \
                                                     const unsigned int n) {                    \
    bias_residual(x, b, r, y, total, n);                                                        \
}                                                                                               \
extern "C" __global__ void clipcid_bias_quick_gelu_##S(const T *x, const T *b, T *y,           \
                                                       const unsigned int total,                \
                                                       const unsigned int n) {                  \
    bias_quick_gelu(x, b, y, total, n);                                                         \
}                                                                                               \
extern "C" __global__ void clipcid_bias_quick_gelu_bwd_##S(const T *x, const T *b, const T *g, \
                                                           T *dh, const unsigned int total,     \
                                                           const unsigned int n) {              \
    bias_quick_gelu_bwd(x, b, g, dh, total, n);                                                 \
}                                                                                               \
extern "C" __global__ void clipcid_column_partial_##S(const T *g, float *partial,              \
                                                      const unsigned int rows,                  \
                                                      const unsigned int n,                     \
                                                      const unsigned int chunk) {               \
    column_partial(g, partial, rows, n, chunk);                                                 \
}                                                                                               \
extern "C" __global__ void clipcid_row_sum_pieces_##S(const T *g, const unsigned int *order,  \
                                                      const unsigned int *piece,                \
                                                      float *partial,                           \
                                                      const unsigned int w) {                   \
    row_sum_pieces(g, order, piece, partial, w);                                                \
}                                                                                               \
extern "C" __global__ void clipcid_row_sum_rows_##S(const float *partial,                      \
                                                    const unsigned int *first,                  \
                                                    const unsigned int *rows, T *out,           \
                                                    const unsigned int w) {                     \
    row_sum_rows(partial, first, rows, out, w);                                                 \
}                                                                                               \
extern "C" __global__ void clipcid_swap_middle_##S(const T *x, T *y, const unsigned int n0,    \
                                                   const unsigned int n1,                       \
                                                   const unsigned int n2,                       \
                                                   const unsigned int n3) {                     \
    swap_middle(x, y, n0, n1, n2, n3);                                                          \
}                                                                                               \
extern "C" __global__ void clipcid_patchify_##S(const T *src, T *dst, const unsigned int b,    \
                                                const unsigned int c, const unsigned int s,     \
                                                const unsigned int p, const int scatter) {      \
    patchify(src, dst, b, c, s, p, scatter);                                                    \
}                                                                                               \
extern "C" __global__ void clipcid_attention_fwd_##S(const T *qkv, T *out,                    \
                                                     const unsigned int t,                      \
                                                     const unsigned int tq,                     \
                                                     const unsigned int h,                      \
                                                     const unsigned int d, const int causal,    \
                                                     const float scale) {                       \
    attention_fwd(qkv, out, t, tq, h, d, causal, scale);                                        \
}                                                                                               \
extern "C" __global__ void clipcid_attention_dq_##S(const T *qkv, const T *g, T *dqkv,        \
                                                    float *stats, const unsigned int t,         \
                                                    const unsigned int tq,                      \
                                                    const unsigned int h,                       \
                                                    const unsigned int d, const int causal,     \
                                                    const float scale) {                        \
    attention_dq(qkv, g, dqkv, stats, t, tq, h, d, causal, scale);                              \
}                                                                                               \
extern "C" __global__ void clipcid_attention_dkv_##S(const T *qkv, const T *g, T *dqkv,       \
                                                     const float *stats, const unsigned int t,  \
                                                     const unsigned int tq,                     \
                                                     const unsigned int h,                      \
                                                     const unsigned int d, const int causal,    \
                                                     const float scale) {                       \
    attention_dkv(qkv, g, dqkv, stats, t, tq, h, d, causal, scale);                             \
}

CLIPCID_TYPED(float, f32)
CLIPCID_TYPED(bf16_t, bf16)
CLIPCID_TYPED(f16_t, f16)

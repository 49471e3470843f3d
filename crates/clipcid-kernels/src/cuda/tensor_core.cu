/* clipcid's tensor-core attention kernels (bf16, compute capability 8.0 and up); see
   tensor_core.rs. */
CLIPCID_DYNAMIC_SHARED(uint4, tc_sh);

/* Two bf16 in one register, `lo` at the lower index (the order mma's fragments use). */
__device__ __forceinline__ unsigned int pack2(float lo, float hi) {
    return bf16_bits(lo) | (bf16_bits(hi) << 16);
}
__device__ __forceinline__ unsigned int ld32(const bf16_t *p) {
    return *(const unsigned int *)p;
}
/* p[0] and p[stride] in one register. */
__device__ __forceinline__ unsigned int pair(const bf16_t *p, const unsigned int stride) {
    return (unsigned int)p[0] | ((unsigned int)p[stride] << 16);
}

/* c += a b for a 16x16 tile a (row-major fragment) and a 16x8 tile b (column fragment). */
__device__ __forceinline__ void mma16816(float c[4], const unsigned int a[4],
                                         const unsigned int b0, const unsigned int b1) {
#ifndef CLIPCID_EMULATOR
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    clipcid_emu::mma_m16n8k16_bf16(c, a, b0, b1);
#endif
}

/* The fragments, for lane = 4 g + q: A (16 x 16) holds rows g and g + 8, columns 2q, 2q + 1
   and those plus 8; B (16 x 8, k by n) holds column n = g, rows 2q, 2q + 1 and those plus 8;
   C (16 x 8) holds rows g and g + 8, columns 2q, 2q + 1. */

/* A = m[r0.., k0..] from a row-major bf16 matrix with rows S apart. */
__device__ __forceinline__ void frag_a(unsigned int a[4], const bf16_t *m, const unsigned int S,
                                       const unsigned int r0, const unsigned int k0) {
    const unsigned int lane = threadIdx.x & 31;
    const bf16_t *p = m + (r0 + (lane >> 2)) * S + k0 + 2 * (lane & 3);
    a[0] = ld32(p);
    a[1] = ld32(p + 8 * S);
    a[2] = ld32(p + 8);
    a[3] = ld32(p + 8 * S + 8);
}
/* B[k][n] = m[n0 + n][k0 + k]: the product's k runs along m's rows (m times a transpose). */
__device__ __forceinline__ void frag_bt(unsigned int b[2], const bf16_t *m, const unsigned int S,
                                        const unsigned int n0, const unsigned int k0) {
    const unsigned int lane = threadIdx.x & 31;
    const bf16_t *p = m + (n0 + (lane >> 2)) * S + k0 + 2 * (lane & 3);
    b[0] = ld32(p);
    b[1] = ld32(p + 8);
}
/* B[k][n] = m[k0 + k][n0 + n]: the product's k runs down m's columns. */
__device__ __forceinline__ void frag_b(unsigned int b[2], const bf16_t *m, const unsigned int S,
                                       const unsigned int k0, const unsigned int n0) {
    const unsigned int lane = threadIdx.x & 31;
    const bf16_t *p = m + (k0 + 2 * (lane & 3)) * S + n0 + (lane >> 2);
    b[0] = pair(p, S);
    b[1] = pair(p + 8 * S, S);
}
/* The A fragment of key tile kt (columns 16 kt..) from the C fragments of 8-column tiles
   2 kt and 2 kt + 1, rounded to bf16 (FlashAttention-2's register reuse). */
__device__ __forceinline__ void frag_a_from_c(unsigned int a[4], const float c0[4],
                                              const float c1[4]) {
    a[0] = pack2(c0[0], c0[1]);
    a[1] = pack2(c0[2], c0[3]);
    a[2] = pack2(c1[0], c1[1]);
    a[3] = pack2(c1[2], c1[3]);
}

/* M matrices at once, each rows 0..rows[m]-1 of a head's D columns (rows stride[m] apart in
   src[m]) into dst[m] [n][S], zeros from rows[m] to n. Each thread issues all its 16-byte
   loads of a round (two per matrix) before their stores: one at a time, every load would
   wait out the global latency (the host checks the alignment). */
template <int D, int M>
__device__ __forceinline__ void tc_load(const bf16_t *const src[M], const unsigned int stride[M],
                                        const unsigned int rows[M], bf16_t *const dst[M],
                                        const unsigned int n, const unsigned int S) {
    const unsigned int per_row = D / 8, total = n * per_row;
    for (unsigned int i0 = threadIdx.x; i0 < total; i0 += 2 * blockDim.x) {
        uint4 v[M][2];
#pragma unroll
        for (int k = 0; k < 2; ++k) {
            const unsigned int i = i0 + k * blockDim.x, r = i / per_row, c = (i - r * per_row) * 8;
#pragma unroll
            for (int m = 0; m < M; ++m) {
                v[m][k] = make_uint4(0u, 0u, 0u, 0u);
                if (i < total && r < rows[m])
                    v[m][k] = *(const uint4 *)(src[m] + r * stride[m] + c);
            }
        }
#pragma unroll
        for (int k = 0; k < 2; ++k) {
            const unsigned int i = i0 + k * blockDim.x, r = i / per_row, c = (i - r * per_row) * 8;
            if (i < total)
#pragma unroll
                for (int m = 0; m < M; ++m) *(uint4 *)(dst[m] + r * S + c) = v[m][k];
        }
    }
}

/* acc[n] = rows i0..i0 + 15 of a times rows 8 n..8 n + 7 of b, transposed (a and b
   [..][S] in shared memory, D columns each), for the first n8 tiles of 8; the rest zeros:
   the scores q k^T, or dO v^T. */
template <int KT, int D>
__device__ __forceinline__ void tc_rows_by_rows(const bf16_t *a_m, const bf16_t *b_m,
                                                const unsigned int S, const unsigned int i0,
                                                const unsigned int n8, float acc[2 * KT][4]) {
#pragma unroll
    for (int n = 0; n < 2 * KT; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
#pragma unroll
    for (int k = 0; k < D / 16; ++k) {
        unsigned int a[4];
        frag_a(a, a_m, S, i0, 16 * k);
#pragma unroll
        for (int n = 0; n < 2 * KT; ++n)
            if (n < n8) {
                unsigned int b[2];
                frag_bt(b, b_m, S, 8 * n, 16 * k);
                mma16816(acc[n], a, b[0], b[1]);
            }
    }
}

/* The probabilities of query rows i0 + g and i0 + g + 8 (this lane's) against every key,
   p[n][c] for key 8 n + 2q + (c & 1), rows c < 2 and c >= 2: scale q k^T, masked (key past
   t, or past the row under `causal`), exp(s - max) over the row, divided by its sum. Key
   tiles a causal query tile cannot see are skipped and stay 0. */
template <int KT, int D>
__device__ __forceinline__ void tc_probs(const bf16_t *sq, const bf16_t *sk, const unsigned int S,
                                         const unsigned int i0, const unsigned int t,
                                         const unsigned int n8, const int causal,
                                         const float scale, float p[2 * KT][4]) {
    const unsigned int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    tc_rows_by_rows<KT, D>(sq, sk, S, i0, n8, p);
    const float inf = __int_as_float(0x7f800000);
    float m[2] = {-inf, -inf}, z[2] = {0.0f, 0.0f};
#pragma unroll
    for (int n = 0; n < 2 * KT; ++n)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const unsigned int i = i0 + g + (c >> 1) * 8, j = 8 * n + 2 * q + (c & 1);
            const bool seen = j < t && (!causal || j <= i);
            p[n][c] = seen ? p[n][c] * scale : -inf;
            m[c >> 1] = fmaxf(m[c >> 1], p[n][c]);
        }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        m[r] = fmaxf(m[r], __shfl_xor_sync(0xffffffffu, m[r], 1));
        m[r] = fmaxf(m[r], __shfl_xor_sync(0xffffffffu, m[r], 2));
    }
    /* Key 0 is seen by every row, so each max is finite. */
#pragma unroll
    for (int n = 0; n < 2 * KT; ++n)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            p[n][c] = p[n][c] == -inf ? 0.0f : expf(p[n][c] - m[c >> 1]);
            z[c >> 1] += p[n][c];
        }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        z[r] += __shfl_xor_sync(0xffffffffu, z[r], 1);
        z[r] += __shfl_xor_sync(0xffffffffu, z[r], 2);
        z[r] = 1.0f / z[r];
    }
#pragma unroll
    for (int n = 0; n < 2 * KT; ++n)
#pragma unroll
        for (int c = 0; c < 4; ++c) p[n][c] *= z[c >> 1];
}

/* acc = w m for the warp's 16 rows of weights w (C fragments over keys 8 n + .., the first
   n8 tiles of 8 nonzero) and a matrix m [keys][S] in shared memory: the attention-weighted
   sum of value rows (forward) or of key rows (dq). */
template <int KT, int D>
__device__ __forceinline__ void tc_weigh_rows(const float w[2 * KT][4], const unsigned int n8,
                                              const bf16_t *m, const unsigned int S,
                                              float acc[D / 8][4]) {
#pragma unroll
    for (int n = 0; n < D / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
#pragma unroll
    for (int kt = 0; kt < KT; ++kt)
        if (2 * kt < n8) {
            unsigned int a[4];
            frag_a_from_c(a, w[2 * kt], w[2 * kt + 1]);
#pragma unroll
            for (int n = 0; n < D / 8; ++n) {
                unsigned int b[2];
                frag_b(b, m, S, 16 * kt, 8 * n);
                mma16816(acc[n], a, b[0], b[1]);
            }
        }
}

/* Stores C fragments acc[D / 8] (times mul) as rows r0 + g and r0 + g + 8 (those below
   `rows`) of a matrix whose rows lie `stride` apart. */
template <int D>
__device__ __forceinline__ void tc_store(bf16_t *dst, const size_t stride, const unsigned int r0,
                                         const unsigned int rows, float acc[D / 8][4],
                                         const float mul) {
    const unsigned int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const unsigned int r = r0 + g + 8 * h;
        if (r < rows) {
            unsigned int *row = (unsigned int *)(dst + r * stride + 2 * q);
#pragma unroll
            for (int n = 0; n < D / 8; ++n)
                row[4 * n] = pack2(mul * acc[n][2 * h], mul * acc[n][2 * h + 1]);
        }
    }
}

/* Key tiles of 8 that query rows i0..i0 + 15 see: all 2 kts, or under `causal` those up to
   the tile's last row. */
__device__ __forceinline__ unsigned int tc_seen_tiles(const unsigned int kts, const int causal,
                                                      const unsigned int i0) {
    return causal ? min(2 * kts, i0 / 8 + 2) : 2 * kts;
}

/* out [B tq, W] = softmax(scale q k^T) v. Shared: K, V and Q [16 kts][S], S = D + 8
   (rows 16 bytes apart beyond D, so the eight rows of a fragment load hit distinct banks). */
template <int KT, int D>
__device__ void tc_fwd(const bf16_t *qkv, bf16_t *out, const unsigned int t,
                       const unsigned int tq, const unsigned int H, const int causal,
                       const float scale) {
    const unsigned int W = H * D, S = D + 8, kts = (t + 15) / 16, qts = (tq + 15) / 16;
    const unsigned int warp = threadIdx.x >> 5;
    bf16_t *sk = (bf16_t *)tc_sh, *sv = sk + 16 * kts * S, *sq = sv + 16 * kts * S;
    const bf16_t *base = qkv + (size_t)blockIdx.x * t * 3 * W + blockIdx.y * D;
    {
        const bf16_t *const src[3] = {base + W, base + 2 * W, base};
        const unsigned int stride[3] = {3 * W, 3 * W, 3 * W}, rows[3] = {t, t, tq};
        bf16_t *const dst[3] = {sk, sv, sq};
        tc_load<D, 3>(src, stride, rows, dst, 16 * kts, S);
    }
    __syncthreads();
    if (warp >= qts) return;
    const unsigned int i0 = 16 * warp, n8 = tc_seen_tiles(kts, causal, i0);
    float p[2 * KT][4];
    tc_probs<KT, D>(sq, sk, S, i0, t, n8, causal, scale, p);
    float o[D / 8][4];
    tc_weigh_rows<KT, D>(p, n8, sv, S, o);
    tc_store<D>(out + (size_t)blockIdx.x * tq * W + blockIdx.y * D, W, i0, tq, o, 1.0f);
}

/* dqkv [B t, 3W] from qkv and the output gradient go [B tq, W]: warp w first takes query tile
   w (probabilities, dp = dO v^T, ds = p (dp - rowsum(p dp)), dq = scale ds k) and leaves p
   and ds transposed in shared memory; then key tile w (dv = p^T dO, dk = scale ds^T q).
   dq rows from tq to t are not written (the host zeroes them). Shared: K, V, Q, dO
   [16 kts][S], then p^T and ds^T [16 kts][16 kts + 8]. */
template <int KT, int D>
__device__ void tc_bwd(const bf16_t *qkv, const bf16_t *go, bf16_t *dqkv, const unsigned int t,
                       const unsigned int tq, const unsigned int H, const int causal,
                       const float scale) {
    const unsigned int W = H * D, S = D + 8, kts = (t + 15) / 16, qts = (tq + 15) / 16;
    const unsigned int R = 16 * kts, SP = R + 8;
    const unsigned int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2,
                       q = lane & 3;
    bf16_t *sk = (bf16_t *)tc_sh, *sv = sk + R * S, *sq = sv + R * S, *sg = sq + R * S;
    bf16_t *spt = sg + R * S, *sdt = spt + R * SP;
    const bf16_t *base = qkv + (size_t)blockIdx.x * t * 3 * W + blockIdx.y * D;
    bf16_t *dbase = dqkv + (size_t)blockIdx.x * t * 3 * W + blockIdx.y * D;
    {
        /* Query and gradient rows past tq are zeros, so their p and ds add nothing below. */
        const bf16_t *const src[4] = {base + W, base + 2 * W, base,
                                      go + (size_t)blockIdx.x * tq * W + blockIdx.y * D};
        const unsigned int stride[4] = {3 * W, 3 * W, 3 * W, W}, rows[4] = {t, t, tq, tq};
        bf16_t *const dst[4] = {sk, sv, sq, sg};
        tc_load<D, 4>(src, stride, rows, dst, R, S);
    }
    __syncthreads();
    if (warp < qts) {
        const unsigned int i0 = 16 * warp, n8 = tc_seen_tiles(kts, causal, i0);
        float p[2 * KT][4], ds[2 * KT][4];
        tc_probs<KT, D>(sq, sk, S, i0, t, n8, causal, scale, p);
        tc_rows_by_rows<KT, D>(sg, sv, S, i0, n8, ds); /* dp = dO v^T, made ds below */
        float dsum[2] = {0.0f, 0.0f};
#pragma unroll
        for (int n = 0; n < 2 * KT; ++n)
#pragma unroll
            for (int c = 0; c < 4; ++c) dsum[c >> 1] += p[n][c] * ds[n][c];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            dsum[r] += __shfl_xor_sync(0xffffffffu, dsum[r], 1);
            dsum[r] += __shfl_xor_sync(0xffffffffu, dsum[r], 2);
        }
#pragma unroll
        for (int n = 0; n < 2 * KT; ++n)
#pragma unroll
            for (int c = 0; c < 4; ++c) ds[n][c] = p[n][c] * (ds[n][c] - dsum[c >> 1]);
        float dq[D / 8][4];
        tc_weigh_rows<KT, D>(ds, n8, sk, S, dq);
        tc_store<D>(dbase, 3 * W, i0, tq, dq, scale);
        /* p and ds, transposed, for the key tiles (zeros where masked). */
#pragma unroll
        for (int n = 0; n < 2 * KT; ++n)
            if (n < 2 * kts)
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const unsigned int i = i0 + g + (c >> 1) * 8, j = 8 * n + 2 * q + (c & 1);
                    spt[j * SP + i] = (bf16_t)bf16_bits(p[n][c]);
                    sdt[j * SP + i] = (bf16_t)bf16_bits(ds[n][c]);
                }
    }
    __syncthreads();
    if (warp >= kts) return;
    const unsigned int j0 = 16 * warp;
    float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
#pragma unroll
        for (int c = 0; c < 4; ++c) dk[n][c] = dv[n][c] = 0.0f;
#pragma unroll
    for (int it = 0; it < KT; ++it)
        /* Under `causal` query tiles wholly before the key tile see none of it. */
        if (it < qts && (!causal || 16 * it + 15 >= j0)) {
            unsigned int a[4];
            frag_a(a, spt, SP, j0, 16 * it);
#pragma unroll
            for (int n = 0; n < D / 8; ++n) {
                unsigned int b[2];
                frag_b(b, sg, S, 16 * it, 8 * n);
                mma16816(dv[n], a, b[0], b[1]);
            }
            frag_a(a, sdt, SP, j0, 16 * it);
#pragma unroll
            for (int n = 0; n < D / 8; ++n) {
                unsigned int b[2];
                frag_b(b, sq, S, 16 * it, 8 * n);
                mma16816(dk[n], a, b[0], b[1]);
            }
        }
    tc_store<D>(dbase + W, 3 * W, j0, t, dk, scale);
    tc_store<D>(dbase + 2 * W, 3 * W, j0, t, dv, 1.0f);
}

#define CLIPCID_TC(KT, D)                                                                       \
extern "C" __global__ void __launch_bounds__(32 * KT)                                          \
clipcid_attention_tc_fwd_k##KT##_d##D(const bf16_t *qkv, bf16_t *out, const unsigned int t,    \
                                      const unsigned int tq, const unsigned int h,              \
                                      const int causal, const float scale) {                    \
    tc_fwd<KT, D>(qkv, out, t, tq, h, causal, scale);                                           \
}                                                                                               \
extern "C" __global__ void __launch_bounds__(32 * KT)                                          \
clipcid_attention_tc_bwd_k##KT##_d##D(const bf16_t *qkv, const bf16_t *go, bf16_t *dqkv,       \
                                      const unsigned int t, const unsigned int tq,              \
                                      const unsigned int h, const int causal,                   \
                                      const float scale) {                                      \
    tc_bwd<KT, D>(qkv, go, dqkv, t, tq, h, causal, scale);                                      \
}

CLIPCID_TC(4, 32)
CLIPCID_TC(4, 64)
CLIPCID_TC(5, 32)
CLIPCID_TC(5, 64)

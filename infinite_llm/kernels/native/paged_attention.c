/* MicroAttention for few-query sequences (decode), reading the paged KV cache in place.
 *
 * The torch path gathers a sequence's blocks into a contiguous buffer before calling the fused
 * attention kernel: that copy reads and writes every cached K/V once more than attention needs,
 * and for decode (memory-bound) it was most of attention's time. Here each (sequence, KV head)
 * work item walks its blocks where they lie, 8 key slots at a time, with an online softmax.
 *
 * Semantics are those of `micro_attention` (infinite_llm/kernels/dist_attention.py): query t of
 * sequence s sees slot j of listed block b iff j < lens[b] and starts[b] + j <= qpos[t]; query
 * head h reads KV head h / G. Rows that see no key get out 0 and lse -inf. All float32.
 *
 * Built by infinite_llm/kernels/native_attention.py with the host compiler (-O3 -march=native,
 * no -ffast-math: the -inf logic needs IEEE infinities). GCC vector extensions keep it portable:
 * the compiler maps the 8-float vectors to whatever the host has (AVX, AVX-512, NEON).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float vf __attribute__((vector_size(32)));  /* 8 floats */
typedef int32_t vi __attribute__((vector_size(32)));
#define W 8

#define MIN_PART_BLOCKS 8 /* a work item gets at least this many blocks of a sequence */
#define MAX_VECS 32 /* head dim up to 256 */

static inline vf splat(float x) { return (vf){x, x, x, x, x, x, x, x}; }

/* Lane-wise m ? a : b for a comparison mask m (GCC's vector ?: is C++ only). */
static inline vf blend(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }

static inline vf load(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v); /* unaligned load */
    return v;
}

static inline void store(float *p, vf v) { memcpy(p, &v, sizeof v); }

/* exp(x) for x <= 0 (x = -inf gives 0), lane-wise: Cephes' expf polynomial after range reduction
 * by ln 2 (within 2 ulp of expf). Rounding to the nearest integer adds and subtracts 1.5 * 2^23. */
static inline vf exp_nonpositive(vf x) {
    const vf lo = splat(-87.0f);
    const vi tiny = x < lo;
    const vf xc = blend(tiny, lo, x);
    const vf n = (xc * splat(1.44269504088896341f) + splat(12582912.0f)) - splat(12582912.0f);
    const vf r = xc - n * splat(0.693359375f) + n * splat(2.12194440e-4f);
    vf p = splat(1.9875691500e-4f);
    p = p * r + splat(1.3981999507e-3f);
    p = p * r + splat(8.3334519073e-3f);
    p = p * r + splat(4.1665795894e-2f);
    p = p * r + splat(1.6666665459e-1f);
    p = p * r + splat(5.0000001201e-1f);
    p = p * r * r + r + splat(1.0f);
    const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
    return blend(tiny, splat(0.0f), p * (vf)bits);
}

/* Lane i of the result is the sum of the lanes of t[i]: three even/odd pair-add stages. */
static inline vf sum_each(vf t[W]) {
    const vi even = {0, 2, 4, 6, 8, 10, 12, 14}, odd = {1, 3, 5, 7, 9, 11, 13, 15};
    for (int width = W; width > 1; width /= 2)
        for (int i = 0; i < width / 2; i++)
            t[i] = __builtin_shuffle(t[2 * i], t[2 * i + 1], even) + __builtin_shuffle(t[2 * i], t[2 * i + 1], odd);
    return t[0];
}

static inline float max_lane(vf x) {
    float m = x[0];
    for (int i = 1; i < W; i++) m = x[i] > m ? x[i] : m;
    return m;
}

static inline float sum_lanes(vf x) {
    float s = 0.0f;
    for (int i = 0; i < W; i++) s += x[i];
    return s;
}

/* The running softmax state of one work item's rows (malloc'd per item: sized to the call). */
typedef struct {
    vf *q, *acc; /* scaled queries and unnormalised outputs, [rows][nd] */
    float *m, *l;
    int64_t *limit; /* a row sees positions <= limit */
} Rows;

/* Folds keys [j0, j0 + 8) of one block (n valid slots, the first at position `start`) into rows
 * [r0, r0 + rows), which all read the KV head that kb/vb point at. Always inlined into the
 * wrappers below, which fix nd (head dim / 8) at compile time for the common head dims so that
 * the per-row vector loops unroll into registers. */
static inline __attribute__((always_inline)) void fold_keys(Rows *st, int64_t r0, int64_t rows, const float *kb,
                                                            const float *vb, int64_t slot_stride, int64_t j0,
                                                            int64_t n, int64_t start, const int64_t nd) {
    const int64_t keys = n - j0 < W ? n - j0 : W;
    const vi lane = {0, 1, 2, 3, 4, 5, 6, 7};
    for (int64_t r = r0; r < r0 + rows; r++) {
        int64_t visible = st->limit[r] - start - j0 + 1; /* keys of these 8 the row may see */
        visible = visible < keys ? visible : keys;
        if (visible <= 0) continue;
        const vf *qr = st->q + r * nd;
        vf t[W];
        for (int64_t j = 0; j < W; j++) { /* slots past the block's end repeat slot j0 (masked) */
            const float *kj = kb + (j0 + (j < keys ? j : 0)) * slot_stride;
            vf dot = qr[0] * load(kj);
            for (int64_t i = 1; i < nd; i++) dot += qr[i] * load(kj + W * i);
            t[j] = dot;
        }
        const int32_t nv = (int32_t)visible;
        const vf s = blend(lane < (vi){nv, nv, nv, nv, nv, nv, nv, nv}, sum_each(t), splat(-INFINITY));
        const float new_max = fmaxf(max_lane(s), st->m[r]);
        const float alpha = exp_nonpositive(splat(st->m[r] - new_max))[0]; /* first keys: m = -inf, 0 */
        const vf p = exp_nonpositive(s - splat(new_max));
        st->l[r] = st->l[r] * alpha + sum_lanes(p);
        st->m[r] = new_max;
        vf a[MAX_VECS], *acc = st->acc + r * nd;
        for (int64_t i = 0; i < nd; i++) a[i] = acc[i] * splat(alpha);
        for (int64_t j = 0; j < visible; j++) { /* invisible slots are never read: they may be NaN */
            const float *vj = vb + (j0 + j) * slot_stride;
            for (int64_t i = 0; i < nd; i++) a[i] += splat(p[j]) * load(vj + W * i);
        }
        for (int64_t i = 0; i < nd; i++) acc[i] = a[i];
    }
}

typedef void (*fold_fn)(Rows *, int64_t, int64_t, const float *, const float *, int64_t, int64_t, int64_t,
                        int64_t, int64_t);
#define FOLD_FOR(ND)                                                                                          \
    static void fold_keys_##ND(Rows *st, int64_t r0, int64_t rows, const float *kb, const float *vb,          \
                               int64_t stride, int64_t j0, int64_t n, int64_t start, int64_t nd) {            \
        (void)nd;                                                                                             \
        fold_keys(st, r0, rows, kb, vb, stride, j0, n, start, ND);                                            \
    }
FOLD_FOR(4)
FOLD_FOR(8)
FOLD_FOR(16)

static void fold_keys_any(Rows *st, int64_t r0, int64_t rows, const float *kb, const float *vb, int64_t stride,
                          int64_t j0, int64_t n, int64_t start, int64_t nd) {
    fold_keys(st, r0, rows, kb, vb, stride, j0, n, start, nd);
}

static fold_fn fold_for(int64_t nd) {
    switch (nd) {
    case 4: return fold_keys_4;   /* head dim 32 */
    case 8: return fold_keys_8;   /* 64 */
    case 16: return fold_keys_16; /* 128 */
    default: return fold_keys_any;
    }
}

typedef struct {
    const float *q, *k_cache, *v_cache;
    const int64_t *row_start, *row_count, *qpos, *tables, *starts, *lens;
    int64_t q_stride_t, max_blocks, Hq, Hkv, D, bs;
    float scale;
    float *out, *lse;
} Args;

/* A work item: table columns [b0, b1) of sequence s. part < 0: the item has all of s's blocks
 * and writes the output; else its state goes to partial slot `part`, merged afterwards. */
typedef struct {
    int64_t s, b0, b1, part;
} Item;

/* Row r of sequence s is query row_start[s] + (r % (nq G)) / G of head (r / (nq G)) G + r % G:
 * the rows that share a KV head are consecutive. */
static inline int64_t row_query(const Args *a, int64_t s, int64_t r, int64_t G) {
    return a->row_start[s] + (r % (a->row_count[s] * G)) / G;
}

static inline int64_t row_head(const Args *a, int64_t s, int64_t r, int64_t G) {
    return (r / (a->row_count[s] * G)) * G + r % G;
}

static void init_rows(const Args *a, int64_t s, Rows *st) {
    const int64_t G = a->Hq / a->Hkv, nd = a->D / W, rows = a->row_count[s] * a->Hq;
    for (int64_t r = 0; r < rows; r++) {
        const float *src = a->q + row_query(a, s, r, G) * a->q_stride_t + row_head(a, s, r, G) * a->D;
        for (int64_t i = 0; i < nd; i++) {
            st->q[r * nd + i] = load(src + W * i) * splat(a->scale);
            st->acc[r * nd + i] = splat(0.0f);
        }
        st->m[r] = -INFINITY;
        st->l[r] = 0.0f;
        st->limit[r] = a->qpos[row_query(a, s, r, G)];
    }
}

/* Folds the item's blocks into its rows, 8 slots at a time and every KV head for those slots
 * (they lie side by side: the item streams through each block once). */
static void fold_item(const Args *a, const Item *it, Rows *st) {
    const int64_t nd = a->D / W, slot_stride = a->Hkv * a->D, rg = a->row_count[it->s] * (a->Hq / a->Hkv);
    const fold_fn fold = fold_for(nd);
    const int64_t *table = a->tables + it->s * a->max_blocks, *starts = a->starts + it->s * a->max_blocks;
    const int64_t *lens = a->lens + it->s * a->max_blocks;
    for (int64_t b = it->b0; b < it->b1; b++) {
        const int64_t n = lens[b];
        if (n <= 0) continue;
        const float *kb = a->k_cache + table[b] * a->bs * slot_stride, *vb = a->v_cache + table[b] * a->bs * slot_stride;
        for (int64_t j0 = 0; j0 < n; j0 += W)
            for (int64_t h = 0; h < a->Hkv; h++)
                fold(st, h * rg, rg, kb + h * a->D, vb + h * a->D, slot_stride, j0, n, starts[b], nd);
    }
}

static void write_row(const Args *a, int64_t s, int64_t r, const float *acc, float m, float l) {
    const int64_t G = a->Hq / a->Hkv, t = row_query(a, s, r, G), head = row_head(a, s, r, G);
    float *o = a->out + (t * a->Hq + head) * a->D;
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    for (int64_t d = 0; d < a->D; d++) o[d] = acc[d] * inv;
    a->lse[t * a->Hq + head] = l > 0.0f ? m + logf(l) : -INFINITY;
}

/* Partial slot p: acc [rows][D] floats, then m [rows], l [rows]; `rows` of its sequence.
 * Returns 0, or -1 if out of memory. */
static int run_item(const Args *a, const Item *it, float *partials, const int64_t *part_offset) {
    const int64_t rows = a->row_count[it->s] * a->Hq, nd = a->D / W;
    void *buf = malloc(rows * (2 * nd * sizeof(vf) + 2 * sizeof(float) + sizeof(int64_t)) + sizeof(vf));
    if (!buf) return -1;
    vf *aligned = (vf *)(((uintptr_t)buf + sizeof(vf) - 1) & ~(uintptr_t)(sizeof(vf) - 1));
    Rows st = {aligned, aligned + rows * nd, (float *)(aligned + 2 * rows * nd), 0, 0};
    st.l = st.m + rows;
    st.limit = (int64_t *)(st.l + rows);
    init_rows(a, it->s, &st);
    fold_item(a, it, &st);
    if (it->part < 0) {
        for (int64_t r = 0; r < rows; r++) write_row(a, it->s, r, (const float *)(st.acc + r * nd), st.m[r], st.l[r]);
    } else {
        float *p = partials + part_offset[it->part];
        memcpy(p, st.acc, rows * a->D * sizeof(float));
        memcpy(p + rows * a->D, st.m, rows * sizeof(float));
        memcpy(p + rows * a->D + rows, st.l, rows * sizeof(float));
    }
    free(buf);
    return 0;
}

/* ScaleReduce of sequence s's partial slots [p0, p1) into its output rows. */
static void merge_parts(const Args *a, int64_t s, int64_t p0, int64_t p1, const float *partials,
                        const int64_t *part_offset, float *acc) {
    const int64_t rows = a->row_count[s] * a->Hq, D = a->D;
    for (int64_t r = 0; r < rows; r++) {
        float m = -INFINITY, l = 0.0f;
        for (int64_t p = p0; p < p1; p++) m = fmaxf(m, partials[part_offset[p] + rows * D + r]);
        for (int64_t d = 0; d < D; d++) acc[d] = 0.0f;
        for (int64_t p = p0; p < p1 && m > -INFINITY; p++) {
            const float *part = partials + part_offset[p];
            const float w = expf(part[rows * D + r] - m); /* this part's max is -inf: 0 */
            l += w * part[rows * D + rows + r];
            for (int64_t d = 0; d < D; d++) acc[d] += w * part[r * D + d];
        }
        write_row(a, s, r, acc, m, l);
    }
}

/* Whether `paged_attention` takes these sizes (else the caller uses the torch path). */
int paged_attention_supports(int64_t Hq, int64_t Hkv, int64_t D) {
    return Hkv > 0 && Hq % Hkv == 0 && D % W == 0 && D / W <= MAX_VECS;
}

/* Splits each sequence's listed columns into parts, so that a batch of few long sequences still
 * gives every thread work: about 4 items per thread overall, none under MIN_PART_BLOCKS blocks.
 * Returns the number of items; fills items, and part_offset/num_parts for split sequences. */
static int64_t plan_items(const Args *a, int64_t S, int nthreads, Item *items, int64_t *part_offset,
                          int64_t *num_parts, int64_t *partials_len) {
    int64_t total = 0, count = 0, parts = 0;
    for (int64_t s = 0; s < S; s++) { /* num_parts[s] = columns up to the last listed block, for now */
        num_parts[s] = 0;
        for (int64_t b = 0; b < a->max_blocks; b++)
            if (a->lens[s * a->max_blocks + b] > 0) num_parts[s] = b + 1;
        total += num_parts[s];
    }
    *partials_len = 0;
    for (int64_t s = 0; s < S; s++) {
        const int64_t used = num_parts[s];
        int64_t p = nthreads > 1 ? (4 * nthreads * used + total - 1) / (total > 0 ? total : 1) : 1;
        const int64_t cap = (used + MIN_PART_BLOCKS - 1) / MIN_PART_BLOCKS;
        p = p < cap ? p : cap;
        p = p < 1 ? 1 : p;
        for (int64_t i = 0; i < p; i++) {
            items[count++] = (Item){s, used * i / p, used * (i + 1) / p, p > 1 ? parts : -1};
            if (p > 1) {
                part_offset[parts++] = *partials_len;
                *partials_len += a->row_count[s] * a->Hq * (a->D + 2);
            }
        }
        num_parts[s] = p;
    }
    return count;
}

/* q [T, Hq, D] with row stride q_stride_t; caches [num_blocks, bs, Hkv, D]. Sequence s (of S) has
 * queries row_start[s] .. + row_count[s] (rows of q, out and lse; other rows are not touched)
 * and tables/starts/lens [S, max_blocks] as in micro_attention; qpos is indexed by row. Writes
 * out [T, Hq, D] and lse [T, Hq]. Returns 0, -1 for sizes `paged_attention_supports` rejects,
 * -2 if out of memory. */
int paged_attention(const float *q, int64_t q_stride_t, const float *k_cache, const float *v_cache,
                    const int64_t *row_start, const int64_t *row_count, const int64_t *qpos, const int64_t *tables,
                    const int64_t *starts, const int64_t *lens, int64_t S, int64_t max_blocks, int64_t Hq,
                    int64_t Hkv, int64_t D, int64_t bs, float scale, float *out, float *lse, int nthreads) {
    if (!paged_attention_supports(Hq, Hkv, D)) return -1;
    const Args a = {q, k_cache, v_cache, row_start, row_count, qpos, tables, starts, lens, q_stride_t, max_blocks,
                    Hq, Hkv, D, bs, scale, out, lse};
    const int64_t max_items = S * (max_blocks / MIN_PART_BLOCKS + 1);
    Item *items = malloc(max_items * sizeof(Item));
    int64_t *part_offset = malloc(max_items * sizeof(int64_t)), *num_parts = malloc((S + 1) * sizeof(int64_t));
    int64_t partials_len = 0;
    const int64_t n = items && part_offset && num_parts
                          ? plan_items(&a, S, nthreads, items, part_offset, num_parts, &partials_len) : -1;
    float *partials = n >= 0 ? malloc((partials_len + 1) * sizeof(float)) : 0;
    int failed = !partials;
    if (partials) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
        for (int64_t i = 0; i < n; i++)
            if (run_item(&a, &items[i], partials, part_offset) != 0) {
#pragma omp atomic write
                failed = 1;
            }
        float *acc = malloc(D * sizeof(float));
        failed |= !acc;
        for (int64_t s = 0, p = 0; !failed && s < S; s++) /* few split sequences: serial is enough */
            if (num_parts[s] > 1) {
                merge_parts(&a, s, p, p + num_parts[s], partials, part_offset, acc);
                p += num_parts[s];
            }
        free(acc);
    }
    const int rc = failed ? -2 : 0;
    free(items), free(part_offset), free(num_parts), free(partials);
    return rc;
}

/* ScaleReduce of P partials of the same rows: outs[p] [rows, D] and lses[p] [rows] (float32,
 * contiguous, given by address). out = sum_p exp(lse_p - lse) out_p, lse = logsumexp_p lse_p;
 * rows no partial saw get 0 and -inf. One pass over the partials instead of a dozen torch ops
 * (which cost more than the arithmetic for a decode step's few rows). */
void scale_reduce(const int64_t *out_ptrs, const int64_t *lse_ptrs, int64_t P, int64_t rows, int64_t D,
                  float *out, float *lse) {
    for (int64_t r = 0; r < rows; r++) {
        float m = -INFINITY, l = 0.0f;
        for (int64_t p = 0; p < P; p++) m = fmaxf(m, ((const float *)lse_ptrs[p])[r]);
        float *o = out + r * D;
        for (int64_t d = 0; d < D; d++) o[d] = 0.0f;
        if (m == -INFINITY) {
            lse[r] = -INFINITY;
            continue;
        }
        for (int64_t p = 0; p < P; p++) l += expf(((const float *)lse_ptrs[p])[r] - m);
        for (int64_t p = 0; p < P; p++) {
            const float w = expf(((const float *)lse_ptrs[p])[r] - m) / l, *src = (const float *)out_ptrs[p] + r * D;
            for (int64_t d = 0; d < D; d++) o[d] += w * src[d];
        }
        lse[r] = m + logf(l);
    }
}

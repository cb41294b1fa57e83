/* The fused CPU kernel: out = aligned + alpha * (aligned - sft) and the statistics of the norm reports, in one
 * pass over memory.
 *
 * The torch fallback (kernels.py) makes ~14 passes over every block (widen, lerp, round, widen again, five dot
 * products, two subtractions, two min/max); this loop reads each input element once, writes each output element
 * once and keeps everything else in registers.
 *
 * Arithmetic, identical to torch's vectorised CPU lerp(aligned, sft, w) with w = (float)-alpha, in the form that
 * kernels.form(alpha) decides once for every backend (coeff, from_sft, keep):
 *     d = sft - aligned                          (float32)
 *     from_sft = 0: out = fma(coeff, d, aligned)     (|w| < 0.5: coeff = w)
 *     from_sft = 1: out = fma(coeff, d, sft)         (|w| >= 0.5: coeff = w - 1)
 *     keep = 1:     out = aligned                    (alpha = 0: -0.0 included)
 * then one rounding to the output dtype (round to nearest even; NaN -> 0x7fc0 in bfloat16).
 *
 * Statistics (when asked): float32 sums over 8 lanes, added into float64 every BLOCK elements, returned in the
 * order of kernels.Sums (the module's SUMS names them, and kernels checks them when it loads the module):
 *     sum sft^2, sum aligned^2, sum out^2 (out as rounded), sum d^2, sum (out - aligned)^2, max |d|,
 *     max |out - aligned|
 * and always flags (FLAGS names the bits): bit 0 sft, bit 1 aligned, bit 2 out holds a NaN or an Inf somewhere.
 *
 * The Python functions at the end take buffer objects, check their lengths, dtypes, writability and overlap once,
 * raise ValueError on a mismatch and release the GIL for the loop. Built with the machine's default target plus an
 * AVX2/FMA variant chosen at run time.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum { DT_BF16 = 0, DT_F16 = 1, DT_F32 = 2 };

#define LANES 8
#define BLOCK 1024 /* elements per float32 partial sum */

typedef float v8f __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint16_t v8s __attribute__((vector_size(16)));

#define INLINE static inline __attribute__((always_inline))

INLINE v8u vselect(v8i mask, v8u yes, v8u no) { return ((v8u)mask & yes) | (~(v8u)mask & no); }

/* float16 <-> float32 with integer and float vector operations only, so that the same code runs (and rounds the
 * same) on every CPU: no F16C, no _Float16. After F. Giesen's branch-free conversions ("half_to_float_fast5",
 * "float_to_half_fast3_rtne"); round to nearest even, NaN stays NaN, overflow goes to Inf. */
INLINE v8f f16_to_f32(const char *p) {
    v8s raw;
    memcpy(&raw, p, sizeof raw);
    v8u h = __builtin_convertvector(raw, v8u);
    v8u o = (h & 0x7fffu) << 13;        /* exponent and mantissa */
    v8u exp = o & (0x7c00u << 13);
    o += (127 - 15) << 23;              /* rebias the exponent */
    v8u inf_nan = o + ((128 - 16) << 23); /* Inf/NaN: all exponent bits set */
    v8f denorm = (v8f)(o + (1u << 23)) - (v8f)((v8u){0} + (113u << 23)); /* zero and subnormals, renormalised */
    o = vselect((v8i)(exp == (0x7c00u << 13)), inf_nan, o);
    o = vselect((v8i)(exp == 0), (v8u)denorm, o);
    return (v8f)(o | ((h & 0x8000u) << 16));
}

INLINE v8u f32_to_f16(v8f f) {
    v8u x = (v8u)f;
    v8u sign = x & 0x80000000u;
    x ^= sign;
    v8i xi = (v8i)x; /* sign cleared: signed comparisons order it as unsigned ones would (AVX2 has only those) */
    v8u nan_inf = vselect(xi > 0x7f800000, (v8u){0} + 0x7e00u, (v8u){0} + 0x7c00u);
    /* subnormal or zero result: let float addition (round to nearest even) align the mantissa bits */
    v8f magic = (v8f)((v8u){0} + (126u << 23));
    v8u sub = (v8u)((v8f)x + magic) - (v8u)magic;
    /* normal result: rebias the exponent, round to nearest even by hand */
    v8u odd = (x >> 13) & 1u;
    v8u norm = (x + ((uint32_t)(15 - 127) << 23) + 0xfffu + odd) >> 13;
    v8u o = vselect(xi < 0x38800000, sub, norm);
    o = vselect(xi >= 0x47800000, nan_inf, o);
    return o | (sign >> 16);
}

INLINE v8f load(const char *p, int dt) {
    if (dt == DT_F32) {
        v8f x;
        memcpy(&x, p, sizeof x);
        return x;
    }
    if (dt == DT_BF16) {
        v8s h;
        memcpy(&h, p, sizeof h);
        return (v8f)(__builtin_convertvector(h, v8u) << 16);
    }
    return f16_to_f32(p);
}

/* Round x to dtype dt, store it at p, and return the stored values widened back to float32. */
INLINE v8f store(char *p, int dt, v8f x) {
    if (dt == DT_F32) {
        memcpy(p, &x, sizeof x);
        return x;
    }
    if (dt == DT_BF16) {
        v8u b = (v8u)x;
        v8u r = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
        v8i nan = (v8i)(x != x);
        r = (v8u)((nan & 0x7fc0) | (~nan & (v8i)r));
        v8s h = __builtin_convertvector(r, v8s);
        memcpy(p, &h, sizeof h);
        return (v8f)(r << 16);
    }
    v8u h = f32_to_f16(x);
    v8s h16 = __builtin_convertvector(h, v8s);
    memcpy(p, &h16, sizeof h16);
    return f16_to_f32((const char *)&h16);
}

INLINE v8f vfma(v8f a, v8f b, v8f c) {
    v8f r;
    for (int k = 0; k < LANES; k++) r[k] = __builtin_fmaf(a[k], b[k], c[k]);
    return r;
}

INLINE v8i nonfinite(v8f x) { return (v8i)(((v8u)x & 0x7f800000u) == 0x7f800000u); }

INLINE v8f vabs(v8f x) { return (v8f)((v8u)x & 0x7fffffffu); }

/* max(m, x) per lane; a NaN in x leaves m as it was (NaN and Inf are reported by the flags instead). */
INLINE v8f vmax(v8f m, v8f x) { return (v8f)vselect((v8i)(x > m), (v8u)x, (v8u)m); }

struct acc {
    v8f ss, aa, oo, dd, uu, md, mu;
    v8u top_o; /* the largest |out| bit pattern: an Inf or a NaN if it reaches 0x7f800000 */
};

INLINE v8u vmaxu(v8u m, v8u x) { return vselect((v8i)(x > m), x, m); }

INLINE void step(char *out, int odt, const char *sft, int sdt, const char *aligned, int adt, v8f w, int from_sft,
                 v8i keep, int stats, struct acc *t) {
    v8f s = load(sft, sdt), a = load(aligned, adt);
    v8f d = s - a;
    v8f r = vfma(w, d, from_sft ? s : a);
    r = (v8f)(((v8i)a & keep) | ((v8i)r & ~keep)); /* alpha = 0: aligned itself, -0.0 included */
    v8f o = store(out, odt, r);
    if (stats) {
        /* NaN and Inf in sft, aligned or out show in the sums (see flush) */
        v8f u = o - a;
        t->ss += s * s;
        t->aa += a * a;
        t->oo += o * o;
        t->dd += d * d;
        t->uu += u * u;
        t->md = vmax(t->md, vabs(d));
        t->mu = vmax(t->mu, vabs(u));
    } else {
        t->top_o = vmaxu(t->top_o, (v8u)o & 0x7fffffffu);
    }
}

INLINE double lanes_sum(v8f x) {
    double r = 0;
    for (int k = 0; k < LANES; k++) r += x[k];
    return r;
}

INLINE float lanes_max(v8f x) {
    float r = 0;
    for (int k = 0; k < LANES; k++) r = x[k] > r ? x[k] : r;
    return r;
}

/* Add the float32 lanes into the float64 sums. A sum that is not finite means a NaN or an Inf in its input (or
 * a square beyond float32's range, |x| > 1.8e19: a false alarm that the engine's scan of the output clears). */
INLINE void flush(struct acc *t, double *res, int *flags) {
    double ss = lanes_sum(t->ss), aa = lanes_sum(t->aa), oo = lanes_sum(t->oo);
    if (!__builtin_isfinite(ss)) *flags |= 1;
    if (!__builtin_isfinite(aa)) *flags |= 2;
    if (!__builtin_isfinite(oo)) *flags |= 4;
    res[0] += ss;
    res[1] += aa;
    res[2] += oo;
    res[3] += lanes_sum(t->dd);
    res[4] += lanes_sum(t->uu);
    t->ss = t->aa = t->oo = t->dd = t->uu = (v8f){0};
}

static const int SIZE[3] = {2, 2, 4};

INLINE void body(char *out, int odt, const char *sft, int sdt, const char *aligned, int adt, int64_t n, float coeff,
                 int from_sft, int keep_aligned, int stats, double *res, int *flags) {
    v8f w = {coeff, coeff, coeff, coeff, coeff, coeff, coeff, coeff}; /* not {0} + coeff: -0.0 would become +0.0 */
    int k0 = keep_aligned ? -1 : 0;
    v8i keep = {k0, k0, k0, k0, k0, k0, k0, k0};
    struct acc t;
    memset(&t, 0, sizeof t);
    int os = SIZE[odt], ss = SIZE[sdt], as = SIZE[adt];
    int64_t i = 0, full = n - n % LANES;
    while (i < full) {
        int64_t stop = i + BLOCK < full ? i + BLOCK : full;
        for (; i < stop; i += LANES)
            step(out + i * os, odt, sft + i * ss, sdt, aligned + i * as, adt, w, from_sft, keep, stats, &t);
        if (stats) flush(&t, res, flags);
    }
    if (i < n) { /* the ragged tail, through zero-padded copies: zeros add nothing to any sum or flag */
        char s8[LANES * 4] = {0}, a8[LANES * 4] = {0}, o8[LANES * 4];
        int64_t m = n - i;
        memcpy(s8, sft + i * ss, m * ss);
        memcpy(a8, aligned + i * as, m * as);
        step(o8, odt, s8, sdt, a8, adt, w, from_sft, keep, stats, &t);
        memcpy(out + i * os, o8, m * os);
        if (stats) flush(&t, res, flags);
    }
    if (stats) {
        float md = lanes_max(t.md), mu = lanes_max(t.mu);
        res[5] = md > res[5] ? md : res[5];
        res[6] = mu > res[6] ? mu : res[6];
    } else {
        for (int k = 0; k < LANES; k++)
            if (t.top_o[k] >= 0x7f800000u) *flags |= 4;
    }
}

/* One specialisation per (out, sft, aligned) dtype triple and stats flag, so that the loads and stores are
 * resolved at compile time. */
#define CASE(O, S, A)                                                                                              \
    case (O) * 9 + (S) * 3 + (A):                                                                                  \
        if (stats)                                                                                                 \
            body(out, O, sft, S, aligned, A, n, coeff, from_sft, keep, 1, res, flags);                             \
        else if (from_sft)                                                                                         \
            body(out, O, sft, S, aligned, A, n, coeff, 1, keep, 0, res, flags);                                    \
        else                                                                                                       \
            body(out, O, sft, S, aligned, A, n, coeff, 0, keep, 0, res, flags);                                    \
        return;
#define CASES_A(O, S) CASE(O, S, 0) CASE(O, S, 1) CASE(O, S, 2)
#define CASES_S(O) CASES_A(O, 0) CASES_A(O, 1) CASES_A(O, 2)
/* `expo norms`: the statistics of the change b - a alone, accumulated in float64 per lane (the report's sums are
 * float64 throughout): res[0] = sum a^2, res[1] = sum b^2, res[2] = sum (b - a)^2, res[3] = max |b - a|; flags bit 0:
 * a holds a NaN or an Inf, bit 1: b does (their sums are then not finite; float64 squares of float32 values cannot
 * overflow). */
typedef double v8d __attribute__((vector_size(64)));
typedef int64_t v8l __attribute__((vector_size(64)));

struct dacc {
    v8d aa, bb, dd, md;
};

INLINE void diff_step(const char *a, int adt, const char *b, int bdt, struct dacc *t) {
    v8d x = __builtin_convertvector(load(a, adt), v8d), y = __builtin_convertvector(load(b, bdt), v8d);
    v8d d = y - x;
    t->aa += x * x;
    t->bb += y * y;
    t->dd += d * d;
    v8d ad = (v8d)((v8l)d & 0x7fffffffffffffffLL);
    v8l gt = (v8l)(ad > t->md);
    t->md = (v8d)((gt & (v8l)ad) | (~gt & (v8l)t->md));
}

INLINE void diff_body(const char *a, int adt, const char *b, int bdt, int64_t n, double *res, int *flags) {
    struct dacc t;
    memset(&t, 0, sizeof t);
    int as = SIZE[adt], bs = SIZE[bdt];
    int64_t i = 0, full = n - n % LANES;
    for (; i < full; i += LANES) diff_step(a + i * as, adt, b + i * bs, bdt, &t);
    if (i < n) {
        char a8[LANES * 4] = {0}, b8[LANES * 4] = {0};
        memcpy(a8, a + i * as, (n - i) * as);
        memcpy(b8, b + i * bs, (n - i) * bs);
        diff_step(a8, adt, b8, bdt, &t);
    }
    double aa = 0, bb = 0, dd = 0, md = 0;
    for (int k = 0; k < LANES; k++) {
        aa += t.aa[k];
        bb += t.bb[k];
        dd += t.dd[k];
        md = t.md[k] > md ? t.md[k] : md;
    }
    if (!__builtin_isfinite(aa)) *flags |= 1;
    if (!__builtin_isfinite(bb)) *flags |= 2;
    res[0] += aa;
    res[1] += bb;
    res[2] += dd;
    res[3] = md > res[3] ? md : res[3];
}

#define DCASE(A, B)                                                                                                \
    case (A) * 3 + (B):                                                                                            \
        diff_body(a, A, b, B, n, res, flags);                                                                      \
        return;

#if defined(__x86_64__) && defined(__GNUC__)
#define HAVE_AVX2 1
/* A function attribute rather than `#pragma GCC target`, which clang ignores; the always-inline loop bodies are
 * compiled into these functions with their target. */
#ifdef __clang__
#define AVX2_TARGET __attribute__((target("avx2,fma")))
#else
#define AVX2_TARGET __attribute__((target("avx2,fma,tune=haswell")))
#endif
static AVX2_TARGET void run_avx2(char *out, int odt, const char *sft, int sdt, const char *aligned, int adt, int64_t n,
                                  float coeff, int from_sft, int keep, int stats, double *res, int *flags) {
    switch (odt * 9 + sdt * 3 + adt) { CASES_S(0) CASES_S(1) CASES_S(2) }
}
static AVX2_TARGET void diff_avx2(const char *a, int adt, const char *b, int bdt, int64_t n, double *res, int *flags) {
    switch (adt * 3 + bdt) { DCASE(0, 0) DCASE(0, 1) DCASE(0, 2) DCASE(1, 0) DCASE(1, 1) DCASE(1, 2) DCASE(2, 0)
                             DCASE(2, 1) DCASE(2, 2) }
}
#else
#define HAVE_AVX2 0
#endif

/* Other CPUs: one loop for every dtype, correct but not tuned. */
static void run_generic(char *out, int odt, const char *sft, int sdt, const char *aligned, int adt, int64_t n,
                        float coeff, int from_sft, int keep, int stats, double *res, int *flags) {
    body(out, odt, sft, sdt, aligned, adt, n, coeff, from_sft, keep, stats, res, flags);
}

static int have_avx2(void) {
#if HAVE_AVX2
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

/* `expo verify`: how far each stored output element is from the float64 formula, in steps of the output dtype,
 * beyond float32's own error; element for element what kernels.error_steps computes with torch ops (float64):
 *     exact = a + alpha * (a - s)                         (float64, from the stored values)
 *     slack = 2^-23 * (|exact| + 3 |alpha| |a - s|)        (float32's rounding of the kernel's three operations)
 *     r     = exact rounded to the output dtype as torch does (float64 -> float32 -> bfloat16/float16, each RNE)
 *     steps = 0 where out == r (or both NaN), else max(|out - r| - slack, 0) / ulp(r)
 * with ulp(r) = eps * 2^(e - 1) for r = m 2^e (frexp), at least tiny * eps; a NaN step counts as Inf and an Inf
 * one as DBL_MAX (torch.nan_to_num). res[0] = the worst step, res[1] = how many elements are more than 1 off.
 * Scalar double arithmetic: the check runs at disk speed, and it shares no code with the kernel above. */
INLINE double load_double(const char *p, int dt, int64_t i) {
    uint32_t bits;
    if (dt == DT_F32) {
        float f;
        memcpy(&f, p + 4 * i, 4);
        return f;
    }
    uint16_t h;
    memcpy(&h, p + 2 * i, 2);
    if (dt == DT_BF16) {
        bits = (uint32_t)h << 16;
        float f;
        memcpy(&f, &bits, 4);
        return f;
    }
    double sign = (h & 0x8000u) ? -1.0 : 1.0;
    int e = (h >> 10) & 0x1f, m = h & 0x3ff;
    if (e == 0) return sign * __builtin_ldexp((double)m, -24);
    if (e == 31) return m ? __builtin_nan("") : sign * __builtin_inf();
    return sign * __builtin_ldexp((double)(m | 0x400), e - 25);
}

INLINE double round_to(double exact, int dt) {
    float f = (float)exact; /* float64 -> float32, round to nearest even */
    if (dt == DT_F32) return f;
    uint32_t w;
    memcpy(&w, &f, 4);
    if (dt == DT_BF16) {
        if (f != f) return f;
        uint32_t b = (w + 0x7fffu + ((w >> 16) & 1u)) & 0xffff0000u;
        float g;
        memcpy(&g, &b, 4);
        return g;
    }
    if (f != f) return f;
    double a = __builtin_fabs((double)f), sign = f < 0 ? -1.0 : 1.0;
    if (a >= 65520.0) return sign * __builtin_inf(); /* halfway between 65504 and 2^16 and above: Inf */
    int e;
    __builtin_frexp(a, &e);
    int q = e - 11 < -24 ? -24 : e - 11; /* the step of float16 at a: 2^(e-11), subnormals 2^-24 */
    return sign * __builtin_ldexp(__builtin_nearbyint(__builtin_ldexp(a, -q)), q); /* RNE: the default mode */
}

static const double EPS[3] = {0x1p-7, 0x1p-10, 0x1p-23}, TINY_EPS[3] = {0x1p-133, 0x1p-24, 0x1p-149};

INLINE void check_body(const char *out, int odt, const char *sft, int sdt, const char *aligned, int adt, int64_t n,
                       double alpha, double *res) {
    double worst = res[0], bad = res[1], k = 3 * __builtin_fabs(alpha);
    for (int64_t i = 0; i < n; i++) {
        double a = load_double(aligned, adt, i), s = load_double(sft, sdt, i), x = load_double(out, odt, i);
        double d = a - s, exact = a + alpha * d;
        double r = round_to(exact, odt);
        if (x == r || (x != x && r != r)) continue;
        double slack = 0x1p-23 * (__builtin_fabs(exact) + k * __builtin_fabs(d));
        double excess = __builtin_fabs(x - r) - slack;
        if (excess <= 0) continue; /* NaN stays */
        int e;
        __builtin_frexp(r, &e);
        if (!__builtin_isfinite(r)) e = 0; /* glibc's frexp, as torch.frexp gives it */
        double ulp = __builtin_ldexp(EPS[odt], e - 1);
        if (ulp < TINY_EPS[odt]) ulp = TINY_EPS[odt];
        double steps = excess / ulp;
        steps = steps != steps ? __builtin_inf() : (steps == __builtin_inf() ? 0x1.fffffffffffffp+1023 : steps);
        if (steps > worst) worst = steps;
        if (steps > 1) bad += 1;
    }
    res[0] = worst;
    res[1] = bad;
}

#define CCASE(O, S, A)                                                                                             \
    case (O) * 9 + (S) * 3 + (A):                                                                                  \
        check_body(o, O, s, S, a, A, n, alpha, res);                                                               \
        return;
#define CCASES_S(O, S) CCASE(O, S, 0) CCASE(O, S, 1) CCASE(O, S, 2)
#define CCASES_O(O) CCASES_S(O, 0) CCASES_S(O, 1) CCASES_S(O, 2)

static void error_steps(const char *o, int odt, const char *s, int sdt, const char *a, int adt, int64_t n,
                        double alpha, double *res) {
    switch (odt * 9 + sdt * 3 + adt) { CCASES_O(0) CCASES_O(1) CCASES_O(2) }
}

/* --- the Python interface ------------------------------------------------------------------------------------ */

#define ABI 2 /* kernels.ABI: a build whose ABI differs is stale (an editable install not rebuilt after a pull) */

/* A dtype name (safetensors': "BF16", "F16", "F32") -> its code, or -1 with ValueError set. */
static int code_of(const char *name) {
    if (!strcmp(name, "BF16")) return DT_BF16;
    if (!strcmp(name, "F16")) return DT_F16;
    if (!strcmp(name, "F32")) return DT_F32;
    PyErr_Format(PyExc_ValueError, "the compiled kernel takes BF16, F16 and F32 elements, not %s", name);
    return -1;
}

/* Each buffer holds n elements of its dtype, n from the first; ValueError naming the first that does not. */
static int check_lengths(int64_t *n, int count, Py_buffer **bufs, const int *codes, const char **names) {
    if (bufs[0]->len % SIZE[codes[0]]) {
        PyErr_Format(PyExc_ValueError, "%s holds %zd bytes, not a whole number of %d-byte elements", names[0],
                     bufs[0]->len, SIZE[codes[0]]);
        return -1;
    }
    *n = bufs[0]->len / SIZE[codes[0]];
    for (int k = 1; k < count; k++)
        if (bufs[k]->len != *n * SIZE[codes[k]]) {
            PyErr_Format(PyExc_ValueError, "%s holds %zd bytes; %lld elements of its dtype (as in %s) are %lld",
                         names[k], bufs[k]->len, (long long)*n, names[0], (long long)(*n * SIZE[codes[k]]));
            return -1;
        }
    return 0;
}

/* out may be an input itself (in place, same element size), but may not overlap one otherwise. */
static int check_overlap(Py_buffer *out, int ocode, Py_buffer *in, int icode, const char *name) {
    const char *o = out->buf, *i = in->buf;
    if (o + out->len <= i || i + in->len <= o || (o == i && SIZE[ocode] == SIZE[icode])) return 0;
    PyErr_Format(PyExc_ValueError, "out overlaps %s other than exactly (in place needs the same start and element "
                 "size)", name);
    return -1;
}

/* out, sft and aligned with their dtype names: the codes and the common element count n; -1 with ValueError set. */
static int check_triple(Py_buffer *out, const char *od, Py_buffer *sft, const char *sd, Py_buffer *aligned,
                        const char *ad, int codes[3], int64_t *n) {
    static const char *names[3] = {"out", "sft", "aligned"};
    const char *dts[3] = {od, sd, ad};
    Py_buffer *bufs[3] = {out, sft, aligned};
    for (int k = 0; k < 3; k++)
        if ((codes[k] = code_of(dts[k])) < 0) return -1;
    return check_lengths(n, 3, bufs, codes, names);
}

PyDoc_STRVAR(extrapolate_doc,
"extrapolate(out, out_dtype, sft, sft_dtype, aligned, aligned_dtype, coeff, from_sft, keep, stats, generic=False)\n"
"-> (sums, flags)\n\n"
"The formula in the form kernels.form gives, over n elements: out a writable buffer, sft and aligned buffers of the\n"
"same element count (out may be aligned itself). sums: the 7 values named by SUMS (zeros without stats); flags:\n"
"the NaN/Inf bits named by FLAGS (without stats only the out bit). generic: the untuned loop on any CPU.");

static PyObject *py_extrapolate(PyObject *self, PyObject *args) {
    Py_buffer out, sft, aligned;
    const char *od, *sd, *ad;
    float coeff;
    int from_sft, keep, stats, generic = 0;
    if (!PyArg_ParseTuple(args, "w*sy*sy*sfppp|p:extrapolate", &out, &od, &sft, &sd, &aligned, &ad, &coeff,
                          &from_sft, &keep, &stats, &generic))
        return NULL;
    PyObject *result = NULL;
    int codes[3];
    int64_t n;
    if (check_triple(&out, od, &sft, sd, &aligned, ad, codes, &n) ||
        check_overlap(&out, codes[0], &sft, codes[1], "sft") ||
        check_overlap(&out, codes[0], &aligned, codes[2], "aligned"))
        goto done;
    double res[7] = {0};
    int flags = 0;
    Py_BEGIN_ALLOW_THREADS
    if (!generic && have_avx2())
        run_avx2(out.buf, codes[0], sft.buf, codes[1], aligned.buf, codes[2], n, coeff, from_sft, keep, stats, res,
                 &flags);
    else
        run_generic(out.buf, codes[0], sft.buf, codes[1], aligned.buf, codes[2], n, coeff, from_sft, keep, stats,
                    res, &flags);
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(ddddddd)i", res[0], res[1], res[2], res[3], res[4], res[5], res[6], flags);
done:
    PyBuffer_Release(&out);
    PyBuffer_Release(&sft);
    PyBuffer_Release(&aligned);
    return result;
}

PyDoc_STRVAR(diff_stats_doc,
"diff_stats(a, a_dtype, b, b_dtype) -> ((sum a^2, sum b^2, sum (b - a)^2, max |b - a|), flags)\n\n"
"`expo norms`' statistics of b - a, summed in float64; flags bit 0: a holds a NaN or an Inf, bit 1: b does.");

static PyObject *py_diff_stats(PyObject *self, PyObject *args) {
    Py_buffer a, b;
    const char *adt, *bdt;
    if (!PyArg_ParseTuple(args, "y*sy*s:diff_stats", &a, &adt, &b, &bdt)) return NULL;
    PyObject *result = NULL;
    int codes[2] = {code_of(adt), 0};
    if (codes[0] < 0 || (codes[1] = code_of(bdt)) < 0) goto done;
    Py_buffer *bufs[2] = {&a, &b};
    const char *names[2] = {"a", "b"};
    int64_t n;
    if (check_lengths(&n, 2, bufs, codes, names)) goto done;
    double res[4] = {0};
    int flags = 0;
    Py_BEGIN_ALLOW_THREADS
#if HAVE_AVX2
    if (have_avx2())
        diff_avx2(a.buf, codes[0], b.buf, codes[1], n, res, &flags);
    else
#endif
        diff_body(a.buf, codes[0], b.buf, codes[1], n, res, &flags);
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(dddd)i", res[0], res[1], res[2], res[3], flags);
done:
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    return result;
}

PyDoc_STRVAR(error_steps_doc,
"error_steps(out, out_dtype, sft, sft_dtype, aligned, aligned_dtype, alpha) -> (worst steps, elements > 1 off)\n\n"
"`expo verify`'s check of stored output elements against the float64 formula (kernels.error_steps, element for\n"
"element).");

static PyObject *py_error_steps(PyObject *self, PyObject *args) {
    Py_buffer out, sft, aligned;
    const char *od, *sd, *ad;
    double alpha;
    if (!PyArg_ParseTuple(args, "y*sy*sy*sd:error_steps", &out, &od, &sft, &sd, &aligned, &ad, &alpha)) return NULL;
    PyObject *result = NULL;
    int codes[3];
    int64_t n;
    if (check_triple(&out, od, &sft, sd, &aligned, ad, codes, &n)) goto done;
    double res[2] = {0};
    Py_BEGIN_ALLOW_THREADS
    error_steps(out.buf, codes[0], sft.buf, codes[1], aligned.buf, codes[2], n, alpha, res);
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(dL)", res[0], (long long)res[1]);
done:
    PyBuffer_Release(&out);
    PyBuffer_Release(&sft);
    PyBuffer_Release(&aligned);
    return result;
}

static PyObject *py_target(PyObject *self, PyObject *unused) {
    return PyUnicode_FromString(have_avx2() ? "avx2" : "generic");
}

static PyMethodDef methods[] = {
    {"extrapolate", py_extrapolate, METH_VARARGS, extrapolate_doc},
    {"diff_stats", py_diff_stats, METH_VARARGS, diff_stats_doc},
    {"error_steps", py_error_steps, METH_VARARGS, error_steps_doc},
    {"target", py_target, METH_NOARGS, "The loop extrapolate takes on this CPU: \"avx2\" or \"generic\"."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fused", "The fused CPU kernel (see _fused.c).", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fused(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    PyObject *sums = Py_BuildValue("(sssssss)", "sft2", "aligned2", "out2", "delta2", "update2", "max_delta",
                                   "max_update");
    PyObject *flags = Py_BuildValue("(sss)", "sft", "aligned", "out");
    if (PyModule_AddIntConstant(m, "ABI", ABI) || !sums || PyModule_AddObject(m, "SUMS", sums) || !flags ||
        PyModule_AddObject(m, "FLAGS", flags)) {
        Py_XDECREF(sums);
        Py_XDECREF(flags);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

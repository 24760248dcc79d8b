/*
 * kernels/xnor_cpu.c -- the 1-bit run time of BinaryNet on the CPU
 * (Courbariaux et al. 2016, arXiv 1602.02830, section "Run-time").
 *
 *   bnn_pack          sign-and-pack float32 rows into 64-bit words
 *   bnn_pack_planes   pack the 8 bit planes of uint8 rows (first layer)
 *   bnn_xnor_gemm     C = A_b . B_b^T by XNOR and popcount on packed words,
 *                     optionally over bit planes and with the hidden layers'
 *                     threshold-and-pack epilogue ("fire")
 *   bnn_make_layout   B laid out once for a vertical kernel (weights used in
 *                     many products), passed to bnn_xnor_gemm_kernel
 *   bnn_baseline_gemm the unoptimized float32 triple loop, for the paper's
 *                     comparison
 *
 * Packing order (shared with binary_ops.py and the CUDA kernels):
 *   element k of a row lives in word k / 64, bit k % 64 (bit 0 = least
 *   significant).  The bit is 1 for x >= 0 (sign(0) = +1) and 0 for x < 0.
 *   A row of K values takes KW = ceil(K / 64) words; the unused high bits of
 *   the last word are 0 in every operand, so they never differ and never
 *   count: no restriction on K.
 * XNOR dot product: bits that agree contribute +1, bits that differ -1, so
 *   a . b = K - 2 * popcount(a XOR b).
 * Both GEMM operands are packed along K: A is M x KW, B is N x KW (B^T of the
 * mathematical K x N matrix).  The result is int32, exact for any K < 2^31.
 *
 * The file reads in this order:
 *   1. bnn_reference_gemm, the plain loop nest: the definition, and what the
 *      tests compare every variant with;
 *   2. the kernel list, the classes of product and the default table (which
 *      kernel serves which class), and the dispatch: bnn_xnor_gemm takes the
 *      default, bnn_xnor_gemm_kernel the kernel it is given (and B's
 *      layout where the caller made one: bnn_make_layout);
 *   3. the thread pool and the float baseline;
 *   4. the kernels of one object (one instruction set):
 *      4.1 what every variant shares: packing, the bit-plane packing, the
 *          arguments of a product (gemm_args), the popcount helpers, the
 *          edge kernel, the epilogue, the blocking arithmetic;
 *      4.2 - 4.7 the variants, each one block under its own #if, adding
 *          one thing to the one before:
 *        scalar           4 x 4 register tiles of scalar popcounts, cache
 *                         blocking, the epilogue (popcnt, or NEON cnt)
 *        avx2             4 words per vector by a nibble lookup (vpshufb), B
 *                         interleaved; Harley-Seal carry-save adders on long
 *                         rows; bit planes as bytes (vpsadbw)
 *        avx2-vertical    bit-sliced counters: 256 rows of B in the bits of a
 *                         vector, one add per set bit of a row of A, no XOR
 *        avx512           VPOPCNTDQ: 8 words per instruction, 4 x 2 tiles
 *        avx512-vertical  the vertical kernel on 512 lanes, VPTERNLOG carry-
 *                         save adders, VPOPCNTDQ row popcounts (avx2-
 *                         vertical's code, which holds both)
 *        avx512-vnni      avx512, with bit planes put back into pixel bytes
 *                         (GFNI) and multiplied by +-1 bytes (VNNI vpdpbusd)
 *      4.8 the driver (a block's tiles or planes, a task's blocks) and the
 *          object's gemm entry, which dispatches to the variants.
 *
 * Parts and builds.  The file has two parts: the common one (sections 1 - 3)
 * and the kernels of one instruction set (section 4), named by BNN_ISA.
 * kernels/cpu.py compiles the common part once with portable flags and the
 * kernels once per instruction set the compiler knows (scalar, avx2, avx512
 * on x86), and links them into one library; the common part calls an
 * object's functions only where the CPU has every feature it was compiled
 * for (__builtin_cpu_supports), so no instruction the CPU lacks ever runs.
 * A plain build of the file (gcc -shared xnor_cpu.c) holds both parts, the
 * kernels for the flags given.  Measured speeds: docs/cpu_kernels.md.
 */
#include <stdint.h>
#include <stddef.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <stdio.h>
#include <time.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#if !defined(BNN_PART_COMMON) && !defined(BNN_PART_KERNELS)
#define BNN_PART_COMMON 1
#define BNN_PART_KERNELS 1
#endif

#if defined(BNN_PART_KERNELS) && (defined(__AVX2__) || defined(__AVX512F__))
#include <immintrin.h>
#endif

typedef uint64_t word_t;

/* Shared by the two parts; hidden: not exported from the library. */
typedef void (*task_fn)(const void *ctx, long task);
__attribute__((visibility("hidden")))
void run_parallel(task_fn fn, const void *ctx, long n_tasks, int n_threads);
__attribute__((visibility("hidden"))) extern __thread int thread_slot;

/* What a kernel object's gemm runs (its algo argument), and the options of
 * a call (kernels/cpu.py mirrors them). */
enum { ALGO_TILE = 0, ALGO_VERTICAL = 1, ALGO_VNNI = 2 };
enum { OPT_NO_WORK_BUFFERS = 1,     /* the paths taken without copies / scratch */
       OPT_STREAM = 2,              /* every int32 output by non-temporal stores */
       OPT_NO_STREAM = 4 };         /* none (default: outputs past the last-level cache) */
#define VERT_MAX_WORDS 256          /* the vertical kernels' longest rows (L2, see there) */

/* B laid out once for a vertical kernel (bnn_make_layout): weights used in
 * many products (inference, the benchmark's prepacked call) are transposed
 * once instead of on every call, which was 18% of a 100 x 4096 x 4096
 * product on one thread.  A header saying what it was made for, checked on
 * every use, then the body as make_vertical lays it out: the blocks of B
 * transposed, then the popcounts of B's rows. */
#define LAYOUT_MAGIC 0x314e5259414c4e42ULL  /* "BNLAYRN1" */
#define LAYOUT_HEADER_BYTES 64              /* keeps the body 64-byte aligned */
typedef struct {
    uint64_t magic;
    long kernel, n, k;
} layout_header;

/* The bytes of a block of `lanes` rows of B transposed: a vector of
 * lanes / 8 bytes per bit of K, then one zero vector (the steps' padding). */
static inline size_t layout_block_bytes(long lanes, long kw)
{
    return (size_t)(64 * kw + 1) * (size_t)(lanes / 8);
}

static inline size_t layout_body_bytes(long lanes, long n, long kw)
{
    size_t blocks = (size_t)((n + lanes - 1) / lanes);
    return blocks * layout_block_bytes(lanes, kw) + blocks * (size_t)lanes * sizeof(int32_t);
}

/* The CPU features a kernel object was compiled for: a constant (data, so
 * reading it runs none of the object's code). */
enum { NEED_POPCNT = 1 << 0, NEED_AVX = 1 << 1, NEED_AVX2 = 1 << 2, NEED_FMA = 1 << 3,
       NEED_BMI = 1 << 4, NEED_BMI2 = 1 << 5, NEED_LZCNT = 1 << 6, NEED_MOVBE = 1 << 7,
       NEED_F16C = 1 << 8, NEED_AVX512F = 1 << 9, NEED_AVX512BW = 1 << 10,
       NEED_AVX512VL = 1 << 11, NEED_AVX512DQ = 1 << 12, NEED_AVX512CD = 1 << 13,
       NEED_VPOPCNTDQ = 1 << 14, NEED_VNNI = 1 << 15, NEED_VBMI = 1 << 16, NEED_GFNI = 1 << 17 };

typedef void gemm_fn(int algo, int options, const word_t *a, const word_t *b,
                     const uint8_t *layout, long m, long n, long k, long planes,
                     const int32_t *threshold, const uint8_t *row_class, void *out, int n_threads);
typedef void lay_out_fn(const word_t *b, long n, long k, uint8_t *body, int n_threads);
typedef void pack_fn(const float *x, word_t *out, long rows, long k, int n_threads);
typedef void planes_fn(const uint8_t *x, word_t *out, long rows, long k, int n_threads);

/* A kernel object's entry points; weak, so that an object not built (an
 * instruction set the compiler or the machine lacks) reads as NULL. */
#define KERNEL_OBJECT(isa)                                                   \
    extern gemm_fn bnn_##isa##_gemm __attribute__((weak));                   \
    extern lay_out_fn bnn_##isa##_lay_out __attribute__((weak));             \
    extern pack_fn bnn_##isa##_pack __attribute__((weak));                   \
    extern planes_fn bnn_##isa##_pack_planes __attribute__((weak));          \
    extern const unsigned bnn_##isa##_needs __attribute__((weak));           \
    extern const char bnn_##isa##_popcount[] __attribute__((weak));
KERNEL_OBJECT(scalar)
KERNEL_OBJECT(avx2)
KERNEL_OBJECT(avx512)

#if defined(BNN_PART_COMMON)
/* ========================================================================
 * 1. The reference kernel: every output by its definition, a word pair at
 * a time.  Output row i is made of the `planes` rows of A planes i + p
 * (planes = 8: the bit planes of the first layer's 8-bit input, weighted
 * 2^p; planes = 1: the ordinary product), so
 *     P = sum_p 2^p popcount(a_p XOR b_j),   dot = (2^planes - 1) K - 2 P.
 * Without a threshold the dot products are stored (m x n int32); with one,
 * bit j % 64 of word j / 64 of output row i is set where dot >= t[j]
 * (m x ceil(n / 64) words): the next layer's packed input.  t is row
 * row_class[i] of the threshold table (classes x n), or its row 0 where
 * row_class is NULL: a conv layer's border pixels, whose padding taps move
 * their thresholds, are classes of their own.
 * ===================================================================== */
typedef struct {
    const word_t *a, *b;
    long n, k, kw, planes;
    const int32_t *threshold;
    const uint8_t *row_class;
    void *out;
} reference_args;

static void reference_row(const void *ctx, long i)
{
    const reference_args *g = (const reference_args *)ctx;
    int32_t base = (int32_t)(((1L << g->planes) - 1) * g->k);
    const int32_t *t = g->threshold + (g->row_class != NULL ? g->row_class[i] * g->n : 0);
    word_t fired = 0;
    for (long j = 0; j < g->n; j++) {
        long pop = 0;
        for (long p = 0; p < g->planes; p++)
            for (long w = 0; w < g->kw; w++)
                pop += (long)__builtin_popcountll(g->a[(i * g->planes + p) * g->kw + w] ^
                                                  g->b[j * g->kw + w]) << p;
        int32_t dot = base - 2 * (int32_t)pop;
        if (g->threshold == NULL) {
            ((int32_t *)g->out)[i * g->n + j] = dot;
            continue;
        }
        fired |= (word_t)(dot >= t[j]) << (j % 64);
        if (j % 64 == 63 || j == g->n - 1) {    /* a whole word, its bits past n zero */
            ((word_t *)g->out)[i * ((g->n + 63) / 64) + j / 64] = fired;
            fired = 0;
        }
    }
}

static void reference_gemm(int algo, int options, const word_t *a, const word_t *b,
                           const uint8_t *layout, long m, long n, long k, long planes,
                           const int32_t *threshold, const uint8_t *row_class, void *out,
                           int n_threads)
{
    (void)algo;
    (void)options;
    (void)layout;
    reference_args g = {a, b, n, k, (k + 63) / 64, planes, threshold, row_class, out};
    run_parallel(reference_row, &g, m, n_threads);
}

/* ========================================================================
 * 2. The kernels, the classes of product and the default table.
 *
 * A kernel is an object's gemm with an algorithm; it runs where the CPU has
 * every feature its object needs, and serves a product where it can take
 * it (the vertical kernels: rows of at most VERT_MAX_WORDS words).
 * ===================================================================== */
typedef struct {
    const char *name;
    gemm_fn *gemm;              /* NULL: its object is not in this build */
    const unsigned *needs;      /* NULL: nothing (the reference) */
    int algo;
    long lanes;                 /* vertical kernels: rows of B a block */
    lay_out_fn *lay_out;        /* vertical kernels: B's layout made once (bnn_make_layout) */
} kernel_t;

static const kernel_t kernels[] = {
    {"reference", reference_gemm, NULL, ALGO_TILE, 0, NULL},
    {"scalar", bnn_scalar_gemm, &bnn_scalar_needs, ALGO_TILE, 0, NULL},
    {"avx2", bnn_avx2_gemm, &bnn_avx2_needs, ALGO_TILE, 0, NULL},
    {"avx2-vertical", bnn_avx2_gemm, &bnn_avx2_needs, ALGO_VERTICAL, 256, bnn_avx2_lay_out},
    {"avx512", bnn_avx512_gemm, &bnn_avx512_needs, ALGO_TILE, 0, NULL},
    {"avx512-vertical", bnn_avx512_gemm, &bnn_avx512_needs, ALGO_VERTICAL, 512, bnn_avx512_lay_out},
    {"avx512-vnni", bnn_avx512_gemm, &bnn_avx512_needs, ALGO_VNNI, 0, NULL},
};
#define N_KERNELS ((int)(sizeof kernels / sizeof kernels[0]))

/* Classes of product: rows of A (output rows x planes), words of K, rows
 * of B (N), and bit planes or not; kernels/cpu.py measures an order of the
 * kernels for each.  The edges of N: below 32 the AVX2 tile kernel's 8
 * columns and its per-task copy of B do not pay (avx512 ahead where avx2
 * leads at 512 columns); below 192 no vertical kernel pays (a block of B
 * more than 1/4 padding, bnn_kernel_pays); from 512 the order is the one
 * of the measured slice's 512 columns (docs/cpu_kernels.md). */
#define ROW_CLASSES 4
#define WORD_CLASSES 4
#define COL_CLASSES 4
static const long row_edges[ROW_CLASSES - 1] = {16, 64, 256};
static const long word_edges[WORD_CLASSES - 1] = {4, 32, VERT_MAX_WORDS + 1};
static const long col_edges[COL_CLASSES - 1] = {32, 192, 512};

/* The default table: for each class, the kernels in order of preference;
 * the first that runs here and pays (bnn_kernel_pays) serves it.
 * kernels/cpu.py replaces it, class by class, by the order measured on the
 * user's CPU at first use (docs/cpu_kernels.md has the measurements).
 * Vertical kernels from 64 rows of A and 4 words: below, transposing B costs
 * more than the kernel saves.  The table ignores N: N decides whether a
 * vertical kernel pays, which bnn_kernel_pays checks for each product, and
 * the order of the tile kernels, which moves with N (avx512 ahead of avx2
 * at 10 columns, behind it at 13 words from about 32), is the measured
 * choice's; the table is what runs where nothing was measured. */
#define TILES "avx512 avx2 scalar"
#define VERTICAL "avx512-vertical avx2-vertical " TILES
static const char *const default_table[ROW_CLASSES][WORD_CLASSES] = {
    /* K words:           1-3    4-31      32-256    257+ */
    /* rows of A 1-15 */ {TILES, TILES,    TILES,    TILES},
    /*        16-63   */ {TILES, TILES,    TILES,    TILES},
    /*        64-255  */ {TILES, VERTICAL, VERTICAL, TILES},
    /*        256+    */ {TILES, VERTICAL, VERTICAL, TILES},
};

static int bucket(long x, const long *edges, int n_edges)
{
    int c = 0;
    while (c < n_edges && x >= edges[c])
        c++;
    return c;
}

/* The class of a product: 0 .. bnn_class_count() - 1. */
int bnn_product_class(long m, long n, long k, long planes)
{
    int rows = bucket(m * planes, row_edges, ROW_CLASSES - 1);
    int words = bucket((k + 63) / 64, word_edges, WORD_CLASSES - 1);
    int cols = bucket(n, col_edges, COL_CLASSES - 1);
    return (((planes > 1) * ROW_CLASSES + rows) * WORD_CLASSES + words) * COL_CLASSES + cols;
}

int bnn_class_count(void)
{
    return 2 * ROW_CLASSES * WORD_CLASSES * COL_CLASSES;
}

/* Bucket c of edges as "what lo-hi" (or "what lo+" for the last). */
static int range_name(char *out, size_t size, const char *what, int c, const long *edges,
                      int n_edges)
{
    long lo = c == 0 ? 1 : edges[c - 1];
    if (c == n_edges)
        return snprintf(out, size, "%s %ld+", what, lo);
    return snprintf(out, size, "%s %ld-%ld", what, lo, edges[c] - 1);
}

/* A class by its ranges, e.g. "rows 64-255 words 4-31 cols 192-511 planes 1"
 * (planes 8: bit planes): kernels/cpu.py keys its measured orders by it,
 * so that an order measured under other edges is never read for a class. */
void bnn_class_name(int c, char *out, long size)
{
    char rows[32], words[32], cols[32];
    range_name(rows, sizeof rows, "rows", c / (COL_CLASSES * WORD_CLASSES) % ROW_CLASSES, row_edges,
               ROW_CLASSES - 1);
    range_name(words, sizeof words, "words", c / COL_CLASSES % WORD_CLASSES, word_edges,
               WORD_CLASSES - 1);
    range_name(cols, sizeof cols, "cols", c % COL_CLASSES, col_edges, COL_CLASSES - 1);
    snprintf(out, (size_t)size, "%s %s %s planes %d", rows, words, cols,
             c / (COL_CLASSES * WORD_CLASSES * ROW_CLASSES) ? 8 : 1);
}

int bnn_kernel_count(void)
{
    return N_KERNELS;
}

const char *bnn_kernel_name(int kernel)
{
    return kernel >= 0 && kernel < N_KERNELS ? kernels[kernel].name : "";
}

static int kernel_index(const char *name, size_t length)
{
    for (int i = 0; i < N_KERNELS; i++)
        if (strlen(kernels[i].name) == length && strncmp(kernels[i].name, name, length) == 0)
            return i;
    return -1;
}

/* Whether the CPU has every feature in `needs` (x86; elsewhere an object
 * is compiled for the machine that builds it, see kernels/cpu.py). */
static int cpu_has(unsigned needs)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
#define HAS(flag, name) if ((needs & (flag)) && !__builtin_cpu_supports(name)) return 0;
    HAS(NEED_POPCNT, "popcnt") HAS(NEED_AVX, "avx") HAS(NEED_AVX2, "avx2") HAS(NEED_FMA, "fma")
    HAS(NEED_BMI, "bmi") HAS(NEED_BMI2, "bmi2") HAS(NEED_LZCNT, "lzcnt") HAS(NEED_MOVBE, "movbe")
    HAS(NEED_F16C, "f16c") HAS(NEED_AVX512F, "avx512f") HAS(NEED_AVX512BW, "avx512bw")
    HAS(NEED_AVX512VL, "avx512vl") HAS(NEED_AVX512DQ, "avx512dq") HAS(NEED_AVX512CD, "avx512cd")
    HAS(NEED_VPOPCNTDQ, "avx512vpopcntdq") HAS(NEED_VNNI, "avx512vnni")
    HAS(NEED_VBMI, "avx512vbmi") HAS(NEED_GFNI, "gfni")
#undef HAS
    return 1;
#else
    (void)needs;
    return 1;
#endif
}

/* Whether a kernel is in this build and the CPU can run it: its object's
 * features, and those its algorithm's functions take by target attributes. */
int bnn_kernel_runs(int kernel)
{
    if (kernel < 0 || kernel >= N_KERNELS || kernels[kernel].gemm == NULL)
        return 0;
    unsigned algo_needs = kernels[kernel].algo == ALGO_VNNI ? NEED_VNNI | NEED_VBMI | NEED_GFNI : 0;
    return kernels[kernel].needs == NULL || cpu_has(*kernels[kernel].needs | algo_needs);
}

/* Whether it runs and can take the product. */
int bnn_kernel_serves(int kernel, long m, long n, long k, long planes)
{
    (void)m;
    (void)n;
    (void)planes;
    return bnn_kernel_runs(kernel) &&
           (kernels[kernel].algo != ALGO_VERTICAL || (k + 63) / 64 <= VERT_MAX_WORDS);
}

/* Whether it serves the product without wasting much: a vertical kernel's
 * last block of B at most 1/4 padding; the VNNI kernel over bit planes
 * (elsewhere it runs the avx512 kernel's path). */
int bnn_kernel_pays(int kernel, long m, long n, long k, long planes)
{
    long lanes = kernels[kernel >= 0 && kernel < N_KERNELS ? kernel : 0].lanes;
    if (!bnn_kernel_serves(kernel, m, n, k, planes) || (kernels[kernel].algo == ALGO_VNNI && planes == 1))
        return 0;
    return lanes == 0 || 4 * ((n + lanes - 1) / lanes * lanes - n) <= (n + lanes - 1) / lanes * lanes;
}

/* Whether it pays for some N of the class of n (the measured choice times
 * only those kernels). */
int bnn_kernel_may_pay(int kernel, long m, long n, long k, long planes)
{
    int c = bucket(n, col_edges, COL_CLASSES - 1);
    long lanes = kernels[kernel >= 0 && kernel < N_KERNELS ? kernel : 0].lanes;
    long lo = c == 0 ? 1 : col_edges[c - 1];
    long hi = c == COL_CLASSES - 1 ? lo + lanes + 1 : col_edges[c];   /* last: a whole block */
    for (long x = lo; x < hi; x++)
        if (bnn_kernel_pays(kernel, m, x, k, planes))
            return 1;
    return 0;
}

/* The first kernel of a space-separated list that pays, or -1. */
static int first_paying(const char *list, long m, long n, long k, long planes)
{
    while (*list != '\0') {
        size_t length = strcspn(list, " ");
        int kernel = kernel_index(list, length);
        if (kernel >= 0 && bnn_kernel_pays(kernel, m, n, k, planes))
            return kernel;
        list += length;
        list += strspn(list, " ");
    }
    return -1;
}

/* The default table's kernel for a product (the reference where no
 * object runs). */
int bnn_default_kernel(long m, long n, long k, long planes)
{
    int rows = bucket(m * planes, row_edges, ROW_CLASSES - 1);
    int words = bucket((k + 63) / 64, word_edges, WORD_CLASSES - 1);
    int kernel = first_paying(default_table[rows][words], m, n, k, planes);
    return kernel >= 0 ? kernel : 0;
}

/* The bytes of B's layout for the kernel (bnn_make_layout), N rows of K
 * bits: 0 where the kernel has none (not vertical, not run here, rows
 * longer than it takes). */
long bnn_layout_bytes(int kernel, long n, long k)
{
    if (!bnn_kernel_serves(kernel, 1, n, k, 1) || kernels[kernel].lay_out == NULL || n < 1)
        return 0;
    return LAYOUT_HEADER_BYTES + (long)layout_body_bytes(kernels[kernel].lanes, n, (k + 63) / 64);
}

/* B (n x ceil(k / 64) words) laid out for the kernel into `layout`, of
 * bnn_layout_bytes(kernel, n, k) bytes, 64-byte aligned, owned by the
 * caller, who passes it with this same B to bnn_xnor_gemm_kernel.  Returns
 * 0, or -1 (nothing written) where the kernel has no layout or the buffer
 * is not aligned. */
int bnn_make_layout(int kernel, const word_t *b, long n, long k, void *layout, int n_threads)
{
    if (bnn_layout_bytes(kernel, n, k) == 0 || (uintptr_t)layout % 64 != 0)
        return -1;
    layout_header header = {LAYOUT_MAGIC, kernel, n, k};
    memset(layout, 0, LAYOUT_HEADER_BYTES);
    memcpy(layout, &header, sizeof header);
    kernels[kernel].lay_out(b, n, k, (uint8_t *)layout + LAYOUT_HEADER_BYTES, n_threads);
    return 0;
}

/* Whether a layout was made for this kernel and shape of B. */
static int layout_fits(const void *layout, int kernel, long n, long k)
{
    const layout_header *h = (const layout_header *)layout;
    return (uintptr_t)layout % 64 == 0 && h->magic == LAYOUT_MAGIC && h->kernel == kernel &&
           h->n == n && h->k == k;
}

/*
 * a: (m * planes) x kw words, b: n x kw words, both packed along K;
 * layout: NULL (a vertical kernel transposes B itself), or B's layout made
 * by bnn_make_layout for this kernel from this same B.
 * threshold == NULL: out is m x n int32 dot products;
 * otherwise out is m x ceil(n / 64) words of packed activations, output row
 * i against row row_class[i] of the threshold table (classes x n int32; the
 * caller checks the classes), or against its row 0 where row_class is NULL.
 * planes is 1 or 8 (checked by the caller).  Returns 0, or -1 (nothing
 * done) where the kernel does not serve the product, -2 where the layout
 * was made for another kernel or shape of B.
 */
int bnn_xnor_gemm_kernel(int kernel, int options, const word_t *a, const word_t *b,
                         const void *layout, long m, long n, long k, long planes,
                         const int32_t *threshold, const uint8_t *row_class, void *out,
                         int n_threads)
{
    if (!bnn_kernel_serves(kernel, m, n, k, planes))
        return -1;
    if (layout != NULL && !layout_fits(layout, kernel, n, k))
        return -2;
    if (m > 0 && n > 0)
        kernels[kernel].gemm(kernels[kernel].algo, options, a, b,
                             layout == NULL ? NULL : (const uint8_t *)layout + LAYOUT_HEADER_BYTES,
                             m, n, k, planes, threshold, row_class, out, n_threads);
    return 0;
}

void bnn_xnor_gemm(const word_t *a, const word_t *b, long m, long n, long k, long planes,
                   const int32_t *threshold, const uint8_t *row_class, void *out, int n_threads)
{
    bnn_xnor_gemm_kernel(bnn_default_kernel(m, n, k, planes), 0, a, b, NULL, m, n, k, planes,
                         threshold, row_class, out, n_threads);
}

/* The packing of the best object that runs here (NULL: none, which
 * kernels/cpu.py checks before any call). */
static int best_object(void)
{
    if (bnn_avx512_pack != NULL && cpu_has(bnn_avx512_needs))
        return 2;
    if (bnn_avx2_pack != NULL && cpu_has(bnn_avx2_needs))
        return 1;
    if (bnn_scalar_pack != NULL && cpu_has(bnn_scalar_needs))
        return 0;
    return -1;
}

void bnn_pack(const float *x, word_t *out, long rows, long k, int n_threads)
{
    pack_fn *const pack[3] = {bnn_scalar_pack, bnn_avx2_pack, bnn_avx512_pack};
    pack[best_object()](x, out, rows, k, n_threads);
}

void bnn_pack_planes(const uint8_t *x, word_t *out, long rows, long k, int n_threads)
{
    planes_fn *const pack[3] = {bnn_scalar_pack_planes, bnn_avx2_pack_planes,
                                bnn_avx512_pack_planes};
    pack[best_object()](x, out, rows, k, n_threads);
}

/* The popcount of the best object that runs here, for the benchmark's
 * header; "" where none does. */
const char *bnn_popcount_kind(void)
{
    const char *const kind[3] = {bnn_scalar_popcount, bnn_avx2_popcount, bnn_avx512_popcount};
    int best = best_object();
    return best < 0 ? "" : kind[best];
}

/* ========================================================================
 * 3. Threads: a job is a list of independent tasks; every thread (the caller
 * included) takes the next task from a shared atomic counter until none is
 * left.  Plain pthreads keep this library free of a second OpenMP runtime
 * next to PyTorch's.
 *
 * The threads are a pool, started at first use and kept: creating threads
 * per call costs time, and worse, on a busy machine a new thread may wait
 * milliseconds for a core, which made the median of a short GEMM a
 * multiple of its best time (docs/cpu_kernels.md).  After a job a pool
 * thread spins (pause) for up to SPIN_NS watching for the next one, so
 * back-to-back calls (the layers of a network, a benchmark loop) find it
 * running; then it sleeps on a condition variable.  Jobs are numbered
 * (generation); a pool thread reads the job, its number and whether it
 * takes part under the lock, so one that slept through a job simply joins
 * the current one.  The caller waits for the participants' "finished"
 * count before returning (the job lives on its stack).  Calls from several
 * threads of the process take turns (call_lock); a forked child starts
 * with an empty pool.
 * ------------------------------------------------------------------------ */
#define MAX_THREADS 256
#define SPIN_NS 2000000L        /* 2 ms */

typedef struct {
    task_fn fn;
    const void *ctx;
    long n_tasks;
    long next;
} job_t;

static void worker(job_t *job)
{
    long t;
    while ((t = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED)) < job->n_tasks)
        job->fn(job->ctx, t);
}

static struct {
    pthread_mutex_t lock;
    pthread_cond_t wake;
    long generation;            /* number of the current job */
    job_t *job;
    int participants;           /* pool threads 0 .. participants - 1 take part */
    int finished;               /* participants done with the current job */
    int started;                /* pool threads running */
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, NULL, 0, 0, 0};
static pthread_mutex_t call_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t fork_handler_once = PTHREAD_ONCE_INIT;

static inline void spin_pause(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static long now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

typedef struct {
    int index;
    long generation;            /* the job number at creation: wait for the next */
} pool_thread_args;

/* The calling thread's slot in a job's per-thread scratch: pool thread i
 * has i + 1, any other thread 0 (calls take turns, so one caller at a
 * time). */
__thread int thread_slot;

static void *pool_thread(void *arg)
{
    pool_thread_args args = *(pool_thread_args *)arg;
    long seen = args.generation;
    free(arg);
    thread_slot = args.index + 1;
    for (;;) {
        long start = now_ns();
        for (long i = 1; __atomic_load_n(&pool.generation, __ATOMIC_ACQUIRE) == seen; i++) {
            spin_pause();
            if (i % 256 == 0 && now_ns() - start > SPIN_NS)
                break;
        }
        pthread_mutex_lock(&pool.lock);
        while (pool.generation == seen)
            pthread_cond_wait(&pool.wake, &pool.lock);
        seen = pool.generation;
        job_t *job = pool.job;
        int joins = args.index < pool.participants;
        pthread_mutex_unlock(&pool.lock);
        if (joins) {
            worker(job);
            __atomic_add_fetch(&pool.finished, 1, __ATOMIC_RELEASE);
        }
    }
    return NULL;
}

static void pool_reset_in_child(void)
{
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pthread_mutex_init(&call_lock, NULL);
    pool.started = 0;
}

static void install_fork_handler(void)
{
    pthread_atfork(NULL, NULL, pool_reset_in_child);
}

/* Grow the pool to n threads (fewer if the system refuses). */
static void pool_grow(int n)
{
    pthread_once(&fork_handler_once, install_fork_handler);
    while (pool.started < n) {
        pool_thread_args *args = malloc(sizeof *args);
        pthread_t thread;
        if (args == NULL)
            return;
        args->index = pool.started;
        args->generation = pool.generation;   /* stable: we hold call_lock */
        if (pthread_create(&thread, NULL, pool_thread, args) != 0) {
            free(args);
            return;
        }
        pthread_detach(thread);
        pool.started++;
    }
}

void run_parallel(task_fn fn, const void *ctx, long n_tasks, int n_threads)
{
    job_t job = {fn, ctx, n_tasks, 0};
    if (n_threads > MAX_THREADS) n_threads = MAX_THREADS;
    if (n_threads > n_tasks) n_threads = (int)n_tasks;
    if (n_threads <= 1) {
        worker(&job);
        return;
    }
    pthread_mutex_lock(&call_lock);
    pool_grow(n_threads - 1);
    int helpers = pool.started < n_threads - 1 ? pool.started : n_threads - 1;
    pthread_mutex_lock(&pool.lock);
    pool.job = &job;
    pool.participants = helpers;
    __atomic_store_n(&pool.finished, 0, __ATOMIC_RELAXED);
    __atomic_add_fetch(&pool.generation, 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
    worker(&job);                   /* the caller works too */
    for (long i = 1; __atomic_load_n(&pool.finished, __ATOMIC_ACQUIRE) < helpers; i++) {
        spin_pause();
        if (i % 4096 == 0)          /* a helper without a core: let it run */
            sched_yield();
    }
    pthread_mutex_unlock(&call_lock);
}

/* ------------------------------------------------------------------------
 * Baseline: the textbook float32 GEMM, C = A . B with A m x k and B k x n
 * row-major, one dot product per output through a strided column of B.
 * No tiling, no blocking: the "unoptimized" kernel the paper compares
 * against.  Rows of C are shared among the threads so that it runs on the
 * same cores as the other two kernels.
 * ------------------------------------------------------------------------ */
typedef struct {
    const float *a, *b;
    float *c;
    long m, n, k;
} baseline_args;

static void baseline_task(const void *ctx, long i)
{
    const baseline_args *g = (const baseline_args *)ctx;
    for (long j = 0; j < g->n; j++) {
        float s = 0.0f;
        for (long p = 0; p < g->k; p++)
            s += g->a[i * g->k + p] * g->b[p * g->n + j];
        g->c[i * g->n + j] = s;
    }
}

void bnn_baseline_gemm(const float *a, const float *b, float *c,
                       long m, long n, long k, int n_threads)
{
    baseline_args g = {a, b, c, m, n, k};
    run_parallel(baseline_task, &g, m, n_threads);
}
#endif  /* BNN_PART_COMMON */

#if defined(BNN_PART_KERNELS)
/* ========================================================================
 * 4. The variants of one instruction set: BNN_ISA (kernels/cpu.py sets
 * it; a plain build takes the best its flags allow).  Exported as
 * bnn_<isa>_gemm, bnn_<isa>_pack, bnn_<isa>_pack_planes, with the CPU
 * features the object needs (bnn_<isa>_needs) and its popcount's name.
 * An object compiles the shared part (4.1), the variants its instruction
 * set has (scalar: 4.2; avx2: 4.3, 4.4; avx512: 4.5 - 4.7 and, of 4.3, the
 * word loads and transpose the vertical kernel uses) and the driver (4.8).
 * ===================================================================== */
#if !defined(BNN_ISA)
#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)
#define BNN_ISA avx512
#elif defined(__AVX2__)
#define BNN_ISA avx2
#else
#define BNN_ISA scalar
#endif
#endif
#define GLUE(a, b, c) a##b##c
#define EXPAND_GLUE(a, b, c) GLUE(a, b, c)
#define ISA_FN(name) EXPAND_GLUE(bnn_, BNN_ISA, _##name)

const unsigned ISA_FN(needs) = 0
#if defined(__POPCNT__)
    | NEED_POPCNT
#endif
#if defined(__AVX__)
    | NEED_AVX
#endif
#if defined(__AVX2__)
    | NEED_AVX2
#endif
#if defined(__FMA__)
    | NEED_FMA
#endif
#if defined(__BMI__)
    | NEED_BMI
#endif
#if defined(__BMI2__)
    | NEED_BMI2
#endif
#if defined(__LZCNT__)
    | NEED_LZCNT
#endif
#if defined(__MOVBE__)
    | NEED_MOVBE
#endif
#if defined(__F16C__)
    | NEED_F16C
#endif
#if defined(__AVX512F__)
    | NEED_AVX512F
#endif
#if defined(__AVX512BW__)
    | NEED_AVX512BW
#endif
#if defined(__AVX512VL__)
    | NEED_AVX512VL
#endif
#if defined(__AVX512DQ__)
    | NEED_AVX512DQ
#endif
#if defined(__AVX512CD__)
    | NEED_AVX512CD
#endif
#if defined(__AVX512VPOPCNTDQ__)
    | NEED_VPOPCNTDQ
#endif
    ;

const char ISA_FN(popcount)[] =
#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)
    "AVX-512 VPOPCNTDQ"
#elif defined(__AVX2__)
    "AVX2 nibble lookup (vpshufb), bit-sliced counters for large products"
#elif defined(__POPCNT__)
    "scalar popcnt (x86)"
#elif defined(__ARM_NEON)
    "NEON cnt (via __builtin_popcountll)"
#else
    "portable bit counting (no popcount instruction enabled)"
#endif
    ;

/* ========================================================================
 * 4.1 What every variant shares: packing, the bit-plane packing, the
 * arguments of a product (gemm_args), the popcount helpers, the edge
 * kernel and the epilogue, the blocking arithmetic.
 * ===================================================================== */
/* ------------------------------------------------------------------------
 * Packing.  One task packs a block of rows.  With AVX2 a compare and a
 * movemask turn 8 floats into 8 bits at once; the tail of a row (K % 8)
 * goes through the scalar loop, which is also the whole kernel elsewhere.
 * The comparison x >= 0 (not the sign bit) makes -0.0 pack as +1.
 * ------------------------------------------------------------------------ */
typedef struct {
    const float *x;
    word_t *out;
    long rows, k, kw;
} pack_args;

#define PACK_ROWS_PER_TASK 64

static word_t pack_word(const float *x, long n)   /* n <= 64 values */
{
    word_t w = 0;
    long j = 0;
#if defined(__AVX2__)
    const __m256 zero = _mm256_setzero_ps();
    for (; j + 8 <= n; j += 8) {
        __m256 ge = _mm256_cmp_ps(_mm256_loadu_ps(x + j), zero, _CMP_GE_OQ);
        w |= (word_t)(unsigned)_mm256_movemask_ps(ge) << j;
    }
#endif
    for (; j < n; j++)
        w |= (word_t)(x[j] >= 0.0f) << j;
    return w;
}

static void pack_task(const void *ctx, long task)
{
    const pack_args *p = (const pack_args *)ctx;
    long r_end = (task + 1) * PACK_ROWS_PER_TASK;
    if (r_end > p->rows) r_end = p->rows;
    for (long r = task * PACK_ROWS_PER_TASK; r < r_end; r++) {
        const float *row = p->x + r * p->k;
        word_t *out = p->out + r * p->kw;
        for (long w = 0; w < p->kw; w++) {
            long n = p->k - 64 * w;
            out[w] = pack_word(row + 64 * w, n < 64 ? n : 64);
        }
    }
}

/* x: rows x k float32, row-major; out: rows x ceil(k / 64) words. */
void ISA_FN(pack)(const float *x, word_t *out, long rows, long k, int n_threads)
{
    pack_args p = {x, out, rows, k, (k + 63) / 64};
    long n_tasks = (rows + PACK_ROWS_PER_TASK - 1) / PACK_ROWS_PER_TASK;
    run_parallel(pack_task, &p, n_tasks, n_threads);
}

/* ------------------------------------------------------------------------
 * Bit planes of 8-bit input (the paper's first layer): row i of x (k bytes)
 * becomes 8 packed rows, 8 i + n holding bit n of every byte.  With AVX2 a
 * left shift by 7 - n moves bit n into each byte's top bit, where movemask
 * collects 32 of them at once.
 * ------------------------------------------------------------------------ */
typedef struct {
    const uint8_t *x;
    word_t *out;
    long rows, k, kw;
} planes_args;

static void planes_word(const uint8_t *x, long n, word_t out[8])  /* n <= 64 */
{
    long j = 0;
    for (int p = 0; p < 8; p++)
        out[p] = 0;
#if defined(__AVX2__)
    for (; j + 32 <= n; j += 32) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(x + j));
        for (int p = 0; p < 8; p++) {
            /* a 16-bit lane shift is fine: only each byte's top bit is read */
            __m256i top = _mm256_slli_epi16(v, 7 - p);
            out[p] |= (word_t)(uint32_t)_mm256_movemask_epi8(top) << j;
        }
    }
#endif
    for (; j < n; j++)
        for (int p = 0; p < 8; p++)
            out[p] |= (word_t)((x[j] >> p) & 1) << j;
}

static void planes_task(const void *ctx, long task)
{
    const planes_args *p = (const planes_args *)ctx;
    long r_end = (task + 1) * PACK_ROWS_PER_TASK;
    if (r_end > p->rows) r_end = p->rows;
    for (long r = task * PACK_ROWS_PER_TASK; r < r_end; r++) {
        word_t *out = p->out + 8 * r * p->kw;
        for (long w = 0; w < p->kw; w++) {
            long n = p->k - 64 * w;
            word_t planes[8];
            planes_word(p->x + r * p->k + 64 * w, n < 64 ? n : 64, planes);
            for (int b = 0; b < 8; b++)
                out[b * p->kw + w] = planes[b];
        }
    }
}

/* x: rows x k uint8; out: 8 rows x ceil(k / 64) words per row of x. */
void ISA_FN(pack_planes)(const uint8_t *x, word_t *out, long rows, long k, int n_threads)
{
    planes_args p = {x, out, rows, k, (k + 63) / 64};
    long n_tasks = (rows + PACK_ROWS_PER_TASK - 1) / PACK_ROWS_PER_TASK;
    run_parallel(planes_task, &p, n_tasks, n_threads);
}

/* ------------------------------------------------------------------------
 * XNOR GEMM.
 *
 * Register tiling: the micro-kernel computes an MR x NR block of popcount
 * sums while it walks the K words of MR rows of A and NR rows of B, so each
 * loaded word serves NR (or MR) pairs.  Each variant has its own
 * micro-kernel and MR x NR tile (4.2 - 4.5), compiled by the instruction
 * set of the object; the vertical kernels (4.4, 4.6) count another way.
 *
 * Cache blocking: the output is cut into blocks of MB rows of A by NB rows
 * of B, one task each (the tile kernel's tasks take a run of blocks, see
 * gemm_task; the vertical kernel's take rows of A against all of B, see
 * vert_task), and K into slices of KC words.  The tile kernel re-reads the
 * NB rows of B (at most 62 KiB in nibble form) once per MR rows of A, and
 * the MR rows of A stay in L1 while it sweeps B; the Harley-Seal kernel
 * goes the other way round, one 8-row panel of B (8 KiB) in L1 against all
 * MB rows of A (32 KiB).  KC = 124 keeps a slice within 31 groups of 4
 * words, so the Harley-Seal kernel's byte counters never need widening
 * inside a call.  Tasks are numbered so that consecutive ones share the
 * same B panel.  The sums of successive K slices add up in a per-task
 * MB x NB scratch block (16 KiB) on the stack.
 *
 * Tails: rows of A or B left over at the block edge (M % MR, N % NR) go
 * through a plain dot product one pair at a time; K tails need nothing
 * (zero padding bits, see the top of the file).  The work buffers (the
 * copies of A and B, the byte-sliced planes) are optional: without them
 * (out of memory, or the option OPT_NO_WORK_BUFFERS in the tests) the edge kernel
 * and the one-output plane kernel compute everything.
 *
 * Bit planes (the paper's first layer, s = sum_p 2^p (x^p . w)): with
 * planes = 8, output row i is made of the 8 consecutive rows of A 8 i + p,
 * weighted 2^p.  A plane kernel computes one such output: it streams the 8
 * planes against the row of B, so the weighting is done on the vector sums
 * and one horizontal sum serves all 8 planes; this matters because the
 * first layer's K is short (784 bits = 13 words) and a per-pair reduction
 * would cost as much as the popcounts.  With AVX2 the byte-sliced plane
 * kernel (byte_plane_kernel) does the same count with the 8 planes of a
 * pixel side by side in a byte, fewer ops than 8 separate lookups.
 * planes = 1 is the ordinary GEMM.
 * The block keeps, per output, the weighted popcount P = sum_p 2^p pop_p,
 * and the dot product is (2^planes - 1) K - 2 P.  MB is a multiple of 8, so
 * a block never splits an image's planes.
 *
 * Epilogue, once per block, after the last K slice:
 *   - without a threshold, the int32 dot products are stored (M x N), by a
 *     loop gcc vectorizes (the AVX2 tile kernel stores them itself where
 *     one K slice makes them final and the output is not streamed: see
 *     g->direct; so does the vertical kernel, see vert_task); an output
 *     larger than the last-level cache
 *     cannot stay cached anyway, and with AVX2 it is written with
 *     non-temporal stores, which skip reading each line before writing it;
 *   - with one, each unit j fires (+1, bit set) where dot >= threshold[j]
 *     (of the table's row that the output row's class names), and the bits
 *     are packed straight into M x ceil(N / 64) words: the next layer's
 *     packed input, with no int32 matrix in between (AVX2: 8 tests per
 *     compare and movemask).  NB is a multiple of 64, so every output
 *     word belongs to one task.
 * A large output is first advised onto huge pages (advise_huge_pages).
 * ------------------------------------------------------------------------ */
#define MB 32
#define NB 128
#define KC 124                /* words: at most BYTE_STEPS groups of 4 (Harley-Seal kernel) */
#define PLANES 8

typedef struct {
    const word_t *a, *b;
    const word_t *b4;           /* AVX2, Harley-Seal: B interleaved by 4 rows, or NULL */
    const word_t *a2;           /* AVX2: A in pair form (Harley-Seal) or nibble form, or NULL */
    int harley_seal;            /* rows of HS_MIN_WORDS words or more: set with the copies */
    const uint8_t *pixels;      /* planes == 8, AVX2: A as pixel bytes, or NULL */
    const uint8_t *masks;       /* ... and B as byte masks (kw * 64 bytes a row) */
    const int32_t *vnni_w;      /* planes == 8, VNNI: B as +-1 bytes (vnni_weights), or NULL */
    const int32_t *vnni_bias;   /* ... and 255 popcount of B's rows */
    const int32_t *threshold;   /* NULL: store dot products; else classes x n */
    const uint8_t *row_class;   /* each output row's row of threshold; NULL: row 0 */
    void *out;
    long m, n, k, kw, planes;   /* m counts rows of A */
    long m_blocks;
    long m_run;                 /* blocks of A a task takes (gemm_task) */
    int stream;                 /* int32 output written by non-temporal stores */
    int direct;                 /* AVX2 tile kernel: dot products straight into the output */
    const uint8_t *bt;          /* AVX2, vertical path: B transposed by blocks of 256 rows */
    const int32_t *pop_b;       /* ... the popcounts of B's rows */
    char *scratch;              /* ... a slot of scratch_bytes per thread */
    size_t scratch_bytes, bt_block_bytes;
} gemm_args;

static inline long popcount_word(word_t x)
{
    return __builtin_popcountll(x);
}

#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)
/* A row's popcount, 8 words per VPOPCNTDQ, the tail by a masked load. */
static inline long popcount_row(const word_t *x, long n)
{
    __m512i sum = _mm512_setzero_si512();
    long k = 0;
    for (; k + 8 <= n; k += 8)
        sum = _mm512_add_epi64(sum, _mm512_popcnt_epi64(_mm512_loadu_si512(x + k)));
    if (k < n)
        sum = _mm512_add_epi64(sum, _mm512_popcnt_epi64(
                                        _mm512_maskz_loadu_epi64((__mmask8)((1u << (n - k)) - 1), x + k)));
    return _mm512_reduce_add_epi64(sum);
}
#else
static inline long popcount_row(const word_t *x, long n)
{
    long sum[4] = {0, 0, 0, 0}, k = 0;     /* 4 sums: not one add a clock */
    for (; k + 4 <= n; k += 4)
        for (int i = 0; i < 4; i++)
            sum[i] += popcount_word(x[k + i]);
    for (; k < n; k++)
        sum[0] += popcount_word(x[k]);
    return sum[0] + sum[1] + sum[2] + sum[3];
}
#endif

#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)
/* One dot product on 8 words per instruction; the tail uses a masked load. */
static long popcount_xor(const word_t *a, const word_t *b, long n)
{
    __m512i sum = _mm512_setzero_si512();
    long k = 0;
    for (; k + 8 <= n; k += 8) {
        __m512i x = _mm512_xor_si512(_mm512_loadu_si512(a + k), _mm512_loadu_si512(b + k));
        sum = _mm512_add_epi64(sum, _mm512_popcnt_epi64(x));
    }
    if (k < n) {
        __mmask8 tail = (__mmask8)((1u << (n - k)) - 1);
        __m512i x = _mm512_xor_si512(_mm512_maskz_loadu_epi64(tail, a + k),
                                     _mm512_maskz_loadu_epi64(tail, b + k));
        sum = _mm512_add_epi64(sum, _mm512_popcnt_epi64(x));
    }
    return _mm512_reduce_add_epi64(sum);
}
#else
static long popcount_xor(const word_t *a, const word_t *b, long n)
{
    long sum = 0;
    for (long k = 0; k < n; k++)
        sum += popcount_word(a[k] ^ b[k]);
    return sum;
}
#endif

/* Add (or, for the first K slice, store) a tile's sums into the block. */
static inline void store_tile(int32_t *c, long ldc, int i, int j, long sum, int first)
{
    c[i * ldc + j] = (int32_t)(first ? sum : c[i * ldc + j] + sum);
}

/* The same sums for a tile cut short by the edge of the block. */
static void edge_kernel(const word_t *a, const word_t *b, long ld, long n,
                        int32_t *c, long ldc, long mr, long nr, int first, int32_t base)
{
    for (long i = 0; i < mr; i++)
        for (long j = 0; j < nr; j++) {
            long pop = popcount_xor(a + i * ld, b + j * ld, n);
            if (base != 0)              /* a dot product, into the output (g->direct) */
                c[i * ldc + j] = base - 2 * (int32_t)pop;
            else
                store_tile(c, ldc, (int)i, (int)j, pop, first);
        }
}

/* Dot product from a weighted popcount (see "Bit planes" above): the
 * constant (2^planes - 1) K minus twice the popcount, in int32 like the
 * output (the caller keeps 255 K < 2^31). */
static inline int32_t dot_base(const gemm_args *g)
{
    return (int32_t)(((1L << g->planes) - 1) * g->k);
}

/* 64 (or, at the right edge, n <= 64) threshold tests packed into a word:
 * bit j is set where base - 2 pop[j] >= threshold[j].  With AVX2, 8 tests
 * per compare, collected by movemask (the test is !(threshold > dot), so
 * no threshold value can overflow). */
static word_t fire_word(int32_t base, const int32_t *pop, const int32_t *threshold, long n)
{
    word_t w = 0;
    long j = 0;
#if defined(__AVX2__)
    const __m256i vbase = _mm256_set1_epi32(base);
    for (; j + 8 <= n; j += 8) {
        __m256i p = _mm256_loadu_si256((const __m256i *)(pop + j));
        __m256i dot = _mm256_sub_epi32(vbase, _mm256_add_epi32(p, p));
        __m256i below = _mm256_cmpgt_epi32(_mm256_loadu_si256((const __m256i *)(threshold + j)), dot);
        unsigned bits = ~(unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(below)) & 0xffu;
        w |= (word_t)bits << j;
    }
#endif
    for (; j < n; j++)
        w |= (word_t)(base - 2 * pop[j] >= threshold[j]) << j;
    return w;
}

/* Rows r0 .. r1 - 1 and columns n0 .. n1 - 1 of the output, from the
 * block's weighted popcounts (row-major, NB per row). */
static void epilogue(const gemm_args *g, const int32_t *pop,
                     long r0, long r1, long n0, long n1)
{
    long n_words = (g->n + 63) / 64;
    int32_t base = dot_base(g);
    for (long r = r0; r < r1; r++) {
        const int32_t *p = pop + (r - r0) * NB - n0;
        if (g->threshold == NULL) {
            int32_t *c = (int32_t *)g->out + r * g->n;
            long j = n0;
#if defined(__AVX2__)
            if (g->stream && (uintptr_t)(c + j) % 32 == 0) {
                const __m256i vbase = _mm256_set1_epi32(base);
                for (; j + 8 <= n1; j += 8) {
                    __m256i pj = _mm256_loadu_si256((const __m256i *)(p + j));
                    _mm256_stream_si256((__m256i *)(c + j),
                                        _mm256_sub_epi32(vbase, _mm256_add_epi32(pj, pj)));
                }
            }
#endif
            for (; j < n1; j++)                 /* vectorized by gcc */
                c[j] = base - 2 * p[j];
            continue;
        }
        word_t *c = (word_t *)g->out + r * n_words;
        const int32_t *t = g->threshold + (g->row_class != NULL ? g->row_class[r] * g->n : 0);
        for (long j0 = n0; j0 < n1; j0 += 64)
            c[j0 / 64] = fire_word(base, p + j0, t + j0, n1 - j0 < 64 ? n1 - j0 : 64);
    }
}

#if defined(__AVX2__)          /* the avx2 and avx512 objects */
/* How many blocks of A a task takes against its panel of B, where a run
 * of blocks pays (the tile kernel's panel copy, the bit planes' reuse of
 * pixel rows): enough to leave about 8 tasks a thread, at most `most`.
 * (The vertical kernel asks it for rows of A against one "panel", all of
 * B, at most MB.)
 * Tile kernel: runs of at most RUN_BLOCKS, whose rows of A (at most
 * 248 KiB in nibble form) stay in L2 while the panel is in L1. */
#define RUN_BLOCKS 16
/* Bit planes: runs of 4 blocks, 16 images, whose pixel rows (13 KiB at
 * K = 784) stay in L1 while each pair of mask rows, read from L2, serves
 * all of them.  The run's images share the task's MB x NB scratch block,
 * one row each. */
#define PLANE_RUN_BLOCKS 4
_Static_assert(PLANE_RUN_BLOCKS * MB / PLANES <= MB, "a run's images fit the scratch block");
static long blocks_per_task(long m_blocks, long panels, int n_threads, long most)
{
    long tasks = 8L * (n_threads > 1 ? n_threads : 1);
    long run = (m_blocks * panels + tasks - 1) / tasks;
    run = run < m_blocks ? run : m_blocks;
    return run < 1 ? 1 : run < most ? run : most;
}
#endif

/* ========================================================================
 * 4.2 scalar: the first variant, which the others build on: 4 x 4
 * register tiles of scalar popcounts (__builtin_popcountll: popcnt on
 * x86, NEON cnt on AArch64), three integer ops per word pair (xor,
 * popcnt, add), cache blocking and the epilogue (4.1); the plane kernel
 * one plane after the other.  The object with neither AVX2 nor AVX-512
 * VPOPCNTDQ (kernels/cpu.py's scalar object, or a portable build).
 * ===================================================================== */
#if !(defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)) && !defined(__AVX2__)
#define MR 4
#define NR 4

/* MR x NR popcount sums over n words: the register-tiled micro-kernel.
 * Kept out of line so that its registers are not shared with the loops of
 * the caller. */
__attribute__((noinline))
static void micro_kernel(const word_t *a, const word_t *b, long ld, long n,
                         int32_t *c, long ldc, int first)
{
    long sum[MR][NR] = {{0}};
    for (long k = 0; k < n; k++) {
        word_t ak[MR];
        for (int i = 0; i < MR; i++)
            ak[i] = a[i * ld + k];
        for (int j = 0; j < NR; j++) {
            word_t bk = b[j * ld + k];
            for (int i = 0; i < MR; i++)
                sum[i][j] += popcount_word(ak[i] ^ bk);
        }
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++)
            store_tile(c, ldc, i, j, sum[i][j], first);
}

/* sum_p 2^p popcount(a_p XOR b) over n words, a_p = a + p * ld, p < 8:
 * the plane kernel. */
__attribute__((noinline))
static long plane_kernel(const word_t *a, const word_t *b, long ld, long n)
{
    long sum = 0;
    for (int p = 0; p < PLANES; p++)
        sum += popcount_xor(a + p * ld, b, n) << p;
    return sum;
}

#endif

/* ========================================================================
 * 4.3 avx2, over scalar: 4 words per vector by a nibble lookup (vpshufb)
 * on 4 x 8 tiles, B interleaved; Harley-Seal carry-save adders on long
 * rows; bit planes as bytes (vpsadbw).
 *
 * The tile kernel popcounts 4 words at a time by a 16-entry nibble table
 * (vpshufb on the low and the high 4 bits of each byte), byte counts
 * summed for up to 31 steps (31 * 8 < 256) before vpsadbw widens them.
 * The vector pipes do 4 word pairs in ~8 ops where popcnt needs 12, and
 * in 6 over copies of A and B split into their low and high nibbles
 * ("nibble form", at the tile kernel).
 * The 4 words of a vector are not 4 consecutive words of one row but
 * word k of 4 rows of B (B interleaved in its copy), against word k of a
 * row of A broadcast: every lane is its own pair, so there is no
 * horizontal sum per pair and no partial vector at the end of a row
 * (K = 784 bits is 13 steps).
 * From HS_MIN_WORDS words on, a Harley-Seal variant counts 4 steps with 3
 * carry-save adders and 1 lookup (micro_kernel_hs), on a 1 x 8 tile that
 * keeps all its counters in registers, over copies of A and B in "pair
 * form" that save one op in seven.
 * What was tried and dropped: docs/cpu_kernels.md.
 * ===================================================================== */
/* Word loads and the 4 x 4 word transpose: also the vertical kernels'
 * (4.4), in the avx512 object too. */
#if defined(__AVX2__)
static inline __m256i load_4_words(const word_t *p)
{
    return _mm256_loadu_si256((const __m256i *)p);
}

/* The 4 x 4 matrix of 64-bit words in r[0 .. 3] transposed (word j of r[i]
 * to word i of out[j]), by unpacks and 128-bit lane permutes. */
static inline void transpose_4x4_words(const __m256i r[4], __m256i out[4])
{
    __m256i even01 = _mm256_unpacklo_epi64(r[0], r[1]), odd01 = _mm256_unpackhi_epi64(r[0], r[1]);
    __m256i even23 = _mm256_unpacklo_epi64(r[2], r[3]), odd23 = _mm256_unpackhi_epi64(r[2], r[3]);
    out[0] = _mm256_permute2x128_si256(even01, even23, 0x20);
    out[1] = _mm256_permute2x128_si256(odd01, odd23, 0x20);
    out[2] = _mm256_permute2x128_si256(even01, even23, 0x31);
    out[3] = _mm256_permute2x128_si256(odd01, odd23, 0x31);
}

#endif

#if defined(__AVX2__) && !(defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__))
#define MR 4
#define NR 8
#define INTERLEAVED_B 1         /* the AVX2 tile kernel reads B interleaved */

/* Bits set in each value 0 .. 15, in both 128-bit halves (vpshufb looks
 * up within each half). */
static inline __m256i nibble_popcounts(void)
{
    return _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                            0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
}

/* Bits set in each byte of x, added to the byte counters. */
static inline __m256i add_byte_popcounts(__m256i counts, __m256i x)
{
    const __m256i table = nibble_popcounts();
    const __m256i nibble = _mm256_set1_epi8(0x0f);
    __m256i low = _mm256_and_si256(x, nibble);
    __m256i high = _mm256_and_si256(_mm256_srli_epi16(x, 4), nibble);
    counts = _mm256_add_epi8(counts, _mm256_shuffle_epi8(table, low));
    return _mm256_add_epi8(counts, _mm256_shuffle_epi8(table, high));
}

static inline long horizontal_sum(__m256i v)
{
    __m128i s = _mm_add_epi64(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    return _mm_cvtsi128_si64(s) + _mm_extract_epi64(s, 1);
}

#define BYTE_STEPS 31   /* each step adds at most 8 to a byte counter */

/* Store (first K slice) or add one row of a tile whose lanes are pairs
 * (see below): the low 32 bits of the 4 lanes of s0 (columns 0 - 3) and of
 * s1 (columns 4 - 7), as one 256-bit row. */
static inline void store_row(__m256i s0, __m256i s1, int32_t *c, int first, int32_t base)
{
    const __m256i low_dwords = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    __m256i row = _mm256_permute2x128_si256(_mm256_permutevar8x32_epi32(s0, low_dwords),
                                            _mm256_permutevar8x32_epi32(s1, low_dwords), 0x20);
    if (base != 0)              /* dot products, into the output (g->direct) */
        row = _mm256_sub_epi32(_mm256_set1_epi32(base), _mm256_add_epi32(row, row));
    else if (!first)
        row = _mm256_add_epi32(row, _mm256_loadu_si256((const __m256i *)c));
    _mm256_storeu_si256((__m256i *)c, row);
}

/* ---- The AVX2 tile kernel, on A and B in nibble form, B interleaved by
 * 4 rows.
 *
 * Nibble form: a word w is kept as two, its low nibbles w & 0x0f0f...
 * and its high nibbles (w >> 4) & 0x0f0f..., each nibble in the low half
 * of its byte: the index vpshufb looks up.  Since (a ^ b) & m =
 * (a & m) ^ (b & m), and so for the shifted words, the two lookup indices
 * of a pair are one xor each, and the and, shift and and of the lookup are
 * paid once per word, in the copy, instead of once per pair: 6 ops per
 * vector of 4 pairs (2 xors, 2 vpshufb, 2 adds) instead of 8.
 * A is first copied in that form (make_copies, once per call, in
 * parallel), a row as KW pairs of words (low, high), and each task copies
 * its panel of NB rows of B (copy_panel_nibbles), in groups of 4 rows,
 * word by word: group g holds, for k = 0 .. KW - 1, the low nibbles of
 * b[4g][k] .. b[4g+3][k] as one 256-bit vector and their high nibbles as
 * the next (rows past N are zero; their results are never used).
 * A step of the kernel takes one word k: for each of 4 rows of A it
 * broadcasts the two halves of a[i][k] to the 4 lanes and adds the byte
 * counts of their xor with two groups (8 rows of B) into one counter per
 * (row of A, group): 8 counters, 32 word pairs per step.  Each 64-bit
 * lane of a counter belongs to one (row of A, row of B) pair, so vpsadbw
 * leaves each pair's sum in its own lane: no horizontal sum and no K tail
 * at all (K = 784 bits is 13 steps, not 4 vectors of which the last is 1/4
 * full).  The 4 x 8 tile is stored as four 256-bit rows.  It gets rows of
 * fewer than HS_MIN_WORDS words, at most BYTE_STEPS steps (longer rows go
 * to the Harley-Seal kernel, below), so its byte counters are widened
 * once, at the end, straight into the tile.
 * Registers: 8 counters, the table and 4 temporaries fit in AVX2's 16, but
 * gcc 12 moved the next row's loads ahead and kept 3 counters on the
 * stack; the empty asm that claims to change a row's two counters after
 * their update pins them in registers (no stack traffic in the loop).
 * Each task copies its own panel of B, which it then keeps in L1 for a run
 * of blocks of A (blocks_per_task).  At K = 784 (13 steps a call) the work
 * a call does outside its step loop counts, so nothing is carried across
 * calls.  (Cycle counts and ratios: docs/cpu_kernels.md.) */
__attribute__((noinline))
static void micro_kernel(const word_t *a, long lda, const word_t *b8, long group_stride,
                         long n, int32_t *c, long ldc, int first, int32_t base)
{
    const __m256i table = nibble_popcounts(), zero = _mm256_setzero_si256();
    __m256i bytes[MR][2];
    for (int i = 0; i < MR; i++)
        bytes[i][0] = bytes[i][1] = zero;
    for (long k = 0; k < n; k++) {
        for (int i = 0; i < MR; i++) {
            __m256i low = _mm256_set1_epi64x((long long)a[i * lda + 2 * k]);
            __m256i high = _mm256_set1_epi64x((long long)a[i * lda + 2 * k + 1]);
            __m256i count[2];
            for (int h = 0; h < 2; h++) {
                const word_t *b = b8 + h * group_stride + 8 * k;
                count[h] = _mm256_add_epi8(bytes[i][h], _mm256_shuffle_epi8(
                    table, _mm256_xor_si256(low, load_4_words(b))));
                count[h] = _mm256_add_epi8(count[h], _mm256_shuffle_epi8(
                    table, _mm256_xor_si256(high, load_4_words(b + 4))));
            }
            __m256i c0 = count[0], c1 = count[1];
            __asm__("" : "+x"(c0), "+x"(c1));       /* in registers: see above */
            bytes[i][0] = c0;
            bytes[i][1] = c1;
        }
    }
    for (int i = 0; i < MR; i++)
        store_row(_mm256_sad_epu8(bytes[i][0], zero), _mm256_sad_epu8(bytes[i][1], zero),
                  c + i * ldc, first, base);
}

/* ---- The AVX2 Harley-Seal kernel, for rows of HS_MIN_WORDS words or
 * more (all their K slices, the last one however short): one row of A
 * against 8 rows of B (two interleaved groups), fewer ops per word pair
 * than the lookup.
 *
 * The lookup costs 7 ops per vector (and, shift, and, two vpshufb, two
 * adds) after the xor.  A carry-save adder (CSA, 5 ops, no lookup) turns
 * three vectors of weight w into one of weight w and one of weight 2 w
 * without losing a bit, so for each pair-vector (the row of A against a
 * group of B) the vectors v0 .. v3 of 4 consecutive steps are folded into
 * two running vectors "ones" and "twos" and one vector "fours", and only
 * "fours" goes through the lookup:
 *     CSA(ones, v0, v1) -> ones, twos_a     CSA(ones, v2, v3) -> ones, twos_b
 *     CSA(twos, twos_a, twos_b) -> twos, fours;    bytes += lookup(fours)
 * 4 xors + 3 CSAs + 1 lookup = 26 ops per 4 steps instead of 32.  A call
 * gets at most KC = 124 words, 31 groups of 4 steps, so the byte counters
 * of "fours" (at most 8 a group) are widened once, at the end; the total
 * is 4 sum(fours) + 2 pop(twos) + pop(ones) plus the plain lookup of the
 * last n % 4 steps.
 * Why one row of A and not the lookup kernel's 4: each pair-vector carries
 * 3 running vectors (ones, twos, bytes), and AVX2 has 16 registers.  A 4 x 8
 * tile needs 24 of them, so gcc kept them on the stack, a load and a store
 * each per step.  The 1 x 8 tile keeps them in registers.  B is reused
 * across the rows of A instead:
 * tile_block_hs sweeps all rows of the block against one 8-row panel of B
 * (8 KC words, 8 KiB), which stays in L1.
 * The order of the work matters as much: the kernel takes the steps in
 * pairs, each pair for both halves of the tile, so that two broadcast
 * words of A are live at a time.  Broadcasting all 4 steps first and doing
 * one half after the other left gcc too few registers, and it spilled the
 * byte counters to the stack.
 * Pair form: the CSA that takes two new steps needs their sum bit
 * v0 ^ v1 and their carry, and with d = v0 ^ v1 it is
 *     ones' = ones ^ d,    carry = v0 ^ ((ones ^ v0) & d)
 * (where v0 = v1, d = 0 and the carry is v0; elsewhere it is ones): 6 ops
 * with the xor for v0 and the one for d, against 7.  d costs one xor
 * because d = (a0 ^ a1) ^ (b0 ^ b1): A and B are copied once per call in
 * "pair form", every odd word k of a row holding w[k - 1] ^ w[k] (a2 and
 * b4; K slices start at even words, KC being even).  24 ops per 4 steps
 * instead of 26.  The steps left over at the
 * end of a slice (at most 3) undo the pair form of their odd word. */
#define HS_MIN_WORDS 32
_Static_assert(KC % 2 == 0, "K slices start at even words (pair form)");
_Static_assert(HS_MIN_WORDS - 1 <= BYTE_STEPS, "the lookup kernel widens its byte counters once");

static inline void csa(__m256i *high, __m256i *low, __m256i a, __m256i b, __m256i c)
{
    __m256i u = _mm256_xor_si256(a, b);
    *high = _mm256_or_si256(_mm256_and_si256(a, b), _mm256_and_si256(u, c));
    *low = _mm256_xor_si256(u, c);
}

/* CSA(a, v0, v1) given v0 and d = v0 ^ v1 (pair form, above). */
static inline void csa_pair(__m256i *high, __m256i *low, __m256i a, __m256i v0, __m256i d)
{
    *low = _mm256_xor_si256(a, d);
    *high = _mm256_xor_si256(v0, _mm256_and_si256(_mm256_xor_si256(a, v0), d));
}

__attribute__((noinline))
static void micro_kernel_hs(const word_t *a, const word_t *b4, long group_stride,
                            long n, int32_t *c, int first)
{
    const __m256i zero = _mm256_setzero_si256();
    __m256i ones[2] = {zero, zero}, twos[2] = {zero, zero}, bytes[2] = {zero, zero};
    long k = 0;
    for (; k + 4 <= n; k += 4) {
        __m256i twos_ab[2][2];      /* [half][a or b] */
        for (int t = 0; t < 2; t++) {
            __m256i a0 = _mm256_set1_epi64x((long long)a[k + 2 * t]);
            __m256i a01 = _mm256_set1_epi64x((long long)a[k + 2 * t + 1]);    /* a0 ^ a1 */
            for (int h = 0; h < 2; h++) {
                const word_t *bp = b4 + h * group_stride + 4 * (k + 2 * t);
                csa_pair(&twos_ab[h][t], &ones[h], ones[h], _mm256_xor_si256(a0, load_4_words(bp)),
                         _mm256_xor_si256(a01, load_4_words(bp + 4)));
            }
        }
        for (int h = 0; h < 2; h++) {
            __m256i fours;
            csa(&fours, &twos[h], twos[h], twos_ab[h][0], twos_ab[h][1]);
            bytes[h] = add_byte_popcounts(bytes[h], fours);
        }
    }
    __m256i sum[2];
    for (int h = 0; h < 2; h++) {
        /* 4 pop(fours) + 2 pop(twos) + pop(ones) + the last 0 - 3 steps; the
         * byte counts of the last three stay under 8 + 8 + 24 */
        const word_t *bh = b4 + h * group_stride;
        __m256i rest = add_byte_popcounts(zero, ones[h]);
        for (long kk = k; kk < n; kk++) {
            word_t ak = a[kk];
            __m256i bk = load_4_words(bh + 4 * kk);
            if (kk % 2 == 1) {              /* an odd word: undo the pair form */
                ak ^= a[kk - 1];
                bk = _mm256_xor_si256(bk, load_4_words(bh + 4 * (kk - 1)));
            }
            rest = add_byte_popcounts(rest, _mm256_xor_si256(_mm256_set1_epi64x((long long)ak), bk));
        }
        __m256i twos_count = _mm256_sad_epu8(add_byte_popcounts(zero, twos[h]), zero);
        sum[h] = _mm256_add_epi64(_mm256_slli_epi64(_mm256_sad_epu8(bytes[h], zero), 2),
                                  _mm256_add_epi64(_mm256_slli_epi64(twos_count, 1),
                                                   _mm256_sad_epu8(rest, zero)));
    }
    store_row(sum[0], sum[1], c, first, 0);
}

/* The AVX2 kernels' copies of the operands (layouts at the two kernels),
 * made once per call in parallel: for rows of HS_MIN_WORDS words or more,
 * A (m x kw words) row by row and B (n x kw words) interleaved by groups
 * of 4 rows, both in pair form, for the Harley-Seal kernel; for shorter
 * rows A in nibble form, for the tile kernel, whose tasks copy their own
 * panels of B (copy_panel_nibbles). */
typedef struct {
    const word_t *a, *b;
    word_t *a2, *b4;            /* b4: NULL for the tile kernel */
    long m, n, kw, b_tasks;
    int harley_seal;            /* pair form, else nibble form */
} copies_args;

#define GROUPS_PER_TASK 16      /* of B's groups of 4 rows */
#define A_ROWS_PER_TASK 64

/* Row src (kw words) to out[0], out[stride], ... in pair form (odd k: the
 * word XOR the one before).  The caller's sizes are passed in, not read
 * through its struct, so that gcc keeps them in registers across the
 * stores. */
static void copy_row_pairs(word_t *out, long stride, const word_t *src, long kw)
{
    long k = 0;
    for (; k + 2 <= kw; k += 2) {
        out[k * stride] = src[k];
        out[(k + 1) * stride] = src[k + 1] ^ src[k];
    }
    if (k < kw)
        out[k * stride] = src[k];
}

/* Row src (kw words) in nibble form: the low nibbles of word k to
 * out[k * stride], its high nibbles to out[k * stride + high]. */
static void copy_row_nibbles(word_t *out, long stride, long high, const word_t *src, long kw)
{
    const word_t low_nibbles = 0x0f0f0f0f0f0f0f0fULL;
    for (long k = 0; k < kw; k++) {
        out[k * stride] = src[k] & low_nibbles;
        out[k * stride + high] = (src[k] >> 4) & low_nibbles;
    }
}

/* A whole group of B (its 4 rows, kw words each, one after the other in
 * rows) in nibble form: 4 words of each row at a time, the 4 x 4 block of
 * words transposed (transpose_4x4_words) so that vector j holds word
 * k + j of the 4 rows, then split into nibbles; copy_row_nibbles takes the
 * last kw % 4 words. */
static void copy_group_nibbles(word_t *out, const word_t *rows, long kw)
{
    const __m256i low_nibbles = _mm256_set1_epi8(0x0f);
    long k = 0;
    for (; k + 4 <= kw; k += 4) {
        __m256i r[4] = {load_4_words(rows + k), load_4_words(rows + kw + k),
                        load_4_words(rows + 2 * kw + k), load_4_words(rows + 3 * kw + k)};
        __m256i w[4];
        transpose_4x4_words(r, w);
        for (int j = 0; j < 4; j++) {
            __m256i *o = (__m256i *)(out + 8 * (k + j));
            _mm256_storeu_si256(o, _mm256_and_si256(w[j], low_nibbles));
            _mm256_storeu_si256(o + 1, _mm256_and_si256(_mm256_srli_epi16(w[j], 4), low_nibbles));
        }
    }
    for (long r = 0; r < 4; r++)
        copy_row_nibbles(out + 8 * k + r, 8, 4, rows + r * kw + k, kw - k);
}

static void copies_task(const void *ctx, long task)
{
    const copies_args *p = (const copies_args *)ctx;
    long kw = p->kw;
    if (task < p->b_tasks) {
        long n = p->n, groups = (n + 3) / 4, g_end = (task + 1) * GROUPS_PER_TASK;
        for (long g = task * GROUPS_PER_TASK; g < g_end && g < groups; g++) {
            word_t *group = p->b4 + g * 4 * kw;
            if (4 * g + 4 > n)          /* rows past N: zero */
                memset(group, 0, 4 * kw * sizeof(word_t));
            for (long r = 0; r < 4 && 4 * g + r < n; r++)
                copy_row_pairs(group + r, 4, p->b + (4 * g + r) * kw, kw);
        }
        return;
    }
    long r0 = (task - p->b_tasks) * A_ROWS_PER_TASK, m = p->m;
    for (long r = r0; r < r0 + A_ROWS_PER_TASK && r < m; r++) {
        if (p->harley_seal)
            copy_row_pairs(p->a2 + r * kw, 1, p->a + r * kw, kw);
        else
            copy_row_nibbles(p->a2 + r * 2 * kw, 2, 1, p->a + r * kw, kw);
    }
}

/* Fills g->a2 and, for the Harley-Seal kernel, g->b4, in one allocation,
 * which it returns for the caller to free; NULL (and both left NULL) if
 * memory is short. */
static word_t *make_copies(gemm_args *g, int n_threads)
{
    long groups = (g->n + 3) / 4;
    int harley_seal = g->kw >= HS_MIN_WORDS;
    size_t b_words = harley_seal ? (size_t)groups * 4 * g->kw : 0;
    size_t a_words = (size_t)g->m * (harley_seal ? 1 : 2) * g->kw;
    word_t *buffer = aligned_alloc(64, ((b_words + a_words) * sizeof(word_t) + 63) & ~(size_t)63);
    if (buffer == NULL)
        return NULL;
    copies_args p = {g->a, g->b, buffer + b_words, harley_seal ? buffer : NULL, g->m, g->n, g->kw,
                     harley_seal ? (groups + GROUPS_PER_TASK - 1) / GROUPS_PER_TASK : 0,
                     harley_seal};
    run_parallel(copies_task, &p, p.b_tasks + (g->m + A_ROWS_PER_TASK - 1) / A_ROWS_PER_TASK,
                 n_threads);
    g->b4 = p.b4;
    g->a2 = p.a2;
    g->harley_seal = harley_seal;
    return buffer;
}

/* The tile kernel's copy of rows n0 .. n1 - 1 of B (a task's panel, n0 a
 * multiple of 4) in nibble form, interleaved by groups of 4 rows, into the
 * calling thread's buffer, which it returns.  Thread-local, so that each
 * pool thread and each caller has its own, allocated at its first use. */
#define NIBBLE_MAX_WORDS (HS_MIN_WORDS - 1)
static const word_t *copy_panel_nibbles(const gemm_args *g, long n0, long n1)
{
    static __thread word_t panel_buffer[NB * 2 * NIBBLE_MAX_WORDS] __attribute__((aligned(64)));
    long kw = g->kw;
    for (long group = n0 / 4; group < (n1 + 3) / 4; group++) {
        word_t *out = panel_buffer + (group - n0 / 4) * 8 * kw;
        const word_t *rows = g->b + 4 * group * kw;
        if (4 * group + 4 <= g->n) {
            copy_group_nibbles(out, rows, kw);
            continue;
        }
        memset(out, 0, 8 * kw * sizeof(word_t));        /* rows past N: zero */
        for (long r = 0; 4 * group + r < g->n; r++)
            copy_row_nibbles(out + r, 8, 4, rows + r * kw, kw);
    }
    return panel_buffer;
}

/* One K slice of a block by the Harley-Seal kernel: panel by panel of 8
 * rows of B (kept in L1 while every row of the block's A passes), then the
 * last n % 8 columns by the edge kernel. */
static void tile_block_hs(const gemm_args *g, int32_t *pop, long m0, long m1,
                          long n0, long n1, long k0, long kc)
{
    long kw = g->kw, j = n0;
    for (; j + NR <= n1; j += NR)
        for (long i = m0; i < m1; i++)
            micro_kernel_hs(g->a2 + i * kw + k0, g->b4 + (j / 4) * 4 * kw + 4 * k0, 4 * kw, kc,
                            pop + (i - m0) * NB + (j - n0), k0 == 0);
    if (j < n1)
        edge_kernel(g->a + m0 * kw + k0, g->b + j * kw + k0, kw, kc, pop + (j - n0), NB,
                    m1 - m0, n1 - j, k0 == 0, 0);
}

__attribute__((noinline))
static long plane_kernel(const word_t *a, const word_t *b, long ld, long n)
{
    long n4 = n & ~3L, tail = 0;
    __m256i sum = _mm256_setzero_si256();
    for (long k = 0; k < n4;) {
        long stop = k + 4 * BYTE_STEPS < n4 ? k + 4 * BYTE_STEPS : n4;
        __m256i bytes[PLANES];
        for (int p = 0; p < PLANES; p++)
            bytes[p] = _mm256_setzero_si256();
        for (; k < stop; k += 4) {
            __m256i bv = load_4_words(b + k);
            for (int p = 0; p < PLANES; p++)
                bytes[p] = add_byte_popcounts(bytes[p],
                                              _mm256_xor_si256(load_4_words(a + p * ld + k), bv));
        }
        for (int p = 0; p < PLANES; p++) {
            __m256i widened = _mm256_sad_epu8(bytes[p], _mm256_setzero_si256());
            sum = _mm256_add_epi64(sum, _mm256_slli_epi64(widened, p));
        }
    }
    for (int p = 0; p < PLANES; p++)
        tail += popcount_xor(a + p * ld + n4, b + n4, n - n4) << p;
    return horizontal_sum(sum) + tail;
}

/* The byte-sliced plane kernel.  Over bit planes, bit k of the 8 planes
 * x_p = a_p XOR b, weighted 2^p, is the byte  pixel_k XOR (b_k ? 0xff : 0):
 * XOR with 0xff flips all 8 planes of the pixel at once.  So with the
 * image's 8 planes put back together into pixel bytes, and the bits of B
 * spread to byte masks (both once per call: byte_planes_and_masks), the
 * weighted popcount P = sum_p 2^p popcount(a_p XOR b) is a sum of bytes of
 * pixels XOR masks, which vpsadbw adds 32 at a time, against 8 word pairs
 * (2 vector steps of 8 ops) on separate planes.  Same bits, same XOR, same
 * count: only the order in which the bits are added changes.  The XOR
 * itself is folded into vpsadbw, which sums |pixel - mask| bytes: that is
 * the pixel where the mask is 0 and 255 - pixel = pixel XOR 0xff where it
 * is 0xff, so a vpsadbw and an add per 32 pixels and row of B.
 * The kernel takes 4 images x 2 rows of B (8 sums in 64-bit lanes): the
 * pixel rows of the task's images stay in L1 and each mask vector, read
 * from L2, serves 4 images.  Rows of bytes are padded with zeros to the 64
 * bytes of a word, which add 0; the buffers are 64-byte aligned, so no
 * load crosses a cache line.  Registers: gcc 12 kept only one vector of
 * the step in a register and loaded every pixel vector twice (16 loads a
 * step instead of 6, and 8 xors); with the step's 6 vectors loaded first
 * and the empty asms that pin the masks and each pair of sums (as in the
 * tile kernel) the step keeps 6 loads (cycles: docs/cpu_kernels.md). */
__attribute__((noinline))
static void byte_plane_kernel(const uint8_t *const px[4], const uint8_t *m0, const uint8_t *m1,
                              long nbytes, long out[4][2])
{
    __m256i s[4][2];
    for (int i = 0; i < 4; i++)
        s[i][0] = s[i][1] = _mm256_setzero_si256();
    for (long t = 0; t < nbytes; t += 32) {
        __m256i mv0 = _mm256_load_si256((const __m256i *)(m0 + t));
        __m256i mv1 = _mm256_load_si256((const __m256i *)(m1 + t));
        __m256i x[4];
        for (int i = 0; i < 4; i++)
            x[i] = _mm256_load_si256((const __m256i *)(px[i] + t));
        __asm__("" : "+x"(mv0), "+x"(mv1));
        for (int i = 0; i < 4; i++) {
            __m256i s0 = _mm256_add_epi64(s[i][0], _mm256_sad_epu8(x[i], mv0));
            __m256i s1 = _mm256_add_epi64(s[i][1], _mm256_sad_epu8(x[i], mv1));
            __asm__("" : "+x"(s0), "+x"(s1));
            s[i][0] = s0;
            s[i][1] = s1;
        }
    }
    for (int i = 0; i < 4; i++) {
        out[i][0] = horizontal_sum(s[i][0]);
        out[i][1] = horizontal_sum(s[i][1]);
    }
}

#define BYTE_PLANES 1

/* The byte buffers of the byte-sliced plane kernel: image r's pixel bytes
 * (byte 64 k + t = sum_p 2^p bit t of plane word a[8 r + p][k]) and row j
 * of B as masks (0xff where bit t of b[j][k] is set, else 0), kw * 64 bytes
 * a row.  spread[v] has byte t = bit t of v. */
static uint64_t spread[256];
static pthread_once_t spread_once = PTHREAD_ONCE_INIT;

static void init_spread(void)
{
    for (int v = 0; v < 256; v++) {
        uint64_t x = 0;
        for (int t = 0; t < 8; t++)
            x |= (uint64_t)((v >> t) & 1) << (8 * t);
        spread[v] = x;
    }
}

typedef struct {
    const word_t *a, *b;
    uint8_t *pixels, *masks;
    long images, n, kw;
} bytes_args;

#define BYTE_ROWS_PER_TASK 64

static void store_bytes(uint8_t *out, uint64_t x)
{
    for (int t = 0; t < 8; t++)
        out[t] = (uint8_t)(x >> (8 * t));
}

static void bytes_task(const void *ctx, long task)
{
    const bytes_args *p = (const bytes_args *)ctx;
    long row0 = task * BYTE_ROWS_PER_TASK, rows = p->images + p->n;
    for (long r = row0; r < row0 + BYTE_ROWS_PER_TASK && r < rows; r++) {
        for (long k = 0; k < p->kw; k++)
            for (int q = 0; q < 8; q++) {
                uint64_t x = 0;
                if (r < p->images) {          /* an image: 8 planes into bytes */
                    for (int pl = 0; pl < PLANES; pl++)
                        x |= spread[(p->a[(PLANES * r + pl) * p->kw + k] >> (8 * q)) & 0xff] << pl;
                    store_bytes(p->pixels + r * p->kw * 64 + 64 * k + 8 * q, x);
                } else {                      /* a row of B: bits into 0 / 0xff */
                    long j = r - p->images;
                    x = spread[(p->b[j * p->kw + k] >> (8 * q)) & 0xff] * 0xff;
                    store_bytes(p->masks + j * p->kw * 64 + 64 * k + 8 * q, x);
                }
            }
    }
}

/* Both buffers, or neither (out of memory: the plane kernel runs instead). */
static int byte_planes_and_masks(const word_t *a, const word_t *b, long images, long n, long kw,
                                 uint8_t **pixels, uint8_t **masks, int n_threads)
{
    pthread_once(&spread_once, init_spread);
    *pixels = aligned_alloc(64, (size_t)images * kw * 64);   /* multiples of 64 bytes */
    *masks = aligned_alloc(64, (size_t)n * kw * 64);
    if (*pixels == NULL || *masks == NULL) {
        free(*pixels);
        free(*masks);
        *pixels = *masks = NULL;
        return 0;
    }
    bytes_args p = {a, b, *pixels, *masks, images, n, kw};
    run_parallel(bytes_task, &p, (images + n + BYTE_ROWS_PER_TASK - 1) / BYTE_ROWS_PER_TASK, n_threads);
    return 1;
}
#endif

/* ========================================================================
 * 4.4 avx2-vertical, over avx2: bit-sliced counters, 256 rows of B in the
 * bits of a vector, one add per set bit of a row of A, no XOR.  A kernel
 * of its own (ALGO_VERTICAL) in the avx2 object; avx512-vertical (4.6) is
 * this same code compiled in the avx512 object, with vvec = __m512i, so
 * the one copy is here.
 * ===================================================================== */
#if defined(__AVX2__)
#define VERTICAL_KERNEL 1       /* 256 lanes with AVX2, 512 with AVX-512 */
/* ---- The vertical (bit-sliced) kernel, for rows of at most
 * VERT_MAX_WORDS words: 256 outputs at once, one per bit of a vector, and
 * no XOR.
 *
 * pop(a ^ b) = pop(a) + pop(b) - 2 pop(a & b), and pop(a & b_j) is the
 * number of set bits k of a where bit k of b_j is set.  So for one row a of
 * A and a block of 256 rows b_j of B, keep 256 one-bit-wide counters side
 * by side in a vector and, for each set bit k of a (a "step"), add the
 * vector of bit k of the 256 rows: B transposed by blocks of 256 rows
 * (make_vertical), vector k of a block holding bit k of its row j at bit j.
 * Where a has more set bits than clear ones below K, its clear bits are the
 * steps instead and pop(a & b) = pop(b) - pop(~a & b): at most K / 2 steps,
 * each counting 256 bit pairs.
 * The counters are bit-sliced (vector p holds bit p of every count) and the
 * steps go in by carry-save adders, Harley-Seal again but down the steps
 * instead of along a word: VERT_GROUP steps (16 with AVX2's 16 registers,
 * 32 with AVX-512's 32) fold into the running ones, twos, fours, eights
 * (and sixteens) by CSAs, and the carry of the next weight ripples into the
 * higher vectors (planes) 2 ops a plane.  About 91 ops per 16 steps of 256
 * pairs with AVX2: 0.7 ops per 64 bit pairs at K / 2 steps, against the
 * Harley-Seal kernel's 1.5 per word pair, and no XOR or lookup at all.
 * A row's steps are a list of byte offsets of vectors in a block
 * (row_steps), made once per row in a task and used against every block of
 * B, padded to a multiple of VERT_GROUP with the offset of the block's zero vector.
 * B transposed is made on every call (make_vertical), or once for weights
 * used in many products (bnn_make_layout, lay_out_b: the same blocks in a
 * buffer of the caller's, which the call then reads instead).
 * Last, the planes are turned into 256 integers (count_bytes: a byte of
 * every count from 8 planes by unpacks and 8 x 8 bit transposes) and
 * combined into the results (vert_results).
 * Tails: rows of B past N are zero lanes, whose outputs are not stored; K
 * needs nothing (no step past K, and B's padding bits are 0).  Bit planes:
 * see vert_task.  Tried and dropped: docs/cpu_kernels.md. */
#define VERT_PLANES 24              /* counts <= 255 * 64 VERT_MAX_WORDS / 2 < 2^22, with room
                                       for the 4 running planes above the last bit plane */
/* The vector of counters: 256 lanes (avx2-vertical) or, with AVX-512,
 * 512 (avx512-vertical), whose carry-save adders are one VPTERNLOG each
 * for the sum (a ^ b ^ c, table 0x96) and the carry (the majority, 0xe8)
 * instead of 5 ops.  A block of B transposed holds VEC_BYTES bytes per bit
 * k; with 512 lanes, two blocks of 256 rows side by side, so the transpose,
 * the count and the results work on 256-lane halves. */
#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)
typedef __m512i vvec;
#define VERT_LANES 512
#define VERT_GROUP 32               /* steps folded before a ripple (32 registers) */
#define RUNNING_PLANES 5            /* ones .. sixteens */
#define vzero() _mm512_setzero_si512()
#define vload(p) _mm512_load_si512((const void *)(p))
#define vand _mm512_and_si512
#define vxor _mm512_xor_si512
static inline __attribute__((always_inline))
void vcsa(vvec *high, vvec *low, vvec a, vvec b, vvec c)
{
    *high = _mm512_ternarylogic_epi64(a, b, c, 0xe8);
    *low = _mm512_ternarylogic_epi64(a, b, c, 0x96);
}
#else
typedef __m256i vvec;
#define VERT_LANES 256
#define VERT_GROUP 16
#define RUNNING_PLANES 4            /* ones .. eights */
#define vzero() _mm256_setzero_si256()
#define vload(p) _mm256_load_si256((const __m256i *)(p))
#define vand _mm256_and_si256
#define vxor _mm256_xor_si256
#define vcsa csa
#endif
#define VEC_BYTES (VERT_LANES / 8)
#define STEPS_STRIDE(kw) (32 * (kw) + VERT_GROUP + 8)   /* a row's steps, padded, + 8 */
#define HALVES (VERT_LANES / 256)
#define PANELS (VERT_LANES / NB)    /* of the epilogue, a block of B */
_Static_assert(VERT_LANES % NB == 0 && 256 % NB == 0, "a block of B is whole panels of the epilogue");

/* 8 steps (byte offsets into the block bt) folded into the running ones,
 * twos and fours by 7 CSAs; returns their carry, of weight 8. */
static inline __attribute__((always_inline))
vvec fold_8_steps(const uint8_t *bt, const uint32_t *steps, vvec *ones, vvec *twos, vvec *fours)
{
#define STEP(i) vload(bt + steps[i])
    vvec ta, tb, fa, fb, eights;
    vcsa(&ta, ones, *ones, STEP(0), STEP(1));
    vcsa(&tb, ones, *ones, STEP(2), STEP(3));
    vcsa(&fa, twos, *twos, ta, tb);
    vcsa(&ta, ones, *ones, STEP(4), STEP(5));
    vcsa(&tb, ones, *ones, STEP(6), STEP(7));
    vcsa(&fb, twos, *twos, ta, tb);
    vcsa(&eights, fours, *fours, fa, fb);
#undef STEP
    return eights;
}

/* Add the steps of one row (groups of 16 byte offsets into the block bt)
 * to the 256 counters planes[0 .. top - 1]; top is the bit length of the
 * largest count they can reach, so the ripple stops there. */
__attribute__((noinline))
static void vert_steps(const uint8_t *bt, const uint32_t *steps, long groups,
                       vvec *planes, int top)
{
    vvec ones = planes[0], twos = planes[1], fours = planes[2], eights = planes[3];
#if VERT_GROUP == 32
    vvec sixteens = planes[4];
#endif
    for (long g = 0; g < groups; g++, steps += VERT_GROUP) {
        vvec ea = fold_8_steps(bt, steps, &ones, &twos, &fours);
        vvec eb = fold_8_steps(bt, steps + 8, &ones, &twos, &fours);
        vvec carry16;
        vcsa(&carry16, &eights, eights, ea, eb);
#if VERT_GROUP == 32
        vvec ec = fold_8_steps(bt, steps + 16, &ones, &twos, &fours);
        vvec ed = fold_8_steps(bt, steps + 24, &ones, &twos, &fours);
        vvec carry16b, carry;
        vcsa(&carry16b, &eights, eights, ec, ed);
        vcsa(&carry, &sixteens, sixteens, carry16, carry16b);
#else
        vvec carry = carry16;
#endif
        for (int p = RUNNING_PLANES; p < top; p++) {       /* the ripple */
            vvec next = vand(planes[p], carry);
            planes[p] = vxor(planes[p], carry);
            carry = next;
        }
    }
    planes[0] = ones;
    planes[1] = twos;
    planes[2] = fours;
    planes[3] = eights;
#if VERT_GROUP == 32
    planes[4] = sixteens;
#endif
}

/* The bits of y under mask swapped with the bits of x under mask << s, in
 * each 64-bit lane: one round of a bit-matrix transpose, which swaps the
 * blocks off the diagonal.  With x and y the same vector it swaps within
 * the lane (an 8 x 8 matrix in its bytes); with rows of a 64 x 64 matrix
 * in x and y, between them. */
static inline __attribute__((always_inline))
void swap_bits(__m256i *x, __m256i *y, int s, long long mask)
{
#if defined(__AVX512VL__)       /* (a ^ b) & c in one VPTERNLOG (table 0x28) */
    __m256i t = _mm256_ternarylogic_epi64(_mm256_srli_epi64(*x, s), *y, _mm256_set1_epi64x(mask),
                                          0x28);
#else
    __m256i t = _mm256_and_si256(_mm256_xor_si256(_mm256_srli_epi64(*x, s), *y),
                                 _mm256_set1_epi64x(mask));
#endif
    *y = _mm256_xor_si256(*y, t);
    *x = _mm256_xor_si256(*x, _mm256_slli_epi64(t, s));
}

/* The 8 x 8 bit matrix in each 64-bit lane transposed: bit t of byte p to
 * bit p of byte t (rounds of 1 x 1, 2 x 2 and 4 x 4 blocks; bit (p, t) is
 * bit 8 p + t, so a block's partner lies 7, 14 and 28 bits up). */
static inline __m256i transpose_8x8_bits(__m256i x)
{
    swap_bits(&x, &x, 7, 0x00AA00AA00AA00AALL);
    swap_bits(&x, &x, 14, 0x0000CCCC0000CCCCLL);
    swap_bits(&x, &x, 28, 0x00000000F0F0F0F0LL);
    return x;
}

/* One byte of the 256 counts of planes[0 .. n - 1] (n <= 8: the planes of
 * weights 2^(8 b) .. 2^(8 b + 7)).  Byte y of the 8 planes is brought into
 * one 64-bit lane by three rounds of unpacks (bytes, words, dwords), and
 * its 8 x 8 bits transposed give the byte of the counts of lanes 8 y ..
 * 8 y + 7.  The unpacks work within 128-bit halves, so vector v holds the
 * counts of lanes 16 v .. 16 v + 15 in its low half and 128 + 16 v ..
 * 128 + 16 v + 15 in its high half.  About 21 ops per 32 counts, against
 * 5 per plane per 32 counts for spreading each plane's bits to bytes. */
static void count_bytes(const __m256i *planes, int n, __m256i bytes[8])
{
    __m256i p[8], a[8], c[8];
    for (int i = 0; i < 8; i++)
        p[i] = i < n ? planes[i] : _mm256_setzero_si256();
    for (int i = 0; i < 4; i++) {           /* planes 2i, 2i + 1 of bytes 0 - 7, 8 - 15 of a half */
        a[i] = _mm256_unpacklo_epi8(p[2 * i], p[2 * i + 1]);
        a[4 + i] = _mm256_unpackhi_epi8(p[2 * i], p[2 * i + 1]);
    }
    for (int h = 0; h < 8; h += 4) {        /* planes 0 - 3 and 4 - 7 of 4 bytes */
        c[h] = _mm256_unpacklo_epi16(a[h], a[h + 1]);
        c[h + 1] = _mm256_unpackhi_epi16(a[h], a[h + 1]);
        c[h + 2] = _mm256_unpacklo_epi16(a[h + 2], a[h + 3]);
        c[h + 3] = _mm256_unpackhi_epi16(a[h + 2], a[h + 3]);
    }
    for (int h = 0; h < 8; h += 4)          /* the 8 planes of 2 bytes */
        for (int q = 0; q < 2; q++) {
            bytes[h + 2 * q] = transpose_8x8_bits(_mm256_unpacklo_epi32(c[h + q], c[h + 2 + q]));
            bytes[h + 2 * q + 1] = transpose_8x8_bits(_mm256_unpackhi_epi32(c[h + q], c[h + 2 + q]));
        }
}

/* The counts of planes[0 .. top - 1] (top <= 24) as int32: 4 vectors of 8
 * lanes, out[0] and out[1] lanes 16 v .. 16 v + 15, out[2] and out[3]
 * lanes 128 + 16 v .. 128 + 16 v + 15 (the layout of count_bytes). */
typedef struct { __m256i byte[3][8]; int top; } vert_count;

static void vert_count_bytes(const __m256i *planes, int top, vert_count *c)
{
    c->top = top;
    for (int b = 0; b < 3 && 8 * b < top; b++)
        count_bytes(planes + 8 * b, top - 8 * b < 8 ? top - 8 * b : 8, c->byte[b]);
}

static inline void vert_count_lanes(const vert_count *c, int v, __m256i out[4])
{
    if (c->top == 0) {
        out[0] = out[1] = out[2] = out[3] = _mm256_setzero_si256();
        return;
    }
    __m256i low = c->byte[0][v], high = c->top > 8 ? c->byte[1][v] : _mm256_setzero_si256();
    __m256i w0 = _mm256_unpacklo_epi8(low, high), w1 = _mm256_unpackhi_epi8(low, high);
    out[0] = _mm256_cvtepu16_epi32(_mm256_castsi256_si128(w0));
    out[1] = _mm256_cvtepu16_epi32(_mm256_castsi256_si128(w1));
    out[2] = _mm256_cvtepu16_epi32(_mm256_extracti128_si256(w0, 1));
    out[3] = _mm256_cvtepu16_epi32(_mm256_extracti128_si256(w1, 1));
    if (c->top > 16) {
        __m128i third[2] = {_mm256_castsi256_si128(c->byte[2][v]), _mm256_extracti128_si256(c->byte[2][v], 1)};
        for (int q = 0; q < 4; q++) {
            __m128i t = q % 2 ? _mm_srli_si128(third[q / 2], 8) : third[q / 2];
            out[q] = _mm256_add_epi32(out[q], _mm256_slli_epi32(_mm256_cvtepu8_epi32(t), 16));
        }
    }
}

/* bit_offsets[v]: the byte offsets (32 per bit) of the set bits of byte v,
 * in order; row_steps copies 8 at a time and keeps popcount(v) of them. */
static uint32_t bit_offsets[256][8] __attribute__((aligned(32)));
static pthread_once_t bit_offsets_once = PTHREAD_ONCE_INIT;

static void init_bit_offsets(void)
{
    for (int v = 0; v < 256; v++)
        for (int t = 0, n = 0; t < 8; t++)
            if (v >> t & 1)
                bit_offsets[v][n++] = VEC_BYTES * t;
}

/* Row a's steps (see above) into steps[], padded to a multiple of VERT_GROUP with
 * zero_offset; returns their number before padding.  *complement says
 * whether they are its clear bits, *set_bits is pop(a).  steps[] has room
 * for STEPS_STRIDE(kw) entries (8 written past the end at a time). */
static long row_steps(const word_t *a, long kw, long k, uint32_t zero_offset,
                      uint32_t *steps, int *complement, long *set_bits)
{
    long ones = popcount_row(a, kw);
    int flip = ones > k - ones;
    long n = 0;
    for (long w = 0; w < kw; w++) {
        word_t x = flip ? ~a[w] : a[w];
        if (w == kw - 1 && k % 64 != 0)
            x &= ((word_t)1 << (k % 64)) - 1;   /* no steps past K */
        for (int q = 0; q < 8; q++) {
            unsigned v = (unsigned)(x >> (8 * q)) & 0xff;
            __m256i offsets = _mm256_add_epi32(_mm256_load_si256((const __m256i *)bit_offsets[v]),
                                               _mm256_set1_epi32((int)(VEC_BYTES * (64 * w + 8 * q))));
            _mm256_storeu_si256((__m256i *)(steps + n), offsets);
            n += __builtin_popcount(v);
        }
    }
    for (long p = n; p % VERT_GROUP != 0; p++)
        steps[p] = zero_offset;
    *complement = flip;
    *set_bits = ones;
    return n;
}

/* 256 rows of B transposed: vector k (VEC_BYTES apart in bt) holds bit k
 * of row j0 + t at bit t, for k < 64 kw, then one zero vector; rows past N
 * are zero.  As 4 x 4 words at a time of 64 x 64 bit transposes, done lane
 * by lane: a vector holds 4 words, and swapping blocks of bits between
 * vectors (swap_bits) transposes the 4 matrices of its lanes at once.
 * The rows' words w .. w + 3 are loaded as they lie, one vector a row,
 * and the 64 rows of each quarter (64 rows) of the block transposed, its
 * lane l becoming bit k of word w + l of those rows; a 4 x 4 transpose of
 * words across the quarters then gives the block's vectors whole.  In
 * three passes over an 8 KiB buffer, each in registers: rounds 32, 16, 8
 * on rows 8 apart, rounds 4, 2, 1 on 8 consecutive ones, the 4 x 4
 * transposes.  About 6 vector ops a word.  With 512 lanes, the two halves
 * of a block are transposed one after the other into the two 32-byte
 * halves of its 64-byte vectors. */
/* Rounds s, s / 2, s / 4 on x[0 .. 7], rows s / 4 apart in the matrix. */
static inline __attribute__((always_inline))
void transpose_rounds(__m256i x[8], int s, const long long masks[3])
{
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++)
        swap_bits(&x[i], &x[i + 4], s, masks[0]);
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++)
        swap_bits(&x[i + i / 2 * 2], &x[i + i / 2 * 2 + 2], s / 2, masks[1]);    /* 0, 1, 4, 5 */
#pragma GCC unroll 4
    for (int i = 0; i < 8; i += 2)
        swap_bits(&x[i], &x[i + 1], s / 4, masks[2]);
}

static void transpose_block(const word_t *b, long rows, long kw, uint8_t *bt)
{
    static const long long far[3] = {0x00000000FFFFFFFFLL, 0x0000FFFF0000FFFFLL, 0x00FF00FF00FF00FFLL};
    static const long long near[3] = {0x0F0F0F0F0F0F0F0FLL, 0x3333333333333333LL, 0x5555555555555555LL};
    static const word_t zeros[4];   /* the words of rows past N */
    __m256i buffer[4][64];          /* quarter, row (then bit) */
    for (long w = 0; w < kw; w += 4) {
        long words = kw - w < 4 ? kw - w : 4;
        __m256i tail = _mm256_cmpgt_epi64(_mm256_set1_epi64x(words), _mm256_setr_epi64x(0, 1, 2, 3));
        for (int quarter = 0; quarter < 4; quarter++) {
            for (int r = 0; r < 8; r++) {
                __m256i x[8];
                const word_t *p[8];
#pragma GCC unroll 8
                for (int i = 0; i < 8; i++) {
                    long row = 64 * quarter + r + 8 * i;
                    p[i] = row < rows ? b + row * kw + w : zeros;
                }
                if (words == 4)
#pragma GCC unroll 8
                    for (int i = 0; i < 8; i++)
                        x[i] = _mm256_loadu_si256((const __m256i *)p[i]);
                else
#pragma GCC unroll 8
                    for (int i = 0; i < 8; i++)
                        x[i] = _mm256_maskload_epi64((const long long *)p[i], tail);
                transpose_rounds(x, 32, far);
#pragma GCC unroll 8
                for (int i = 0; i < 8; i++)
                    buffer[quarter][r + 8 * i] = x[i];
            }
            for (int r = 0; r < 64; r += 8) {
                __m256i x[8];
#pragma GCC unroll 8
                for (int i = 0; i < 8; i++)
                    x[i] = buffer[quarter][r + i];
                transpose_rounds(x, 4, near);
#pragma GCC unroll 8
                for (int i = 0; i < 8; i++)
                    buffer[quarter][r + i] = x[i];
            }
        }
        for (int k = 0; k < 64; k++) {
            __m256i q[4] = {buffer[0][k], buffer[1][k], buffer[2][k], buffer[3][k]}, v[4];
            transpose_4x4_words(q, v);
            for (long l = 0; l < words; l++)
                _mm256_store_si256((__m256i *)(bt + (64 * (w + l) + k) * VEC_BYTES), v[l]);
        }
    }
    memset(bt + 64 * kw * VEC_BYTES, 0, 32);
}

static void transpose_task(const void *ctx, long block)
{
    const gemm_args *g = (const gemm_args *)ctx;
    long kw = g->kw, j0 = block * VERT_LANES, rows = g->n - j0;
    int32_t *pop_b = (int32_t *)g->pop_b + j0;
    for (long h = 0; h < HALVES; h++)       /* 256 rows each, side by side */
        transpose_block(rows > 256 * h ? g->b + (j0 + 256 * h) * kw : g->b, rows - 256 * h, kw,
                        (uint8_t *)g->bt + block * g->bt_block_bytes + 32 * h);
    for (long t = 0; t < VERT_LANES; t++)   /* after: the rows are in the cache */
        pop_b[t] = t < rows ? (int32_t)popcount_row(g->b + (j0 + t) * kw, kw) : 0;
}

/* A task of the vertical path: output rows m0 .. m1 - 1 (at most MB; rows
 * of A, or images of 8 bit-plane rows) against all of B, block by block,
 * so that each row's steps, made once, serve every block, and each block
 * (K x 32 bytes, in L2) serves all the rows.
 * Bit planes: P = sum_p 2^p pop(a_p ^ b).  Plane p's steps are added at
 * level p of the counters (planes + p), which adds 2^p times its count;
 * planes counted over their clear bits go to a second set of counters,
 * since their counts enter with the other sign:
 *   P = sum_p 2^p pop(a_p) + pop(b) sum_p 2^p s_p - 2 (plus - minus),
 * s_p = -1 for those planes, +1 for the others.
 * The results go straight into an int32 output (whole blocks, output not
 * streamed), else into PANELS panels of popcounts for the epilogue.  The
 * scratch (the steps, the panels) is the thread's slot of g->scratch. */
typedef struct {
    long n[PLANES];             /* steps of each plane (row) before padding */
    int complement[PLANES];
    int32_t base, sign;         /* sum_p 2^p pop(a_p), sum_p 2^p s_p */
    long total[2];              /* bounds of the plus and minus counts */
} vert_row;

static int bit_length(long x)
{
    return x == 0 ? 0 : 64 - __builtin_clzl((unsigned long)x);
}

/* Row r's 256 results against a block, from its plus and minus counters:
 * to out0 (lanes 0 - 127) and out1 (lanes 128 - 255) its weighted
 * popcounts P = base + sign pop(b) - 2 (plus - minus), or, with `direct`,
 * its dot products dot_base - 2 P. */
static void vert_results(__m256i sums[2][VERT_PLANES], const vert_row *r, const int32_t *pop_b,
                         int direct, int32_t dot_base, int32_t *out0, int32_t *out1)
{
    vert_count counters[2];
    for (int c = 0; c < 2; c++)
        vert_count_bytes(sums[c], bit_length(r->total[c]), &counters[c]);
    const __m256i base = _mm256_set1_epi32(r->base), sign = _mm256_set1_epi32(r->sign);
    const __m256i dot = _mm256_set1_epi32(dot_base);
    for (int v = 0; v < 8; v++) {
        __m256i plus[4], minus[4];
        vert_count_lanes(&counters[0], v, plus);
        vert_count_lanes(&counters[1], v, minus);
        for (int q = 0; q < 4; q++) {
            long lane = 16 * v + 8 * (q % 2);
            int32_t *out = (q < 2 ? out0 : out1) + lane;
            __m256i pb = _mm256_loadu_si256((const __m256i *)(pop_b + (q < 2 ? 0 : NB) + lane));
            __m256i twice = _mm256_sub_epi32(plus[q], minus[q]);
            __m256i p = _mm256_sub_epi32(_mm256_add_epi32(base, _mm256_mullo_epi32(sign, pb)),
                                         _mm256_add_epi32(twice, twice));
            if (direct)
                p = _mm256_sub_epi32(dot, _mm256_add_epi32(p, p));
            _mm256_storeu_si256((__m256i *)out, p);
        }
    }
}

static void vert_task(const void *ctx, long task)
{
    const gemm_args *g = (const gemm_args *)ctx;
    long kw = g->kw, planes = g->planes, stride = STEPS_STRIDE(kw);
    long m0 = task * g->m_run, m1 = m0 + g->m_run < g->m / planes ? m0 + g->m_run : g->m / planes;
    char *scratch = g->scratch + (size_t)thread_slot * g->scratch_bytes;
    int32_t *pop = (int32_t *)scratch;                      /* PANELS panels, MB x NB each */
    uint32_t *steps = (uint32_t *)(pop + PANELS * MB * NB); /* rows x planes x stride */
    uint32_t zero_offset = (uint32_t)(64 * kw * VEC_BYTES);
    vert_row rows[MB];
    for (long i = m0; i < m1; i++) {
        vert_row *r = &rows[i - m0];
        r->base = r->sign = 0;
        r->total[0] = r->total[1] = 0;
        for (long p = 0; p < planes; p++) {
            long ones;
            r->n[p] = row_steps(g->a + (i * planes + p) * kw, kw, g->k, zero_offset,
                                steps + ((i - m0) * planes + p) * stride, &r->complement[p], &ones);
            r->base += (int32_t)(ones << p);
            r->sign += r->complement[p] ? -(1 << p) : 1 << p;
            r->total[r->complement[p]] += r->n[p] << p;
        }
    }
    for (long j0 = 0; j0 < g->n; j0 += VERT_LANES) {
        const uint8_t *bt = g->bt + j0 / VERT_LANES * g->bt_block_bytes;
        long lanes = g->n - j0 < VERT_LANES ? g->n - j0 : VERT_LANES;
        /* whole blocks of an int32 output kept in the cache: straight into it */
        int direct = g->threshold == NULL && !g->stream && lanes == VERT_LANES;
        for (long i = m0; i < m1; i++) {
            const vert_row *r = &rows[i - m0];
            vvec sums[2][VERT_PLANES];                      /* plus, minus */
            for (int c = 0; c < 2; c++) {   /* the planes vert_steps and count_bytes read */
                long used = bit_length(r->total[c]) + planes + RUNNING_PLANES - 1;
                for (long p = 0; p < used && p < VERT_PLANES; p++)
                    sums[c][p] = vzero();
            }
            for (long p = 0; p < planes; p++) {
                int c = r->complement[p];
                vert_steps(bt, steps + ((i - m0) * planes + p) * stride,
                           (r->n[p] + VERT_GROUP - 1) / VERT_GROUP, sums[c] + p,
                           bit_length(r->total[c]) - (int)p);
            }
            for (int h = 0; h < HALVES; h++) {              /* 256 lanes at a time */
                int32_t *out = direct ? (int32_t *)g->out + i * g->n + j0 + 256 * h
                                      : pop + 2 * h * MB * NB + (i - m0) * NB;
#if HALVES == 1
                vert_results(sums, r, g->pop_b + j0, direct, dot_base(g), out,
                             direct ? out + NB : out + MB * NB);
#else
                __m256i half[2][VERT_PLANES];
                for (int c = 0; c < 2; c++)
                    for (int p = 0; p < bit_length(r->total[c]); p++)
                        half[c][p] = h == 0 ? _mm512_castsi512_si256(sums[c][p])
                                            : _mm512_extracti64x4_epi64(sums[c][p], 1);
                vert_results(half, r, g->pop_b + j0 + 256 * h, direct, dot_base(g), out,
                             direct ? out + NB : out + MB * NB);
#endif
            }
        }
        for (long panel = 0; !direct && panel * NB < lanes; panel++) {
            long n0 = j0 + panel * NB, n1 = j0 + lanes < n0 + NB ? j0 + lanes : n0 + NB;
            epilogue(g, pop + panel * MB * NB, m0, m1, n0, n1);
        }
    }
    if (g->stream)
        _mm_sfence();       /* this thread's streamed lines, out before the job ends */
}

static void point_at_layout(gemm_args *g, const uint8_t *body)
{
    g->bt_block_bytes = layout_block_bytes(VERT_LANES, g->kw);
    g->bt = body;
    g->pop_b = (const int32_t *)(body + (g->n + VERT_LANES - 1) / VERT_LANES * g->bt_block_bytes);
}

/* B laid out (transposed, its rows' popcounts) into body, of
 * layout_body_bytes(VERT_LANES, n, kw) bytes, 64-byte aligned. */
static void lay_out_b(gemm_args *g, uint8_t *body, int n_threads)
{
    point_at_layout(g, body);
    run_parallel(transpose_task, g, (g->n + VERT_LANES - 1) / VERT_LANES, n_threads);
}

/* The object's bnn_make_layout (see the common part). */
void ISA_FN(lay_out)(const word_t *b, long n, long k, uint8_t *body, int n_threads)
{
    gemm_args g = {.b = b, .n = n, .k = k, .kw = (k + 63) / 64};
    lay_out_b(&g, body, n_threads);
}

/* The vertical path's buffers, in one allocation that the caller frees:
 * B laid out (g->bt, g->pop_b), here in parallel, unless the caller's
 * layout (its body) is given, and a scratch slot per thread (g->scratch);
 * NULL if memory is short.  Tasks of m_run rows: enough for about 8 a
 * thread, at most MB. */
static char *make_vertical(gemm_args *g, const uint8_t *layout, int n_threads)
{
    int slots = n_threads > 1 ? n_threads : 1;
    g->m_run = blocks_per_task(g->m / g->planes, 1, n_threads, MB);    /* output rows */
    g->scratch_bytes = (PANELS * MB * NB * sizeof(int32_t) +
                        (size_t)g->m_run * g->planes * STEPS_STRIDE(g->kw) * sizeof(uint32_t) + 63) &
                       ~(size_t)63;
    size_t body_bytes = layout == NULL ? layout_body_bytes(VERT_LANES, g->n, g->kw) : 0;
    char *buffer = aligned_alloc(64, (body_bytes + slots * g->scratch_bytes + 63) & ~(size_t)63);
    if (buffer == NULL)
        return NULL;
    g->scratch = buffer + body_bytes;
    pthread_once(&bit_offsets_once, init_bit_offsets);
    if (layout != NULL)
        point_at_layout(g, layout);
    else
        lay_out_b(g, (uint8_t *)buffer, n_threads);
    return buffer;
}
#endif

/* ========================================================================
 * 4.5 avx512, over avx2: VPOPCNTDQ, xor and popcount 8 words per
 * instruction on 4 x 2 tiles, 64-bit sums in 8 zmm registers.  The
 * AVX-512 kernel reads the last partial vector of a row with a masked
 * load, so any K runs through it.  Its popcounts of a row and of a pair
 * (popcount_row, popcount_xor) are with the others in 4.1, where the edge
 * kernel and the vertical kernels call them.
 * ===================================================================== */
#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)
#define MR 4
#define NR 2

static inline __m512i load_8_words(const word_t *p, long k, long n)
{
    if (k + 8 <= n)
        return _mm512_loadu_si512(p + k);
    return _mm512_maskz_loadu_epi64((__mmask8)((1u << (n - k)) - 1), p + k);
}

__attribute__((noinline))
static void micro_kernel(const word_t *a, const word_t *b, long ld, long n,
                         int32_t *c, long ldc, int first)
{
    __m512i sum[MR][NR];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++)
            sum[i][j] = _mm512_setzero_si512();
    for (long k = 0; k < n; k += 8) {
        __m512i av[MR];
        for (int i = 0; i < MR; i++)
            av[i] = load_8_words(a + i * ld, k, n);
        for (int j = 0; j < NR; j++) {
            __m512i bv = load_8_words(b + j * ld, k, n);
            for (int i = 0; i < MR; i++)
                sum[i][j] = _mm512_add_epi64(sum[i][j],
                                             _mm512_popcnt_epi64(_mm512_xor_si512(av[i], bv)));
        }
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++)
            store_tile(c, ldc, i, j, _mm512_reduce_add_epi64(sum[i][j]), first);
}

__attribute__((noinline))
static long plane_kernel(const word_t *a, const word_t *b, long ld, long n)
{
    __m512i sum = _mm512_setzero_si512();
    for (long k = 0; k < n; k += 8) {
        __m512i bv = load_8_words(b, k, n);
        for (int p = 0; p < PLANES; p++) {
            __m512i x = _mm512_xor_si512(load_8_words(a + p * ld, k, n), bv);
            sum = _mm512_add_epi64(sum, _mm512_slli_epi64(_mm512_popcnt_epi64(x), p));
        }
    }
    return _mm512_reduce_add_epi64(sum);
}
#endif

/* ========================================================================
 * 4.6 avx512-vertical, over avx2-vertical: the vertical kernel on 512
 * lanes, carry-save adders of one VPTERNLOG each, VPOPCNTDQ row
 * popcounts.  No code of its own: 4.4's, compiled in the avx512 object
 * (vvec = __m512i and its vcsa there; HALVES == 2 in vert_task).
 * ===================================================================== */

/* ========================================================================
 * 4.7 avx512-vnni, over avx512: the bit planes as pixel bytes times +-1
 * weight bytes (VNNI), the avx512 kernel's path elsewhere.  Its own
 * kernel of the avx512 object (ALGO_VNNI), whose extra features (VNNI,
 * VBMI, GFNI) its functions take by target attributes.
 * ===================================================================== */
#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)
/* The VNNI plane kernel (kernel "avx512-vnni": the features past the
 * object's by target attributes, checked by the common part).  Over bit
 * planes, P = sum_p 2^p popcount(a_p XOR b) counts for each bit t of K the
 * pixel x_t where b_t = 0 and 255 - x_t where b_t = 1:
 *     P = 255 popcount(b) + sum_t x_t s_t,   s_t = b_t ? -1 : +1,
 * unsigned pixel bytes times signed +-1 bytes, which vpdpbusd adds 4 at a
 * time into 16 int32 lanes: 16 units a vector, 4 vectors a pass.  An
 * image's word of 8 planes goes back into 64 pixel bytes by a byte
 * transpose (vpermb: byte q of plane p to byte 8 q + 7 - p) and a bit
 * transpose of each 8 x 8 block (gf2p8affineqb against the bytes 1 << j).
 * Bits past K are 0 in A: their bytes add 0.  The weights (per block of 64
 * units, word and group of 4 bits, 64 int32) and 255 popcount(b) are made
 * once per call (vnni_weights); units past N have 0 weights. */
#define VNNI_PLANES 1
#define VNNI_UNITS 64
#define VNNI_TARGET __attribute__((target("avx512bw,avx512vnni,avx512vbmi,gfni")))
static const uint8_t byte_transpose[64] __attribute__((aligned(64))) = {
    56, 48, 40, 32, 24, 16, 8, 0, 57, 49, 41, 33, 25, 17, 9, 1,
    58, 50, 42, 34, 26, 18, 10, 2, 59, 51, 43, 35, 27, 19, 11, 3,
    60, 52, 44, 36, 28, 20, 12, 4, 61, 53, 45, 37, 29, 21, 13, 5,
    62, 54, 46, 38, 30, 22, 14, 6, 63, 55, 47, 39, 31, 23, 15, 7};

VNNI_TARGET static inline __m512i pixel_bytes(const word_t *planes, long kw)
{
    __m512i words = kw == 1 ? _mm512_loadu_si512(planes)
                            : _mm512_i64gather_epi64(_mm512_set_epi64(7 * kw, 6 * kw, 5 * kw, 4 * kw,
                                                                      3 * kw, 2 * kw, kw, 0), planes, 8);
    __m512i bytes = _mm512_permutexvar_epi8(_mm512_load_si512(byte_transpose), words);
    return _mm512_gf2p8affine_epi64_epi8(_mm512_set1_epi64(0x8040201008040201LL), bytes, 0);
}

/* One K slice of images img0 .. img1 - 1 against units n0 .. n1 - 1:
 * their P into pop (NB a row; n0 is a multiple of NB, so a pass of 64
 * units stays in the row). */
VNNI_TARGET static void vnni_plane_block(const gemm_args *g, int32_t *pop, long img0, long img1,
                                         long n0, long n1, long k0, long kc)
{
    long kw = g->kw;
    for (long img = img0; img < img1; img++) {
        int32_t *c = pop + (img - img0) * NB - n0;
        for (long j = n0; j < n1; j += VNNI_UNITS) {
            const int32_t *w = g->vnni_w + j * kw * 16;
            __m512i acc[4];
            for (int v = 0; v < 4; v++)
                acc[v] = _mm512_loadu_si512(k0 == 0 ? g->vnni_bias + j + 16 * v : c + j + 16 * v);
            for (long k = k0; k < k0 + kc; k++) {
                uint32_t x[16] __attribute__((aligned(64)));
                _mm512_store_si512(x, pixel_bytes(g->a + img * PLANES * kw + k, kw));
                long groups = (g->k - 64 * k + 3) / 4 < 16 ? (g->k - 64 * k + 3) / 4 : 16;
                for (long q = 0; q < groups; q++) {
                    __m512i xq = _mm512_set1_epi32((int)x[q]);
                    const int32_t *wq = w + (k * 16 + q) * VNNI_UNITS;
                    for (int v = 0; v < 4; v++)
                        acc[v] = _mm512_dpbusd_epi32(acc[v], xq, _mm512_load_si512(wq + 16 * v));
                }
            }
            for (int v = 0; v < 4; v++)
                _mm512_storeu_si512(c + j + 16 * v, acc[v]);
        }
    }
}

/* The VNNI plane kernel's weights: for each block of 64 units, word k and
 * group q of 4 bits, 64 int32 of 4 signed bytes s_t = b_t ? -1 : +1, then
 * 255 popcount(b_j) per unit (g->vnni_bias); 0 past n.  NULL if memory is
 * short (the plane kernel runs instead). */
static int32_t *vnni_weights(gemm_args *g)
{
    long units = (g->n + VNNI_UNITS - 1) / VNNI_UNITS * VNNI_UNITS, kw = g->kw;
    int32_t *w = aligned_alloc(64, (size_t)units * (kw * 16 + 1) * sizeof(int32_t));
    if (w == NULL)
        return NULL;
    int32_t *bias = w + units * kw * 16;
    for (long j = 0; j < units; j++) {
        long ones = 0;
        for (long k = 0; k < kw; k++) {
            word_t bits = j < g->n ? g->b[j * kw + k] : 0;
            ones += popcount_word(bits);
            for (long q = 0; q < 16; q++) {
                uint32_t s = 0;
                for (int t = 0; t < 4 && j < g->n; t++)
                    s |= (bits >> (4 * q + t) & 1 ? 0xffu : 0x01u) << (8 * t);
                w[((j / VNNI_UNITS * kw + k) * 16 + q) * VNNI_UNITS + j % VNNI_UNITS] = (int32_t)s;
            }
        }
        bias[j] = (int32_t)(255 * ones);
    }
    g->vnni_w = w;
    g->vnni_bias = bias;
    return w;
}
#endif

/* ========================================================================
 * 4.8 The driver: a block's tiles or planes, a task's blocks, and the
 * object's gemm entry, which dispatches to the variants above.
 * ===================================================================== */
/* One K slice of a block of the ordinary GEMM: register tiles, then edges.
 * panel: the block's rows of B in nibble form (AVX2 tile kernel), or NULL. */
static void tile_block(const gemm_args *g, const word_t *panel, int32_t *pop, long m0, long m1,
                       long n0, long n1, long k0, long kc)
{
    long kw = g->kw;
    int first = k0 == 0;
#if defined(INTERLEAVED_B)
    if (g->harley_seal) {
        tile_block_hs(g, pop, m0, m1, n0, n1, k0, kc);
        return;
    }
#else
    (void)panel;
#endif
    int32_t base = g->direct ? dot_base(g) : 0;     /* nonzero: straight into the output */
    long ldc = g->direct ? g->n : NB;
    for (long i = m0; i < m1; i += MR) {
        const word_t *a = g->a + i * kw + k0;
        for (long j = n0; j < n1; j += NR) {
            const word_t *b = g->b + j * kw + k0;
            int32_t *c = g->direct ? (int32_t *)g->out + i * g->n + j : pop + (i - m0) * NB + (j - n0);
#if defined(INTERLEAVED_B)
            if (i + MR <= m1 && j + NR <= n1 && panel != NULL)
                micro_kernel(g->a2 + (i * kw + k0) * 2, 2 * kw,
                             panel + (j - n0) / 4 * 8 * kw + 8 * k0, 8 * kw, kc, c, ldc, first, base);
#else
            if (i + MR <= m1 && j + NR <= n1)
                micro_kernel(a, b, kw, kc, c, NB, first);
#endif
            else
                edge_kernel(a, b, kw, kc, c, ldc,
                            m1 - i < MR ? m1 - i : MR,
                            n1 - j < NR ? n1 - j : NR, first, base);
        }
    }
}

/* One K slice of rows m0 .. m1 - 1 of A over bit planes (a task's run of
 * blocks).  AVX2: the byte-sliced kernel on their images, 4 at a time, and
 * pairs of rows of B (rows of B outer, so a pair of mask rows is read once
 * for all the images); at the edges the last image or row is repeated and
 * its extra results dropped.  Otherwise (or without the byte buffers) the
 * plane kernel, one output at a time. */
static void plane_block(const gemm_args *g, int32_t *pop, long m0, long m1,
                        long n0, long n1, long k0, long kc)
{
    long kw = g->kw;
#if defined(VNNI_PLANES)
    if (g->vnni_w != NULL) {
        vnni_plane_block(g, pop, m0 / PLANES, m1 / PLANES, n0, n1, k0, kc);
        return;
    }
#endif
#if defined(BYTE_PLANES)
    if (g->pixels != NULL && g->masks != NULL) {
        long ld = kw * 64, images0 = m0 / PLANES, images1 = m1 / PLANES;
        for (long j = n0; j < n1; j += 2) {
            const uint8_t *mv0 = g->masks + j * ld + k0 * 64;
            const uint8_t *mv1 = j + 1 < n1 ? mv0 + ld : mv0;
            for (long i = images0; i < images1; i += 4) {
                const uint8_t *px[4];
                long s[4][2];
                for (long h = 0; h < 4; h++)
                    px[h] = g->pixels + (i + h < images1 ? i + h : images1 - 1) * ld + k0 * 64;
                byte_plane_kernel(px, mv0, mv1, kc * 64, s);
                for (long h = 0; h < 4 && i + h < images1; h++) {
                    int32_t *c = pop + (i + h - images0) * NB + (j - n0);
                    for (long r = 0; r < 2 && j + r < n1; r++)
                        c[r] = (int32_t)(k0 == 0 ? s[h][r] : c[r] + s[h][r]);
                }
            }
        }
        return;
    }
#endif
    for (long i = m0; i < m1; i += PLANES) {
        const word_t *a = g->a + i * kw + k0;
        int32_t *c = pop + (i - m0) / PLANES * NB;
        for (long j = n0; j < n1; j++) {
            long s = plane_kernel(a, g->b + j * kw + k0, kw, kc);
            c[j - n0] = (int32_t)(k0 == 0 ? s : c[j - n0] + s);
        }
    }
}


/* A task: the blocks mb0 .. mb1 - 1 of A (a run of m_run blocks, more than
 * one on the tile kernel's path and the bit planes', see blocks_per_task)
 * against one panel of NB rows of B.  On the tile kernel's path the task
 * first copies its panel in nibble form to its thread's buffer
 * (panel_buffer: thread-local, not on the stack, which can be small in a
 * caller's thread) and then takes its blocks one by one; over bit planes
 * it takes the whole run at once. */
static void gemm_task(const void *ctx, long task)
{
    const gemm_args *g = (const gemm_args *)ctx;
    int32_t pop[MB * NB];
    long runs = (g->m_blocks + g->m_run - 1) / g->m_run;
    long mb0 = (task % runs) * g->m_run, n0 = (task / runs) * NB;
    long mb1 = mb0 + g->m_run < g->m_blocks ? mb0 + g->m_run : g->m_blocks;
    long n1 = n0 + NB < g->n ? n0 + NB : g->n;
    const word_t *panel = NULL;
#if defined(INTERLEAVED_B)
    if (g->a2 != NULL && !g->harley_seal)
        panel = copy_panel_nibbles(g, n0, n1);
#endif

    /* the tile kernel's blocks one by one; the bit planes' run at once */
    long step = g->planes == 1 ? MB : g->m_run * MB;
    long m_end = mb1 * MB < g->m ? mb1 * MB : g->m;
    for (long m0 = mb0 * MB; m0 < m_end; m0 += step) {
        long m1 = m0 + step < m_end ? m0 + step : m_end;
        for (long k0 = 0; k0 < g->kw; k0 += KC) {
            long kc = k0 + KC < g->kw ? KC : g->kw - k0;
            if (g->planes == 1)
                tile_block(g, panel, pop, m0, m1, n0, n1, k0, kc);
            else
                plane_block(g, pop, m0, m1, n0, n1, k0, kc);
        }
        if (!g->direct)
            epilogue(g, pop, m0 / g->planes, m1 / g->planes, n0, n1);
    }
#if defined(__AVX2__)
    if (g->stream)
        _mm_sfence();       /* this thread's streamed lines, out before the job ends */
#endif
}

/* The size in bytes of the L3 cache that this core shares, for the
 * epilogue's choice of stores; 32 MiB where the system does not say.  (On
 * the EPYC this was written on, sysconf's _SC_LEVEL3_CACHE_SIZE gave the
 * whole package's 256 MiB, not the 32 MiB one core can use; sysfs gives
 * the latter.)  Read once. */
static size_t llc_bytes;
static pthread_once_t llc_once = PTHREAD_ONCE_INIT;

static void read_last_level_cache(void)
{
    long kib = 0;
#if defined(__linux__)
    FILE *f = fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r");
    if (f != NULL) {
        if (fscanf(f, "%ldK", &kib) != 1)
            kib = 0;
        fclose(f);
    }
#endif
    llc_bytes = kib > 0 ? (size_t)kib << 10 : (size_t)32 << 20;
}

static size_t last_level_cache(void)
{
    pthread_once(&llc_once, read_last_level_cache);
    return llc_bytes;
}

/* A large output is fresh memory from PyTorch's allocator, mapped in 4 KiB
 * pages that fault in one by one as the epilogue first writes them: for the
 * 10000 x 4096 int32 result (164 MB) a large part of the GEMM's time
 * (docs/cpu_kernels.md).  Asking for transparent huge pages on the 2
 * MiB-aligned interior (where the system leaves that to madvise) makes it
 * 512 times fewer faults.  Only a hint: nothing changes where it is refused. */
static void advise_huge_pages(void *p, size_t bytes)
{
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = (uintptr_t)1 << 21;
    uintptr_t start = ((uintptr_t)p + huge - 1) & ~(huge - 1);
    uintptr_t end = ((uintptr_t)p + bytes) & ~(huge - 1);
    if (end > start)
        madvise((void *)start, end - start, MADV_HUGEPAGE);
#else
    (void)p;
    (void)bytes;
#endif
}



/* The object's bnn_xnor_gemm (see the common part): algo ALGO_VERTICAL
 * runs the vertical kernel where the object has one and the rows fit it,
 * else the tile kernels; options OPT_*; layout: the body of B's layout
 * (bnn_make_layout, checked by the caller) or NULL. */
void ISA_FN(gemm)(int algo, int options, const word_t *a, const word_t *b,
                  const uint8_t *layout, long m, long n, long k, long planes,
                  const int32_t *threshold, const uint8_t *row_class, void *out, int n_threads)
{
    int use_work_buffers = !(options & OPT_NO_WORK_BUFFERS);
    (void)use_work_buffers;     /* the scalar object has no work buffers */
    gemm_args g = {.a = a, .b = b, .threshold = threshold, .row_class = row_class, .out = out,
                   .m = m * planes, .n = n,
                   .k = k, .kw = (k + 63) / 64, .planes = planes,
                   .m_blocks = (m * planes + MB - 1) / MB, .m_run = 1};
    uint8_t *pixels = NULL, *masks = NULL;
    long panels = (n + NB - 1) / NB;
    word_t *copies = NULL;
    if (m == 0 || n == 0)
        return;
    size_t out_bytes = threshold == NULL ? (size_t)m * n * sizeof(int32_t)
                                         : (size_t)m * ((n + 63) / 64) * sizeof(word_t);
    advise_huge_pages(out, out_bytes);
    g.stream = threshold == NULL && (options & OPT_STREAM      ? 1
                                     : options & OPT_NO_STREAM ? 0
                                                               : out_bytes > last_level_cache());
#if defined(VERTICAL_KERNEL)
    if (algo == ALGO_VERTICAL && use_work_buffers && g.kw <= VERT_MAX_WORDS) {
        char *vertical = make_vertical(&g, layout, n_threads);
        if (vertical != NULL) {
            run_parallel(vert_task, &g, (m + g.m_run - 1) / g.m_run, n_threads);
            free(vertical);
            return;
        }
    }
#else
    (void)algo;
    (void)layout;
#endif
#if defined(INTERLEAVED_B)
    if (planes == 1 && use_work_buffers)
        copies = make_copies(&g, n_threads);    /* none (no memory): edge kernels */
    if (copies != NULL && !g.harley_seal)
        g.m_run = blocks_per_task(g.m_blocks, panels, n_threads, RUN_BLOCKS);
    /* The tile kernel's dot products straight into an int32 output, where one
     * K slice makes them final: stored tile by tile, they overlap the
     * computing instead of a burst of stores in the epilogue.  Not for
     * outputs streamed past the cache, which the epilogue writes whole
     * lines of. */
    g.direct = planes == 1 && threshold == NULL && !g.stream && !g.harley_seal && g.kw <= KC &&
               k > 0;
#endif
#if defined(BYTE_PLANES)
    if (planes == PLANES && use_work_buffers &&
        byte_planes_and_masks(a, b, m, n, g.kw, &pixels, &masks, n_threads))
        g.m_run = blocks_per_task(g.m_blocks, panels, n_threads, PLANE_RUN_BLOCKS);
#endif
#if defined(VNNI_PLANES)
    int32_t *vnni = NULL;
    if (algo == ALGO_VNNI && planes == PLANES && use_work_buffers && (vnni = vnni_weights(&g)) != NULL)
        g.m_run = blocks_per_task(g.m_blocks, panels, n_threads, PLANES);   /* images <= MB */
#endif
    g.pixels = pixels;
    g.masks = masks;
    run_parallel(gemm_task, &g, panels * ((g.m_blocks + g.m_run - 1) / g.m_run), n_threads);
#if defined(VNNI_PLANES)
    free(vnni);
#endif
    free(copies);
    free(pixels);
    free(masks);
}

#endif  /* BNN_PART_KERNELS */
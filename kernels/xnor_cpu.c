/*
 * kernels/xnor_cpu.c -- the 1-bit run time of BinaryNet on the CPU
 * (Courbariaux et al. 2016, arXiv 1602.02830, section "Run-time").
 *
 * The kernels, each readable on its own:
 *
 *   bnn_pack          sign-and-pack float32 rows into 64-bit words
 *   bnn_pack_planes   pack the 8 bit planes of uint8 rows (first layer)
 *   bnn_xnor_gemm     C = A_b . B_b^T by XNOR and popcount on packed words,
 *                     optionally over bit planes and with the hidden layers'
 *                     threshold-and-pack epilogue
 *   bnn_baseline_gemm the unoptimized float32 triple loop, for the paper's
 *                     comparison
 *
 * Packing order (shared with binary_ops.py and the CUDA kernels):
 *   element k of a row lives in word k / 64, bit k % 64 (bit 0 = least
 *   significant).  The bit is 1 for x >= 0 (sign(0) = +1) and 0 for x < 0.
 *   A row of K values takes KW = ceil(K / 64) words; the unused high bits of
 *   the last word are 0 in every operand, so they never differ and never
 *   count: no restriction on K.
 *
 * XNOR dot product: bits that agree contribute +1, bits that differ -1, so
 *   a . b = K - 2 * popcount(a XOR b).
 *
 * Both GEMM operands are packed along K: A is M x KW, B is N x KW (that is,
 * B^T of the mathematical K x N matrix), so the inner loop streams two
 * contiguous rows.  The result is int32, exact for any K < 2^31.
 *
 * Compiled at first use by kernels/cpu.py with  gcc -O3 -march=native,
 * which picks the fastest popcount the CPU has (see "XNOR GEMM" below):
 * AVX-512 VPOPCNTDQ, else an AVX2 nibble lookup, else __builtin_popcountll
 * (the popcnt instruction on x86, NEON cnt on AArch64).
 */
#include <stdint.h>
#include <stddef.h>
#include <pthread.h>

#if defined(__AVX2__) || (defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__))
#include <immintrin.h>
#endif

typedef uint64_t word_t;

/* The popcount this build uses, for the benchmark's header. */
const char *bnn_popcount_kind(void)
{
#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)
    return "AVX-512 VPOPCNTDQ";
#elif defined(__AVX2__)
    return "AVX2 nibble lookup (vpshufb)";
#elif defined(__POPCNT__)
    return "scalar popcnt (x86)";
#elif defined(__ARM_NEON)
    return "NEON cnt (via __builtin_popcountll)";
#else
    return "portable bit counting (no popcount instruction enabled)";
#endif
}

/* ------------------------------------------------------------------------
 * Threads: a job is a list of independent tasks; every thread (the caller
 * included) takes the next task from a shared atomic counter until none is
 * left.  Plain pthreads keep this library free of a second OpenMP runtime
 * next to PyTorch's.
 * ------------------------------------------------------------------------ */
#define MAX_THREADS 256

typedef void (*task_fn)(const void *ctx, long task);

typedef struct {
    task_fn fn;
    const void *ctx;
    long n_tasks;
    long next;
} job_t;

static void *worker(void *arg)
{
    job_t *job = (job_t *)arg;
    long t;
    while ((t = __atomic_fetch_add(&job->next, 1, __ATOMIC_RELAXED)) < job->n_tasks)
        job->fn(job->ctx, t);
    return NULL;
}

static void run_parallel(task_fn fn, const void *ctx, long n_tasks, int n_threads)
{
    job_t job = {fn, ctx, n_tasks, 0};
    pthread_t threads[MAX_THREADS];
    int started = 0;
    if (n_threads > MAX_THREADS) n_threads = MAX_THREADS;
    if (n_threads > n_tasks) n_threads = (int)n_tasks;
    for (int i = 1; i < n_threads; i++)
        if (pthread_create(&threads[started], NULL, worker, &job) == 0)
            started++;
    worker(&job);                   /* the caller works too */
    for (int i = 0; i < started; i++)
        pthread_join(threads[i], NULL);
}

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
void bnn_pack(const float *x, word_t *out, long rows, long k, int n_threads)
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
void bnn_pack_planes(const uint8_t *x, word_t *out, long rows, long k, int n_threads)
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
 * loaded word serves NR (or MR) pairs.  One of three micro-kernels is
 * compiled, by the instructions the CPU has (-march=native):
 *   - AVX-512 VPOPCNTDQ, 4 x 2: xor and popcount 8 words per instruction,
 *     64-bit sums in 8 zmm registers;
 *   - AVX2, 4 x 2: popcount 4 words at a time by a 16-entry nibble table
 *     (vpshufb on the low and the high 4 bits of each byte), byte counts
 *     summed for up to 31 steps (31 * 8 < 256) before vpsadbw widens them.
 *     On a Zen 3 core this ran about 1.6x faster than scalar popcnt: the
 *     vector pipes do 4 word pairs in ~7 ops where popcnt needs 12;
 *   - otherwise scalar __builtin_popcountll (popcnt on x86, NEON cnt on
 *     AArch64), 4 x 4: three integer ops per word pair (xor, popcnt, add).
 * The AVX-512 kernels read the last partial vector of a row with a masked
 * load and the AVX2 ones count its last 0 - 3 words with scalar popcnt, so
 * any K runs through them.
 *
 * Cache blocking: the output is cut into blocks of MB rows of A by NB rows
 * of B, one task each, and K into slices of KC words.  For one K slice a
 * block re-reads its NB rows of B (NB * KC * 8 = 128 KiB, kept in L2) once
 * per MR rows of A, and the MR rows of A (4 KiB) stay in L1 while the
 * micro-kernel sweeps B.  Tasks are numbered so that consecutive ones share
 * the same B panel.  The sums of successive K slices add up in a per-task
 * MB x NB scratch block (16 KiB) on the stack.
 *
 * Tails: rows of A or B left over at the block edge (M % MR, N % NR) go
 * through a plain dot product one pair at a time; K tails need nothing
 * (zero padding bits, see the top of the file).
 *
 * Bit planes (the paper's first layer, s = sum_p 2^p (x^p . w)): with
 * planes = 8, output row i is made of the 8 consecutive rows of A 8 i + p,
 * weighted 2^p.  A plane kernel computes one such output: it streams the 8
 * planes against one row of B, so the weighting is done on the vector sums
 * and one horizontal sum serves all 8 planes; this matters because the
 * first layer's K is short (784 bits = 13 words) and a per-pair reduction
 * would cost as much as the popcounts.  planes = 1 is the ordinary GEMM.
 * The block keeps, per output, the weighted popcount P = sum_p 2^p pop_p,
 * and the dot product is (2^planes - 1) K - 2 P.  MB is a multiple of 8, so
 * a block never splits an image's planes.
 *
 * Epilogue, once per block, after the last K slice:
 *   - without a threshold, the int32 dot products are stored (M x N);
 *   - with one, each unit j fires (+1, bit set) where dot >= threshold[j],
 *     and the bits are packed straight into M x ceil(N / 64) words: the next
 *     layer's packed input, with no int32 matrix in between.  NB is a
 *     multiple of 64, so every output word belongs to one task.
 * ------------------------------------------------------------------------ */
#if (defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)) || defined(__AVX2__)
#define MR 4
#define NR 2
#else
#define MR 4
#define NR 4
#endif
#define MB 32
#define NB 128
#define KC 128

typedef struct {
    const word_t *a, *b;
    const int32_t *threshold;   /* NULL: store dot products */
    void *out;
    long m, n, k, kw, planes;   /* m counts rows of A */
    long m_blocks;
} gemm_args;

static inline long popcount_word(word_t x)
{
    return __builtin_popcountll(x);
}

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

/* MR x NR popcount sums over n words: the register-tiled micro-kernel.
 * Kept out of line so that its registers are not shared with the loops of
 * the caller. */
#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)

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

#elif defined(__AVX2__)

static inline __m256i load_4_words(const word_t *p)
{
    return _mm256_loadu_si256((const __m256i *)p);
}

/* Bits set in each byte of x, added to the byte counters. */
static inline __m256i add_byte_popcounts(__m256i counts, __m256i x)
{
    const __m256i table = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                           0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
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

/* The 8 sums of the 4 x 2 tile, each held as 4 partial sums in a vector,
 * as 8 int32 in tile order (0,0) (0,1) (1,0) ... (3,1): one transpose-and-
 * add instead of 8 horizontal sums, which for a short K (the MNIST layers
 * have 13 to 64 words) would cost as much as the popcounts themselves. */
static inline __m256i reduce_tile(__m256i s[MR][NR])
{
    __m256i rows[2];
    for (int h = 0; h < 2; h++) {
        __m256i a = s[2 * h][0], b = s[2 * h][1], c = s[2 * h + 1][0], d = s[2 * h + 1][1];
        /* [a0+a1, b0+b1, a2+a3, b2+b3] and the same for c, d */
        __m256i ab = _mm256_add_epi64(_mm256_unpacklo_epi64(a, b), _mm256_unpackhi_epi64(a, b));
        __m256i cd = _mm256_add_epi64(_mm256_unpacklo_epi64(c, d), _mm256_unpackhi_epi64(c, d));
        /* [sum a, sum b, sum c, sum d] */
        rows[h] = _mm256_add_epi64(_mm256_permute2x128_si256(ab, cd, 0x20),
                                   _mm256_permute2x128_si256(ab, cd, 0x31));
    }
    const __m256i low_dwords = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
    return _mm256_permute2x128_si256(_mm256_permutevar8x32_epi32(rows[0], low_dwords),
                                     _mm256_permutevar8x32_epi32(rows[1], low_dwords), 0x20);
}

/* The vector loop runs over the whole groups of 4 words; the last 0 - 3
 * words of a row go through scalar popcnt. */
__attribute__((noinline))
static void micro_kernel(const word_t *a, const word_t *b, long ld, long n,
                         int32_t *c, long ldc, int first)
{
    long n4 = n & ~3L;
    __m256i sum[MR][NR];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++)
            sum[i][j] = _mm256_setzero_si256();
    for (long k = 0; k < n4;) {
        long stop = k + 4 * BYTE_STEPS < n4 ? k + 4 * BYTE_STEPS : n4;
        __m256i bytes[MR][NR];
        for (int i = 0; i < MR; i++)
            for (int j = 0; j < NR; j++)
                bytes[i][j] = _mm256_setzero_si256();
        for (; k < stop; k += 4) {
            __m256i av[MR];
            for (int i = 0; i < MR; i++)
                av[i] = load_4_words(a + i * ld + k);
            for (int j = 0; j < NR; j++) {
                __m256i bv = load_4_words(b + j * ld + k);
                for (int i = 0; i < MR; i++)
                    bytes[i][j] = add_byte_popcounts(bytes[i][j], _mm256_xor_si256(av[i], bv));
            }
        }
        for (int i = 0; i < MR; i++)
            for (int j = 0; j < NR; j++)
                sum[i][j] = _mm256_add_epi64(sum[i][j],
                                             _mm256_sad_epu8(bytes[i][j], _mm256_setzero_si256()));
    }
    int32_t tile[MR * NR];
    _mm256_storeu_si256((__m256i *)tile, reduce_tile(sum));
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) {
            long tail = n4 < n ? popcount_xor(a + i * ld + n4, b + j * ld + n4, n - n4) : 0;
            store_tile(c, ldc, i, j, tile[i * NR + j] + tail, first);
        }
}

#else

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

#endif

/* sum_p 2^p popcount(a_p XOR b) over n words, a_p = a + p * ld, p < 8:
 * the plane kernel. */
#define PLANES 8
#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)

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

#elif defined(__AVX2__)

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

#else

__attribute__((noinline))
static long plane_kernel(const word_t *a, const word_t *b, long ld, long n)
{
    long sum = 0;
    for (int p = 0; p < PLANES; p++)
        sum += popcount_xor(a + p * ld, b, n) << p;
    return sum;
}

#endif

/* The same sums for a tile cut short by the edge of the block. */
static void edge_kernel(const word_t *a, const word_t *b, long ld, long n,
                        int32_t *c, long ldc, long mr, long nr, int first)
{
    for (long i = 0; i < mr; i++)
        for (long j = 0; j < nr; j++)
            store_tile(c, ldc, (int)i, (int)j, popcount_xor(a + i * ld, b + j * ld, n), first);
}

/* Dot product from a weighted popcount (see "Bit planes" above). */
static inline long dot_product(const gemm_args *g, long weighted_popcount)
{
    return ((1L << g->planes) - 1) * g->k - 2 * weighted_popcount;
}

/* Rows r0 .. r1 - 1 and columns n0 .. n1 - 1 of the output, from the
 * block's weighted popcounts (row-major, NB per row). */
static void epilogue(const gemm_args *g, const int32_t *pop,
                     long r0, long r1, long n0, long n1)
{
    long n_words = (g->n + 63) / 64;
    for (long r = r0; r < r1; r++) {
        const int32_t *p = pop + (r - r0) * NB - n0;
        if (g->threshold == NULL) {
            int32_t *c = (int32_t *)g->out + r * g->n;
            for (long j = n0; j < n1; j++)
                c[j] = (int32_t)dot_product(g, p[j]);
            continue;
        }
        word_t *c = (word_t *)g->out + r * n_words;
        for (long j0 = n0; j0 < n1; j0 += 64) {
            word_t w = 0;
            for (long j = j0; j < n1 && j < j0 + 64; j++)
                w |= (word_t)(dot_product(g, p[j]) >= g->threshold[j]) << (j - j0);
            c[j0 / 64] = w;
        }
    }
}

/* One K slice of a block of the ordinary GEMM: register tiles, then edges. */
static void tile_block(const gemm_args *g, int32_t *pop, long m0, long m1,
                       long n0, long n1, long k0, long kc)
{
    long kw = g->kw;
    int first = k0 == 0;
    for (long i = m0; i < m1; i += MR) {
        const word_t *a = g->a + i * kw + k0;
        for (long j = n0; j < n1; j += NR) {
            const word_t *b = g->b + j * kw + k0;
            int32_t *c = pop + (i - m0) * NB + (j - n0);
            if (i + MR <= m1 && j + NR <= n1)
                micro_kernel(a, b, kw, kc, c, NB, first);
            else
                edge_kernel(a, b, kw, kc, c, NB,
                            m1 - i < MR ? m1 - i : MR,
                            n1 - j < NR ? n1 - j : NR, first);
        }
    }
}

/* One K slice of a block over bit planes: one plane kernel per output. */
static void plane_block(const gemm_args *g, int32_t *pop, long m0, long m1,
                        long n0, long n1, long k0, long kc)
{
    long kw = g->kw;
    for (long i = m0; i < m1; i += PLANES)
        for (long j = n0; j < n1; j++) {
            long s = plane_kernel(g->a + i * kw + k0, g->b + j * kw + k0, kw, kc);
            int32_t *c = pop + (i - m0) / PLANES * NB + (j - n0);
            *c = (int32_t)(k0 == 0 ? s : *c + s);
        }
}

static void gemm_task(const void *ctx, long task)
{
    const gemm_args *g = (const gemm_args *)ctx;
    int32_t pop[MB * NB];
    long m0 = (task % g->m_blocks) * MB, n0 = (task / g->m_blocks) * NB;
    long m1 = m0 + MB < g->m ? m0 + MB : g->m;
    long n1 = n0 + NB < g->n ? n0 + NB : g->n;

    for (long k0 = 0; k0 < g->kw; k0 += KC) {
        long kc = k0 + KC < g->kw ? KC : g->kw - k0;
        if (g->planes == 1)
            tile_block(g, pop, m0, m1, n0, n1, k0, kc);
        else
            plane_block(g, pop, m0, m1, n0, n1, k0, kc);
    }
    epilogue(g, pop, m0 / g->planes, m1 / g->planes, n0, n1);
}

/*
 * a: (m * planes) x kw words, b: n x kw words, both packed along K.
 * threshold == NULL: out is m x n int32 dot products;
 * otherwise out is m x ceil(n / 64) words of packed activations.
 * planes is 1 or 8 (checked by the caller).
 */
void bnn_xnor_gemm(const word_t *a, const word_t *b, long m, long n, long k,
                   long planes, const int32_t *threshold, void *out, int n_threads)
{
    gemm_args g = {a, b, threshold, out, m * planes, n, k, (k + 63) / 64, planes,
                   (m * planes + MB - 1) / MB};
    long n_tasks = g.m_blocks * ((n + NB - 1) / NB);
    if (m == 0 || n == 0)
        return;
    run_parallel(gemm_task, &g, n_tasks, n_threads);
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

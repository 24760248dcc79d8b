/*
 * kernels/xnor_gemm_tc.cu -- BinaryNet's XNOR GEMM on the tensor cores'
 * 1-bit matrix instruction (Courbariaux et al. 2016, section "Run-time").
 *
 *   c[i][j] = K - 2 * popcount(a_i XOR b_j)   (the dot product of two +-1 rows)
 *           = K - 2 |a_i| - 2 |b_j| + 4 popcount(a_i AND b_j),
 * |x| the popcount of a whole row.
 *
 * Operands as in xnor_gemm.cu: a is M x KW and b is N x KW 64-bit words,
 * element k in bit k % 64 of word k / 64, unused bits 0 in both (they add
 * nothing to either form).
 *
 * The instruction: mma.sync m16n8k256 .b1 .and.popc adds popcount(a AND b)
 * over 256 bits for a 16 x 8 tile of c in one warp-wide step (compute
 * capability 8.0 and up).  Why AND and not XOR: for Hopper (sm_90) ptxas
 * turns each .xor.popc into a call to a subroutine of two AND instructions
 * and register moves (seen in its SASS).  The row popcounts |a_i| and
 * |b_j| come almost free: each thread counts the words it copies from
 * global memory (its rows stay the same at every stage).  Fragments, per
 * lane (g = lane / 4, t = lane % 4), each register 32 bits of K:
 *   A: rows g and g + 8, 32-bit pieces t and 4 + t of the 256 bits;
 *   B: column g, pieces t and 4 + t;
 *   C: rows g and g + 8, columns 2 t and 2 t + 1.
 * A and B take the same pieces of K, so the order of bits inside a piece
 * does not matter: each lane reads its pieces as plain 32-bit halves of our
 * little-endian words.
 *
 * Design:
 *   - block tile 128 x 128 of c, 8 warps as 2 x 4, each warp 64 x 32
 *     (4 x 4 instructions, 64 accumulators a lane);
 *   - K in stages of BKW = 8 words (512 bits, two instructions deep) in
 *     shared memory, double-buffered: the global loads of the next stage
 *     are issued before the current one is multiplied and stored after it,
 *     so one barrier per stage suffices;
 *   - shared rows padded to 10 words (20 32-bit banks): the 8 rows x 4
 *     pieces of one fragment load fall in 8 x 20 mod 32 = {0, 20, 8, 28, 16,
 *     4, 24, 12} plus 0..3, all 32 banks once, so no bank conflicts;
 *   - tails: words, rows and columns past the edge are loaded as 0 (a zero
 *     word in both operands counts nothing) and results past the edge of c
 *     are not stored, so M, N and K are arbitrary;
 *   - two blocks per multiprocessor (launch bounds): 128 registers a
 *     thread, no spills (ptxas gives 158 otherwise, one block); at 8192^3
 *     on an H200, 0.60 ms against 0.74 ms with one block.
 * Launch: grid (ceil(N / 128), ceil(M / 128)), block 256.
 */
#define BM 128
#define BN 128
#define BKW 8                        /* words of K per stage */
#define LDW (BKW + 2)                /* padded shared row, in words */
#define WARPS_N 4
#define THREADS 256
#define MT 4                         /* 16-row tiles per warp */
#define NT 4                         /* 8-column tiles per warp */
#define LOADS (BM * BKW / THREADS)   /* words per thread per operand per stage */

typedef unsigned long long word_t;

/* Words [k0, k0 + BKW) of rows r0.. r0 + BM - 1 of x (rows x kw), 0 past the edges. */
__device__ __forceinline__ void load_stage(word_t *reg, const word_t *__restrict__ x,
                                           int rows, int kw, int r0, int k0)
{
#pragma unroll
    for (int i = 0; i < LOADS; i++) {
        const int e = threadIdx.x + i * THREADS, row = r0 + e / BKW, w = k0 + e % BKW;
        reg[i] = (row < rows && w < kw) ? x[(long long)row * kw + w] : 0ull;
    }
}

__device__ __forceinline__ void store_stage(word_t (*s)[LDW], const word_t *reg)
{
#pragma unroll
    for (int i = 0; i < LOADS; i++) {
        const int e = threadIdx.x + i * THREADS;
        s[e / BKW][e % BKW] = reg[i];
    }
}

/* Adds the popcounts of the words a thread copies: its rows are e / BKW =
 * threadIdx.x / BKW + i * THREADS / BKW at every stage. */
__device__ __forceinline__ void count_stage(int *count, const word_t *reg)
{
#pragma unroll
    for (int i = 0; i < LOADS; i++)
        count[i] += __popcll(reg[i]);
}

/* The row popcounts of one operand's tile into s[BM]: the BKW threads of a
 * row are BKW neighbouring lanes of one warp. */
__device__ __forceinline__ void sum_rows(int *s, int *count)
{
#pragma unroll
    for (int i = 0; i < LOADS; i++) {
#pragma unroll
        for (int lanes = BKW / 2; lanes > 0; lanes /= 2)
            count[i] += __shfl_xor_sync(0xffffffffu, count[i], lanes);
        if (threadIdx.x % BKW == 0)
            s[threadIdx.x / BKW + i * (THREADS / BKW)] = count[i];
    }
}

__device__ __forceinline__ void mma_and_popc(int *d, const unsigned *a, const unsigned *b)
{
    asm volatile(
        "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

extern "C" __global__ void __launch_bounds__(THREADS, 2)
xnor_gemm_tc(const word_t *__restrict__ a, const word_t *__restrict__ b,
             int *__restrict__ c, int m, int n, int k)
{
    __shared__ __align__(16) word_t sa[2][BM][LDW];
    __shared__ __align__(16) word_t sb[2][BN][LDW];
    __shared__ int pop_a[BM], pop_b[BN];

    const int kw = (k + 63) / 64;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane / 4, t = lane % 4;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int wm0 = (warp / WARPS_N) * (MT * 16), wn0 = (warp % WARPS_N) * (NT * 8);
    int acc[MT][NT][4] = {};
    int count_a[LOADS] = {}, count_b[LOADS] = {};
    word_t ra[LOADS], rb[LOADS];

    load_stage(ra, a, m, kw, m0, 0);
    load_stage(rb, b, n, kw, n0, 0);
    count_stage(count_a, ra);
    count_stage(count_b, rb);
    store_stage(sa[0], ra);
    store_stage(sb[0], rb);
    __syncthreads();

    for (int k0 = 0, buf = 0; k0 < kw; k0 += BKW, buf ^= 1) {
        const bool more = k0 + BKW < kw;
        if (more) {
            load_stage(ra, a, m, kw, m0, k0 + BKW);
            load_stage(rb, b, n, kw, n0, k0 + BKW);
            count_stage(count_a, ra);
            count_stage(count_b, rb);
        }
        /* the stage as 32-bit pieces: row r, piece p at [r * 2 LDW + p] */
        const unsigned *pa = (const unsigned *)sa[buf], *pb = (const unsigned *)sb[buf];
#pragma unroll
        for (int step = 0; step < BKW / 4; step++) {
            const int p = 8 * step + t;
            unsigned fa[MT][4], fb[NT][2];
#pragma unroll
            for (int i = 0; i < MT; i++) {
                const int r = wm0 + 16 * i + g;
                fa[i][0] = pa[r * 2 * LDW + p];
                fa[i][1] = pa[(r + 8) * 2 * LDW + p];
                fa[i][2] = pa[r * 2 * LDW + p + 4];
                fa[i][3] = pa[(r + 8) * 2 * LDW + p + 4];
            }
#pragma unroll
            for (int j = 0; j < NT; j++) {
                const int r = wn0 + 8 * j + g;
                fb[j][0] = pb[r * 2 * LDW + p];
                fb[j][1] = pb[r * 2 * LDW + p + 4];
            }
#pragma unroll
            for (int i = 0; i < MT; i++)
#pragma unroll
                for (int j = 0; j < NT; j++)
                    mma_and_popc(acc[i][j], fa[i], fb[j]);
        }
        if (more) {
            store_stage(sa[buf ^ 1], ra);
            store_stage(sb[buf ^ 1], rb);
        }
        __syncthreads();
    }
    sum_rows(pop_a, count_a);
    sum_rows(pop_b, count_b);
    __syncthreads();

#pragma unroll
    for (int i = 0; i < MT; i++)
#pragma unroll
        for (int j = 0; j < NT; j++)
#pragma unroll
            for (int q = 0; q < 4; q++) {
                const int r = wm0 + 16 * i + g + 8 * (q / 2), s = wn0 + 8 * j + 2 * t + q % 2;
                if (m0 + r < m && n0 + s < n)
                    c[(long long)(m0 + r) * n + n0 + s] =
                        k - 2 * (pop_a[r] + pop_b[s]) + 4 * acc[i][j][q];
            }
}

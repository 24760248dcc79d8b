/*
 * kernels/xnor_gemm.cu -- BinaryNet's XNOR GEMM on the GPU
 * (Courbariaux et al. 2016, section "Run-time").
 *
 *   c[i][j] = K - 2 * popcount(a_i XOR b_j)   (the dot product of two +-1 rows)
 *
 * Operands are packed along K as on the CPU (kernels/xnor_cpu.c): a is M x KW
 * and b is N x KW 64-bit words, KW = ceil(K / 64), element k in bit k % 64 of
 * word k / 64, bit set for +1; the unused bits of the last word are 0 in both
 * operands, so they never count and K needs no rounding.
 *
 * Design, against the reference kernel (16 x 16 threads, one output each,
 * 32-bit __popc, K a multiple of 512):
 *   - block tile: a 64 x 64 block of c per 16 x 16 threads;
 *   - register tiling: each thread keeps 4 x 4 popcount sums, for rows
 *     ty + 16 i and columns tx + 16 j, so each word read from shared memory
 *     is used four times;
 *   - K is walked in slices of BKW = 8 words (512 bits) staged in shared
 *     memory; the global reads of a slice are 64-byte runs of one row;
 *   - shared rows are padded to BKW + 1 words: the 16 threads of a half warp
 *     read 16 different rows of sb at a stride of 9 words, which falls in 16
 *     different 8-byte banks (9 is odd), and the rows of sa they read are
 *     the same for all of them (a broadcast), so the inner loop has no bank
 *     conflicts;
 *   - 64-bit words and __popcll: one popcount instruction pair per 64 bits;
 *   - tails: words, rows and columns past the edge are loaded as 0 (a zero
 *     word of both operands adds nothing) and the results past the edge of c
 *     are not stored, so M, N and K are arbitrary.
 * Launch: grid (ceil(N / 64), ceil(M / 64)), block (16, 16).
 */
#define BM 64
#define BN 64
#define BKW 8
#define THREADS 16
#define TM (BM / THREADS)
#define TN (BN / THREADS)

typedef unsigned long long word_t;

extern "C" __global__ void __launch_bounds__(THREADS * THREADS)
xnor_gemm(const word_t *__restrict__ a, const word_t *__restrict__ b,
          int *__restrict__ c, int m, int n, int k)
{
    __shared__ word_t sa[BM][BKW + 1];
    __shared__ word_t sb[BN][BKW + 1];

    const int kw = (k + 63) / 64;
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int tid = ty * THREADS + tx;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    int pop[TM][TN] = {};

    for (int k0 = 0; k0 < kw; k0 += BKW) {
        for (int e = tid; e < BM * BKW; e += THREADS * THREADS) {
            const int row = e / BKW, w = e % BKW, gw = k0 + w;
            const int ra = m0 + row, rb = n0 + row;
            sa[row][w] = (ra < m && gw < kw) ? a[(long long)ra * kw + gw] : 0ull;
            sb[row][w] = (rb < n && gw < kw) ? b[(long long)rb * kw + gw] : 0ull;
        }
        __syncthreads();
#pragma unroll
        for (int w = 0; w < BKW; w++) {
            word_t av[TM], bv[TN];
#pragma unroll
            for (int i = 0; i < TM; i++)
                av[i] = sa[ty + THREADS * i][w];
#pragma unroll
            for (int j = 0; j < TN; j++)
                bv[j] = sb[tx + THREADS * j][w];
#pragma unroll
            for (int i = 0; i < TM; i++)
#pragma unroll
                for (int j = 0; j < TN; j++)
                    pop[i][j] += __popcll(av[i] ^ bv[j]);
        }
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < TM; i++)
#pragma unroll
        for (int j = 0; j < TN; j++) {
            const int row = m0 + ty + THREADS * i, col = n0 + tx + THREADS * j;
            if (row < m && col < n)
                c[(long long)row * n + col] = k - 2 * pop[i][j];
        }
}

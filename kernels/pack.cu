/*
 * kernels/pack.cu -- BinaryNet's packing on the GPU: signs, thresholds and
 * bit planes into 64-bit words (the layout of binary_ops.py's module doc:
 * element k in bit k % 64 of word k / 64, bit set for +1, unused bits 0).
 *
 * Design: one warp per output word.  Lane i reads elements 64 w + i and
 * 64 w + 32 + i of its row (two coalesced 128-byte reads for floats), and
 * __ballot_sync gathers the 32 lanes' bits of each half into one register
 * in lane order, which is exactly the packed order; lane 0 stores the word.
 * Tails: lanes past the end of the row vote 0, so the unused bits are 0.
 * The three kernels repeat their few lines of indexing, so each reads on
 * its own.
 * Launch: 8 warps (256 threads) per block, one warp per word of the output
 * (pack_planes: per word of the input rows, each writing 8 planes).
 */
typedef unsigned long long word_t;

#define WARPS 8

/* The word this warp packs, or -1 past the end of the output. */
__device__ __forceinline__ long long warp_word(long long words)
{
    const long long w = (long long)blockIdx.x * WARPS + threadIdx.x / 32;
    return w < words ? w : -1;
}

__device__ __forceinline__ word_t ballot_word(bool lo, bool hi)
{
    const unsigned l = __ballot_sync(0xffffffffu, lo), h = __ballot_sync(0xffffffffu, hi);
    return (word_t)h << 32 | l;
}

/* out (rows x kw) = the signs of x (rows x k, float32): bit set where x >= 0,
 * as binary_net.sign reads sign(0) = +1 (and a NaN as -1). */
extern "C" __global__ void pack_signs(const float *__restrict__ x, word_t *__restrict__ out,
                                      int rows, int k)
{
    const int kw = (k + 63) / 64, lane = threadIdx.x % 32;
    const long long w = warp_word((long long)rows * kw);
    if (w < 0)
        return;
    const long long row = w / kw;
    const int c = (int)(w % kw) * 64 + lane;
    const float *r = x + row * k;
    const word_t word = ballot_word(c < k && r[c] >= 0.0f, c + 32 < k && r[c + 32] >= 0.0f);
    if (lane == 0)
        out[w] = word;
}

/* out (rows x nw) = the next layer's packed input from the accumulators d
 * (rows x n, int32): bit set where d reaches its unit's threshold. */
extern "C" __global__ void fire(const int *__restrict__ d, const int *__restrict__ threshold,
                                word_t *__restrict__ out, int rows, int n)
{
    const int nw = (n + 63) / 64, lane = threadIdx.x % 32;
    const long long w = warp_word((long long)rows * nw);
    if (w < 0)
        return;
    const long long row = w / nw;
    const int c = (int)(w % nw) * 64 + lane;
    const int *r = d + row * n;
    const word_t word = ballot_word(c < n && r[c] >= threshold[c],
                                    c + 32 < n && r[c + 32] >= threshold[c + 32]);
    if (lane == 0)
        out[w] = word;
}

/* out (8 rows x kw) = the 8 bit planes of uint8 rows (rows x k): row 8 i + p
 * holds bit p of row i's pixels.  A warp reads its 64 pixels once and
 * votes 8 times. */
extern "C" __global__ void pack_planes(const unsigned char *__restrict__ pixels,
                                       word_t *__restrict__ out, int rows, int k)
{
    const int kw = (k + 63) / 64, lane = threadIdx.x % 32;
    const long long w = warp_word((long long)rows * kw);
    if (w < 0)
        return;
    const long long row = w / kw;
    const int c = (int)(w % kw) * 64 + lane;
    const unsigned char *r = pixels + row * k;
    const unsigned lo = c < k ? r[c] : 0u, hi = c + 32 < k ? r[c + 32] : 0u;
#pragma unroll
    for (int p = 0; p < 8; p++) {
        const word_t word = ballot_word(lo >> p & 1u, hi >> p & 1u);
        if (lane == 0)
            out[(8 * row + p) * kw + w % kw] = word;
    }
}

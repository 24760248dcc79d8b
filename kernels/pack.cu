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
 * Launch: 8 warps (256 threads) per block, one warp per word of the output
 * (pack_planes: per word of the input rows, each writing 8 planes).
 */
typedef unsigned long long word_t;

#define WARPS 8

/* Where this warp works: output word w (of rows x kw words), its row, and
 * the element c of that row that this lane reads first (then c + 32).
 * Every lane of a warp has the same w, so a warp leaves as a whole. */
struct slot {
    long long w, row;
    int kw, c;
};

/* This warp's slot over rows of k elements; false past the last word. */
__device__ __forceinline__ bool warp_slot(int rows, int k, slot *s)
{
    s->kw = (k + 63) / 64;
    s->w = (long long)blockIdx.x * WARPS + threadIdx.x / 32;
    if (s->w >= (long long)rows * s->kw)
        return false;
    s->row = s->w / s->kw;
    s->c = (int)(s->w % s->kw) * 64 + threadIdx.x % 32;
    return true;
}

__device__ __forceinline__ word_t ballot_word(bool lo, bool hi)
{
    const unsigned l = __ballot_sync(0xffffffffu, lo), h = __ballot_sync(0xffffffffu, hi);
    return (word_t)h << 32 | l;
}

__device__ __forceinline__ bool first_lane(void)
{
    return threadIdx.x % 32 == 0;
}

/* out (rows x kw) = the signs of x (rows x k, float32): bit set where x >= 0,
 * as binary_net.sign reads sign(0) = +1 (and a NaN as -1). */
extern "C" __global__ void pack_signs(const float *__restrict__ x, word_t *__restrict__ out,
                                      int rows, int k)
{
    slot s;
    if (!warp_slot(rows, k, &s))
        return;
    const float *r = x + s.row * k;
    const word_t word = ballot_word(s.c < k && r[s.c] >= 0.0f,
                                    s.c + 32 < k && r[s.c + 32] >= 0.0f);
    if (first_lane())
        out[s.w] = word;
}

/* out (rows x nw) = the next layer's packed input from the accumulators d
 * (rows x n, int32): bit set where d reaches its unit's threshold. */
extern "C" __global__ void fire(const int *__restrict__ d, const int *__restrict__ threshold,
                                word_t *__restrict__ out, int rows, int n)
{
    slot s;
    if (!warp_slot(rows, n, &s))
        return;
    const int *r = d + s.row * n;
    const word_t word = ballot_word(s.c < n && r[s.c] >= threshold[s.c],
                                    s.c + 32 < n && r[s.c + 32] >= threshold[s.c + 32]);
    if (first_lane())
        out[s.w] = word;
}

/* out (8 rows x kw) = the 8 bit planes of uint8 rows (rows x k): row 8 i + p
 * holds bit p of row i's pixels.  A warp reads its 64 pixels once and
 * votes 8 times. */
extern "C" __global__ void pack_planes(const unsigned char *__restrict__ pixels,
                                       word_t *__restrict__ out, int rows, int k)
{
    slot s;
    if (!warp_slot(rows, k, &s))
        return;
    const unsigned char *r = pixels + s.row * k;
    const unsigned lo = s.c < k ? r[s.c] : 0u, hi = s.c + 32 < k ? r[s.c + 32] : 0u;
#pragma unroll
    for (int p = 0; p < 8; p++) {
        const word_t word = ballot_word(lo >> p & 1u, hi >> p & 1u);
        if (first_lane())
            out[(8 * s.row + p) * s.kw + s.w % s.kw] = word;
    }
}

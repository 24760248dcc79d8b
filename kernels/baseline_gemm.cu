/*
 * kernels/baseline_gemm.cu -- the unoptimized float32 GEMM the paper compares
 * its XNOR kernel with: c = a . b, a M x K, b K x N, row-major.
 *
 * Design (the textbook shared-memory GEMM, as in the reference code):
 *   - one thread per output, 16 x 16 threads per block;
 *   - K is walked in 16-wide slices: each thread copies one element of a and
 *     one of b into shared memory, the block synchronizes, and every thread
 *     adds 16 products from the two tiles;
 *   - tails: elements past the edges are loaded as 0 and outputs past the
 *     edges are not stored, so M, N and K are arbitrary.
 * No register tiling, no vector loads: its speed is the yardstick.
 * Launch: grid (ceil(N / 16), ceil(M / 16)), block (16, 16).
 */
#define TILE 16

extern "C" __global__ void
baseline_gemm(const float *__restrict__ a, const float *__restrict__ b,
              float *__restrict__ c, int m, int n, int k)
{
    __shared__ float sa[TILE][TILE];
    __shared__ float sb[TILE][TILE];

    const int tx = threadIdx.x, ty = threadIdx.y;
    const int row = blockIdx.y * TILE + ty, col = blockIdx.x * TILE + tx;
    float sum = 0.0f;

    for (int k0 = 0; k0 < k; k0 += TILE) {
        sa[ty][tx] = (row < m && k0 + tx < k) ? a[(long long)row * k + k0 + tx] : 0.0f;
        sb[ty][tx] = (k0 + ty < k && col < n) ? b[(long long)(k0 + ty) * n + col] : 0.0f;
        __syncthreads();
        for (int p = 0; p < TILE; p++)
            sum += sa[ty][p] * sb[p][tx];
        __syncthreads();
    }
    if (row < m && col < n)
        c[(long long)row * n + col] = sum;
}

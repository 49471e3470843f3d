/* Kernels that test the emulator itself (tests/emulator.rs): what it must refuse, and what
   CUDA's semantics say a block's barriers, shuffles and shared memory give. */

/* Lane 0 of each warp waits at the block's barrier while the others wait at the warp's: on a
   GPU this hangs; the emulator reports a deadlock. */
extern "C" __global__ void emu_selftest_deadlock(int *out) {
    if ((threadIdx.x & 31) == 0)
        __syncthreads();
    else
        __syncwarp();
    out[threadIdx.x] = 1;
}

/* Lanes 0..15 read lanes 16..31, which have returned: undefined on a GPU, an error here. */
extern "C" __global__ void emu_selftest_exited_lane(float *out) {
    if (threadIdx.x >= 16) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (float)threadIdx.x, 16);
}

/* out[t] = the value of lane (t ^ mask) of t's warp. */
extern "C" __global__ void emu_selftest_shuffle(unsigned int *out, const int mask) {
    const unsigned int t = blockIdx.x * blockDim.x + threadIdx.x;
    out[t] = __shfl_xor_sync(0xffffffffu, t, mask);
}

/* Each block's values summed by thread 0 through shared memory, after a barrier; threads
   past n (a block's tail) return early, before the barrier, which must still complete. */
extern "C" __global__ void emu_selftest_block_sums(const float *x, float *out,
                                                   const unsigned int n) {
    __shared__ float sh[1024];
    const unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    sh[threadIdx.x] = 0.0f;
    __syncthreads();
    if (i >= n) return;
    sh[threadIdx.x] = x[i];
    __syncthreads();
    if (threadIdx.x == 0) {
        float s = 0.0f;
        for (unsigned int k = 0; k < blockDim.x; ++k) s += sh[k];
        out[blockIdx.x] = s;
    }
}

/* The f16 conversions the kernels' ld/st use: h[i] = x[i] rounded, back[i] = h[i] widened. */
extern "C" __global__ void emu_selftest_f16(const float *x, unsigned short *h, float *back,
                                            const unsigned int n) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += blockDim.x * gridDim.x) {
        h[i] = clipcid_emu::f32_to_f16(x[i]);
        back[i] = clipcid_emu::f16_to_f32(h[i]);
    }
}

/* A grid of (2, 3, 2) blocks of (4, 2, 2) threads: each thread writes its coordinates. */
extern "C" __global__ void emu_selftest_coordinates(unsigned int *out) {
    const unsigned int block = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    const unsigned int thread = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
    unsigned int *o = out + 6 * (block * blockDim.x * blockDim.y * blockDim.z + thread);
    o[0] = blockIdx.x;
    o[1] = blockIdx.y;
    o[2] = blockIdx.z;
    o[3] = threadIdx.x;
    o[4] = threadIdx.y;
    o[5] = threadIdx.z;
}

/* out[i] = the value the next thread of the block put in shared memory: with the barrier a
   function of the launch alone; without it, a race whose result depends on the order the
   threads run in. */
extern "C" __global__ void emu_selftest_neighbour(float *out, const int barrier) {
    __shared__ float sh[1024];
    sh[threadIdx.x] = (float)(blockIdx.x * 1000 + threadIdx.x);
    if (barrier) __syncthreads();
    out[blockIdx.x * blockDim.x + threadIdx.x] = sh[(threadIdx.x + 1) % blockDim.x];
}

/* CUDA's execution model on the CPU, for clipcid's kernel sources in tests.

   Included before a kernel source (prelude.cuh, then kernels.cu or tensor_core.cu), it gives
   the names those sources use: `threadIdx` and friends, `__syncthreads`, `__syncwarp`,
   `__shfl_xor_sync`, shared memory, the `__f*_rn` intrinsics, and C++ stand-ins for the
   two pieces of PTX assembly (f16 conversion, bf16 `mma.sync`). A launch (emulator.cpp) runs
   the blocks one after another and the threads of a block as cooperative fibers on the
   calling thread: a thread runs until it reaches a barrier or a shuffle, then the next one,
   so a block's barriers, warp shuffles and shared memory behave as CUDA says they do.

   What it is for: catching wrong indexing, wrong table layouts, missing barriers that a
   round-robin order exposes, reads of lanes that have exited, and deadlocks, before a GPU
   ever runs the code. What it is not: a timing model, or a check of races that only a GPU's
   real interleaving shows (threads here switch only at barriers and shuffles). */
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#define CLIPCID_EMULATOR 1

#define __device__
#ifdef CLIPCID_EMU_SCAN
/* The build script's first pass: marks each kernel so that it can list their names. */
#define __global__ clipcid_emu_kernel_mark
#else
#define __global__
#endif
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__
/* Blocks run one at a time, so a function's static variable is the running block's shared
   memory (one per template instance, as in CUDA). */
#define __shared__ static

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
};
struct float4 {
    float x, y, z, w;
};
struct alignas(16) uint4 {
    unsigned int x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) {
    return uint4{x, y, z, w};
}

namespace clipcid_emu {

/* The running thread's coordinates (set by the scheduler before it resumes a thread). */
extern uint3 thread_idx;
extern uint3 block_idx;
extern dim3 block_dim;
extern dim3 grid_dim;

/* The launch's dynamic shared memory (at most this many bytes; an H200 gives 227 KiB). */
constexpr std::size_t DYNAMIC_SHARED_BYTES = 232448;
extern unsigned char dynamic_shared[DYNAMIC_SHARED_BYTES];

/* `__syncthreads`: every thread of the block that has not exited. */
void sync_block();
/* `__syncwarp`: every thread of the running thread's warp that has not exited. */
void sync_warp();
/* `__shfl_xor_sync` on 32 bits: the value of lane (lane ^ mask) of the running warp. */
std::uint32_t shfl_xor_bits(std::uint32_t bits, int lane_mask);

/* PTX's cvt.f32.f16 and cvt.rn.f16.f32 (nearest-even; out of range: infinity). */
float f16_to_f32(unsigned short h);
unsigned short f32_to_f16(float f);

/* mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, c += a b, warp-wide: a 16x16 a in
   each lane's four registers, a 16x8 b in two, c 16x8 in four (the PTX ISA's fragments). */
void mma_m16n8k16_bf16(float c[4], const unsigned int a[4], unsigned int b0, unsigned int b1);

} // namespace clipcid_emu

#define threadIdx clipcid_emu::thread_idx
#define blockIdx clipcid_emu::block_idx
#define blockDim clipcid_emu::block_dim
#define gridDim clipcid_emu::grid_dim
#define CLIPCID_DYNAMIC_SHARED(T, name)                                                        \
    static T *const name = reinterpret_cast<T *>(clipcid_emu::dynamic_shared)

inline void __syncthreads() { clipcid_emu::sync_block(); }
inline void __syncwarp(unsigned int = 0xffffffffu) { clipcid_emu::sync_warp(); }

template <typename T> inline T __shfl_xor_sync(unsigned int, T v, int lane_mask) {
    static_assert(sizeof(T) == 4, "the emulator shuffles 32-bit values");
    std::uint32_t bits;
    std::memcpy(&bits, &v, 4);
    bits = clipcid_emu::shfl_xor_bits(bits, lane_mask);
    std::memcpy(&v, &bits, 4);
    return v;
}

inline float __uint_as_float(unsigned int u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline unsigned int __float_as_uint(float f) {
    unsigned int u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline int __float_as_int(float f) {
    int i;
    std::memcpy(&i, &f, 4);
    return i;
}
/* IEEE single-precision operations, each rounded (the build passes -ffp-contract=off, so no
   fused multiply-adds, and SSE arithmetic, so no wider intermediates). */
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

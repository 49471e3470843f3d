/* What both of clipcid's CUDA kernel sources begin with (NVRTC compiles each as one text:
   this, then kernels.cu or tensor_core.cu). Under CLIPCID_EMULATOR (clipcid-cuda-emulator,
   which runs these sources on the CPU in tests) the PTX assembly has C++ stand-ins. */
typedef unsigned short bf16_t;
__device__ __forceinline__ float ld(float v) { return v; }
__device__ __forceinline__ float ld(bf16_t v) { return __uint_as_float(((unsigned int)v) << 16); }
/* v's bf16 bits, rounded to nearest-even (NaN stays NaN). */
__device__ __forceinline__ unsigned int bf16_bits(float v) {
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
    u += 0x7fffu + ((u >> 16) & 1u);
    return u >> 16;
}
__device__ __forceinline__ void st(float *p, float v) { *p = v; }
__device__ __forceinline__ void st(bf16_t *p, float v) { *p = (bf16_t)bf16_bits(v); }
/* f16 values as a struct of their 16 bits (a type of its own, told apart from bf16_t by the
   overloads), converted by PTX's cvt (rounded to nearest-even; out of range: infinity). */
struct f16_t { unsigned short bits; };
#ifndef CLIPCID_EMULATOR
__device__ __forceinline__ float ld(f16_t v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
}
__device__ __forceinline__ void st(f16_t *p, float v) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    p->bits = h;
}
/* A kernel's dynamic shared memory (the launch's size), as an array of T. */
#define CLIPCID_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#else
/* clipcid-cuda-emulator (tests on the CPU): the same conversions in C++, and its own
   dynamic shared memory. */
__device__ __forceinline__ float ld(f16_t v) { return clipcid_emu::f16_to_f32(v.bits); }
__device__ __forceinline__ void st(f16_t *p, float v) { p->bits = clipcid_emu::f32_to_f16(v); }
#endif

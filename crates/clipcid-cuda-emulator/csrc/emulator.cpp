/* The emulator's launch: blocks in order, a block's threads as cooperative fibers (ucontext)
   on the calling thread, switched at barriers and shuffles. See cuda_emulator.h. */
#include "cuda_emulator.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <cstdio>
#include <mutex>
#include <string>
#include <vector>

namespace clipcid_emu {

uint3 thread_idx;
uint3 block_idx;
dim3 block_dim;
dim3 grid_dim;
alignas(16) unsigned char dynamic_shared[DYNAMIC_SHARED_BYTES];

namespace {

/* Each thread's stack. Kernels keep small arrays in registers (at most a few KiB here). */
constexpr std::size_t STACK_BYTES = 256 * 1024;
constexpr unsigned int MAX_THREADS = 1024;

struct Barrier {
    unsigned int arrived = 0;
    unsigned long long generation = 0;
};

struct Fiber {
    ucontext_t context;
    uint3 index;
    unsigned int linear = 0;
    bool done = false;
    /* Waiting at a barrier: resumable once *waiting_on differs from waited_at. */
    const unsigned long long *waiting_on = nullptr;
    unsigned long long waited_at = 0;
};

struct MmaFragments {
    unsigned int a[4];
    unsigned int b[2];
};

std::mutex launch_lock;
ucontext_t scheduler;
std::vector<Fiber> fibers;
Fiber *current = nullptr;
unsigned int threads = 0;
Barrier block_barrier;
unsigned int block_live = 0;
std::vector<Barrier> warp_barriers;
std::vector<unsigned int> warp_live;
std::vector<std::uint32_t> shuffle_slots;
std::vector<MmaFragments> mma_slots;
unsigned char *stacks = nullptr;
std::string failure;
void (*running_kernel)(void **) = nullptr;
/* Run blocks, and a block's threads, last first (see clipcid_emu_launch). */
bool reversed = false;
void **running_args = nullptr;

void fail(const std::string &what) {
    if (failure.empty()) {
        char where[96];
        std::snprintf(where, sizeof where, " (block (%u, %u, %u), thread (%u, %u, %u))",
                      block_idx.x, block_idx.y, block_idx.z, thread_idx.x, thread_idx.y,
                      thread_idx.z);
        failure = what + where;
    }
}

/* Back to the scheduler until the barrier's generation moves on. */
void wait_for(const Barrier &b, unsigned long long generation) {
    current->waiting_on = &b.generation;
    current->waited_at = generation;
    swapcontext(&current->context, &scheduler);
}

void release_if_complete(Barrier &b, unsigned int live) {
    if (b.arrived > 0 && b.arrived >= live) {
        b.arrived = 0;
        ++b.generation;
    }
}

/* The running thread arrives at `b`: the last of `live` threads to arrive releases the
   others; every other waits until then. */
void arrive(Barrier &b, const unsigned int &live) {
    const unsigned long long generation = b.generation;
    ++b.arrived;
    release_if_complete(b, live);
    if (b.generation == generation) wait_for(b, generation);
}

void fiber_main() {
    running_kernel(running_args);
    Fiber *f = current;
    f->done = true;
    --block_live;
    const unsigned int w = f->linear >> 5;
    --warp_live[w];
    /* An exited thread no longer counts at barriers (as on GPUs since Volta). */
    release_if_complete(block_barrier, block_live);
    release_if_complete(warp_barriers[w], warp_live[w]);
    /* Returning resumes uc_link: the scheduler. */
}

bool runnable(const Fiber &f) {
    return !f.done && (f.waiting_on == nullptr || *f.waiting_on != f.waited_at);
}

/* One block to the end; false (with `failure` set) on a deadlock. */
bool run_block() {
    const unsigned int warps = (threads + 31) / 32;
    block_barrier = Barrier{};
    block_live = threads;
    warp_barriers.assign(warps, Barrier{});
    warp_live.assign(warps, 32);
    if (threads % 32 != 0) warp_live[warps - 1] = threads % 32;
    for (unsigned int t = 0; t < threads; ++t) {
        Fiber &f = fibers[t];
        f.linear = t;
        f.index = uint3{t % block_dim.x, (t / block_dim.x) % block_dim.y,
                        t / (block_dim.x * block_dim.y)};
        f.done = false;
        f.waiting_on = nullptr;
        getcontext(&f.context);
        f.context.uc_stack.ss_sp = stacks + static_cast<std::size_t>(t) * STACK_BYTES;
        f.context.uc_stack.ss_size = STACK_BYTES;
        f.context.uc_link = &scheduler;
        makecontext(&f.context, fiber_main, 0);
    }
    unsigned int finished = 0;
    while (finished < threads) {
        bool progressed = false;
        for (unsigned int k = 0; k < threads; ++k) {
            Fiber &f = fibers[reversed ? threads - 1 - k : k];
            if (!runnable(f)) continue;
            f.waiting_on = nullptr;
            current = &f;
            thread_idx = f.index;
            swapcontext(&scheduler, &f.context);
            progressed = true;
            if (f.done) ++finished;
            if (!failure.empty()) return false;
        }
        if (!progressed) {
            for (unsigned int t = 0; t < threads; ++t)
                if (!fibers[t].done) {
                    thread_idx = fibers[t].index;
                    break;
                }
            fail("deadlock: threads wait at a barrier or shuffle that the block's other "
                 "threads never reach");
            return false;
        }
    }
    return true;
}

} // namespace

void sync_block() { arrive(block_barrier, block_live); }

void sync_warp() {
    const unsigned int w = current->linear >> 5;
    arrive(warp_barriers[w], warp_live[w]);
}

std::uint32_t shfl_xor_bits(std::uint32_t bits, int lane_mask) {
    const unsigned int me = current->linear;
    shuffle_slots[me] = bits;
    sync_warp();
    const unsigned int from = (me & ~31u) | ((me & 31u) ^ (static_cast<unsigned int>(lane_mask) & 31u));
    std::uint32_t got = bits;
    if (from >= threads || fibers[from].done)
        fail("__shfl_xor_sync reads lane " + std::to_string(from & 31u) +
             ", which has exited or is past the block's last thread");
    else
        got = shuffle_slots[from];
    sync_warp();
    return got;
}

float f16_to_f32(unsigned short h) {
    const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
    const std::uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
    if (exponent == 0) {
        const float v = std::ldexp(static_cast<float>(mantissa), -24);
        return sign ? -v : v;
    }
    std::uint32_t bits;
    if (exponent == 31)
        bits = sign | 0x7f800000u | (mantissa << 13);
    else
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    return __uint_as_float(bits);
}

unsigned short f32_to_f16(float f) {
    const std::uint32_t x = __float_as_uint(f);
    const std::uint32_t sign = (x >> 16) & 0x8000u, magnitude = x & 0x7fffffffu;
    if (magnitude > 0x7f800000u) return static_cast<unsigned short>(0x7fffu); /* NaN */
    if (magnitude >= 0x477ff000u) return static_cast<unsigned short>(sign | 0x7c00u);
    if (magnitude < 0x38800000u) {
        /* Below f16's smallest normal: a multiple of 2^-24, rounded to nearest-even (the
           scaling is exact; 1024 is the smallest normal's bits). */
        const float scaled = std::fabs(f) * 16777216.0f;
        return static_cast<unsigned short>(sign | static_cast<std::uint32_t>(std::nearbyint(scaled)));
    }
    const std::uint32_t mantissa = magnitude & 0x7fffffu;
    std::uint32_t h = (((magnitude >> 23) - 112u) << 10) | (mantissa >> 13);
    const std::uint32_t rest = mantissa & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
    return static_cast<unsigned short>(sign | h);
}

void mma_m16n8k16_bf16(float c[4], const unsigned int a[4], unsigned int b0, unsigned int b1) {
    const unsigned int me = current->linear, base = me & ~31u;
    if (base + 32 > threads || warp_live[me >> 5] != 32) {
        fail("mma.sync needs all 32 lanes of the warp");
        return;
    }
    MmaFragments &mine = mma_slots[me];
    for (int i = 0; i < 4; ++i) mine.a[i] = a[i];
    mine.b[0] = b0;
    mine.b[1] = b1;
    sync_warp();
    /* The fragments of the PTX ISA (m16n8k16, .bf16): lane l, g = l / 4, t = l % 4, holds
       a[g][2t..2t+1], a[g+8][2t..], a[g][2t+8..], a[g+8][2t+8..] and b[2t..2t+1][g],
       b[2t+8..2t+9][g]; c[g][2t..2t+1] and c[g+8][2t..2t+1]. Lower index in the low half. */
    float A[16][16], B[16][8];
    auto lo = [](unsigned int r) { return __uint_as_float(r << 16); };
    auto hi = [](unsigned int r) { return __uint_as_float(r & 0xffff0000u); };
    for (unsigned int l = 0; l < 32; ++l) {
        const MmaFragments &s = mma_slots[base + l];
        const unsigned int g = l >> 2, t = l & 3;
        A[g][2 * t] = lo(s.a[0]);
        A[g][2 * t + 1] = hi(s.a[0]);
        A[g + 8][2 * t] = lo(s.a[1]);
        A[g + 8][2 * t + 1] = hi(s.a[1]);
        A[g][2 * t + 8] = lo(s.a[2]);
        A[g][2 * t + 9] = hi(s.a[2]);
        A[g + 8][2 * t + 8] = lo(s.a[3]);
        A[g + 8][2 * t + 9] = hi(s.a[3]);
        B[2 * t][g] = lo(s.b[0]);
        B[2 * t + 1][g] = hi(s.b[0]);
        B[2 * t + 8][g] = lo(s.b[1]);
        B[2 * t + 9][g] = hi(s.b[1]);
    }
    const unsigned int g = (me & 31u) >> 2, t = me & 3u;
    const unsigned int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
    for (int i = 0; i < 4; ++i) {
        /* Exact bf16 products, summed in double, then added to c in f32. */
        double s = 0.0;
        for (int k = 0; k < 16; ++k)
            s += static_cast<double>(A[rows[i]][k]) * static_cast<double>(B[k][cols[i]]);
        c[i] += static_cast<float>(s);
    }
    sync_warp();
}

} // namespace clipcid_emu

using Invoker = void (*)(void **);
extern "C" Invoker clipcid_emu_find_kernels(const char *name);
extern "C" Invoker clipcid_emu_find_tensor_core(const char *name);
extern "C" Invoker clipcid_emu_find_selftest(const char *name);

namespace {
int refuse(char *message, std::size_t len, const std::string &why) {
    if (len > 0) {
        std::snprintf(message, len, "%s", why.c_str());
    }
    return 1;
}
} // namespace

/* Runs kernel `name` over grid x block with `shared_bytes` of dynamic shared memory, its
   arguments as cudaLaunchKernel takes them (args[i] points at parameter i's value). With
   `reverse`, the last block runs first and within a block the last thread is resumed first
   at each turn: a kernel whose threads or blocks race (read what another writes with no
   barrier between) gives other results in the other order. 0 when it ran to the end;
   otherwise 1 and why in `message`. */
extern "C" int clipcid_emu_launch(const char *name, const unsigned int grid[3],
                                  const unsigned int block[3], std::size_t shared_bytes,
                                  int reverse, void **args, char *message,
                                  std::size_t message_len) {
    using namespace clipcid_emu;
    Invoker kernel = clipcid_emu_find_kernels(name);
    if (kernel == nullptr) kernel = clipcid_emu_find_tensor_core(name);
    if (kernel == nullptr) kernel = clipcid_emu_find_selftest(name);
    if (kernel == nullptr) return refuse(message, message_len, std::string("no kernel named ") + name);
    const unsigned long long count =
        static_cast<unsigned long long>(block[0]) * block[1] * block[2];
    if (count == 0 || count > MAX_THREADS)
        return refuse(message, message_len,
                      std::string(name) + ": a block of " + std::to_string(count) +
                          " threads (1 to 1024)");
    if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0)
        return refuse(message, message_len, std::string(name) + ": an empty grid");
    if (shared_bytes > DYNAMIC_SHARED_BYTES)
        return refuse(message, message_len,
                      std::string(name) + ": " + std::to_string(shared_bytes) +
                          " bytes of dynamic shared memory (at most " +
                          std::to_string(DYNAMIC_SHARED_BYTES) + ")");
    std::lock_guard<std::mutex> hold(launch_lock);
    if (stacks == nullptr) {
        void *p = mmap(nullptr, STACK_BYTES * MAX_THREADS, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) return refuse(message, message_len, "no memory for the threads' stacks");
        stacks = static_cast<unsigned char *>(p);
    }
    threads = static_cast<unsigned int>(count);
    fibers.assign(threads, Fiber{});
    shuffle_slots.assign(threads, 0);
    mma_slots.assign(threads, MmaFragments{});
    block_dim = dim3{block[0], block[1], block[2]};
    grid_dim = dim3{grid[0], grid[1], grid[2]};
    running_kernel = kernel;
    running_args = args;
    failure.clear();
    reversed = reverse != 0;
    const unsigned long long blocks = static_cast<unsigned long long>(grid[0]) * grid[1] * grid[2];
    for (unsigned long long k = 0; k < blocks; ++k) {
        const unsigned long long b = reversed ? blocks - 1 - k : k;
        block_idx = uint3{static_cast<unsigned int>(b % grid[0]),
                          static_cast<unsigned int>((b / grid[0]) % grid[1]),
                          static_cast<unsigned int>(b / (static_cast<unsigned long long>(grid[0]) * grid[1]))};
        /* Uninitialised shared memory reads as NaN (all bits set), not as zeros. */
        std::memset(dynamic_shared, 0xff, shared_bytes);
        if (!run_block()) return refuse(message, message_len, std::string(name) + ": " + failure);
    }
    return 0;
}

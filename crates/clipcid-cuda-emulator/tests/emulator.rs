//! The emulator against CUDA's semantics: what it must refuse, and what barriers, shuffles,
//! shared memory, grid coordinates and PTX's f16 conversions give (kernels in
//! `csrc/selftest.cu`).
#![allow(unsafe_code)] // launches of the self-test kernels, each with its arguments checked.

use clipcid_cuda_emulator::{
    launch, launch_in_order, Args, EmulatorError, GuardedBuffer, LaunchConfig, ThreadOrder,
};
use half::f16;
use rand::{Rng, SeedableRng};

fn refused(r: Result<(), EmulatorError>, words: &str) {
    match r {
        Err(EmulatorError::Launch(m)) => assert!(m.contains(words), "{m:?} lacks {words:?}"),
        other => panic!("expected a refusal naming {words:?}, got {other:?}"),
    }
}

#[test]
fn a_barrier_some_threads_never_reach_is_reported_as_a_deadlock() {
    let out = GuardedBuffer::new(&[0i32; 64]);
    let args = Args::new().ptr(out.as_ptr());
    // SAFETY: emu_selftest_deadlock(int *out) writes out[threadIdx.x], 64 threads.
    refused(
        unsafe { launch("emu_selftest_deadlock", LaunchConfig::linear(1, 64), &args) },
        "deadlock",
    );
}

#[test]
fn a_shuffle_from_an_exited_lane_is_an_error() {
    let out = GuardedBuffer::new(&[0f32; 32]);
    let args = Args::new().ptr(out.as_ptr());
    // SAFETY: emu_selftest_exited_lane(float *out) writes out[0..16].
    refused(
        unsafe {
            launch(
                "emu_selftest_exited_lane",
                LaunchConfig::linear(1, 32),
                &args,
            )
        },
        "exited",
    );
}

#[test]
fn bad_launches_are_refused_with_the_reason() {
    let out = GuardedBuffer::new(&[0u32; 4096]);
    let args = Args::new().ptr(out.as_ptr()).i32(1);
    // SAFETY (all three): emu_selftest_shuffle(unsigned *out, int mask) writes out[0..threads]
    // of at most 1,024 threads; none of these launches runs a thread.
    refused(
        unsafe { launch("no_such_kernel", LaunchConfig::linear(1, 32), &args) },
        "no kernel named no_such_kernel",
    );
    refused(
        unsafe { launch("emu_selftest_shuffle", LaunchConfig::linear(1, 1025), &args) },
        "1025 threads",
    );
    refused(
        unsafe { launch("emu_selftest_shuffle", LaunchConfig::linear(0, 32), &args) },
        "empty grid",
    );
    let mut big = LaunchConfig::linear(1, 32);
    big.shared_bytes = 1 << 20;
    refused(
        unsafe { launch("emu_selftest_shuffle", big, &args) },
        "dynamic shared memory",
    );
    // SAFETY: refused before any kernel runs.
    let nul = unsafe { launch("a\0b", LaunchConfig::linear(1, 32), &args) };
    assert!(matches!(nul, Err(EmulatorError::Name(_))), "{nul:?}");
}

#[test]
fn shuffles_exchange_within_each_warp() {
    for mask in [1, 2, 5, 16, 31] {
        let out = GuardedBuffer::new(&[0u32; 128]);
        let args = Args::new().ptr(out.as_ptr()).i32(mask);
        // SAFETY: 2 blocks of 64 threads write out[0..128].
        unsafe { launch("emu_selftest_shuffle", LaunchConfig::linear(2, 64), &args) }
            .expect("launch");
        out.check_guards().expect("guards");
        let want: Vec<u32> = (0..128u32)
            .map(|t| (t & !31) | ((t & 31) ^ mask as u32))
            .collect();
        assert_eq!(out.values(), want, "mask {mask}");
    }
}

#[test]
fn shared_memory_after_a_barrier_holds_every_threads_value_even_with_early_exits() {
    let n = 1000usize;
    let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
    let xs = GuardedBuffer::new(&x);
    let out = GuardedBuffer::new(&[f32::NAN; 4]);
    let args = Args::new().ptr(xs.as_ptr()).ptr(out.as_ptr()).u32(n as u32);
    // SAFETY: 4 blocks of 256 threads read x[0..n] and write out[0..4].
    unsafe {
        launch(
            "emu_selftest_block_sums",
            LaunchConfig::linear(4, 256),
            &args,
        )
    }
    .expect("launch");
    out.check_guards().expect("guards");
    let want: Vec<f32> = x
        .chunks(256)
        .map(|c| {
            let mut padded = c.to_vec();
            padded.resize(256, 0.0);
            padded.iter().fold(0.0f32, |s, v| s + v)
        })
        .collect();
    assert_eq!(out.values(), want);
}

#[test]
fn every_thread_sees_its_own_block_and_thread_coordinates() {
    let (grid, block) = ([2u32, 3, 2], [4u32, 2, 2]);
    let threads = (grid.iter().product::<u32>() * block.iter().product::<u32>()) as usize;
    let out = GuardedBuffer::new(&vec![u32::MAX; 6 * threads]);
    let args = Args::new().ptr(out.as_ptr());
    let config = LaunchConfig {
        grid,
        block,
        shared_bytes: 0,
    };
    // SAFETY: each of the grid's threads writes its six values of out.
    unsafe { launch("emu_selftest_coordinates", config, &args) }.expect("launch");
    out.check_guards().expect("guards");
    let got = out.values();
    let mut k = 0;
    for bz in 0..grid[2] {
        for by in 0..grid[1] {
            for bx in 0..grid[0] {
                for tz in 0..block[2] {
                    for ty in 0..block[1] {
                        for tx in 0..block[0] {
                            assert_eq!(got[6 * k..6 * k + 6], [bx, by, bz, tx, ty, tz]);
                            k += 1;
                        }
                    }
                }
            }
        }
    }
}

/// The emulator's f16 conversions (PTX's cvt) against the `half` crate's: every f16 widened,
/// and f32 values rounded to nearest-even, edge cases and a random sample.
#[test]
fn f16_conversions_match_the_half_crate_bit_for_bit() {
    let mut x: Vec<f32> = (0..=u16::MAX).map(|h| f16::from_bits(h).to_f32()).collect();
    let edges = [
        0.0f32,
        -0.0,
        65504.0,
        65519.99,
        65520.0,
        -65520.0,
        1e9,
        f32::INFINITY,
        f32::NEG_INFINITY,
        5.96e-8,
        2.98e-8,
        2.9802322e-8,
        8.940697e-8,
        6.1035156e-5,
        6.1032e-5,
        1.0 + 1.0 / 2048.0,
        1.0 + 3.0 / 2048.0,
        1e-10,
        f32::MIN_POSITIVE,
    ];
    x.extend(edges);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    x.extend(
        (0..20_000)
            .map(|_| f32::from_bits(rng.random::<u32>()))
            .filter(|v| !v.is_nan()),
    );
    let n = x.len();
    let xs = GuardedBuffer::new(&x);
    let h = GuardedBuffer::new(&vec![0u16; n]);
    let back = GuardedBuffer::new(&vec![0f32; n]);
    let args = Args::new()
        .ptr(xs.as_ptr())
        .ptr(h.as_ptr())
        .ptr(back.as_ptr())
        .u32(n as u32);
    // SAFETY: a grid-stride loop over n values of each buffer.
    unsafe { launch("emu_selftest_f16", LaunchConfig::linear(8, 256), &args) }.expect("launch");
    let (h, back) = (h.values(), back.values());
    for i in 0..n {
        let want = f16::from_f32(x[i]);
        if want.is_nan() {
            assert!(
                f16::from_bits(h[i]).is_nan() && back[i].is_nan(),
                "{:e}",
                x[i]
            );
            continue;
        }
        assert_eq!(h[i], want.to_bits(), "rounding {:e}", x[i]);
        assert_eq!(
            back[i].to_bits(),
            want.to_f32().to_bits(),
            "widening {:e}",
            x[i]
        );
    }
}

/// A read of another thread's shared value with no barrier between gives other results when
/// threads run last first (the race check the kernels' tests run); with the barrier, both
/// orders give the same, expected, values.
#[test]
fn running_threads_in_reverse_order_exposes_a_missing_barrier() {
    let run = |barrier: i32, order: ThreadOrder| {
        let out = GuardedBuffer::new(&[0f32; 128]);
        let args = Args::new().ptr(out.as_ptr()).i32(barrier);
        // SAFETY: emu_selftest_neighbour(float *out, int barrier), 2 blocks of 64 threads
        // writing out[0..128].
        unsafe {
            launch_in_order(
                "emu_selftest_neighbour",
                LaunchConfig::linear(2, 64),
                &args,
                order,
            )
        }
        .expect("launch");
        out.values()
    };
    let want: Vec<f32> = (0..128u32)
        .map(|i| ((i / 64) * 1000 + (i % 64 + 1) % 64) as f32)
        .collect();
    assert_eq!(run(1, ThreadOrder::Forward), want);
    assert_eq!(run(1, ThreadOrder::Reverse), want);
    assert_ne!(run(0, ThreadOrder::Forward), run(0, ThreadOrder::Reverse));
}

//! The device parity checks on every device this machine has ([`available_devices`]): on a
//! CPU-only machine they assert determinism and bf16 closeness on the CPU; with a `cuda`
//! build and a GPU, CPU-vs-CUDA parity (f32 embeddings <= 1e-4, bf16 cosine >= 0.999, losses
//! <= 1e-4, identical near-duplicate sets, one training step's weights <= 1e-4).

use candle_core::Device;
use clipcid_pipeline::{available_devices, device_parity, parity_table};

/// Where a GPU is expected (`CLIPCID_EXPECT_CUDA=1`, as `scripts/gpu-check.sh` sets it), the
/// device list must hold it: otherwise every device-parametrised test would pass on the CPU
/// alone and the GPU run would prove nothing.
#[test]
fn a_gpu_that_is_expected_is_in_the_device_list() {
    if std::env::var_os("CLIPCID_EXPECT_CUDA").is_none() {
        return;
    }
    let devices = available_devices();
    assert!(
        devices.iter().any(|d| d.is_cuda()),
        "CLIPCID_EXPECT_CUDA is set but the devices are {:?} (a build without `cuda`, or \
         cuda:0 did not open)",
        devices.iter().map(|d| d.location()).collect::<Vec<_>>()
    );
}

#[test]
fn every_available_device_computes_what_the_cpu_does() {
    let devices = available_devices();
    if devices.len() == 1 {
        eprintln!("no CUDA device in this build or on this machine: checking the CPU only");
    }
    for device in &devices {
        let rows = device_parity(&Device::Cpu, device).expect("parity checks run");
        println!("{}", parity_table(&Device::Cpu, device, &rows));
        // Nine checks, and on a GPU of an `nccl` build the one-rank NCCL group.
        let nccl = cfg!(feature = "nccl") && !device.is_cpu();
        assert_eq!(rows.len(), 9 + usize::from(nccl), "{rows:?}");
        assert!(rows.iter().all(|r| r.pass), "{rows:?}");
    }
}

/// The GPU check's benchmark runs (at smoke size on the CPU); its figures are printed, not
/// asserted.
#[test]
fn the_benchmark_runs_at_smoke_size() {
    let rows = clipcid_pipeline::throughput(&Device::Cpu, clipcid_pipeline::BenchSizes::SMOKE)
        .expect("benchmark runs");
    // Four headline rows (what gpu-check.py compares), then three phases of each step and
    // the trainer's gradient norm.
    let units: Vec<_> = rows.iter().map(|r| r.unit).collect();
    let step = ["ms", "ms", "ms", "ms (gradient norm)"];
    let headline = ["images/s", "samples/s", "samples/s", "s"];
    assert_eq!(units, [&headline[..], &step, &step].concat());
    for r in &rows {
        assert!(r.value.is_finite() && r.value > 0.0, "{r:?}");
        println!("{}: {:.2} {}", r.workload, r.value, r.unit);
    }
}

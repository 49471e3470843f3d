//! Where each stage puts its work for a given device. Regression test for a drift between
//! the command line's and the demo's copies of the stage glue: `--device cuda:0 demo` ran
//! k-means on the CPU while `--device cuda:0 cluster` ran it on the GPU. Both now build their
//! k-means through `kmeans_for`; these tests need no GPU (they check the placement chosen,
//! not a run).

use candle_core::{Device, DeviceLocation};
use clipcid_pipeline::{demo::demo_kmeans, faiss_gpu, kmeans_for};

#[test]
fn the_demo_runs_kmeans_on_the_gpu_of_a_cuda_run() {
    for gpu_id in [0, 3] {
        let cuda = DeviceLocation::Cuda { gpu_id };
        // faiss's GPU build is opt-in (`faiss-gpu`); without it both keep k-means on the CPU.
        let want = cfg!(feature = "faiss-gpu").then_some(gpu_id as i32);
        assert_eq!(demo_kmeans(7, cuda).get_gpu(), want);
        assert_eq!(kmeans_for(7, cuda).get_gpu(), want);
    }
}

#[test]
fn a_cpu_run_keeps_kmeans_on_the_cpu() {
    let cpu = Device::Cpu.location();
    assert_eq!(faiss_gpu(cpu), None);
    assert_eq!(demo_kmeans(7, cpu).get_gpu(), None);
    assert_eq!(kmeans_for(7, cpu).get_gpu(), None);
}

#[test]
fn the_demo_and_the_cluster_command_build_the_same_kmeans_apart_from_its_schedule() {
    let cuda = DeviceLocation::Cuda { gpu_id: 1 };
    let demo = demo_kmeans(12, cuda);
    let command = kmeans_for(12, cuda).iterations(20).seed(0);
    assert_eq!(format!("{demo:?}"), format!("{command:?}"));
}

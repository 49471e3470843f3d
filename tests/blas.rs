//! How the workspace's binaries get faiss and BLAS, both set in `.cargo/config.toml`: they load
//! Debian's OpenMP build of OpenBLAS when it is installed (faiss k-means is slower with the
//! pthreads build, whose threads spin against faiss's OpenMP threads), and faiss is compiled
//! for the build machine's CPU, so it has its AVX2 kernels where the CPU has AVX2.

use std::path::Path;

use clipcid_cluster::KMeans;
use clipcid_suite::{faiss_has_avx2_kernel, loaded_blas, FAISS_AVX2_KERNEL, OPENMP_OPENBLAS_DIR};

#[test]
fn faiss_uses_the_openmp_openblas_when_installed() {
    // A small k-means, so faiss (and through it BLAS) is linked in and called.
    let x: Vec<f32> = (0..64 * 8).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
    let centroids = KMeans::new(4).iterations(3).seed(1).train(&x, 8);
    assert!(centroids.is_ok(), "{centroids:?}");
    let blas = loaded_blas();
    assert!(
        blas.is_some(),
        "no BLAS library is mapped into a process that ran faiss"
    );
    if !Path::new(OPENMP_OPENBLAS_DIR).join("libblas.so.3").exists() {
        eprintln!("skipped: {OPENMP_OPENBLAS_DIR} is absent (install libopenblas0-openmp)");
        return;
    }
    // cargo sets LD_LIBRARY_PATH for tests (build folders); a BLAS there would come first.
    let library_path = std::env::var_os("LD_LIBRARY_PATH").unwrap_or_default();
    if let Some(dir) = std::env::split_paths(&library_path)
        .find(|d| d.join("libblas.so.3").exists() || d.join("libopenblas.so.0").exists())
    {
        eprintln!("skipped: LD_LIBRARY_PATH names a BLAS in {}", dir.display());
        return;
    }
    let blas = blas.unwrap_or_default();
    assert!(
        blas.starts_with(OPENMP_OPENBLAS_DIR),
        "loaded {blas}, not the OpenMP OpenBLAS in {OPENMP_OPENBLAS_DIR}: is RUSTFLAGS \
         replacing the run path in .cargo/config.toml?"
    );
}

/// faiss is compiled for the build machine's CPU (`-march=native`, from `.cargo/config.toml`):
/// on a CPU with AVX2 its fused L2 nearest-centroid kernel must be in the binary. A target
/// folder built before that setting keeps a generic faiss until `cargo clean -p faiss-sys`.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[test]
fn faiss_has_its_avx2_kernels_on_cpus_with_avx2() {
    if !std::arch::is_x86_feature_detected!("avx2") {
        eprintln!("skipped: this CPU has no AVX2, so faiss is built without its AVX2 kernels");
        return;
    }
    // cargo passes the [env] table of .cargo/config.toml to the processes it runs; a user's
    // own value (a portable build) takes precedence and is respected.
    let flags = std::env::var("CXXFLAGS_x86_64_unknown_linux_gnu").unwrap_or_default();
    if !flags.contains("-march=native") {
        eprintln!("skipped: faiss's C++ flags are {flags:?}, not the -march=native default");
        return;
    }
    // Keep faiss linked into this binary.
    let x: Vec<f32> = (0..64 * 8).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
    let centroids = KMeans::new(4).iterations(3).seed(1).train(&x, 8);
    assert!(centroids.is_ok(), "{centroids:?}");
    assert_eq!(
        faiss_has_avx2_kernel(),
        Some(true),
        "faiss was compiled without {FAISS_AVX2_KERNEL} on a CPU with AVX2: was faiss-sys built \
         before .cargo/config.toml set -march=native? Run `cargo clean -p faiss-sys`"
    );
}

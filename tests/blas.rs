//! The workspace's binaries load Debian's OpenMP build of OpenBLAS when it is installed (the
//! run path in `.cargo/config.toml`): faiss k-means is slower with the pthreads build, whose
//! threads spin against faiss's OpenMP threads.

use std::path::Path;

use clipcid_cluster::KMeans;
use clipcid_suite::{loaded_blas, OPENMP_OPENBLAS_DIR};

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

//! Links the BLAS backend chosen by feature. `openblas` (the default): the system OpenBLAS
//! (Debian: `libopenblas-dev`), whose `cblas_sgemm` ndarray calls for the linear layers'
//! products in CPU training, clipcid-dedup's distance tiles and clipcid-eval's linear probe
//! (all sit above this crate, so the link reaches them). The `openblas-src` crate would do the
//! same but pulls an HTTPS client into the build for its download mode, which this project
//! never uses. Another backend (Accelerate, MKL) would be one more feature linking its
//! library here, with `blas.rs`'s OpenMP thread control behind the `openblas` feature.
fn main() {
    if std::env::var_os("CARGO_FEATURE_OPENBLAS").is_some() {
        println!("cargo:rustc-link-lib=dylib=openblas");
        // libgomp (GCC's OpenMP runtime, which faiss and OpenMP OpenBLAS load anyway): the
        // `blas` module sets the calling thread's OpenMP thread count around single-threaded
        // products.
        println!("cargo:rustc-link-lib=dylib=gomp");
    }
}

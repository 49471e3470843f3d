//! Links the system OpenBLAS (Debian: `libopenblas-dev`), whose `cblas_sgemm` ndarray calls
//! for CPU distance tiles. The `openblas-src` crate would do the same but pulls an HTTPS
//! client into the build for its download mode, which this project never uses.
fn main() {
    println!("cargo:rustc-link-lib=dylib=openblas");
}

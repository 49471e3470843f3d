//! Links the system OpenBLAS (Debian: `libopenblas-dev`), whose `cblas_dgemm` ndarray calls
//! for the linear probe's products (see clipcid-dedup's build script for why not
//! `openblas-src`).
fn main() {
    println!("cargo:rustc-link-lib=dylib=openblas");
}

//! Helpers shared by the workspace-level integration tests, benchmarks and examples.
#![deny(missing_docs)]

pub mod torch_zip;
pub mod toy;

/// The allocator of the `clipcid` binary (see its `main.rs`), so that benchmarks and examples
/// measure what the command line runs.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;

/// The project's `shared/` folder (beside the checkout), when present.
pub fn shared_dir() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("shared");
    p.is_dir().then_some(p)
}

/// Writes a zero-shot set in CLIP_benchmark's WebDataset layout (see
/// `clipcid_data::ClipBenchmarkSet`) under `root`: three classes (`red`, `green`,
/// `deep blue`) in `classnames.txt`, two `{c}` templates in
/// `zeroshot_classification_templates.txt`, and a `test` split of two shards with
/// `per_shard` lossless WebP images each and their `.cls` labels. Returns the image count.
pub fn write_clip_benchmark_set(
    root: &std::path::Path,
    per_shard: usize,
) -> std::io::Result<usize> {
    let test = root.join("test");
    std::fs::create_dir_all(&test)?;
    std::fs::write(root.join("classnames.txt"), "red\ngreen\ndeep blue\n")?;
    std::fs::write(
        root.join("zeroshot_classification_templates.txt"),
        "a photo of a {c}.\na {c} square.\n",
    )?;
    std::fs::write(test.join("nshards.txt"), "2\n")?;
    let colours = [[200u8, 30, 30], [30, 180, 40], [20, 40, 200]];
    for shard in 0..2 {
        let mut tar = tar::Builder::new(std::fs::File::create(test.join(format!("{shard}.tar")))?);
        for i in 0..per_shard {
            let n = shard * per_shard + i;
            let label = n % colours.len();
            let img = image::RgbImage::from_fn(32, 32, |x, y| {
                let v = ((x + y) as u8).wrapping_mul(n as u8 + 1) / 8;
                image::Rgb(colours[label].map(|c| c.saturating_add(v)))
            });
            let mut webp = std::io::Cursor::new(Vec::new());
            img.write_to(&mut webp, image::ImageFormat::WebP)
                .map_err(std::io::Error::other)?;
            for (ext, bytes) in [
                ("webp", webp.into_inner()),
                ("cls", label.to_string().into_bytes()),
            ] {
                let mut header = tar::Header::new_gnu();
                header.set_size(bytes.len() as u64);
                header.set_mode(0o644);
                header.set_cksum();
                tar.append_data(&mut header, format!("s{n:06}.{ext}"), bytes.as_slice())?;
            }
        }
        tar.finish()?;
    }
    Ok(2 * per_shard)
}

/// Median of a list of timings in seconds (NaN for an empty list).
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The value after `--name` on the command line (e.g. `cargo bench -- --n 1000`), parsed, or
/// `default` when absent or unparsable.
pub fn bench_arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Peak resident memory of this process so far in MB (`VmHWM` from `/proc/self/status`),
/// NaN where that file is not available.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Debian's folder for the OpenMP build of OpenBLAS (package `libopenblas0-openmp`), which
/// `.cargo/config.toml` puts on the run path of the workspace's binaries.
pub const OPENMP_OPENBLAS_DIR: &str = "/usr/lib/x86_64-linux-gnu/openblas-openmp";

/// Path of the OpenBLAS (or other `libblas`) shared library this process has loaded, read from
/// `/proc/self/maps`; `None` where none is mapped or the file is unavailable. Benchmarks print
/// it, because faiss k-means is slower with the pthreads build (see docs/benchmarks.md).
pub fn loaded_blas() -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| {
            let file = p.rsplit('/').next().unwrap_or(p);
            file.starts_with("libopenblas") || file.starts_with("libblas")
        })
        .map(str::to_string)
}

/// One header line for a benchmark: the BLAS library this process loaded ([`loaded_blas`]) and
/// the OpenBLAS kernel set that runs its products (`clipcid_kernels::blas::openblas_core`);
/// both change the speed, and the kernel set the last bits of the results.
pub fn blas_line() -> String {
    format!(
        "BLAS: {}, kernels {}",
        loaded_blas().unwrap_or_else(|| "none mapped".into()),
        clipcid_kernels::blas::openblas_core()
    )
}

/// Name of faiss's fused AVX2 kernel for L2 nearest-centroid search (distances plus arg-min
/// in one pass over each distance block). faiss compiles it only when `__AVX2__` is defined,
/// which `.cargo/config.toml` arranges on x86-64 CPUs that have AVX2 (`-march=native`).
pub const FAISS_AVX2_KERNEL: &str = "exhaustive_L2sqr_blas_cmax_avx2";

/// Whether this process's executable contains faiss's AVX2 L2 kernel ([`FAISS_AVX2_KERNEL`]),
/// found by its symbol name (faiss is linked statically, and the symbol table keeps the names
/// of its functions); `None` where the executable cannot be read. Plain (L2) k-means is 10-15%
/// faster with it on a 2-core AMD EPYC (docs/benchmarks.md).
pub fn faiss_has_avx2_kernel() -> Option<bool> {
    let exe = std::env::current_exe().ok()?;
    let bytes = std::fs::read(exe).ok()?;
    // The executable also holds FAISS_AVX2_KERNEL itself as string data, which would match
    // every time; faiss mangles the name as `<length><name>E` in its namespace, a form that
    // appears only in the symbol table, and it is assembled here at run time so that no
    // string literal contains it.
    let needle = format!("{}{FAISS_AVX2_KERNEL}E", FAISS_AVX2_KERNEL.len());
    let needle = needle.as_bytes();
    Some(bytes.windows(needle.len()).any(|w| w == needle))
}

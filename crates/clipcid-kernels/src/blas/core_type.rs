//! Which of OpenBLAS's kernel sets ("core types") runs the products, and the one correction
//! clipcid makes to OpenBLAS's choice.
//!
//! A `DYNAMIC_ARCH` OpenBLAS (every distribution's build) carries kernels for many x86 CPUs
//! and picks one set when it is loaded, from the CPU's family and model numbers. A CPU newer
//! than the library can be filed under a set far older than the CPU: Debian 12's OpenBLAS
//! 0.3.21 files Intel's Emerald Rapids (family 6, model 0xCF: AVX-512, AVX-512 BF16, AMX)
//! under `Prescott`, a Pentium 4 of 2004 (SSE3, no AVX), because its model switch has no case
//! for the model and falls through to the Pentium 4's. Every `sgemm` of training, near-pair
//! tiles, the linear probe and faiss's k-means then runs SSE3 kernels: a 1-epoch locked-text
//! teacher took about 36 s there instead of 11 s with the AVX-512 kernels (docs/benchmarks.md,
//! "OpenBLAS's kernels"). The results also differ from an AVX machine's in the last bits, so
//! numbers recorded on one machine did not reproduce on the other.
//!
//! When the process starts (an ELF initialiser, after the shared libraries' and before `main`,
//! so no product can be running), clipcid checks OpenBLAS's choice: where it is a set without AVX on
//! a CPU that has AVX, it makes OpenBLAS choose again, through its own documented override
//! (`OPENBLAS_CORETYPE`, set for the call and removed after) and its own initialiser, with the
//! set OpenBLAS itself falls back to for a CPU it does not know: `Cooperlake` with AVX-512
//! BF16, `SkylakeX` with AVX-512, `Haswell` with AVX2 and FMA, `Sandybridge` with AVX. Nothing
//! else is changed: a correctly detected CPU, a CPU without AVX, an `OPENBLAS_CORETYPE` the user
//! set (always obeyed, so `OPENBLAS_CORETYPE=Prescott` restores the old choice), an OpenBLAS
//! built without `DYNAMIC_ARCH` (it has no initialiser to call), and OpenBLAS's pthreads build
//! (its worker threads already run; [`suggested_core_type`] names the set to ask for) are left
//! as they are.
//! [`openblas_core`] says which set runs and what was replaced.
//!
//! Unsafe code: reading OpenBLAS's core name (a static string), looking up and calling
//! OpenBLAS's exported `gotoblas_dynamic_quit`/`gotoblas_dynamic_init` (no arguments), and
//! setting an environment variable, all before `main`, when only OpenBLAS's own threads (in
//! its pthreads build, which is therefore left alone) can exist.

use std::ffi::{c_char, CStr};
use std::sync::OnceLock;

extern "C" {
    /// OpenBLAS: the name of the kernel set in use, a static NUL-terminated string.
    fn openblas_get_corename() -> *const c_char;
}

/// OpenBLAS's kernel set: the one running, and the one OpenBLAS had picked when clipcid
/// replaced it (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenBlasCore {
    /// The kernel set that runs the products (`openblas_get_corename`), e.g. `Haswell`.
    pub name: String,
    /// The set OpenBLAS picked when it was loaded, where it had no AVX on a CPU with AVX and
    /// clipcid replaced it; `None` where OpenBLAS's choice stands.
    pub replaced: Option<String>,
}

/// `Cooperlake`, or `Cooperlake (OpenBLAS had picked Prescott, without AVX, for this CPU)`
/// where clipcid replaced OpenBLAS's choice: the wording of the log, the demo's report and
/// the benchmarks' headers.
impl std::fmt::Display for OpenBlasCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)?;
        if let Some(old) = &self.replaced {
            write!(f, " (OpenBLAS had picked {old}, without AVX, for this CPU)")?;
        }
        Ok(())
    }
}

/// The kernel set OpenBLAS runs in this process, and the one it replaced, if any.
///
/// ```
/// let core = clipcid_kernels::blas::openblas_core();
/// assert!(!core.name.is_empty());
/// // A replaced choice is always one of OpenBLAS's sets without AVX.
/// if let Some(old) = &core.replaced {
///     assert_ne!(old, &core.name);
/// }
/// // Displayed as the set, and the one it replaced where there is one.
/// assert!(core.to_string().starts_with(&core.name));
/// ```
pub fn openblas_core() -> OpenBlasCore {
    // The linker keeps an object file of this crate only where something in it is used, and
    // `#[used]` does not change that: this reference makes every executable that calls
    // `openblas_core` also hold the initialiser. A crate that reaches OpenBLAS without this
    // crate's products (clipcid-cluster, through faiss) calls it for that reason.
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    std::hint::black_box(&REPLACE_AT_LOAD);
    OpenBlasCore {
        name: corename(),
        replaced: REPLACED.get().cloned().flatten(),
    }
}

/// The `OPENBLAS_CORETYPE` that would give this process kernels for its CPU, where OpenBLAS
/// still runs a set without AVX on a CPU with AVX: with OpenBLAS's pthreads build, whose
/// choice clipcid leaves alone (see the [module docs](self)), or where `OPENBLAS_CORETYPE`
/// asked for such a set. `None` where the kernels fit the CPU.
///
/// ```
/// if let Some(set) = clipcid_kernels::blas::core_type::suggested_core_type() {
///     eprintln!("set OPENBLAS_CORETYPE={set} for this CPU's kernels");
/// }
/// ```
pub fn suggested_core_type() -> Option<&'static str> {
    #[cfg(target_arch = "x86_64")]
    return replacement(&corename(), VectorLevel::of_this_cpu());
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// What the initialiser replaced (set once, before `main`).
static REPLACED: OnceLock<Option<String>> = OnceLock::new();

// x86 only: on other architectures what follows serves the tests.
/// OpenBLAS's x86 kernel sets that use no AVX (names as `openblas_get_corename` gives them).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const WITHOUT_AVX: &[&str] = &[
    "Katmai",
    "Coppermine",
    "Northwood",
    "Prescott",
    "Banias",
    "Atom",
    "Core2",
    "Penryn",
    "Dunnington",
    "Nehalem",
    "Athlon",
    "Opteron",
    "Opteron_SSE3",
    "Barcelona",
    "Nano",
    "Bobcat",
];

/// The widest x86 vector instructions this CPU and its OS support, as OpenBLAS ranks them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) enum VectorLevel {
    /// No AVX (or the OS does not save its registers).
    None,
    /// AVX.
    Avx,
    /// AVX2 with FMA.
    Avx2,
    /// AVX-512 F, BW, DQ, VL and CD (Skylake-SP and later).
    Avx512,
    /// AVX-512 with BF16 (Cooper Lake, Sapphire and Emerald Rapids, Zen 4 and later).
    Avx512Bf16,
}

impl VectorLevel {
    /// This CPU's level (`is_x86_feature_detected!` also checks that the OS saves the
    /// registers, as OpenBLAS's own checks do).
    #[cfg(target_arch = "x86_64")]
    fn of_this_cpu() -> Self {
        use std::arch::is_x86_feature_detected as has;
        let avx512 = has!("avx512f")
            && has!("avx512bw")
            && has!("avx512dq")
            && has!("avx512vl")
            && has!("avx512cd");
        if avx512 && has!("avx512bf16") {
            Self::Avx512Bf16
        } else if avx512 {
            Self::Avx512
        } else if has!("avx2") && has!("fma") {
            Self::Avx2
        } else if has!("avx") {
            Self::Avx
        } else {
            Self::None
        }
    }
}

/// The kernel set to replace OpenBLAS's `picked` with on a CPU of `level`: the set OpenBLAS
/// itself falls back to for an unknown CPU of that level (its `gotoblas_dynamic_init`), where
/// `picked` has no AVX and the CPU has it; otherwise `None` (OpenBLAS's choice stands).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) fn replacement(picked: &str, level: VectorLevel) -> Option<&'static str> {
    if !WITHOUT_AVX.iter().any(|c| c.eq_ignore_ascii_case(picked)) {
        return None;
    }
    match level {
        VectorLevel::None => None,
        VectorLevel::Avx => Some("Sandybridge"),
        VectorLevel::Avx2 => Some("Haswell"),
        VectorLevel::Avx512 => Some("SkylakeX"),
        VectorLevel::Avx512Bf16 => Some("Cooperlake"),
    }
}

/// `openblas_get_corename()` as a string.
fn corename() -> String {
    // SAFETY: OpenBLAS returns a pointer to a static NUL-terminated string (its table of
    // names, or a literal), valid for the life of the process; checked for null anyway.
    let p = unsafe { openblas_get_corename() };
    if p.is_null() {
        return String::new();
    }
    // SAFETY: non-null, NUL-terminated and static, as above.
    unsafe { CStr::from_ptr(p) }
        .to_string_lossy()
        .trim()
        .to_string()
}

/// Runs before `main` in every executable that links this module (the loader calls the
/// functions listed in `.init_array` after the shared libraries', so OpenBLAS is loaded and
/// initialised, and before `main`, so no product has run). Written out rather than
/// through the `ctor` crate: one ELF section entry, on the one platform (Linux on x86-64)
/// where the misfiling happens, is less than that crate's proc-macro build.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
#[used]
#[link_section = ".init_array"]
static REPLACE_AT_LOAD: extern "C" fn() = replace_at_load;

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
extern "C" fn replace_at_load() {
    // A panic must not unwind out of an `extern "C"` function; nothing below panics, and
    // `catch_unwind` makes sure a failure only leaves OpenBLAS's choice in place.
    let replaced = std::panic::catch_unwind(replace_misfiled_core)
        .ok()
        .flatten();
    let _ = REPLACED.set(replaced);
}

/// Replaces OpenBLAS's kernel set where [`replacement`] says so; returns the set it replaced.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
fn replace_misfiled_core() -> Option<String> {
    const VAR: &str = "OPENBLAS_CORETYPE";
    if std::env::var_os(VAR).is_some() {
        return None; // the user's choice, obeyed by OpenBLAS already
    }
    // OpenBLAS's pthreads build starts its worker threads in its own initialiser, before this
    // one, and they read the kernel set as they start: choosing again under them crashed 3
    // of 30 starts. That build keeps its choice ([`suggested_core_type`] says what to set);
    // the OpenMP build (which the workspace's run path loads) and the single-threaded one
    // have no threads before `main`.
    if super::openblas_uses_pthreads() {
        return None;
    }
    let picked = corename();
    let wanted = replacement(&picked, VectorLevel::of_this_cpu())?;
    // Only a DYNAMIC_ARCH build has these two (other builds have one kernel set): looked up
    // rather than linked, so that a build without them still links and is left alone.
    // SAFETY: `dlsym` with RTLD_DEFAULT and NUL-terminated names only reads the loaded
    // objects' symbol tables.
    let quit = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"gotoblas_dynamic_quit".as_ptr()) };
    let init = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"gotoblas_dynamic_init".as_ptr()) };
    if quit.is_null() || init.is_null() {
        return None;
    }
    // SAFETY: both are OpenBLAS's `void f(void)` functions (driver/others/dynamic.c), found
    // by name in the OpenBLAS this process loaded.
    type VoidFn = extern "C" fn();
    let (quit, init) = unsafe {
        (
            std::mem::transmute::<*mut libc::c_void, VoidFn>(quit),
            std::mem::transmute::<*mut libc::c_void, VoidFn>(init),
        )
    };
    // `quit` forgets the chosen set; `init` chooses again, honouring OPENBLAS_CORETYPE, and
    // runs the new set's own initialisation (its block sizes). Buffers are sized at build
    // time for every set, and no product has run yet, so nothing else depends on the old set.
    // 0.3.21's override table stops one name short of `Cooperlake` (with OPENBLAS_VERBOSE set
    // it prints "Core not found: Cooperlake") and then takes its fallback by the CPU's
    // features, which is `Cooperlake` on such a CPU; `now` is read back rather than assumed.
    std::env::set_var(VAR, wanted);
    quit();
    init();
    std::env::remove_var(VAR);
    let now = corename();
    (now != picked).then_some(picked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_set_without_avx_on_a_cpu_with_avx_is_replaced() {
        use VectorLevel::*;
        // Debian 12's OpenBLAS on Emerald Rapids, and on older CPUs it also misfiles.
        assert_eq!(replacement("Prescott", Avx512Bf16), Some("Cooperlake"));
        assert_eq!(replacement("prescott", Avx512), Some("SkylakeX"));
        assert_eq!(replacement("Nehalem", Avx2), Some("Haswell"));
        assert_eq!(replacement("Core2", Avx), Some("Sandybridge"));
        // A CPU without AVX keeps its set; so does every set with AVX, even an older one.
        assert_eq!(replacement("Prescott", None), Option::None);
        for set in [
            "Sandybridge",
            "Haswell",
            "Zen",
            "SkylakeX",
            "Cooperlake",
            "Bulldozer",
        ] {
            assert_eq!(replacement(set, Avx512Bf16), Option::None, "{set}");
        }
        assert_eq!(replacement("Unknown", Avx2), Option::None);
    }

    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    #[test]
    fn openblas_runs_a_set_the_cpu_supports_at_its_level() {
        let core = openblas_core();
        let level = VectorLevel::of_this_cpu();
        let user_choice = std::env::var_os("OPENBLAS_CORETYPE").is_some();
        if super::super::openblas_uses_pthreads() {
            println!("skipped: OpenBLAS's pthreads build keeps its choice");
            assert_eq!(core.replaced, None);
            return;
        }
        println!("OpenBLAS core {core:?}, CPU level {level:?}");
        if level > VectorLevel::None && !user_choice {
            // Where OpenBLAS chose a set without AVX, it was replaced before this test ran.
            assert!(
                replacement(&core.name, level).is_none(),
                "OpenBLAS runs {} on a CPU with {level:?}",
                core.name
            );
        }
        if let Some(old) = &core.replaced {
            assert_eq!(replacement(old, level), Some(core.name.as_str()));
        }
    }

    /// The same test binary, run again with `OPENBLAS_CORETYPE` set: the user's choice stands
    /// and nothing is replaced.
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    #[test]
    fn a_core_type_the_user_sets_is_obeyed() {
        const CHILD: &str = "CLIPCID_CORE_TYPE_CHILD";
        if std::env::var_os(CHILD).is_some() {
            let core = openblas_core();
            println!("child core: {} replaced: {:?}", core.name, core.replaced);
            return;
        }
        if VectorLevel::of_this_cpu() == VectorLevel::None {
            println!("skipped: this CPU has no AVX, so no set would be replaced");
            return;
        }
        let exe = std::env::current_exe().expect("the test binary's path");
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                "blas::core_type::tests::a_core_type_the_user_sets_is_obeyed",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, "1")
            .env("OPENBLAS_CORETYPE", "Prescott")
            .output()
            .expect("run the test binary again");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}");
        assert!(
            stdout.contains("child core: Prescott replaced: None"),
            "{stdout}"
        );
    }
}

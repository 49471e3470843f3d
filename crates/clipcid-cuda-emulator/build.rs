//! Compiles clipcid-kernels' CUDA sources (the files NVRTC compiles at run time) for the
//! CPU, under `csrc/cuda_emulator.h`, with a table of their kernels by name.
//!
//! Each source becomes one C++ unit: the emulator's header, `prelude.cuh`, the kernels, then
//! the table. The table's names come from a first pass through the preprocessor in which
//! `__global__` expands to a marker, so kernels that a macro defines per dtype (`..._##S`)
//! are listed as the compiler sees them and no list here can fall out of date.

use std::path::{Path, PathBuf};

/// (unit, the files it includes after the emulator's header): the function that finds a
/// kernel of the unit is `clipcid_emu_find_{unit}` (see `csrc/emulator.cpp`). The first two
/// are clipcid-kernels' sources, the last the emulator's own tests.
const UNITS: [(&str, &[&str]); 3] = [
    ("kernels", &["prelude.cuh", "kernels.cu"]),
    ("tensor_core", &["prelude.cuh", "tensor_core.cu"]),
    ("selftest", &["selftest.cu"]),
];

fn main() {
    let here = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it"));
    let csrc = here.join("csrc");
    let kernels = here.join("../clipcid-kernels/src/cuda");
    for f in ["cuda_emulator.h", "invoke.h", "emulator.cpp", "selftest.cu"] {
        println!("cargo:rerun-if-changed={}", csrc.join(f).display());
    }
    for f in ["prelude.cuh", "kernels.cu", "tensor_core.cu"] {
        println!("cargo:rerun-if-changed={}", kernels.join(f).display());
    }

    let mut units = vec![csrc.join("emulator.cpp")];
    for (unit, files) in UNITS {
        let mut body = "#include \"cuda_emulator.h\"\n".to_string();
        for f in files {
            body += &format!("#include \"{f}\"\n");
        }
        let scan = out.join(format!("{unit}_scan.cpp"));
        write(&scan, &body);
        let expanded = base(&csrc, &kernels)
            .define("CLIPCID_EMU_SCAN", None)
            .file(&scan)
            .expand();
        let names = kernel_names(&String::from_utf8_lossy(&expanded));
        assert!(!names.is_empty(), "no kernels found in {files:?}");
        let entries: Vec<String> = names
            .iter()
            .map(|n| format!("    CLIPCID_EMU_ENTRY({n}),"))
            .collect();
        let unit_path = out.join(format!("{unit}_unit.cpp"));
        write(
            &unit_path,
            &format!(
                "{body}#include \"invoke.h\"\n#include <cstring>\n\
                 extern \"C\" clipcid_emu::Invoker clipcid_emu_find_{unit}(const char *name) {{\n\
                 \x20   static const clipcid_emu::KernelEntry table[] = {{\n{}\n    }};\n\
                 \x20   for (const auto &e : table)\n\
                 \x20       if (std::strcmp(e.name, name) == 0) return e.invoke;\n\
                 \x20   return nullptr;\n}}\n",
                entries.join("\n")
            ),
        );
        units.push(unit_path);
    }
    base(&csrc, &kernels)
        .files(&units)
        .compile("clipcid_cuda_emulator");
}

/// The compiler settings of both passes: C++17, IEEE single precision rounded op by op (no
/// contraction into fused multiply-adds), no strict aliasing (the kernels read bf16 pairs
/// through `unsigned int` pointers, as CUDA code does), the kernels' own warnings off (they
/// are written for NVRTC, where `#pragma unroll` and unused parameters are at home).
fn base(csrc: &Path, kernels: &Path) -> cc::Build {
    let mut b = cc::Build::new();
    b.cpp(true)
        .std("c++17")
        .include(csrc)
        .include(kernels)
        .opt_level(2)
        .flag("-ffp-contract=off")
        .flag("-fno-strict-aliasing")
        .flag("-w")
        .warnings(false);
    b
}

/// The names after each `clipcid_emu_kernel_mark void` in the preprocessed text.
fn kernel_names(expanded: &str) -> Vec<String> {
    const MARK: &str = "clipcid_emu_kernel_mark";
    let mut names = vec![];
    for piece in expanded.split(MARK).skip(1) {
        let rest = piece.trim_start();
        let Some(rest) = rest.strip_prefix("void") else {
            continue;
        };
        let name: String = rest
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() && !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

fn write(path: &Path, text: &str) {
    // Rewritten only when changed, so that cc's outputs stay fresh.
    if std::fs::read_to_string(path).ok().as_deref() != Some(text) {
        std::fs::write(path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }
}

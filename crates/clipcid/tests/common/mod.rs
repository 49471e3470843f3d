//! Running the `clipcid` binary from the integration tests.
// Each test file compiles this module on its own and uses part of it.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// Runs `clipcid args` in `dir` (the test's folder when `None`): whether it succeeded, its
/// stdout and stderr together, and whether it ended by a signal (an abort).
pub fn run_clipcid(dir: Option<&Path>, args: &[&str]) -> (bool, String, bool) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_clipcid"));
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    let out = cmd.args(args).output().expect("run clipcid");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text, out.status.code().is_none())
}

/// Runs `clipcid args` in the test's folder: whether it succeeded, and its output.
pub fn clipcid(args: &[&str]) -> (bool, String) {
    let (ok, text, _) = run_clipcid(None, args);
    (ok, text)
}

/// A path as the `&str` an argument list takes.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

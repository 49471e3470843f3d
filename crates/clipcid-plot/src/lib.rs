//! Plot helpers shared by clipcid's stages (cluster-size histograms, loss curves, evaluation
//! charts, textness grids): the built-in DejaVu Sans font for plotters, and PNG files drawn
//! under a temporary name and renamed into place once complete.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use plotters::prelude::*;
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("empty.png");
//! clipcid_plot::register_font()?;
//! let tmp = clipcid_plot::temp_png_path(&path);
//! {
//!     let root = BitMapBackend::new(&tmp, (64, 32)).into_drawing_area();
//!     root.fill(&WHITE)?;
//!     root.draw(&Text::new("ok", (4, 4), ("sans-serif", 14)))?;
//!     root.present()?;
//! }
//! clipcid_plot::commit_png(&tmp, &path)?;
//! assert!(path.is_file() && !tmp.exists());
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

use std::path::{Path, PathBuf};

use plotters::style::FontStyle;

/// Registers the built-in DejaVu Sans as plotters' `sans-serif` (once per process), so
/// pictures need no system fonts.
pub fn register_font() -> Result<(), String> {
    static REGISTERED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
                .map_err(|_| "the built-in DejaVu Sans font did not load".to_string())
        })
        .clone()
}

/// The temporary file a PNG for `path` is drawn into (same folder, hidden name, `.png`
/// extension so plotters picks the PNG encoder).
pub fn temp_png_path(path: &Path) -> PathBuf {
    clipcid_store::io::temp_path(path).with_extension("png")
}

/// Moves a finished picture from `tmp` to `path`; on failure removes `tmp` and says why
/// (the caller names `path` in its error).
pub fn commit_png(tmp: &Path, path: &Path) -> Result<(), String> {
    std::fs::rename(tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(tmp);
        format!("cannot move the finished picture into place: {e}")
    })
}

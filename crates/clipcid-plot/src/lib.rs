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
//! let draft = clipcid_plot::PngDraft::new(&path);
//! let tmp = draft.tmp().to_path_buf();
//! {
//!     let root = BitMapBackend::new(&tmp, (64, 32)).into_drawing_area();
//!     root.fill(&WHITE)?;
//!     root.draw(&Text::new("ok", (4, 4), ("sans-serif", 14)))?;
//!     root.present()?;
//! }
//! draft.commit()?;
//! assert!(path.is_file() && !tmp.exists());
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

use std::path::{Path, PathBuf};

use plotters::drawing::DrawingAreaErrorKind;
use plotters::style::FontStyle;
use plotters_backend::DrawingErrorKind;
use plotters_bitmap::BitMapBackendError;

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

/// What went wrong in drawing a picture, in words. A failed write (a full disk) reads as the
/// OS says it, `No space left on device (os error 28)`, where plotters' own message shows its
/// error's structure: `backend error: Drawing backend error: ImageError(IoError(Custom {
/// kind: Other, error: "No space left on device (os error 28)" }))`.
///
/// ```
/// use plotters::prelude::*;
/// let dir = tempfile::tempdir().unwrap();
/// // A folder that is not there: the picture cannot be written.
/// let path = dir.path().join("missing/empty.png");
/// let root = BitMapBackend::new(&path, (8, 8)).into_drawing_area();
/// let e = root.present().unwrap_err();
/// let said = clipcid_plot::drawing_error(&e);
/// assert!(said.contains("No such file or directory") && !said.contains("Custom"), "{said}");
/// ```
pub fn drawing_error(e: &DrawingAreaErrorKind<BitMapBackendError>) -> String {
    match e {
        DrawingAreaErrorKind::BackendError(DrawingErrorKind::DrawingError(b)) => match b {
            BitMapBackendError::IOError(io) => io.to_string(),
            BitMapBackendError::ImageError(image) => image.to_string(),
            _ => e.to_string(),
        },
        _ => e.to_string(),
    }
}

/// A picture being drawn for `path`: drawn into a temporary file beside it (hidden name,
/// `.png` extension so plotters picks the PNG encoder) and renamed into place by
/// [`PngDraft::commit`]. Dropped without a commit (a drawing error, a full disk while
/// encoding), it removes the temporary file: no cut-short picture is left behind.
pub struct PngDraft {
    tmp: PathBuf,
    path: PathBuf,
}

impl PngDraft {
    /// A draft of the picture `path`.
    pub fn new(path: &Path) -> Self {
        // `.NAME.tmp-PID.png`: a temporary name by its look, that plotters still encodes as PNG.
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Self {
            tmp: path.with_file_name(format!(".{stem}.tmp-{}.png", std::process::id())),
            path: path.to_path_buf(),
        }
    }

    /// The temporary file to draw into.
    pub fn tmp(&self) -> &Path {
        &self.tmp
    }

    /// Moves the finished picture into place, or says why it could not (the caller names
    /// the picture's path in its error).
    pub fn commit(self) -> Result<(), String> {
        std::fs::rename(&self.tmp, &self.path)
            .map_err(|e| format!("cannot move the finished picture into place: {e}"))
        // Drop removes the temporary file when the rename failed, and finds none otherwise.
    }
}

impl Drop for PngDraft {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a failed setup step should panic
mod tests {
    use super::PngDraft;

    #[test]
    fn a_draft_dropped_without_a_commit_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.png");
        let draft = PngDraft::new(&path);
        let name = draft
            .tmp()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(
            name.starts_with(".loss.tmp-") && name.ends_with(".png"),
            "{name}"
        );
        // A drawing that failed part way: bytes in the temporary file, no commit.
        std::fs::write(draft.tmp(), b"half a picture").unwrap();
        drop(draft);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

        let draft = PngDraft::new(&path);
        std::fs::write(draft.tmp(), b"a picture").unwrap();
        draft.commit().unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["loss.png"]);
    }
}

//! One-item-per-line text files: class names, queries, words.

use std::path::Path;

use crate::DataError;

/// The trimmed, non-empty lines of a text file (class names, queries, words), in file order.
/// A file with none is an error naming it, as is one that cannot be read or is not UTF-8.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("classnames.txt");
/// std::fs::write(&path, "cat\n\n  dog \r\n")?;
/// assert_eq!(clipcid_data::read_lines(&path)?, ["cat", "dog"]);
/// std::fs::write(&path, "\n \n")?;
/// assert!(clipcid_data::read_lines(&path).unwrap_err().to_string().contains("no lines"));
/// # Ok(()) }
/// ```
pub fn read_lines(path: &Path) -> Result<Vec<String>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    let lines: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    if lines.is_empty() {
        return Err(DataError::format(
            path,
            "no lines (only blank ones, or empty)",
        ));
    }
    Ok(lines)
}

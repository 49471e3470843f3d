//! Helpers shared by the fixture tests.

/// Hostile versions of an encoded image: every `step`-th truncation (from the empty file on)
/// and each of its first `head` bytes overwritten with 0x00 and with 0xFF (where a format
/// keeps its markers, lengths and tables).
pub fn truncated_and_overwritten(bytes: &[u8], step: usize, head: usize) -> Vec<Vec<u8>> {
    let mut variants: Vec<Vec<u8>> = (0..bytes.len())
        .step_by(step)
        .map(|n| bytes[..n].to_vec())
        .collect();
    for at in 0..bytes.len().min(head) {
        for v in [0x00, 0xFF] {
            let mut b = bytes.to_vec();
            b[at] = v;
            variants.push(b);
        }
    }
    variants
}

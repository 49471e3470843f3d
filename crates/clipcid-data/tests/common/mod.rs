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

/// Decodes each hostile variant ([`truncated_and_overwritten`]) with
/// `clipcid_data::decode_image_with_mode`: an image must preprocess (open_clip's transform) to
/// 8 x 8, an error must say something. Returns how many decoded and how many were refused.
pub fn decoded_and_refused(variants: &[Vec<u8>]) -> (usize, usize) {
    let p = clipcid_data::Preprocess::open_clip(8);
    let (mut decoded, mut refused) = (0, 0);
    for b in variants {
        match clipcid_data::decode_image_with_mode(b) {
            Ok(img) => {
                decoded += 1;
                assert_eq!(p.resize_and_crop_decoded(&img).dimensions(), (8, 8));
            }
            Err(e) => {
                assert!(!e.is_empty());
                refused += 1;
            }
        }
    }
    (decoded, refused)
}

//! Statistics of a clustering: the agreement of two labelings (sizes are the cluster
//! file's, `clipcid_store::clusters::cluster_sizes`).

use crate::ClusterError;

/// Adjusted Rand index of two labelings of the same points (1 = same partition up to
/// renaming, about 0 = chance). Hubert and Arabie's formula over the contingency table.
pub fn adjusted_rand_index(a: &[u32], b: &[u32]) -> Result<f64, ClusterError> {
    if a.len() != b.len() {
        return Err(ClusterError::Config(format!(
            "labelings of different lengths ({} and {})",
            a.len(),
            b.len()
        )));
    }
    let n = a.len() as f64;
    let choose2 = |v: f64| v * (v - 1.0) / 2.0;
    let mut table = std::collections::HashMap::<(u32, u32), f64>::new();
    let mut rows = std::collections::HashMap::<u32, f64>::new();
    let mut cols = std::collections::HashMap::<u32, f64>::new();
    for (&p, &q) in a.iter().zip(b) {
        *table.entry((p, q)).or_default() += 1.0;
        *rows.entry(p).or_default() += 1.0;
        *cols.entry(q).or_default() += 1.0;
    }
    let index: f64 = table.values().map(|&v| choose2(v)).sum();
    let sum_a: f64 = rows.values().map(|&v| choose2(v)).sum();
    let sum_b: f64 = cols.values().map(|&v| choose2(v)).sum();
    let expected = sum_a * sum_b / choose2(n).max(1.0);
    let max = (sum_a + sum_b) / 2.0;
    if (max - expected).abs() < 1e-12 {
        // Both labelings are all-one-cluster or all-singletons: identical partitions.
        return Ok(if (index - expected).abs() < 1e-12 {
            1.0
        } else {
            0.0
        });
    }
    Ok((index - expected) / (max - expected))
}

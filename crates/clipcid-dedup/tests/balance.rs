//! Balance agrees exactly with a brute-force O(N^2) reference.
#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should panic

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use clipcid_dedup::{balance, load_embeddings, write_keep_file, BalanceOptions, UnionFind};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

fn normalise(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= n);
}

/// `n` unit vectors in `d` dims: ~70% random "sources", ~30% copies of a random source plus
/// noise of norm about `noise`, shuffled.
fn planted(n: usize, d: usize, noise: f32, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n_src = (n * 7).div_ceil(10);
    let mut rows: Vec<Vec<f32>> = (0..n_src)
        .map(|_| {
            let mut v: Vec<f32> = (0..d).map(|_| StandardNormal.sample(&mut rng)).collect();
            normalise(&mut v);
            v
        })
        .collect();
    for _ in n_src..n {
        let s = rows[rng.random_range(0..n_src)].clone();
        let mut v: Vec<f32> = s
            .iter()
            .map(|x| {
                let z: f32 = StandardNormal.sample(&mut rng);
                x + noise / (d as f32).sqrt() * z
            })
            .collect();
        normalise(&mut v);
        rows.push(v);
    }
    for i in (1..rows.len()).rev() {
        let j = rng.random_range(0..=i);
        rows.swap(i, j);
    }
    rows
}

fn tensor(rows: &[Vec<f32>]) -> Tensor {
    Tensor::new(rows.to_vec(), &Device::Cpu).unwrap()
}

/// Components of the graph `d(i, j) < thr` (f64 distances), as smallest-member labels.
fn brute_force_labels(rows: &[Vec<f32>], thr: f64) -> Vec<usize> {
    let n = rows.len();
    let mut label: Vec<usize> = (0..n).collect();
    let mut changed = true;
    let near = |a: usize, b: usize| distance(&rows[a], &rows[b]) < thr;
    let adj: Vec<Vec<usize>> = (0..n)
        .map(|i| (0..n).filter(|&j| j != i && near(i, j)).collect())
        .collect();
    while changed {
        changed = false;
        for i in 0..n {
            for &j in &adj[i] {
                if label[j] < label[i] {
                    label[i] = label[j];
                    changed = true;
                }
            }
        }
    }
    label
}

/// Euclidean distance, in f64.
fn distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// Pairs `i < j` whose distance is under `thr - 1e-4`, and under `thr + 1e-4`.
fn pair_count_bounds(rows: &[Vec<f32>], thr: f64) -> (usize, usize) {
    let (mut sure, mut maybe) = (0, 0);
    for i in 0..rows.len() {
        for j in i + 1..rows.len() {
            let d = distance(&rows[i], &rows[j]);
            sure += usize::from(d < thr - 1e-4);
            maybe += usize::from(d < thr + 1e-4);
        }
    }
    (sure, maybe)
}

fn smallest_member_labels(set_id: &[u32]) -> Vec<usize> {
    let mut first: HashMap<u32, usize> = HashMap::new();
    set_id
        .iter()
        .enumerate()
        .map(|(i, s)| *first.entry(*s).or_insert(i))
        .collect()
}

fn reference_representative(rows: &[Vec<f32>], members: &[usize]) -> usize {
    let d = rows[0].len();
    let c: Vec<f64> = (0..d)
        .map(|k| members.iter().map(|&m| rows[m][k] as f64).sum::<f64>() / members.len() as f64)
        .collect();
    let dist = |m: usize| {
        rows[m]
            .iter()
            .zip(&c)
            .map(|(v, c)| (*v as f64 - c).powi(2))
            .sum::<f64>()
    };
    let mut best = members[0];
    for &m in members {
        if dist(m) < dist(best) {
            best = m;
        }
    }
    best
}

#[test]
fn partition_and_representatives_equal_brute_force() {
    for device in clipcid_kernels::available_devices() {
        partition_equals_brute_force_on(&device);
    }
}

fn partition_equals_brute_force_on(device: &Device) {
    for (n, thr, block) in [
        (50, 0.1, 7),
        (333, 0.1, 64),
        (333, 0.3, 333),
        (700, 0.05, 100),
        (700, 0.2, 1024),
        (512, 0.1, 128),
        // 300 tiles: on a device, read back in several groups of tiles.
        (700, 0.1, 30),
    ] {
        let rows = planted(n, 32, 0.04, n as u64);
        let opts = BalanceOptions {
            threshold: thr as f32,
            block_size: block,
            ..Default::default()
        };
        let r = balance(&tensor(&rows).to_device(device).unwrap(), &opts).unwrap();
        let want = brute_force_labels(&rows, thr);
        assert_eq!(
            smallest_member_labels(&r.set_id),
            want,
            "n={n} thr={thr} block={block} on {:?}",
            device.location()
        );
        let mut groups: HashMap<usize, Vec<usize>> = HashMap::new();
        for (i, l) in want.iter().enumerate() {
            groups.entry(*l).or_default().push(i);
        }
        assert_eq!(r.summary.sets, groups.len());
        assert_eq!(r.keep.iter().filter(|k| **k).count(), groups.len());
        // The summary's figures, as `clipcid balance` prints them: the share removed, and
        // the pairs under the threshold (counted in f64 here; a pair within 1e-4 of the
        // threshold may fall either way in f32).
        assert_eq!(r.summary.removed, n - groups.len());
        assert_eq!(
            r.summary.removed_pct,
            100.0 * (n - groups.len()) as f64 / n as f64
        );
        let (sure, maybe) = pair_count_bounds(&rows, thr);
        assert!(
            (sure..=maybe).contains(&r.summary.pairs),
            "n={n} thr={thr}: {} pairs, brute force {sure}..={maybe}",
            r.summary.pairs
        );
        for members in groups.values() {
            let rep = reference_representative(&rows, members);
            assert!(
                r.keep[rep],
                "n={n} thr={thr}: representative {rep} of {members:?} not kept"
            );
        }
        if thr >= 0.1 {
            assert!(
                r.summary.removed > 0,
                "planted duplicates must be found (n={n}, thr={thr})"
            );
        }
    }
}

#[test]
fn chains_merge_transitively() {
    // Points on a great circle, 0.06 apart: neighbours are within 0.1, ends are far apart.
    let rows: Vec<Vec<f32>> = (0..21)
        .map(|k| {
            let a = k as f32 * 0.06;
            vec![a.cos(), a.sin(), 0.0]
        })
        .chain(std::iter::once(vec![0.0, 0.0, 1.0]))
        .collect();
    let r = balance(
        &tensor(&rows),
        &BalanceOptions {
            threshold: 0.1,
            block_size: 3,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(r.summary.sets, 2);
    assert_eq!(r.summary.largest_set, 21);
    // The centroid of an evenly spaced arc of 21 points is nearest its middle point, 10.
    assert!(
        r.keep[10] && r.keep[21] && r.keep.iter().filter(|k| **k).count() == 2,
        "{:?}",
        r.keep
    );
}

#[test]
fn sweep_matches_separate_runs_and_thread_count_does_not_matter() {
    let rows = planted(400, 16, 0.08, 9);
    let x = tensor(&rows);
    let sweep = vec![0.05f32, 0.08, 0.12, 0.3];
    let r = balance(
        &x,
        &BalanceOptions {
            threshold: 0.08,
            block_size: 50,
            sweep: sweep.clone(),
            ..Default::default()
        },
    )
    .unwrap();
    let thresholds: Vec<f32> = r.summary.sweep.iter().map(|w| w.threshold).collect();
    assert_eq!(thresholds, sweep);
    for row in &r.summary.sweep {
        assert_eq!(
            row.removed_pct,
            100.0 * (400 - row.kept) as f64 / 400.0,
            "threshold {}",
            row.threshold
        );
        let alone = balance(
            &x,
            &BalanceOptions {
                threshold: row.threshold,
                block_size: 64,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(row.kept, alone.summary.kept, "threshold {}", row.threshold);
    }
    assert!(r
        .summary
        .sweep
        .windows(2)
        .all(|w| w[0].removed_pct <= w[1].removed_pct));
    let in_pool = |threads| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| {
                balance(
                    &x,
                    &BalanceOptions {
                        threshold: 0.08,
                        block_size: 50,
                        ..Default::default()
                    },
                )
                .unwrap()
            })
    };
    let (a, b) = (in_pool(1), in_pool(4));
    // The sweep searches out to its largest threshold (0.3), but the kept rows, the sets
    // and the pair count are those of the threshold alone.
    assert_eq!(
        (&r.keep, &r.set_id, r.summary.pairs),
        (&a.keep, &a.set_id, a.summary.pairs)
    );
    assert!(r
        .summary
        .sweep
        .last()
        .is_some_and(|w| w.kept < r.summary.kept));
    assert_eq!(
        (a.keep, a.set_id, a.representatives),
        (b.keep, b.set_id, b.representatives)
    );
}

#[test]
fn bad_inputs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let shard = |name: &str, rows: usize, d: usize, poison: bool| {
        let mut v = vec![0.5f32; rows * d];
        if poison {
            v[d + 1] = f32::NAN;
        }
        let t: HashMap<String, Tensor> = [(
            "image".to_string(),
            Tensor::from_vec(v, (rows, d), &Device::Cpu).unwrap(),
        )]
        .into();
        let p = dir.path().join(name);
        clipcid_store::io::write_safetensors(&p, t, &HashMap::new()).unwrap();
        p
    };
    let a = shard("a.safetensors", 3, 8, false);
    let b = shard("b.safetensors", 3, 4, false);
    let msg = load_embeddings(&[a.clone(), b], &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("b.safetensors") && msg.contains("4 wide") && msg.contains("has 8"),
        "{msg}"
    );
    let nan = shard("nan.safetensors", 3, 8, true);
    let msg = load_embeddings(&[nan], &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("nan.safetensors") && msg.contains("NaN") && msg.contains("row 1"),
        "{msg}"
    );
    let empty = shard("empty.safetensors", 0, 8, false);
    let msg = load_embeddings(&[empty], &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("no rows"), "{msg}");
    let msg = load_embeddings(&[dir.path().join("none")], &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("none"), "{msg}");

    let e = load_embeddings(&[a], &Device::Cpu).unwrap();
    let r = balance(&e.image, &BalanceOptions::default()).unwrap();
    assert_eq!(r.summary.kept, 1, "three identical rows are one set");
    let out = dir.path().join("keep.safetensors");
    write_keep_file(&out, &r, &e).unwrap();
    let back = clipcid_store::io::load_tensors(&out).unwrap();
    assert_eq!(back["keep"].to_vec1::<u8>().unwrap(), vec![1, 0, 0]);
    assert!(out.with_extension("json").is_file());
    let err = balance(
        &e.image,
        &BalanceOptions {
            threshold: -1.0,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("positive"));
}

fn naive_components(n: usize, edges: &[(u32, u32)]) -> Vec<u32> {
    let mut label: Vec<u32> = (0..n as u32).collect();
    loop {
        let mut changed = false;
        for &(a, b) in edges {
            let m = label[a as usize].min(label[b as usize]);
            for x in [a, b] {
                if label[x as usize] != m {
                    label[x as usize] = m;
                    changed = true;
                }
            }
        }
        if !changed {
            return label;
        }
    }
}

proptest! {
    #[test]
    fn union_find_matches_naive_components(n in 1usize..60, raw in prop::collection::vec((0u32..60, 0u32..60), 0..120)) {
        let edges: Vec<(u32, u32)> = raw.into_iter().map(|(a, b)| (a % n as u32, b % n as u32)).collect();
        let mut uf = UnionFind::new(n);
        for &(a, b) in &edges {
            uf.union(a, b);
        }
        let want = naive_components(n, &edges);
        prop_assert_eq!(uf.canonical_labels(), want.clone());
        let distinct: std::collections::BTreeSet<u32> = want.into_iter().collect();
        prop_assert_eq!(uf.num_sets(), distinct.len());
        // Reversed union order: same partition.
        let mut rev = UnionFind::new(n);
        for &(a, b) in edges.iter().rev() {
            rev.union(b, a);
        }
        prop_assert_eq!(rev.canonical_labels(), uf.canonical_labels());
    }
}

#[test]
fn f16_tiles_and_unnormalised_input_give_the_same_partition() {
    // Well-separated planted data: f16 rounding (~1e-3) cannot move a pair across 0.2.
    let rows = planted(300, 32, 0.03, 5);
    let base = balance(
        &tensor(&rows),
        &BalanceOptions {
            threshold: 0.2,
            block_size: 64,
            ..Default::default()
        },
    )
    .unwrap();
    // Blocks of 16: 190 tiles, read back in several groups of tiles.
    let half = balance(
        &tensor(&rows),
        &BalanceOptions {
            threshold: 0.2,
            block_size: 16,
            f16: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(base.set_id, half.set_id);
    let scaled: Vec<Vec<f32>> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| r.iter().map(|v| v * (1.0 + i as f32)).collect())
        .collect();
    let s = balance(
        &tensor(&scaled),
        &BalanceOptions {
            threshold: 0.2,
            block_size: 64,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        (base.keep, base.set_id, base.representatives),
        (s.keep, s.set_id, s.representatives),
        "rows are normalised before comparing"
    );
}

/// The pairs as sorted `(i, j, bits of dist2)`: equal only when every distance is equal.
fn pair_bits(p: &clipcid_dedup::NearPairs) -> Vec<(u32, u32, u32)> {
    let mut v: Vec<_> = (0..p.len())
        .map(|k| (p.i[k], p.j[k], p.dist2[k].to_bits()))
        .collect();
    v.sort();
    v
}

#[test]
fn three_parts_and_a_merge_give_the_one_process_keep_list_exactly() {
    // 700 planted rows in shards of 97 (f16 and f32 alternating, unnormalised), tiles of 64:
    // 11 row blocks dealt to 3 parts. The pairs the parts find are the one process's pairs,
    // bit for bit, and the merge gives its keep list, sets and representatives.
    use clipcid_dedup::{
        merge_pair_files, near_pairs_of_part, read_pair_file, write_pair_file, PairFile,
    };
    use clipcid_store::{Part, RowReader, ShardLayout};
    let rows = planted(700, 24, 0.05, 11);
    let dir = tempfile::tempdir().unwrap();
    let emb = dir.path().join("emb");
    std::fs::create_dir(&emb).unwrap();
    for (k, chunk) in rows.chunks(97).enumerate() {
        let scaled: Vec<Vec<f32>> = chunk
            .iter()
            .map(|r| r.iter().map(|v| v * (1.0 + k as f32)).collect())
            .collect();
        let mut image = tensor(&scaled);
        if k % 2 == 1 {
            image = image.to_dtype(candle_core::DType::F16).unwrap();
        }
        let ids = Tensor::from_vec(
            (0..chunk.len() as i64)
                .map(|i| 1000 + k as i64 * 97 + i)
                .collect::<Vec<_>>(),
            chunk.len(),
            &Device::Cpu,
        )
        .unwrap();
        clipcid_store::io::write_safetensors(
            &clipcid_store::shard_path(&emb, k),
            [("image".to_string(), image), ("ids".to_string(), ids)],
            &HashMap::new(),
        )
        .unwrap();
    }
    let opts = BalanceOptions {
        threshold: 0.07,
        block_size: 64,
        sweep: vec![0.05],
        ..Default::default()
    };
    let whole = load_embeddings(std::slice::from_ref(&emb), &Device::Cpu).unwrap();
    let one = balance(&whole.image, &opts).unwrap();
    assert!(one.summary.removed > 100, "{:?}", one.summary);
    let reader = RowReader::open(ShardLayout::open(std::slice::from_ref(&emb)).unwrap()).unwrap();
    let all = clipcid_dedup::near_pairs(&whole.image, 0.07, 64, false, || {}).unwrap();
    let mut files = vec![];
    let mut found = vec![];
    for i in 0..3 {
        let part = Part::new(i, 3).unwrap();
        let pairs =
            near_pairs_of_part(&reader, part, 0.07, 64, false, &Device::Cpu, || {}).unwrap();
        found.extend(pair_bits(&pairs));
        let path = dir.path().join(format!("pairs-{i}.safetensors"));
        let file = PairFile {
            pairs,
            rows: reader.len(),
            threshold: 0.07,
            block_size: 64,
            f16: false,
            part,
            embeddings: None,
            row_ids: Some(clipcid_store::row_ids_digest(
                &reader.layout().row_ids().unwrap(),
            )),
        };
        write_pair_file(&path, &file).unwrap();
        let back = read_pair_file(&path).unwrap();
        assert_eq!(back, file);
        files.push((path, back));
    }
    let expected = pair_bits(&all);
    found.sort();
    assert_eq!(
        found, expected,
        "the parts' pairs differ from one process's"
    );
    // f16 tiles (the device path of the product, here on the CPU): the parts' pairs are the
    // one process's f16 pairs.
    let all16 = clipcid_dedup::near_pairs(&whole.image, 0.07, 64, true, || {}).unwrap();
    let mut found16 = vec![];
    for i in 0..2 {
        let part = Part::new(i, 2).unwrap();
        let p = near_pairs_of_part(&reader, part, 0.07, 64, true, &Device::Cpu, || {}).unwrap();
        found16.extend(pair_bits(&p));
    }
    found16.sort();
    assert_eq!(
        found16,
        pair_bits(&all16),
        "f16: the parts' pairs differ from one process's"
    );
    // On each GPU, both tile precisions: the parts find the one process's pairs there (but
    // for distances within rounding of the threshold: the products are not promised to be
    // bit for bit the same off the CPU).
    let gpus = clipcid_kernels::available_devices()
        .into_iter()
        .filter(|d| !d.is_cpu());
    for device in gpus {
        let x = whole.image.to_device(&device).unwrap();
        for f16 in [false, true] {
            let all = clipcid_dedup::near_pairs(&x, 0.07, 64, f16, || {}).unwrap();
            let mut parts = vec![];
            for i in 0..2 {
                let part = Part::new(i, 2).unwrap();
                let p = near_pairs_of_part(&reader, part, 0.07, 64, f16, &device, || {}).unwrap();
                parts.extend(pair_bits(&p));
            }
            let keys = |v: &[(u32, u32, u32)]| -> std::collections::BTreeMap<(u32, u32), f32> {
                v.iter()
                    .map(|&(i, j, d)| ((i, j), f32::from_bits(d)))
                    .collect()
            };
            let (one, split) = (keys(&pair_bits(&all)), keys(&parts));
            assert!(one.len() > 100, "{device:?}: {} pairs", one.len());
            let t2 = 0.07f32 * 0.07;
            for (k, d) in one.iter().filter(|(k, _)| !split.contains_key(k)) {
                assert!(
                    (d - t2).abs() < 1e-5,
                    "{device:?} f16 {f16}: {k:?} ({d}) one process only"
                );
            }
            for (k, d) in split.iter().filter(|(k, _)| !one.contains_key(k)) {
                assert!(
                    (d - t2).abs() < 1e-5,
                    "{device:?} f16 {f16}: {k:?} ({d}) parts only"
                );
            }
        }
    }
    // Files in any order.
    files.reverse();
    let merged = merge_pair_files(&reader, &files, &opts).unwrap();
    assert_eq!(merged.keep, one.keep);
    assert_eq!(merged.set_id, one.set_id);
    assert_eq!(merged.representatives, one.representatives);
    assert_eq!(merged.summary.sweep, one.summary.sweep);
    assert_eq!(
        (merged.summary.kept, merged.summary.pairs),
        (one.summary.kept, one.summary.pairs)
    );
    // The same rows in another order (two shards of 97 rows swapped on the command line)
    // are refused: the pairs name rows by position, and were merged into other sets.
    let mut swapped = clipcid_store::list_shards(&emb).unwrap();
    swapped.swap(0, 1);
    let other_order = RowReader::open(ShardLayout::open(&swapped).unwrap()).unwrap();
    assert_eq!(other_order.len(), reader.len());
    let e = merge_pair_files(&other_order, &files, &opts)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("pairs-") && e.contains("in another order"),
        "{e}"
    );
    // A file recording no digest (written before it was recorded) is merged as before.
    let unrecorded: Vec<_> = files
        .iter()
        .map(|(p, f)| {
            (
                p.clone(),
                PairFile {
                    row_ids: None,
                    ..f.clone()
                },
            )
        })
        .collect();
    let merged = merge_pair_files(&reader, &unrecorded, &opts).unwrap();
    assert_eq!(merged.keep, one.keep);
    // Missing, repeated or mismatched parts are refused by name.
    let e = merge_pair_files(&reader, &files[1..], &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("parts 2/3 are missing"), "{e}");
    // A file claiming 2^60 parts names the first few missing and counts the rest (a table
    // of every part once overflowed its capacity).
    let huge = Part::new(0, 1 << 60).unwrap();
    let claimed = vec![(
        files[0].0.clone(),
        PairFile {
            part: huge,
            ..files[0].1.clone()
        },
    )];
    let e = merge_pair_files(&reader, &claimed, &opts)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("parts 1/1152921504606846976, 2/1152921504606846976")
            && e.contains("and 1152921504606846967 more are missing"),
        "{e}"
    );
    let twice = vec![files[0].clone(), files[0].clone(), files[1].clone()];
    let e = merge_pair_files(&reader, &twice, &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("also given as"), "{e}");
    let higher = BalanceOptions {
        threshold: 0.1,
        ..opts.clone()
    };
    let e = merge_pair_files(&reader, &files, &higher)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("searched up to 0.07") && e.contains("--threshold 0.1"),
        "{e}"
    );
    // A threshold that is not a distance is refused, not read as "merge nothing" (NaN, whose
    // comparisons all fail) or as its absolute value (a negative one, squared).
    for (threshold, sweep) in [
        (f32::NAN, vec![]),
        (-0.05, vec![]),
        (0.0, vec![]),
        (0.05, vec![f32::NEG_INFINITY]),
        (0.05, vec![0.03, -0.01]),
    ] {
        let bad = BalanceOptions {
            threshold,
            sweep: sweep.clone(),
            ..opts.clone()
        };
        let e = merge_pair_files(&reader, &files, &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a distance"), "{threshold} {sweep:?}: {e}");
        assert!(
            balance(&whole.image, &bad).is_err(),
            "{threshold} {sweep:?}"
        );
    }
    // So is a pair file that claims such a search (one written by hand: `balance pairs`
    // refuses the threshold before searching).
    for threshold in [f32::NAN, f32::INFINITY, -0.07] {
        let path = dir.path().join("pairs-bad.safetensors");
        let file = PairFile {
            threshold,
            ..files[0].1.clone()
        };
        write_pair_file(&path, &file).unwrap();
        let e = read_pair_file(&path).unwrap_err().to_string();
        assert!(
            e.contains("pairs-bad.safetensors") && e.contains("bad `threshold` metadata"),
            "{threshold}: {e}"
        );
    }
}

/// A pair file whose arrays disagree in length, or whose pair is not two distinct rows
/// (`i < j < rows`) at a finite distance, is refused with the file's name, as is an array
/// that is not a vector; the same file with good pairs reads back.
#[test]
fn pair_files_with_bad_pairs_are_refused_naming_the_file() {
    use clipcid_dedup::{read_pair_file, write_pair_file, NearPairs, PairFile};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pairs-0.safetensors");
    let good = PairFile {
        pairs: NearPairs {
            i: vec![0, 3],
            j: vec![1, 9],
            dist2: vec![0.001, 0.002],
        },
        rows: 10,
        threshold: 0.1,
        block_size: 4,
        f16: false,
        part: clipcid_store::Part::new(0, 1).unwrap(),
        embeddings: None,
        row_ids: None,
    };
    write_pair_file(&path, &good).unwrap();
    assert_eq!(read_pair_file(&path).unwrap(), good);
    // The good file's metadata around other arrays.
    let metadata = clipcid_store::io::read_header(&path).unwrap().metadata;
    let refused = |i: Tensor, j: Vec<u32>, dist2: Vec<f32>| {
        let tensors = [
            ("i".to_string(), i),
            ("j".to_string(), vector(j)),
            ("dist2".to_string(), vector(dist2)),
        ];
        clipcid_store::io::write_safetensors(&path, tensors, &metadata).unwrap();
        let e = read_pair_file(&path).unwrap_err().to_string();
        assert!(e.contains(&path.display().to_string()), "{e}");
        e
    };
    for (i, j, dist2, why) in [
        (vec![0u32, 3], vec![1], vec![0.001, 0.002], "lengths"),
        (vec![0], vec![1], vec![0.001, 0.002], "lengths"),
        (vec![0, 3], vec![1, 3], vec![0.001, 0.002], "distinct rows"),
        (vec![0, 4], vec![1, 3], vec![0.001, 0.002], "distinct rows"),
        (vec![0, 3], vec![1, 10], vec![0.001, 0.002], "distinct rows"),
        (
            vec![0, 3],
            vec![1, 9],
            vec![0.001, f32::NAN],
            "distinct rows",
        ),
    ] {
        let e = refused(vector(i.clone()), j.clone(), dist2.clone());
        assert!(e.contains(why), "{i:?} {j:?} {dist2:?}: {e}");
    }
    // `i` as a [2, 1] matrix: the right dtype and count, but not a vector.
    let matrix = vector(vec![0u32, 3]).reshape((2, 1)).unwrap();
    let e = refused(matrix, vec![1, 9], vec![0.001, 0.002]);
    assert!(e.contains("`i` must be a U32 vector"), "{e}");
}

/// `v` as a CPU tensor of its length.
fn vector<T: candle_core::WithDType>(v: Vec<T>) -> Tensor {
    let n = v.len();
    Tensor::from_vec(v, n, &Device::Cpu).unwrap()
}

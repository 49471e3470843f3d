#![allow(clippy::unwrap_used)]
//! k-means through faiss: planted partitions, determinism, brute-force assignment,
//! streaming over shards, file round trip, errors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use clipcid_cluster::{
    adjusted_rand_index, assign_shards, cluster_shards, cluster_sizes, plot_size_histogram,
    read_clusters, train_from_shards, write_clusters, Centroids, ClusterFile, ClusterSummary,
    KMeans, KMeansInit, ShardRows, SizeSummary,
};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

fn normalise(v: &mut [f32]) {
    let n = v.iter().map(|a| a * a).sum::<f32>().sqrt();
    v.iter_mut().for_each(|a| *a /= n);
}

/// `k` random unit centres in `d` dimensions, `per` points around each (noise of norm about
/// `noise`), normalised and shuffled. Returns the rows and the planted label of each.
fn planted(k: usize, per: usize, d: usize, noise: f32, seed: u64) -> (Vec<f32>, Vec<u32>) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut centres = vec![0f32; k * d];
    for c in centres.chunks_exact_mut(d) {
        c.iter_mut()
            .for_each(|v| *v = StandardNormal.sample(&mut rng));
        normalise(c);
    }
    let mut rows: Vec<(Vec<f32>, u32)> = Vec::new();
    for (c, centre) in centres.chunks_exact(d).enumerate() {
        for _ in 0..per {
            let mut v: Vec<f32> = centre
                .iter()
                .map(|&x| {
                    let z: f32 = StandardNormal.sample(&mut rng);
                    x + z * noise / (d as f32).sqrt()
                })
                .collect();
            normalise(&mut v);
            rows.push((v, c as u32));
        }
    }
    for i in (1..rows.len()).rev() {
        let j = rng.random_range(0..=i);
        rows.swap(i, j);
    }
    let labels = rows.iter().map(|r| r.1).collect();
    (rows.into_iter().flat_map(|r| r.0).collect(), labels)
}

#[test]
fn planted_clusters_are_recovered_exactly() {
    for (k, d, seed) in [(8, 32, 1u64), (20, 64, 2), (3, 16, 3)] {
        let (x, truth) = planted(k, 40, d, 0.1, seed);
        for spherical in [true, false] {
            let fit = KMeans::new(k)
                .iterations(10)
                .seed(seed as u32)
                .spherical(spherical)
                .init(KMeansInit::PlusPlus)
                .fit_slice(&x, d)
                .unwrap();
            assert_eq!(
                adjusted_rand_index(&fit.labels, &truth).unwrap(),
                1.0,
                "k={k} d={d} spherical={spherical}"
            );
            let sizes = cluster_sizes(&fit.labels, k);
            assert!(sizes.iter().all(|&s| s == 40), "{sizes:?}");
            // Normalised centroids are unit rows.
            for row in fit.centroids.normalized().chunks_exact(d) {
                let n: f32 = row.iter().map(|v| v * v).sum();
                assert!((n - 1.0).abs() < 1e-5);
            }
        }
    }
}

#[test]
fn same_seed_same_result_and_seed_matters() {
    let (x, _) = planted(16, 30, 24, 0.6, 9);
    for init in [KMeansInit::Random, KMeansInit::PlusPlus] {
        let run = |seed| {
            KMeans::new(16)
                .iterations(8)
                .redo(2)
                .seed(seed)
                .init(init)
                .fit_slice(&x, 24)
                .unwrap()
        };
        let (a, b) = (run(5), run(5));
        assert_eq!(a.centroids.as_slice(), b.centroids.as_slice(), "{init:?}");
        assert_eq!(a.labels, b.labels);
        // A different seed starts elsewhere: the centroids differ (noisy, overlapping data).
        assert_ne!(
            run(6).centroids.as_slice(),
            a.centroids.as_slice(),
            "{init:?}"
        );
    }
}

/// Spherical training on unit rows searches by L2 (faster in faiss 1.12); on rows scaled by 2
/// (not unit) by inner product. Scaling every row by 2 changes neither the normalised centroids
/// nor the assignments of spherical k-means and doubles its objective (the sum of inner
/// products), so the two paths must agree.
#[test]
fn spherical_training_on_unit_rows_agrees_with_inner_product_search() {
    for (k, d, seed) in [(6, 32, 11u64), (12, 48, 12)] {
        let (x, _) = planted(k, 100, d, 0.6, seed);
        let doubled: Vec<f32> = x.iter().map(|v| v * 2.0).collect();
        let fit = |x: &[f32], redo| {
            KMeans::new(k)
                .iterations(10)
                .redo(redo)
                .seed(seed as u32)
                .fit_slice(x, d)
                .unwrap()
        };
        for redo in [1, 3] {
            let (unit, scaled) = (fit(&x, redo), fit(&doubled, redo));
            assert_eq!(unit.labels, scaled.labels, "k={k} redo={redo}");
            let diff = unit
                .centroids
                .as_slice()
                .iter()
                .zip(scaled.centroids.as_slice())
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-4, "k={k} redo={redo}: centroids differ by {diff}");
            let (a, b) = (unit.centroids.objective, scaled.centroids.objective / 2.0);
            assert!(
                (a - b).abs() <= 1e-3 * b.abs() && a > 0.0 && a <= x.len() as f32 / d as f32,
                "k={k} redo={redo}: objective {a} on unit rows, {b} from the doubled rows / 2"
            );
        }
    }
}

#[test]
fn assignment_matches_brute_force() {
    let (x, _) = planted(10, 30, 16, 0.8, 4);
    let d = 16;
    for spherical in [true, false] {
        let fit = KMeans::new(10)
            .iterations(5)
            .spherical(spherical)
            .fit_slice(&x, d)
            .unwrap();
        let c = fit.centroids.as_slice();
        for (i, row) in x.chunks_exact(d).enumerate() {
            let score = |j: usize| -> f64 {
                let cj = &c[j * d..(j + 1) * d];
                if spherical {
                    row.iter().zip(cj).map(|(a, b)| (a * b) as f64).sum()
                } else {
                    -row.iter()
                        .zip(cj)
                        .map(|(a, b)| ((a - b) * (a - b)) as f64)
                        .sum::<f64>()
                }
            };
            let got = fit.labels[i] as usize;
            let best = (0..10).map(score).fold(f64::NEG_INFINITY, f64::max);
            assert!(
                score(got) >= best - 1e-5,
                "row {i}: {} vs {best}",
                score(got)
            );
        }
        // The tensor entry point gives the same as the slice one.
        let t = Tensor::from_vec(x.clone(), (x.len() / d, d), &Device::Cpu).unwrap();
        let via_tensor = KMeans::new(10)
            .iterations(5)
            .spherical(spherical)
            .fit(&t)
            .unwrap();
        assert_eq!(via_tensor.labels, fit.labels);
    }
}

#[test]
fn builder_options_read_back_and_reach_the_centroids() {
    let km = KMeans::new(5)
        .iterations(7)
        .seed(99)
        .spherical(false)
        .init(KMeansInit::PlusPlus)
        .gpu(Some(3));
    assert_eq!(
        (
            km.k(),
            km.get_iterations(),
            km.get_seed(),
            km.get_spherical()
        ),
        (5, 7, 99, false)
    );
    assert!(
        KMeans::new(5).get_spherical(),
        "spherical by default, as in the paper"
    );
    assert_eq!(
        (km.get_init(), km.get_gpu()),
        (KMeansInit::PlusPlus, Some(3))
    );
    let (x, _) = planted(5, 8, 6, 0.3, 4);
    for spherical in [true, false] {
        let c = km
            .clone()
            .gpu(None)
            .spherical(spherical)
            .train(&x, 6)
            .unwrap();
        assert_eq!((c.k(), c.dim(), c.is_spherical()), (5, 6, spherical));
    }
}

/// The objective faiss reports is the last iteration's: once the centroids stop moving it
/// is the brute-force sum over the rows with the final centroids, of inner products
/// (spherical) or squared distances (L2). Spherical training on unit rows searches by L2 and
/// converts faiss's figure back; rows of other norms and L2 k-means must not be converted.
#[test]
fn objective_is_the_sum_the_final_centroids_give() {
    let d = 16;
    let (unit, _) = planted(5, 40, d, 0.1, 21);
    let scaled: Vec<f32> = unit
        .chunks_exact(d)
        .enumerate()
        .flat_map(|(i, r)| r.iter().map(move |v| v * (1.0 + (i % 4) as f32)))
        .collect();
    for (x, spherical) in [
        (&unit, true),
        (&scaled, true),
        (&unit, false),
        (&scaled, false),
    ] {
        for init in [KMeansInit::Random, KMeansInit::PlusPlus] {
            let fit = KMeans::new(5)
                .iterations(25)
                .seed(3)
                .spherical(spherical)
                .init(init)
                .fit_slice(x, d)
                .unwrap();
            let c = fit.centroids.as_slice();
            let want: f64 = x
                .chunks_exact(d)
                .zip(&fit.labels)
                .map(|(row, &l)| {
                    let cl = &c[l as usize * d..(l as usize + 1) * d];
                    row.iter()
                        .zip(cl)
                        .map(|(&a, &b)| {
                            let (a, b) = (a as f64, b as f64);
                            if spherical {
                                a * b
                            } else {
                                (a - b) * (a - b)
                            }
                        })
                        .sum::<f64>()
                })
                .sum();
            let got = fit.centroids.objective as f64;
            assert!(
                (got - want).abs() <= 1e-4 * want.abs(),
                "spherical {spherical}, {init:?}: objective {got}, brute force {want}"
            );
            // And its imbalance factor, K sum(size^2) / n^2, is that of the final labels.
            let n = fit.labels.len() as f64;
            let squares: f64 = cluster_sizes(&fit.labels, 5)
                .iter()
                .map(|&s| (s as f64) * (s as f64))
                .sum();
            let imbalance = 5.0 * squares / (n * n);
            assert!(
                (fit.centroids.imbalance_factor - imbalance).abs() < 1e-9,
                "{} vs {imbalance}",
                fit.centroids.imbalance_factor
            );
        }
    }
}

/// With k-means++ starts, `redo(n)` runs seeds `seed, seed + 1, ...` and keeps the run with
/// the best objective: the largest sum of inner products (spherical), the smallest sum of
/// squared distances (L2).
#[test]
fn redo_keeps_the_best_of_its_runs() {
    let d = 24;
    let (x, _) = planted(16, 30, d, 0.6, 9);
    for spherical in [true, false] {
        let km = KMeans::new(16)
            .iterations(4)
            .spherical(spherical)
            .init(KMeansInit::PlusPlus);
        let singles: Vec<_> = (0..3)
            .map(|i| km.clone().seed(5 + i).train(&x, d).unwrap())
            .collect();
        let objectives: Vec<f32> = singles.iter().map(|c| c.objective).collect();
        let best = if spherical {
            objectives.iter().copied().fold(f32::MIN, f32::max)
        } else {
            objectives.iter().copied().fold(f32::MAX, f32::min)
        };
        let best = singles.iter().position(|c| c.objective == best).unwrap();
        let runs = objectives
            .iter()
            .filter(|&&o| o == objectives[best])
            .count();
        assert!(runs == 1, "spherical {spherical}: runs tie {objectives:?}");
        // The first run is not the best here: keeping it would fail.
        assert_ne!(best, 0, "spherical {spherical}: {objectives:?}");
        let redo = km.clone().seed(5).redo(3).train(&x, d).unwrap();
        assert_eq!(
            redo.as_slice(),
            singles[best].as_slice(),
            "spherical {spherical}: {objectives:?}"
        );
    }
}

#[test]
fn adjusted_rand_index_matches_known_values() {
    // Values from scikit-learn's adjusted_rand_score.
    let ari = |a: &[u32], b: &[u32]| adjusted_rand_index(a, b).unwrap();
    assert_eq!(ari(&[0, 0, 1, 1], &[1, 1, 0, 0]), 1.0);
    assert!((ari(&[0, 0, 1, 1], &[0, 0, 1, 2]) - 0.571_428_571_428_571_5).abs() < 1e-12);
    assert!(
        (ari(&[0, 0, 0, 1, 1, 1], &[0, 0, 1, 1, 2, 2]) - 0.242_424_242_424_242_4).abs() < 1e-12
    );
    assert!((ari(&[0, 0, 1, 1], &[0, 1, 0, 1]) + 0.5).abs() < 1e-12);
    assert!(adjusted_rand_index(&[0, 1], &[0]).is_err());
    // Both all-one-cluster, or both all-singletons: the same partition, 1 (scikit-learn's
    // special case; the formula would divide 0 by 0).
    assert_eq!(ari(&[4, 4, 4], &[7, 7, 7]), 1.0);
    assert_eq!(ari(&[0, 1, 2], &[2, 0, 1]), 1.0);
    assert_eq!(ari(&[0, 1, 2], &[5, 5, 5]), 0.0);
}

#[test]
fn bad_inputs_are_clear_errors() {
    let (x, _) = planted(2, 3, 4, 0.1, 1);
    let msg = |r: Result<_, clipcid_cluster::ClusterError>| r.err().unwrap().to_string();
    let e = msg(KMeans::new(7).fit_slice(&x, 4).map(|_| ()));
    assert!(e.contains("K = 7") && e.contains("(6)"), "{e}");
    let e = msg(KMeans::new(2).fit_slice(&x, 5).map(|_| ()));
    assert!(e.contains("width 5"), "{e}");
    let mut nan = x.clone();
    nan[9] = f32::NAN;
    let e = msg(KMeans::new(2).fit_slice(&nan, 4).map(|_| ()));
    assert!(e.contains("non-finite") && e.contains("row 2"), "{e}");
    let e = msg(KMeans::new(0).fit_slice(&x, 4).map(|_| ()));
    assert!(e.contains("at least 1"), "{e}");
    // 0 was read as 1: K training rows, each its own centroid.
    let e = msg(KMeans::new(2)
        .max_points_per_centroid(0)
        .fit_slice(&x, 4)
        .map(|_| ()));
    assert!(
        e.contains("max points per centroid must be at least 1"),
        "{e}"
    );
    for km in [KMeans::new(2).iterations(0), KMeans::new(2).redo(0)] {
        let e = msg(km.fit_slice(&x, 4).map(|_| ()));
        assert!(e.contains("iterations and redo must be at least 1"), "{e}");
    }
    // As many centroids as rows is allowed.
    assert_eq!(KMeans::new(6).fit_slice(&x, 4).unwrap().centroids.k(), 6);
    for (data, k, d) in [(vec![], 0, 4), (vec![], 1, 0), (vec![0.5; 6], 2, 4)] {
        let e = msg(Centroids::from_vec(data, k, d, true).map(|_| ()));
        assert!(e.contains("do not make"), "{e}");
    }
    // A non-finite value is found wherever it is, and its row named (9 values: an odd
    // count, so a parity-like fold would also flag finite data).
    let fine = vec![0.25f32; 9];
    assert!(Centroids::from_vec(fine.clone(), 3, 3, false).is_ok());
    for at in 0..9 {
        let mut bad = fine.clone();
        bad[at] = f32::INFINITY;
        let e = msg(Centroids::from_vec(bad, 3, 3, false).map(|_| ()));
        assert!(
            e.contains(&format!(
                "centroids: non-finite value inf in row {}",
                at / 3
            )),
            "{e}"
        );
    }
    // Past the first block of 65,536 values the row is still counted from the start.
    let mut wide = vec![0.25f32; 70_000];
    wide[68_005] = f32::NAN;
    let e = msg(Centroids::from_vec(wide, 7_000, 10, false).map(|_| ()));
    assert!(e.contains("non-finite value NaN in row 6800"), "{e}");
    // Centroids of another width cannot label these rows.
    let c = KMeans::new(2).train(&x, 4).unwrap();
    let e = msg(c.assign(&x[..10]).map(|_| ()));
    assert!(e.contains("width 4"), "{e}");
    #[cfg(not(feature = "faiss-gpu"))]
    {
        let e = msg(KMeans::new(2).gpu(Some(0)).fit_slice(&x, 4).map(|_| ()));
        assert!(e.contains("faiss-gpu"), "{e}");
    }
}

#[test]
fn training_sample_is_seeded_bounded_and_used() {
    let km = KMeans::new(4).max_points_per_centroid(5).seed(3);
    let rows = km.training_rows(100);
    assert_eq!(rows.len(), 20);
    assert!(rows.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(rows, km.training_rows(100));
    assert_ne!(rows, km.clone().seed(4).training_rows(100));
    assert_eq!(km.training_rows(15), (0..15).collect::<Vec<_>>());
    // Training on all rows equals training on exactly the sampled rows.
    let (x, _) = planted(4, 25, 8, 0.3, 2);
    let full = km.train(&x, 8).unwrap();
    assert_eq!(full.trained_on, 20);
    let sample: Vec<f32> = rows
        .iter()
        .flat_map(|&r| x[r * 8..(r + 1) * 8].to_vec())
        .collect();
    let direct = km.train_sample(&sample, 8).unwrap();
    assert_eq!(full.as_slice(), direct.as_slice());
}

/// Writes `x` as embedding shards of `per` rows (ids `100 + row`, like `clipcid embed`).
fn write_shards(dir: &Path, x: &[f32], d: usize, per: usize) -> Vec<PathBuf> {
    let n = x.len() / d;
    let mut paths = Vec::new();
    for (s, start) in (0..n).step_by(per).enumerate() {
        let m = per.min(n - start);
        let image =
            Tensor::from_vec(x[start * d..(start + m) * d].to_vec(), (m, d), &Device::Cpu).unwrap();
        let ids = Tensor::from_vec(
            (start as i64 + 100..(start + m) as i64 + 100).collect::<Vec<_>>(),
            m,
            &Device::Cpu,
        )
        .unwrap();
        let p = clipcid_store::shard_path(dir, s);
        clipcid_store::io::write_safetensors(
            &p,
            vec![("image".into(), image), ("ids".into(), ids)],
            &HashMap::new(),
        )
        .unwrap();
        paths.push(p);
    }
    paths
}

fn write_keep(path: &Path, keep: &[bool], ids: &[i64]) {
    let t = vec![
        (
            "keep".to_string(),
            Tensor::from_vec(
                keep.iter().map(|&k| k as u8).collect::<Vec<_>>(),
                keep.len(),
                &Device::Cpu,
            )
            .unwrap(),
        ),
        (
            "ids".to_string(),
            Tensor::from_vec(ids.to_vec(), ids.len(), &Device::Cpu).unwrap(),
        ),
    ];
    clipcid_store::io::write_safetensors(path, t, &HashMap::new()).unwrap();
}

#[test]
fn streaming_over_shards_equals_in_memory_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let d = 12;
    let (mut x, _) = planted(6, 30, d, 0.4, 8);
    // Scale rows: the shard reader normalises them, as the in-memory reference does here.
    for (i, row) in x.chunks_exact_mut(d).enumerate() {
        row.iter_mut().for_each(|v| *v *= 1.0 + (i % 3) as f32);
    }
    write_shards(dir.path(), &x, d, 47);
    let n = x.len() / d;
    let keep: Vec<bool> = (0..n).map(|i| i % 4 != 1).collect();
    let ids: Vec<i64> = (0..n as i64).map(|i| i + 100).collect();
    let keep_path = dir.path().join("keep.safetensors");
    write_keep(&keep_path, &keep, &ids);

    let kept_rows: Vec<f32> = x
        .chunks_exact(d)
        .zip(&keep)
        .filter(|(_, &k)| k)
        .flat_map(|(r, _)| {
            let mut r = r.to_vec();
            normalise(&mut r);
            r
        })
        .collect();
    let km = KMeans::new(6)
        .iterations(6)
        .max_points_per_centroid(20)
        .seed(11);
    let rows = ShardRows::open(&[dir.path().to_path_buf()], Some(&keep_path)).unwrap();
    assert_eq!(
        (rows.total(), rows.kept(), rows.dim()),
        (n, kept_rows.len() / d, d)
    );
    let streamed = train_from_shards(&km, &rows).unwrap();
    let in_memory = km.train(&kept_rows, d).unwrap();
    assert_eq!(streamed.trained_on, 120);
    assert_eq!(streamed.as_slice(), in_memory.as_slice());
    let mut progress = Vec::new();
    let (labels, kept_ids) = assign_shards(&streamed, &rows, |done| progress.push(done)).unwrap();
    assert_eq!(labels, in_memory.assign(&kept_rows).unwrap());
    assert_eq!(progress.last(), Some(&labels.len()));
    let expect_ids: Vec<i64> = ids
        .iter()
        .zip(&keep)
        .filter(|(_, &k)| k)
        .map(|(&i, _)| i)
        .collect();
    assert_eq!(kept_ids, expect_ids);
    // The whole stage gathers the same centroids, labels and ids, and a summary of the
    // options it ran with.
    let staged = cluster_shards(&km, &rows, false).unwrap();
    assert_eq!(
        (
            &staged.centroids,
            &staged.labels,
            &staged.ids,
            staged.k,
            staged.dim
        ),
        (&streamed.normalized(), &labels, &expect_ids, 6, d)
    );
    assert_eq!(staged.sizes, cluster_sizes(&labels, 6));
    let s = &staged.summary;
    assert_eq!(
        (
            s.dim,
            s.iterations,
            s.seed,
            s.spherical,
            s.init,
            s.trained_on
        ),
        (d, 6, 11, true, KMeansInit::Random, 120)
    );
    assert_eq!(s.objective, streamed.objective);
    // As many centroids as kept rows is allowed; one more is not.
    let kept = rows.kept();
    let all = train_from_shards(&KMeans::new(kept).iterations(1), &rows).unwrap();
    assert_eq!((all.k(), all.trained_on), (kept, kept));
    let e = train_from_shards(&KMeans::new(kept + 1), &rows)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!(
            "K = {} is larger than the number of kept embeddings ({kept})",
            kept + 1
        )),
        "{e}"
    );

    // Cluster file round trip, summary JSON beside it, histogram PNG that decodes.
    let sizes = cluster_sizes(&labels, 6);
    let file = ClusterFile {
        centroids: streamed.normalized(),
        k: 6,
        dim: d,
        labels: labels.clone(),
        ids: kept_ids,
        sizes: sizes.clone(),
        summary: ClusterSummary {
            dim: d,
            sizes: SizeSummary::of(&sizes),
            ..Default::default()
        },
        embeddings: Some(r#"{"teacher":"ab"}"#.to_string()),
    };
    let out = dir.path().join("clusters.safetensors");
    write_clusters(&out, &file).unwrap();
    assert_eq!(read_clusters(&out).unwrap(), file);
    assert!(dir.path().join("clusters.json").exists());
    let png = dir.path().join("sizes.png");
    plot_size_histogram(
        &png,
        "cluster sizes",
        &[("after", &sizes), ("before", &[50, 10, 3])],
    )
    .unwrap();
    let img = image::open(&png).unwrap();
    assert_eq!((img.width(), img.height()), (900, 540));
    assert!(std::fs::read_dir(dir.path()).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains(".tmp")));

    // Mismatched inputs are errors naming the file.
    let other = dir.path().join("other-keep.safetensors");
    write_keep(&other, &keep[..10], &ids[..10]);
    let e = ShardRows::open(&[dir.path().to_path_buf()], Some(&other))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("other-keep.safetensors") && e.contains("covers 10 rows"),
        "{e}"
    );
    let mut wrong_ids = ids.clone();
    wrong_ids[50] = 7;
    write_keep(&other, &keep, &wrong_ids);
    let rows = ShardRows::open(&[dir.path().to_path_buf()], Some(&other)).unwrap();
    let e = assign_shards(&streamed, &rows, |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("embeddings-00001") && e.contains("id 150") && e.contains("id 7"),
        "{e}"
    );
    // A non-finite value in a kept row names the shard, row and sample.
    let nan_dir = dir.path().join("nan");
    let mut bad = x.clone();
    bad[3 * d + 2] = f32::NAN;
    std::fs::create_dir(&nan_dir).unwrap();
    write_shards(&nan_dir, &bad, d, 47);
    let rows = ShardRows::open(&[nan_dir], None).unwrap();
    let e = assign_shards(&streamed, &rows, |_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("embeddings-00000") && e.contains("NaN in row 3"),
        "{e}"
    );
    let e = read_clusters(&keep_path).unwrap_err().to_string();
    assert!(
        e.contains("keep.safetensors") && e.contains("`centroids`"),
        "{e}"
    );
    // A cluster file whose labels are floats (cast, 3.7 read as 3) or whose sizes are not
    // its labels' counts is refused by name.
    let tensors = clipcid_store::io::load_tensors(&out).unwrap();
    let meta = clipcid_store::io::read_header(&out).unwrap().metadata;
    let rewrite = |name: &str, t: candle_core::Tensor| {
        let mut all = tensors.clone();
        all.insert(name.to_string(), t);
        let path = dir.path().join("edited.safetensors");
        clipcid_store::io::write_safetensors(&path, all, &meta).unwrap();
        read_clusters(&path).unwrap_err().to_string()
    };
    let n = labels.len();
    let mut float_labels: Vec<f32> = labels.iter().map(|&l| l as f32).collect();
    float_labels[0] += 0.7;
    let e = rewrite(
        "labels",
        candle_core::Tensor::from_vec(float_labels, n, &candle_core::Device::Cpu).unwrap(),
    );
    assert!(
        e.contains("edited.safetensors") && e.contains("`labels` holds F32"),
        "{e}"
    );
    // Labels stored as i64 must fit u32: 2^32 + 1 was read as 1 (a narrowing cast wraps),
    // -1 as 4294967295.
    for (wrapped, says) in [(1i64 << 32) + 1, -1].into_iter().zip(["4294967297", "-1"]) {
        let mut wide: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
        wide[0] = wrapped;
        let e = rewrite(
            "labels",
            candle_core::Tensor::from_vec(wide, n, &candle_core::Device::Cpu).unwrap(),
        );
        assert!(
            e.contains("edited.safetensors")
                && e.contains(&format!("`labels` holds {says}, outside 0..=4294967295")),
            "{e}"
        );
    }
    // In range, i64 labels are read as they are.
    let wide: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
    let mut all = tensors.clone();
    all.insert(
        "labels".to_string(),
        candle_core::Tensor::from_vec(wide, n, &candle_core::Device::Cpu).unwrap(),
    );
    let path = dir.path().join("i64-labels.safetensors");
    clipcid_store::io::write_safetensors(&path, all, &meta).unwrap();
    assert_eq!(read_clusters(&path).unwrap().labels, labels);
    let mut off = sizes.clone();
    off[2] += 1;
    let e = rewrite(
        "sizes",
        candle_core::Tensor::from_vec(off, 6, &candle_core::Device::Cpu).unwrap(),
    );
    assert!(e.contains("`sizes` says cluster 2 holds"), "{e}");
}

#[test]
fn size_summary_counts_empty_clusters() {
    let s = SizeSummary::of(&[0, 5, 2, 0, 9]);
    assert_eq!(
        (s.k, s.n, s.empty, s.min, s.median, s.max),
        (5, 16, 2, 0, 2, 9)
    );
}

#[test]
fn a_keep_file_of_other_embeddings_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = r#"{"teacher":"aa","data":"dd"}"#;
    let b = r#"{"teacher":"bb","data":"dd"}"#;
    let image = Tensor::ones((3, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
    let shard = clipcid_store::shard_path(dir.path(), 0);
    let meta = HashMap::from([("provenance".to_string(), a.to_string())]);
    clipcid_store::io::write_safetensors(&shard, [("image".to_string(), image)], &meta).unwrap();
    let keep = dir.path().join("keep.safetensors");
    let write = |provenance: Option<&str>| {
        let flags = [true, false, true];
        clipcid_store::write_keep_file(
            &keep,
            &flags,
            &[0, 0, 1],
            &[0, 2],
            &[0, 1, 2],
            &"",
            provenance,
        )
        .unwrap();
    };
    let open = || ShardRows::open(&[dir.path().to_path_buf()], Some(&keep));
    // Same ids, same row count: only the recorded provenance tells them apart.
    write(Some(b));
    let e = open().unwrap_err().to_string();
    assert!(
        e.contains("keep.safetensors") && e.contains("different teacher"),
        "{e}"
    );
    write(Some(a));
    assert_eq!(open().unwrap().kept(), 2);
    // A keep file that records none (another tool's) is checked by ids only.
    write(None);
    assert_eq!(open().unwrap().kept(), 2);
    // The cluster file carries the shards' provenance on.
    let kmeans = KMeans::new(1).seed(1);
    let file = cluster_shards(&kmeans, &open().unwrap(), false).unwrap();
    assert_eq!(file.embeddings.as_deref(), Some(a));
}

#[test]
fn assignment_on_a_candle_device_equals_faiss() {
    // The path `clipcid --device cuda:N cluster` takes, run here on the CPU device.
    let d = 24;
    let (x, _) = planted(8, 60, d, 0.5, 3);
    for spherical in [true, false] {
        let c = KMeans::new(8)
            .seed(2)
            .spherical(spherical)
            .train(&x, d)
            .unwrap();
        let faiss = c.assign(&x).unwrap();
        let on_device = c.device_assigner(&Device::Cpu).unwrap().assign(&x).unwrap();
        assert_eq!(on_device, faiss, "spherical {spherical}");
    }
    // L2 centroids of different norms: the nearest is not the largest inner product.
    let c = Centroids::from_vec(vec![1.0, 0.0, 3.0, 0.0, 0.0, 0.5], 3, 2, false).unwrap();
    let rows = [1.2f32, 0.1, 2.2, 0.0, 0.1, 0.3, 1.9, 0.2];
    let on_device = c
        .device_assigner(&Device::Cpu)
        .unwrap()
        .assign(&rows)
        .unwrap();
    assert_eq!(on_device, vec![0, 1, 2, 0]);
    assert_eq!(c.assign(&rows).unwrap(), on_device);
}

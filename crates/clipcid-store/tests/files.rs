#![allow(clippy::unwrap_used)] // test setup
//! The stage files other than shards (cluster files, keep files), the image digests, the
//! provenance check and the `--part` share: round trips, and each refusal named, on read and
//! before a write (a file a reader would refuse is never written).

use std::path::Path;

mod common;
use common::write_tensors;

use candle_core::{Device, Tensor};
use clipcid_store::clusters::cluster_sizes;
use clipcid_store::{
    check_same_embeddings, differing_fields, image_digest, read_clusters, sha256_hex, shard_path,
    write_clusters, write_keep_file, ClusterFile, ClusterSummary, ImageDigests, KMeansInit,
    KeepList, Part, ShardLayout, SizeSummary,
};

/// A consistent cluster file: 4 rows in 3 clusters of width 2.
fn clusters() -> ClusterFile {
    let labels = vec![2, 0, 2, 1];
    ClusterFile {
        centroids: vec![1.0, 0.0, 0.0, 1.0, -0.6, 0.8],
        k: 3,
        dim: 2,
        sizes: cluster_sizes(&labels, 3),
        labels,
        ids: vec![10, 11, 12, 13],
        summary: ClusterSummary {
            dim: 2,
            iterations: 7,
            seed: 3,
            spherical: true,
            init: KMeansInit::PlusPlus,
            trained_on: 4,
            objective: 1.5,
            imbalance_factor: 1.25,
            sizes: SizeSummary::of(&[1, 1, 2]),
            seconds_train: 0.5,
            seconds_assign: 0.25,
        },
        embeddings: Some(r#"{"teacher":"aa"}"#.into()),
    }
}

#[test]
fn cluster_files_round_trip_and_what_a_reader_refuses_is_never_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("clusters.safetensors");
    let file = clusters();
    assert_eq!(file.sizes, vec![1, 1, 2]);
    write_clusters(&path, &file).unwrap();
    assert_eq!(read_clusters(&path).unwrap(), file);
    let beside: ClusterSummary =
        serde_json::from_slice(&std::fs::read(path.with_extension("json")).unwrap()).unwrap();
    assert_eq!(beside, file.summary);
    let centroids = file.centroids_tensor(&Device::Cpu).unwrap();
    assert_eq!(centroids.dims(), [3, 2]);
    assert_eq!(
        centroids.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        file.centroids
    );

    // Each refusal names the file and the problem, and leaves no file (nor summary).
    let refused = |change: &dyn Fn(&mut ClusterFile), says: &str| {
        let mut bad = clusters();
        change(&mut bad);
        let out = dir.path().join("refused.safetensors");
        let e = write_clusters(&out, &bad).unwrap_err().to_string();
        assert!(
            e.contains("refused.safetensors") && e.contains("not written") && e.contains(says),
            "{says}: {e}"
        );
        assert!(
            !out.exists() && !out.with_extension("json").exists(),
            "{says}"
        );
    };
    refused(
        &|f| f.ids.push(14),
        "4 labels, 5 ids and 3 sizes for 3 clusters",
    );
    refused(
        &|f| f.sizes.push(0),
        "4 labels, 4 ids and 4 sizes for 3 clusters",
    );
    refused(
        &|f| {
            f.centroids.pop();
        },
        "5 centroid values for 3 centroids of width 2",
    );
    refused(
        &|f| {
            f.labels[1] = 3;
        },
        "label 3 is not below K = 3",
    );
    refused(
        &|f| {
            f.sizes = vec![1, 2, 1];
        },
        "`sizes` says cluster 1 holds 2 rows, but 1 labels name it",
    );
    refused(
        &|f| {
            f.centroids[4] = f32::NAN;
        },
        "non-finite value in `centroids`",
    );
    refused(
        &|f| {
            f.centroids[0] = f32::INFINITY;
        },
        "non-finite value in `centroids`",
    );
    // Changes that keep the contents consistent are written: a label moved (its sizes
    // recounted), the largest finite centroid value.
    for change in [
        (|f: &mut ClusterFile| f.labels[1] = 2) as fn(&mut ClusterFile),
        |f| f.centroids[4] = f32::MAX,
    ] {
        let mut ok = clusters();
        change(&mut ok);
        ok.sizes = cluster_sizes(&ok.labels, ok.k);
        write_clusters(&path, &ok).unwrap();
        assert_eq!(read_clusters(&path).unwrap(), ok);
    }
}

#[test]
fn cluster_files_from_other_writers_are_checked_when_read() {
    let dir = tempfile::tempdir().unwrap();
    let cpu = Device::Cpu;
    let path = dir.path().join("other.safetensors");
    let write = |labels: &[u32], ids: &[i64], sizes: &[u32], centroids: &[f32]| {
        let tensors = [
            (
                "centroids",
                Tensor::from_slice(centroids, (2, 2), &cpu).unwrap(),
            ),
            ("labels", Tensor::new(labels, &cpu).unwrap()),
            ("ids", Tensor::new(ids, &cpu).unwrap()),
            ("sizes", Tensor::new(sizes, &cpu).unwrap()),
        ];
        write_tensors(&path, tensors);
        read_clusters(&path)
    };
    let unit = [1.0f32, 0.0, 0.0, 1.0];
    // No summary metadata: the default summary and no provenance.
    let file = write(&[1, 1, 0], &[5, 6, 7], &[1, 2], &unit).unwrap();
    assert_eq!((file.k, file.dim, file.labels.len()), (2, 2, 3));
    assert_eq!(file.summary, ClusterSummary::default());
    assert_eq!(file.embeddings, None);
    for (e, says) in [
        (
            write(&[1, 1], &[5, 6, 7], &[0, 2], &unit),
            "2 labels, 3 ids and 2 sizes for 2 clusters",
        ),
        (
            write(&[1, 2, 0], &[5, 6, 7], &[1, 1], &unit),
            "label 2 is not below K = 2",
        ),
        (
            write(&[1, 1, 0], &[5, 6, 7], &[2, 1], &unit),
            "`sizes` says cluster 0 holds 2 rows, but 1 labels name it",
        ),
        (
            write(&[1, 1, 0], &[5, 6, 7], &[1, 2], &[1.0, f32::NAN, 0.0, 1.0]),
            "non-finite value in `centroids`",
        ),
    ] {
        let e = e.unwrap_err().to_string();
        assert!(
            e.contains("other.safetensors") && e.contains(says),
            "{says}: {e}"
        );
    }
    // A missing tensor is named.
    write_tensors(&path, [("labels", Tensor::new(&[0u32], &cpu).unwrap())]);
    let e = read_clusters(&path).unwrap_err().to_string();
    assert!(e.contains("no `centroids` tensor"), "{e}");
}

#[test]
fn cluster_sizes_and_their_summary_against_counting_by_hand() {
    // Labels from K up are not counted; clusters no label names are 0.
    assert_eq!(cluster_sizes(&[0, 3, 0, 9, 1], 4), vec![2, 1, 0, 1]);
    assert_eq!(cluster_sizes(&[], 2), vec![0, 0]);
    assert!(cluster_sizes(&[0, 1], 0).is_empty());
    let s = SizeSummary::of(&[5, 0, 3, 9, 1]);
    let want = SizeSummary {
        k: 5,
        n: 18,
        empty: 1,
        min: 0,
        median: 3,
        max: 9,
    };
    assert_eq!(s, want);
    // The lower median of an even count.
    let s = SizeSummary::of(&[4, 1, 3, 2]);
    assert_eq!((s.median, s.min, s.max, s.empty, s.n), (2, 1, 4, 0, 10));
    assert_eq!(SizeSummary::of(&[]), SizeSummary::default());
    // Sizes past u32 in total still add up.
    assert_eq!(
        SizeSummary::of(&[u32::MAX, u32::MAX]).n,
        2 * u32::MAX as usize
    );
}

#[test]
fn k_means_init_names() {
    for (name, init) in [
        ("random", KMeansInit::Random),
        ("kmeans++", KMeansInit::PlusPlus),
        ("k-means++", KMeansInit::PlusPlus),
        ("plus-plus", KMeansInit::PlusPlus),
    ] {
        assert_eq!(name.parse::<KMeansInit>().unwrap(), init, "{name}");
    }
    let e = "forgy".parse::<KMeansInit>().unwrap_err().to_string();
    assert!(e.contains("`forgy`") && e.contains("kmeans++"), "{e}");
    assert_eq!(KMeansInit::default(), KMeansInit::Random);
}

#[test]
fn keep_files_round_trip_and_sets_that_do_not_fit_are_never_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keep.safetensors");
    // Rows 0, 2 and 3 are one set (row 3 kept); rows 1 and 4 stand alone.
    let keep = [false, true, false, true, true];
    let set_id = [0, 1, 0, 0, 2];
    let reps = [3, 1, 4];
    let ids = [10, 11, 12, 13, 14];
    write_keep_file(&path, &keep, &set_id, &reps, &ids, &"s", None).unwrap();
    let list = KeepList::read(&path).unwrap();
    assert_eq!(list.keep, keep);
    assert_eq!(list.ids, ids);
    assert_eq!(list.embeddings, None);
    assert_eq!(list.kept(), 3);
    assert_eq!(list.kept_ids().collect::<Vec<_>>(), vec![11, 13, 14]);
    assert_eq!(KeepList::default().kept(), 0);

    let out = dir.path().join("refused.safetensors");
    for (keep, set_id, reps, ids, says) in [
        (
            &keep[..],
            &set_id[..],
            &reps[..],
            &ids[..4],
            "4 ids and 5 set ids for 5 balanced rows",
        ),
        (
            &keep[..],
            &set_id[..4],
            &reps[..],
            &ids[..],
            "5 ids and 4 set ids",
        ),
        (
            &keep[..],
            &[0, 1, 0, 0, 3][..],
            &reps[..],
            &ids[..],
            "row 4 is in set 3, but there are 3 sets",
        ),
        (
            &keep[..],
            &set_id[..],
            &[3, 1, 5][..],
            &ids[..],
            "set 2's representative, row 5, is not a kept row of that set",
        ),
        (
            &keep[..],
            &set_id[..],
            &[3, 4, 1][..],
            &ids[..],
            "set 1's representative, row 4, is not a kept row of that set",
        ),
        (
            &[true, true, false, false, true][..],
            &set_id[..],
            &reps[..],
            &ids[..],
            "set 0's representative, row 3, is not a kept row of that set",
        ),
        (
            &[true, true, false, true, true][..],
            &set_id[..],
            &reps[..],
            &ids[..],
            "4 rows kept but 3 sets",
        ),
    ] {
        let e = write_keep_file(&out, keep, set_id, reps, ids, &"s", None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("refused.safetensors") && e.contains(says),
            "{says}: {e}"
        );
        assert!(
            !out.exists() && !out.with_extension("json").exists(),
            "{says}"
        );
    }
}

#[test]
fn keep_flags_other_than_zero_or_one_or_of_another_count_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keep.safetensors");
    let cpu = Device::Cpu;
    let read = |flags: &[u8], ids: &[i64]| {
        let tensors = [
            ("keep", Tensor::new(flags, &cpu).unwrap()),
            ("ids", Tensor::new(ids, &cpu).unwrap()),
        ];
        write_tensors(&path, tensors);
        KeepList::read(&path)
    };
    assert_eq!(
        read(&[1, 0, 1], &[4, 5, 6]).unwrap().keep,
        [true, false, true]
    );
    for (flags, ids, says) in [
        (
            &[1u8, 2, 1][..],
            &[4i64, 5, 6][..],
            "`keep` flag 1 is 2, not 0 or 1",
        ),
        (&[1, 0][..], &[4, 5, 6][..], "2 keep flags but 3 ids"),
    ] {
        let e = read(flags, ids).unwrap_err().to_string();
        assert!(
            e.contains("keep.safetensors") && e.contains(says),
            "{says}: {e}"
        );
    }
}

/// The part these launcher variables give.
fn part(vars: &[(&str, &str)]) -> Result<Option<Part>, clipcid_store::StoreError> {
    Part::from_vars(|k| {
        vars.iter()
            .find(|(name, _)| *name == k)
            .map(|(_, v)| v.to_string())
    })
}

#[test]
fn parts_share_items_round_robin_and_come_from_the_launchers_environment() {
    let p = Part::new(2, 3).unwrap();
    assert_eq!((p.index(), p.count()), (2, 3));
    assert!(!p.is_whole() && Part::WHOLE.is_whole() && Part::new(0, 1).unwrap().is_whole());
    assert_eq!((0..8).filter(|&j| p.owns(j)).collect::<Vec<_>>(), [2, 5]);
    // Three parts share every item exactly once.
    for j in 0..20 {
        let owners = (0..3).filter(|&i| Part::new(i, 3).unwrap().owns(j)).count();
        assert_eq!(owners, 1, "item {j}");
    }
    assert_eq!(p.to_string(), "2/3");
    assert_eq!(" 2 / 3 ".parse::<Part>().unwrap(), p);
    assert_eq!(Part::default(), Part::WHOLE);
    for bad in ["2", "3/3", "1/0", "x/3", "1/y"] {
        assert!(bad.parse::<Part>().is_err(), "{bad}");
    }

    assert_eq!(part(&[]).unwrap(), None);
    assert_eq!(
        part(&[("RANK", "1"), ("WORLD_SIZE", "2")]).unwrap(),
        Some(Part::new(1, 2).unwrap())
    );
    // torchrun's pair wins over a Slurm array's.
    let both = [
        ("RANK", "1"),
        ("WORLD_SIZE", "2"),
        ("SLURM_ARRAY_TASK_ID", "3"),
        ("SLURM_ARRAY_TASK_COUNT", "4"),
    ];
    assert_eq!(part(&both).unwrap(), Some(Part::new(1, 2).unwrap()));
    assert_eq!(
        part(&[
            ("SLURM_ARRAY_TASK_ID", "3"),
            ("SLURM_ARRAY_TASK_COUNT", "4")
        ])
        .unwrap(),
        Some(Part::new(3, 4).unwrap())
    );
    // --array=1-7:2 runs ids 1, 3, 5 and 7: parts 0..4 of 4.
    for (id, index) in [("1", 0), ("3", 1), ("5", 2), ("7", 3)] {
        let vars = [
            ("SLURM_ARRAY_TASK_ID", id),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_STEP", "2"),
        ];
        assert_eq!(
            part(&vars).unwrap(),
            Some(Part::new(index, 4).unwrap()),
            "{id}"
        );
    }
    for (vars, says) in [
        (&[("RANK", "1")][..], "only one of RANK and WORLD_SIZE"),
        (&[("WORLD_SIZE", "2")][..], "only one of RANK and WORLD_SIZE"),
        (&[("SLURM_ARRAY_TASK_COUNT", "2")][..], "SLURM_ARRAY_TASK_ID"),
        (&[("RANK", "2"), ("WORLD_SIZE", "2")][..], "below the count"),
        (&[("RANK", "-1"), ("WORLD_SIZE", "2")][..], "RANK=`-1` is not a count"),
        (
            &[
                ("SLURM_ARRAY_TASK_ID", "0"),
                ("SLURM_ARRAY_TASK_COUNT", "4"),
                ("SLURM_ARRAY_TASK_MIN", "1"),
            ][..],
            "SLURM_ARRAY_TASK_ID=0 is not SLURM_ARRAY_TASK_MIN=1 plus a multiple of SLURM_ARRAY_TASK_STEP=1",
        ),
        (
            &[
                ("SLURM_ARRAY_TASK_ID", "4"),
                ("SLURM_ARRAY_TASK_COUNT", "4"),
                ("SLURM_ARRAY_TASK_MIN", "1"),
                ("SLURM_ARRAY_TASK_STEP", "2"),
            ][..],
            "SLURM_ARRAY_TASK_ID=4 is not",
        ),
        (
            &[
                ("SLURM_ARRAY_TASK_ID", "1"),
                ("SLURM_ARRAY_TASK_COUNT", "4"),
                ("SLURM_ARRAY_TASK_STEP", "0"),
            ][..],
            "SLURM_ARRAY_TASK_STEP=0",
        ),
        (
            &[
                ("SLURM_ARRAY_TASK_ID", "9"),
                ("SLURM_ARRAY_TASK_COUNT", "4"),
                ("SLURM_ARRAY_TASK_MIN", "1"),
                ("SLURM_ARRAY_TASK_STEP", "2"),
            ][..],
            "below the count",
        ),
    ] {
        let e = part(vars).unwrap_err().to_string();
        assert!(e.contains(says), "{vars:?}: {e}");
    }
}

#[test]
fn provenance_records_compare_by_field_and_a_file_with_one_needs_shards_with_one() {
    let a = r#"{"teacher":"aa","data":"dd"}"#;
    let b = r#"{"data":"dd","teacher":"bb","size":1}"#;
    assert_eq!(differing_fields(a, b), vec!["size", "teacher"]);
    // Key order is not a difference.
    assert!(differing_fields(a, r#"{"data":"dd","teacher":"aa"}"#).is_empty());
    // Text that is not a JSON object is compared whole.
    assert!(differing_fields("plain", "plain").is_empty());
    assert_eq!(differing_fields("plain", "other"), vec!["provenance"]);
    assert_eq!(differing_fields(a, "plain"), vec!["provenance"]);
    assert_eq!(differing_fields("[1]", "[2]"), vec!["provenance"]);

    let p = Path::new("clusters.safetensors");
    assert!(check_same_embeddings(p, "cluster file", None, None).is_ok());
    assert!(check_same_embeddings(p, "cluster file", None, Some(a)).is_ok());
    assert!(check_same_embeddings(p, "cluster file", Some(a), Some(a)).is_ok());
    let e = check_same_embeddings(p, "cluster file", Some(a), None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("clusters.safetensors")
            && e.contains("this cluster file")
            && e.contains("record no provenance"),
        "{e}"
    );
    let e = check_same_embeddings(p, "cluster file", Some(a), Some(b))
        .unwrap_err()
        .to_string();
    assert!(e.contains("(different size, teacher)"), "{e}");
}

#[test]
fn image_digests_are_read_by_row_and_name_their_shard() {
    let dir = tempfile::tempdir().unwrap();
    let cpu = Device::Cpu;
    // SHA-256's first 8 bytes, as the full hash gives them.
    let bytes = b"some encoded image";
    let hex = sha256_hex([bytes]);
    let want: Vec<u8> = (0..8)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    assert_eq!(image_digest(bytes).to_vec(), want);
    assert_ne!(image_digest(b"another"), image_digest(bytes));

    let image = |n: usize| Tensor::ones((n, 4), candle_core::DType::F32, &cpu).unwrap();
    let digests_of = |names: &[&str]| -> Vec<u8> {
        names
            .iter()
            .flat_map(|n| image_digest(n.as_bytes()))
            .collect()
    };
    // Shard 0: no digests, 2 rows. Shard 1: 3 rows with digests.
    write_tensors(&shard_path(dir.path(), 0), [("image", image(2))]);
    let layout = || ShardLayout::open(&[dir.path().to_path_buf()]).unwrap();
    let none = ImageDigests::open(&layout()).unwrap();
    assert!(!none.any());
    assert_eq!(none.gather(&[1, 0]).unwrap(), vec![None, None]);
    write_tensors(
        &shard_path(dir.path(), 1),
        [
            ("image", image(3)),
            (
                "image_digest",
                Tensor::from_vec(digests_of(&["a", "b", "c"]), (3, 8), &cpu).unwrap(),
            ),
        ],
    );
    let d = ImageDigests::open(&layout()).unwrap();
    assert!(d.any());
    assert_eq!(
        d.gather(&[4, 1, 2, 4]).unwrap(),
        vec![
            Some(image_digest(b"c")),
            None,
            Some(image_digest(b"a")),
            Some(image_digest(b"c"))
        ]
    );
    assert_eq!(d.shard_of(1), Some(shard_path(dir.path(), 0).as_path()));
    assert_eq!(d.shard_of(2), Some(shard_path(dir.path(), 1).as_path()));
    assert_eq!(d.shard_of(5), None);
    let e = d.gather(&[0, 5]).unwrap_err().to_string();
    assert!(e.contains("image digest of row 5"), "{e}");

    // Digests of another count, width or type are refused, naming the shard.
    for digest in [
        Tensor::from_vec(digests_of(&["a", "b"]), (2, 8), &cpu).unwrap(),
        Tensor::from_vec(vec![0u8; 12], (3, 4), &cpu).unwrap(),
        Tensor::from_vec(vec![0u32; 24], (3, 8), &cpu).unwrap(),
    ] {
        let shape = format!("{:?}", digest.dims());
        write_tensors(
            &shard_path(dir.path(), 1),
            [("image", image(3)), ("image_digest", digest)],
        );
        let e = ImageDigests::open(&layout()).unwrap_err().to_string();
        assert!(
            e.contains("00001") && e.contains("expected [3, 8] U8") && e.contains(&shape),
            "{e}"
        );
    }
}

//! Hostile input and interrupted runs through the `clipcid` command line, one case per row
//! of issue 18's classes: stale or foreign results, data loss, sizes from untrusted input,
//! silent acceptance of nonsense. Every case must end as its row says (an error naming the
//! file and the problem, or success with a named skip), and no case may panic. The verdicts
//! print as a markdown table (`cargo test -p clipcid --test hostile -- --nocapture`).
#![allow(clippy::unwrap_used)] // test setup: a failed setup step should panic

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use clipcid_suite::torch_zip;

mod common;

/// What a case must end with.
enum Expect<'a> {
    /// A non-zero exit whose output holds every fragment.
    Error(&'a [&'a str]),
    /// Success, with every fragment in the output.
    Ok(&'a [&'a str]),
}

struct Battery {
    dir: tempfile::TempDir,
    rows: Vec<String>,
    failures: Vec<String>,
}

impl Battery {
    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// Runs `clipcid args` (paths relative to the battery's folder) and records the verdict.
    fn case(&mut self, class: u8, name: &str, args: &[&str], expect: Expect<'_>) {
        let (ok, text, signalled) = common::run_clipcid(Some(self.dir.path()), args);
        let (want_ok, fragments) = match expect {
            Expect::Error(f) => (false, f),
            Expect::Ok(f) => (true, f),
        };
        let missing: Vec<&str> = fragments
            .iter()
            .copied()
            .filter(|f| !text.contains(f))
            .collect();
        let panicked = text.contains("panicked") || signalled;
        let pass = ok == want_ok && missing.is_empty() && !panicked;
        let said = text
            .lines()
            .rev()
            .find(|l| l.contains("rror") || l.contains("skipped"))
            .or(text.lines().last())
            .unwrap_or("")
            .replace('|', "\\|");
        self.rows.push(format!(
            "| {class} | {name} | {} | {} | {said} |",
            if want_ok { "success" } else { "error" },
            if pass { "pass" } else { "FAIL" }
        ));
        if !pass {
            self.failures.push(format!(
                "{name}: success {ok}, missing {missing:?}, panicked {panicked}:\n{text}"
            ));
        }
    }

    fn write(&self, name: &str, bytes: impl AsRef<[u8]>) {
        let p = self.path(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(p, bytes).unwrap();
    }

    /// A run config (CLIP + instance terms, tiny student) over `embeddings`, with `extra`
    /// lines after `[optim]` and `data` lines in `[data]`, written to `name`.
    fn distill_config(&self, name: &str, embeddings: &str, extra: &str, data: &str) {
        self.write(
            name,
            format!(
                "batch_size = 4\nepochs = 1\nseed = 1\ncheckpoint_every = 1\n[student]\nmodel = \"tiny\"\n[optim]\nwarmup_steps = 1\n{extra}\n[data]\ndataset = \"data\"\nembeddings = \"{embeddings}\"\ntokenizer = \"tok.json\"\n{data}"
            ),
        );
    }
}

fn png(r: u8, w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(w, h, image::Rgb([r, 10, 200 - r / 2]));
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png).unwrap();
    buf.into_inner()
}

fn jpeg(r: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([r, x as u8 * 3, y as u8 * 5]));
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Jpeg).unwrap();
    buf.into_inner()
}

/// A tar shard of `(member name, bytes, claimed size)`; a claimed size other than the
/// length is written into the header as is.
fn tar(members: &[(&str, Vec<u8>, Option<u64>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, bytes, claim) in members {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_path(name).unwrap();
        h.set_cksum();
        b.append(&h, bytes.as_slice()).unwrap();
        if let Some(c) = claim {
            // Rewrite the size in the header just appended (before the archive's trailer).
            let out = b.get_mut();
            let at = out.len() - bytes.len().div_ceil(512) * 512 - 512;
            let mut h2 = tar::Header::from_byte_slice(&out[at..at + 512]).clone();
            h2.set_size(*c);
            h2.set_cksum();
            out[at..at + 512].copy_from_slice(h2.as_bytes());
        }
    }
    b.into_inner().unwrap()
}

/// The teacher file with `edit` applied to its tensors and config JSON.
fn edited_teacher(
    src: &Path,
    dst: &Path,
    edit: impl FnOnce(&mut HashMap<String, Tensor>, &mut serde_json::Value),
) {
    let mut meta = clipcid_store::io::read_header(src).unwrap().metadata;
    let mut tensors = clipcid_store::io::load_tensors(src).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&meta["clipcid.config"]).unwrap();
    edit(&mut tensors, &mut config);
    meta.insert("clipcid.config".into(), config.to_string());
    clipcid_store::io::write_safetensors(dst, tensors, &meta).unwrap();
}

const FC1: &str = "vision_model.encoder.layers.0.mlp.fc1.weight";

#[test]
fn hostile_inputs_end_in_named_errors_or_named_skips() {
    let mut b = Battery {
        dir: tempfile::tempdir().unwrap(),
        rows: vec![],
        failures: vec![],
    };
    // Data: eight captioned images, and the same images with other captions.
    let mut tsv = String::new();
    for i in 0..8u8 {
        b.write(&format!("data/{i}.png"), png(i * 30, 40, 30));
        tsv.push_str(&format!("{i}.png\ta picture number {i}\n"));
    }
    b.write("data/captions.tsv", &tsv);
    for i in 0..8u8 {
        b.write(&format!("data2/{i}.png"), png(i * 30, 40, 30));
    }
    b.write("data2/captions.tsv", tsv.replace("picture", "photo"));
    for (seed, out) in [("4", "teacher.safetensors"), ("5", "teacher2.safetensors")] {
        let args = [
            "init-model",
            "--preset",
            "tiny",
            "--seed",
            seed,
            "--out",
            out,
        ];
        b.case(0, "setup: a random tiny teacher", &args, Expect::Ok(&[]));
    }
    let args = ["tokenizer", "--out", "tok.json"];
    b.case(0, "setup: byte-level tokenizer", &args, Expect::Ok(&[]));
    let embed = |teacher: &'static str, data: &'static str, out: &'static str| {
        vec![
            "embed",
            "--teacher",
            teacher,
            "--data",
            data,
            "--out",
            out,
            "--tokenizer",
            "tok.json",
            "--shard-size",
            "4",
            "--quiet",
        ]
    };

    // ---- Class 1: stale or foreign results.
    b.case(
        1,
        "embed",
        &embed("teacher.safetensors", "data", "emb"),
        Expect::Ok(&["embedded 8 images"]),
    );
    b.case(
        1,
        "embed (second teacher, own folder)",
        &embed("teacher2.safetensors", "data", "emb2"),
        Expect::Ok(&["embedded 8 images"]),
    );
    let mut other_size = embed("teacher.safetensors", "data", "emb");
    other_size[10] = "3";
    b.case(
        1,
        "re-embed into the folder with another --shard-size",
        &other_size,
        Expect::Error(&["--shard-size", "--overwrite"]),
    );
    b.case(
        1,
        "re-embed into the folder with another teacher",
        &embed("teacher2.safetensors", "data", "emb"),
        Expect::Error(&["different teacher", "--overwrite"]),
    );
    b.case(
        1,
        "re-embed into the folder with another dataset",
        &embed("teacher.safetensors", "data2", "emb"),
        Expect::Error(&["dataset"]),
    );
    b.case(
        1,
        "re-embed, same inputs: resumes",
        &embed("teacher.safetensors", "data", "emb"),
        Expect::Ok(&["2 resumed"]),
    );
    let mut over = embed("teacher2.safetensors", "data", "emb-over");
    b.case(
        1,
        "embed (to be overwritten)",
        &embed("teacher.safetensors", "data", "emb-over"),
        Expect::Ok(&["embedded 8"]),
    );
    over.push("--overwrite");
    b.case(
        1,
        "re-embed with another teacher and --overwrite",
        &over,
        Expect::Ok(&["embedded 8 images"]),
    );
    // Shards of two runs in one folder.
    std::fs::create_dir(b.path("mixed")).unwrap();
    std::fs::copy(
        clipcid_store::shard_path(&b.path("emb"), 0),
        clipcid_store::shard_path(&b.path("mixed"), 0),
    )
    .unwrap();
    std::fs::copy(
        clipcid_store::shard_path(&b.path("emb2"), 1),
        clipcid_store::shard_path(&b.path("mixed"), 1),
    )
    .unwrap();
    b.case(
        1,
        "balance over shards of two teachers in one folder",
        &[
            "balance",
            "--embeddings",
            "mixed",
            "--out",
            "k.safetensors",
            "--quiet",
        ],
        Expect::Error(&[
            "embeddings-00001",
            "another embedding run",
            "different teacher",
        ]),
    );
    b.case(
        1,
        "balance",
        &[
            "balance",
            "--embeddings",
            "emb",
            "--out",
            "keep.safetensors",
            "--quiet",
        ],
        Expect::Ok(&[]),
    );
    // Balance split over processes: a part's pair file, then merges that must not happen.
    b.case(
        1,
        "balance pairs, part 0 of 2",
        &[
            "balance",
            "pairs",
            "--embeddings",
            "emb",
            "--part",
            "0/2",
            "--out",
            "pairs-0.safetensors",
            "--quiet",
        ],
        Expect::Ok(&["part 0/2"]),
    );
    // Merges that must not happen: (case, --embeddings, --pairs, more arguments, error).
    type RefusedMerge = (
        &'static str,
        &'static str,
        &'static str,
        &'static [&'static str],
        &'static [&'static str],
    );
    let merges: [RefusedMerge; 5] = [
        (
            "balance merge with a part missing",
            "emb",
            "pairs-0.safetensors",
            &[],
            &["parts 1/2 are missing"],
        ),
        (
            "balance merge of pairs from another teacher's embeddings",
            "emb2",
            "pairs-0.safetensors",
            &[],
            &["pairs-0.safetensors", "different teacher"],
        ),
        (
            "balance merge at a negative threshold",
            "emb",
            "pairs-0.safetensors",
            &["--threshold=-0.05"],
            &["not a distance"],
        ),
        (
            "balance merge at a NaN threshold",
            "emb",
            "pairs-0.safetensors",
            &["--threshold=nan"],
            &["not a distance"],
        ),
        (
            "balance merge given a keep file as a pair file",
            "emb",
            "keep.safetensors",
            &[],
            &["keep.safetensors", "not a pair file"],
        ),
    ];
    for (name, embeddings, pairs, more, says) in merges {
        let mut args = vec![
            "balance",
            "merge",
            "--embeddings",
            embeddings,
            "--pairs",
            pairs,
            "--out",
            "m.safetensors",
        ];
        args.extend(more);
        b.case(1, name, &args, Expect::Error(says));
    }
    // The pairs name rows by position: the same shards in another order (files listed by
    // hand) were merged into the wrong sets without a word.
    b.case(
        1,
        "balance pairs, the whole search as one part",
        &[
            "balance",
            "pairs",
            "--embeddings",
            "emb",
            "--out",
            "pairs-all.safetensors",
            "--quiet",
        ],
        Expect::Ok(&["part 0/1"]),
    );
    b.case(
        1,
        "balance merge over the searched shards in another order",
        &[
            "balance",
            "merge",
            "--embeddings",
            "emb/embeddings-00001.safetensors",
            "emb/embeddings-00000.safetensors",
            "--pairs",
            "pairs-all.safetensors",
            "--out",
            "m.safetensors",
        ],
        Expect::Error(&["pairs-all.safetensors", "in another order"]),
    );
    b.case(
        1,
        "balance pairs with a part beyond the count",
        &[
            "balance",
            "pairs",
            "--embeddings",
            "emb",
            "--part",
            "2/2",
            "--out",
            "p.safetensors",
        ],
        Expect::Error(&["2/2", "below the count"]),
    );
    b.case(
        1,
        "embed from a glob that matches nothing",
        &[
            "embed",
            "--teacher",
            "teacher.safetensors",
            "--data",
            "nowhere/*.tar",
            "--out",
            "e-glob",
            "--images-only",
            "--quiet",
        ],
        Expect::Error(&["nowhere/*.tar", "matches no file"]),
    );
    // 2^40 paths from forty `{0,1}`: counted before expanding (expanded, they aborted).
    let alternatives = format!("nowhere/{}.tar", "{0,1}".repeat(40));
    b.case(
        1,
        "embed from a brace pattern of 2^40 paths",
        &[
            "embed",
            "--teacher",
            "teacher.safetensors",
            "--data",
            &alternatives,
            "--out",
            "e-braces",
            "--images-only",
            "--quiet",
        ],
        Expect::Error(&["name 1099511627776 paths"]),
    );
    b.case(
        1,
        "cluster --keep with a keep file of another teacher's embeddings",
        &[
            "cluster",
            "--embeddings",
            "emb2",
            "--keep",
            "keep.safetensors",
            "--k",
            "2",
            "--out",
            "c.safetensors",
            "--quiet",
        ],
        Expect::Error(&["keep.safetensors", "different teacher"]),
    );
    b.case(
        1,
        "cluster",
        &[
            "cluster",
            "--embeddings",
            "emb",
            "--keep",
            "keep.safetensors",
            "--k",
            "2",
            "--out",
            "clusters.safetensors",
            "--quiet",
        ],
        Expect::Ok(&[]),
    );
    // Outputs that are inputs of the run: refused before anything is replaced.
    let shard0 = "emb/embeddings-00000.safetensors";
    let written_over = [
        (
            "balance --out onto one of its shards",
            vec!["balance", "--embeddings", "emb", "--out", shard0, "--quiet"],
        ),
        (
            "cluster --out onto its --keep file",
            vec![
                "cluster",
                "--embeddings",
                "emb",
                "--keep",
                "keep.safetensors",
                "--k",
                "2",
                "--out",
                "./keep.safetensors",
                "--quiet",
            ],
        ),
        (
            "balance pairs --out onto one of its shards",
            vec![
                "balance",
                "pairs",
                "--embeddings",
                "emb",
                "--part",
                "0/2",
                "--out",
                shard0,
            ],
        ),
        (
            "export --out into the model's own folder",
            vec!["export", "--model", "teacher.safetensors", "--out", "."],
        ),
        (
            "init-model --image-tower-of into the teacher's own folder",
            vec![
                "init-model",
                "--image-tower-of",
                "teacher.safetensors",
                "--out",
                ".",
            ],
        ),
        (
            "tokenizer --out onto its --bpe-vocab",
            vec!["tokenizer", "--bpe-vocab", "tok.json", "--out", "tok.json"],
        ),
    ];
    for (name, args) in &written_over {
        let says = if name.contains("folder") {
            "the model is read from this folder"
        } else {
            "is an input of the run"
        };
        b.case(1, name, args, Expect::Error(&[says]));
    }
    assert!(clipcid_store::EmbeddingShard::read(&b.path(shard0)).is_ok());
    assert!(clipcid_store::KeepList::read(&b.path("keep.safetensors")).is_ok());
    assert!(clipcid_models::ClipModel::load(&b.path("teacher.safetensors"), &Device::Cpu).is_ok());
    // A shard repeating a sample id.
    let shard = clipcid_store::shard_path(&b.path("emb"), 0);
    let mut tensors = clipcid_store::io::load_tensors(&shard).unwrap();
    tensors.insert(
        "ids".into(),
        Tensor::new(&[0i64, 1, 1, 3], &Device::Cpu).unwrap(),
    );
    let meta = clipcid_store::io::read_header(&shard).unwrap().metadata;
    std::fs::create_dir(b.path("dup")).unwrap();
    clipcid_store::io::write_safetensors(
        &b.path("dup/embeddings-00000.safetensors"),
        tensors,
        &meta,
    )
    .unwrap();
    b.case(
        1,
        "balance over a shard with a repeated sample id",
        &[
            "balance",
            "--embeddings",
            // The file, not its folder: one shard of a run is a subset only listed so.
            "dup/embeddings-00000.safetensors",
            "--out",
            "k.safetensors",
            "--quiet",
        ],
        Expect::Error(&["embeddings-00000", "1"]),
    );
    let no_cluster = "[loss.cluster]\nenabled = false\n";
    b.distill_config(
        "keep-other.toml",
        "emb2",
        no_cluster,
        "keep = \"keep.safetensors\"\n",
    );
    b.case(
        1,
        "distill with a keep file of another teacher's embeddings",
        &[
            "distill",
            "--config",
            "keep-other.toml",
            "--out",
            "run-k",
            "--quiet",
        ],
        Expect::Error(&["keep.safetensors", "different teacher"]),
    );
    b.distill_config(
        "clusters-other.toml",
        "emb2",
        "",
        "clusters = \"clusters.safetensors\"\n",
    );
    b.case(
        1,
        "distill with a cluster file of another teacher's embeddings",
        &[
            "distill",
            "--config",
            "clusters-other.toml",
            "--out",
            "run-c",
            "--quiet",
        ],
        Expect::Error(&["clusters.safetensors", "different teacher"]),
    );
    b.distill_config("run.toml", "emb", no_cluster, "");
    b.case(
        1,
        "distill, stopped after 1 step",
        &[
            "distill",
            "--config",
            "run.toml",
            "--out",
            "run",
            "--max-steps",
            "1",
            "--quiet",
        ],
        Expect::Ok(&[]),
    );
    // An image replaced since `embed` by another of the same byte size: the dataset's
    // fingerprint (image sizes) is unchanged, the digests the shard keeps of each image are not.
    let original = std::fs::read(b.path("data/3.png")).unwrap();
    let same_size = (0..=255u8)
        .map(|r| png(r, 40, 30))
        .find(|p| p.len() == original.len() && *p != original)
        .unwrap();
    b.write("data/3.png", &same_size);
    b.case(
        1,
        "distill after an image was replaced by one of the same size",
        &[
            "distill", "--config", "run.toml", "--out", "run-r", "--quiet",
        ],
        Expect::Error(&[
            "`3.png`",
            "embeddings-00000",
            "replaced after `clipcid embed`",
        ]),
    );
    b.write("data/3.png", &original);
    b.distill_config("run2.toml", "emb2", no_cluster, "");
    b.case(
        1,
        "distill --resume on another teacher's embeddings",
        &[
            "distill",
            "--config",
            "run2.toml",
            "--out",
            "run",
            "--resume",
            "--quiet",
        ],
        Expect::Error(&["other teacher embeddings", "different teacher"]),
    );
    // A second writer: this process holds the output folder's lock.
    std::fs::create_dir(b.path("locked")).unwrap();
    let lock = std::fs::File::create(b.path("locked/.clipcid.lock")).unwrap();
    lock.try_lock().unwrap();
    b.case(
        1,
        "embed into a folder another run is writing",
        &embed("teacher.safetensors", "data", "locked"),
        Expect::Error(&["another clipcid run is writing"]),
    );
    drop(lock);

    // ---- Class 2: data loss.
    b.case(
        2,
        "fresh distill into a used run folder",
        &["distill", "--config", "run.toml", "--out", "run", "--quiet"],
        Expect::Error(&["--resume", "--overwrite"]),
    );
    b.case(
        2,
        "distill --resume keeps the run",
        &[
            "distill", "--config", "run.toml", "--out", "run", "--resume", "--quiet",
        ],
        Expect::Ok(&[]),
    );
    b.case(
        2,
        "fresh distill into a used run folder with --overwrite",
        &[
            "distill",
            "--config",
            "run.toml",
            "--out",
            "run",
            "--overwrite",
            "--max-steps",
            "1",
            "--quiet",
        ],
        Expect::Ok(&[]),
    );
    assert!(std::fs::read_dir(b.path("run/checkpoints"))
        .unwrap()
        .any(|e| e.unwrap().file_name() == "step-00000001"));

    // ---- Class 3: sizes from untrusted input.
    b.write(
        "big/000.tar",
        tar(&[
            ("a.png", png(1, 4, 4), Some(1 << 40)),
            ("a.txt", b"x".to_vec(), None),
        ]),
    );
    b.case(
        3,
        "tar member claiming 2^40 bytes",
        &[
            "embed",
            "--teacher",
            "teacher.safetensors",
            "--data",
            "big",
            "--out",
            "e-big",
            "--images-only",
            "--quiet",
        ],
        Expect::Error(&["000.tar", "claims 1099511627776 bytes"]),
    );
    b.write(
        "thin/captions.tsv",
        "thin.png\ta thin image\nok.png\tfine\n",
    );
    b.write("thin/thin.png", png(9, 1, 1_500_000));
    b.write("thin/ok.png", png(9, 40, 30));
    b.case(
        3,
        "1 x 1,500,000 PNG (cropped before it is resized)",
        &[
            "embed",
            "--teacher",
            "teacher.safetensors",
            "--data",
            "thin",
            "--out",
            "e-thin",
            "--images-only",
            "--quiet",
        ],
        Expect::Ok(&["embedded 2 images"]),
    );
    let header = r#"{"image":{"dtype":"F32","shape":[1099511627776,4],"data_offsets":[0,16]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&[0u8; 16]);
    b.write("huge/embeddings-00000.safetensors", bytes);
    b.case(
        3,
        "embedding shard whose header claims 2^40 rows",
        &[
            "balance",
            "--embeddings",
            "huge",
            "--out",
            "k.safetensors",
            "--quiet",
        ],
        Expect::Error(&["embeddings-00000", "does not fill its data range"]),
    );
    // Crafted PyTorch checkpoints: candle's pickle reader (patched, vendor/README.md).
    let pickles = [
        (
            "bomb",
            "PyTorch checkpoint whose pickle doubles an object 40 times",
            torch_zip::memo_doubling(40),
            "512 MiB of objects",
        ),
        (
            "deep",
            "PyTorch checkpoint nesting 200,000 tuples",
            torch_zip::nested_tuples(200_000),
            "deeper than 64 levels",
        ),
    ];
    for (dir, name, pickle, said) in pickles {
        let file = format!("{dir}/pytorch_model.bin");
        b.write(&file, torch_zip::torch_save_zip(&pickle, &[]).unwrap());
        let out = format!("e-{dir}");
        let args = [
            "embed",
            "--teacher",
            &file,
            "--data",
            "data",
            "--out",
            &out,
            "--tokenizer",
            "tok.json",
            "--quiet",
        ];
        b.case(3, name, &args, Expect::Error(&["pytorch_model.bin", said]));
    }
    let mut cfg: serde_json::Value = serde_json::from_str(
        &clipcid_store::io::read_header(&b.path("teacher.safetensors"))
            .unwrap()
            .metadata["clipcid.config"],
    )
    .unwrap();
    cfg["vision_config"]["hidden_size"] = serde_json::json!(1u64 << 30);
    b.write("huge-config.json", cfg.to_string());
    b.distill_config("huge.toml", "emb", no_cluster, "");
    let text = std::fs::read_to_string(b.path("huge.toml"))
        .unwrap()
        .replace("model = \"tiny\"", "model = \"huge-config.json\"");
    b.write("huge.toml", text);
    b.case(
        3,
        "student config asking for 10^18 parameters",
        &[
            "distill",
            "--config",
            "huge.toml",
            "--out",
            "run-huge",
            "--quiet",
        ],
        Expect::Error(&["huge-config.json", "parameters"]),
    );

    // ---- Class 4: silent acceptance of nonsense.
    b.write(
        "trunc/captions.tsv",
        "cut.jpg\ta cut photo\nwhole.jpg\ta whole photo\n",
    );
    let whole = jpeg(7);
    b.write("trunc/cut.jpg", &whole[..whole.len() * 2 / 3]);
    b.write("trunc/whole.jpg", &whole);
    b.case(
        4,
        "truncated JPEG",
        &[
            "embed",
            "--teacher",
            "teacher.safetensors",
            "--data",
            "trunc",
            "--out",
            "e-trunc",
            "--images-only",
            "--quiet",
        ],
        Expect::Ok(&["embedded 1 images", "cut.jpg", "truncated JPEG"]),
    );
    edited_teacher(
        &b.path("teacher.safetensors"),
        &b.path("nan.safetensors"),
        |t, _| {
            let x = &t[FC1];
            let mut v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v[3] = f32::NAN;
            t.insert(
                FC1.into(),
                Tensor::from_vec(v, x.dims(), &Device::Cpu).unwrap(),
            );
        },
    );
    b.case(
        4,
        "NaN in a teacher weight",
        &[
            "embed",
            "--teacher",
            "nan.safetensors",
            "--data",
            "data",
            "--out",
            "e-nan",
            "--images-only",
            "--quiet",
        ],
        Expect::Error(&["nan.safetensors", FC1, "NaN or infinite"]),
    );
    edited_teacher(
        &b.path("teacher.safetensors"),
        &b.path("int.safetensors"),
        |t, _| {
            let x = t[FC1].to_dtype(DType::I64).unwrap();
            t.insert(FC1.into(), x);
        },
    );
    b.case(
        4,
        "integer tensor where f32 is expected",
        &[
            "embed",
            "--teacher",
            "int.safetensors",
            "--data",
            "data",
            "--out",
            "e-int",
            "--images-only",
            "--quiet",
        ],
        Expect::Error(&["int.safetensors", FC1, "floating point"]),
    );
    // Embeddings stored as integers: no reader takes them as rows.
    let ints = Tensor::from_vec((0..12i64).collect::<Vec<_>>(), (3, 4), &Device::Cpu).unwrap();
    clipcid_store::io::write_safetensors(
        &b.path("int-emb.safetensors"),
        [("image".to_string(), ints)],
        &HashMap::new(),
    )
    .unwrap();
    b.case(
        4,
        "integer embeddings",
        &[
            "balance",
            "--embeddings",
            "int-emb.safetensors",
            "--out",
            "k-int.safetensors",
            "--quiet",
        ],
        Expect::Error(&["int-emb.safetensors", "`image` is I64", "F32, F16 or BF16"]),
    );
    edited_teacher(
        &b.path("teacher.safetensors"),
        &b.path("zero.safetensors"),
        |_, c| {
            c["vision_config"]["image_size"] = serde_json::json!(0);
        },
    );
    b.case(
        4,
        "image_size 0",
        &[
            "embed",
            "--teacher",
            "zero.safetensors",
            "--data",
            "data",
            "--out",
            "e-zero",
            "--images-only",
            "--quiet",
        ],
        Expect::Error(&["zero.safetensors", "image_size"]),
    );
    b.write("gone/captions.tsv", "a.png\tmissing\nb.png\tmissing too\n");
    b.case(
        4,
        "every image path missing",
        &[
            "embed",
            "--teacher",
            "teacher.safetensors",
            "--data",
            "gone",
            "--out",
            "e-gone",
            "--images-only",
            "--quiet",
        ],
        Expect::Error(&["a.png"]),
    );
    b.write("empty-tar/000.tar", b"");
    b.case(
        4,
        "0-byte tar",
        &[
            "embed",
            "--teacher",
            "teacher.safetensors",
            "--data",
            "empty-tar",
            "--out",
            "e-et",
            "--images-only",
            "--quiet",
        ],
        Expect::Error(&["000.tar"]),
    );
    b.write("no-members/000.tar", tar(&[]));
    b.case(
        4,
        "tar without members",
        &[
            "embed",
            "--teacher",
            "teacher.safetensors",
            "--data",
            "no-members",
            "--out",
            "e-nm",
            "--images-only",
            "--quiet",
        ],
        Expect::Error(&["000.tar"]),
    );
    b.write(
        "twice/000.tar",
        tar(&[
            ("a.png", png(1, 8, 8), None),
            ("a.txt", b"first".to_vec(), None),
            ("b.png", png(2, 8, 8), None),
            ("b.txt", b"second".to_vec(), None),
            ("a.png", png(3, 8, 8), None),
            ("a.txt", b"again".to_vec(), None),
        ]),
    );
    b.case(
        4,
        "the same key twice in a tar",
        &[
            "embed",
            "--teacher",
            "teacher.safetensors",
            "--data",
            "twice",
            "--out",
            "e-tw",
            "--images-only",
            "--quiet",
        ],
        Expect::Ok(&["embedded 2 images", "skipped 1", "key `a` appears again"]),
    );
    for (name, extra, key) in [
        ("min_lr > lr", "lr = 0.001\nmin_lr = 0.01\n", "optim.min_lr"),
        (
            "beta2 = 1.5",
            "[optim.adamw]\nbeta2 = 1.5\n",
            "optim.adamw.beta2",
        ),
        (
            "negative weight decay",
            "[optim.adamw]\nweight_decay = -0.1\n",
            "optim.adamw.weight_decay",
        ),
        (
            "negative loss weight",
            "[loss.instance]\nweight = -1.0\n",
            "loss.instance.weight",
        ),
        ("NaN learning rate", "lr = nan\n", "optim.lr"),
        (
            "temperature 0 in PicCollage's schedule",
            "[loss.piccollage.schedule]\nsteps = [[0, 0.0]]\n",
            "temperature",
        ),
        (
            "arcface margin inf",
            "[loss.cluster.margin]\nkind = \"arcface\"\nm = inf\n",
            "margin",
        ),
    ] {
        b.distill_config("bad.toml", "emb", &format!("{extra}{no_cluster}"), "");
        b.case(
            4,
            name,
            &[
                "distill", "--config", "bad.toml", "--out", "run-bad", "--quiet",
            ],
            Expect::Error(&["bad.toml", key]),
        );
    }
    b.distill_config("bad.toml", "emb", no_cluster, "");
    let text = std::fs::read_to_string(b.path("bad.toml"))
        .unwrap()
        .replace("epochs = 1", "epochs = 6148914691236517206");
    b.write("bad.toml", text);
    b.case(
        4,
        "epochs = 6148914691236517206",
        &[
            "distill", "--config", "bad.toml", "--out", "run-bad", "--quiet",
        ],
        Expect::Error(&["bad.toml", "epochs"]),
    );
    let mut utf = b"0.png\tfine\n1.png\tbad \xff\xfe caption\n2.png\tfine too\n".to_vec();
    utf.extend_from_slice(b"");
    for i in 0..3u8 {
        b.write(&format!("utf/{i}.png"), png(i * 40, 40, 30));
    }
    b.write("utf/captions.tsv", utf);
    b.case(
        4,
        "invalid UTF-8 in one captions line",
        &[
            "embed",
            "--teacher",
            "teacher.safetensors",
            "--data",
            "utf",
            "--out",
            "e-utf",
            "--tokenizer",
            "tok.json",
            "--quiet",
        ],
        Expect::Ok(&["embedded 2 images", "skipped 1", "UTF-8"]),
    );
    b.write("tok-bad.json", b"{\"decoder\": {\"type\": \"ByteLevel\"");
    b.case(
        4,
        "tokenizer.json that is not JSON",
        &[
            "embed",
            "--teacher",
            "teacher.safetensors",
            "--data",
            "data",
            "--out",
            "e-tok",
            "--tokenizer",
            "tok-bad.json",
            "--quiet",
        ],
        Expect::Error(&["tok-bad.json", "not a tokenizer.json"]),
    );

    // A data-limited run asking for no rows, or for more rows than there are.
    for (name, subset, want) in [
        (
            "data.subset = 0",
            "subset = 0\n",
            "data.subset must be at least 1",
        ),
        (
            "data.subset beyond the training rows",
            "subset = 100000\n",
            "data.subset asks for 100000 rows",
        ),
    ] {
        b.distill_config("bad.toml", "emb", no_cluster, subset);
        b.case(
            4,
            name,
            &[
                "distill", "--config", "bad.toml", "--out", "run-bad", "--quiet",
            ],
            Expect::Error(&[want]),
        );
    }
    b.write(
        "junk-teacher.safetensors",
        b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}",
    );
    b.case(
        4,
        "PicCollage student of a corrupt teacher",
        &[
            "init-model",
            "--image-tower-of",
            "junk-teacher.safetensors",
            "--out",
            "pc-student",
        ],
        Expect::Error(&["junk-teacher.safetensors"]),
    );
    assert!(!b.path("pc-student").exists(), "no half-written student");
    // One shard reached twice (beside its folder): every row would count twice.
    b.case(
        4,
        "an embedding shard given twice",
        &[
            "cluster",
            "--embeddings",
            "emb",
            "emb/embeddings-00000.safetensors",
            "--k",
            "2",
            "--out",
            "twice.safetensors",
        ],
        Expect::Error(&["embeddings-00000.safetensors", "given twice"]),
    );
    // A file where a command's output folder goes.
    b.write("a-file", b"");
    for (name, args) in [
        (
            "embed --out names a file",
            embed("teacher.safetensors", "data", "a-file"),
        ),
        (
            "export --out names a file",
            vec![
                "export",
                "--model",
                "teacher.safetensors",
                "--out",
                "a-file",
            ],
        ),
    ] {
        b.case(
            4,
            name,
            &args,
            Expect::Error(&["a-file", "is a file where an output folder goes"]),
        );
    }

    println!("| class | case | expected | verdict | what clipcid said |\n|---|---|---|---|---|");
    for r in &b.rows {
        println!("{r}");
    }
    assert!(b.failures.is_empty(), "{}", b.failures.join("\n\n"));
}

//! Opening a folder of embedding shards: what `clipcid distill` (and `balance`) read before
//! the first step, timed reader by reader.
//!
//! `cargo bench --bench shard_open [-- --shards 200 --rows 10000 --dim 16 --reps 5
//! --dir target/shard-open-bench]`
//!
//! Writes `--shards` shards as `clipcid embed` writes them (`image` and `text` f16, `ids`,
//! `has_text`, `image_digest`, and the metadata: provenance, sample range and the `keys` JSON
//! list of LAION-style keys, the bulk of each header), once, into `--dir`. The default
//! `--rows` is embed's default `--shard-size`. The embedding width is small (`--dim`) so the
//! files stay small: nothing here reads an embedding, and a header's size does not depend on
//! the width.
//!
//! Then, median of `--reps` (warm page cache, so this is the CPU's share; a cold or network
//! file system adds the header bytes read, printed per pass):
//! - each reader distill opens, alone: [`ShardLayout::open`], every shard's [`RowIds`] from
//!   the layout ([`ShardLayout::row_ids_of`]), the `image` and `text` [`RowReader`]s and
//!   [`ImageDigests`]; and, for comparison, every shard's [`RowIds`] read with its header
//!   ([`RowIds::read`]) and [`RowIndex`] (the ids with the keys, which distill read before);
//! - distill's whole start sequence over the store (those five, in its order).

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use clipcid_store::{
    io::write_safetensors, shard_path, ImageDigests, RowIds, RowIndex, RowReader, ShardLayout,
    IMAGE_DIGEST_BYTES, IMAGE_DIGEST_TENSOR,
};
use clipcid_suite::{bench_arg as arg, median};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (shards, rows, dim, reps) = (
        arg("--shards", 200usize),
        arg("--rows", 10_000usize),
        arg("--dim", 16usize),
        arg("--reps", 5usize),
    );
    let dir: PathBuf = arg("--dir", PathBuf::from("target/shard-open-bench"));
    let files = write_shards(&dir, shards, rows, dim)?;
    let header_mb = files
        .iter()
        .map(|p| header_len(p))
        .sum::<Result<u64, _>>()? as f64
        / 1e6;
    println!(
        "opening {shards} embedding shards of {rows} rows (header {:.2} MB each, {header_mb:.0} MB in all), warm page cache, median of {reps}",
        header_mb / shards as f64
    );
    println!();
    println!("| reads | ms | ms per shard |");
    println!("|---|---:|---:|");
    let layout = ShardLayout::open(&files)?;
    let row = |name: &str, f: &dyn Fn() -> Result<(), Box<dyn std::error::Error>>| {
        let ms = median(
            (0..reps)
                .map(|_| {
                    let t = Instant::now();
                    f().map(|_| t.elapsed().as_secs_f64() * 1e3)
                })
                .collect::<Result<Vec<f64>, _>>()?,
        );
        println!("| {name} | {ms:.1} | {:.3} |", ms / shards as f64);
        Ok::<f64, Box<dyn std::error::Error>>(ms)
    };
    row("`ShardLayout::open`", &|| {
        ShardLayout::open(&files)?;
        Ok(())
    })?;
    row("`ShardLayout::row_ids_of`, every shard", &|| {
        for i in 0..layout.shards.len() {
            layout.row_ids_of(i)?;
        }
        Ok(())
    })?;
    row("`RowIds::read` (with its header), every shard", &|| {
        for p in &layout.shards {
            RowIds::read(p)?;
        }
        Ok(())
    })?;
    row("`RowIndex::read` (with the keys), every shard", &|| {
        for p in &layout.shards {
            RowIndex::read(p)?;
        }
        Ok(())
    })?;
    row("`RowReader::open` (`image`)", &|| {
        RowReader::open(layout.clone())?;
        Ok(())
    })?;
    row("`RowReader::open_tensor` (`text`)", &|| {
        RowReader::open_tensor(layout.clone(), "text")?;
        Ok(())
    })?;
    row("`ImageDigests::open`", &|| {
        ImageDigests::open(&layout)?;
        Ok(())
    })?;
    row("distill's start: all five, in its order", &|| {
        let layout = ShardLayout::open(&files)?;
        for i in 0..layout.shards.len() {
            layout.row_ids_of(i)?;
        }
        RowReader::open_tensor(layout.clone(), "text")?;
        ImageDigests::open(&layout)?;
        RowReader::open(layout)?;
        Ok(())
    })?;
    Ok(())
}

/// The shards, written once per set of arguments (a marker file names them).
fn write_shards(
    dir: &Path,
    shards: usize,
    rows: usize,
    dim: usize,
) -> Result<Vec<PathBuf>, Box<dyn std::error::Error>> {
    let marker = dir.join(format!("written-{shards}x{rows}x{dim}"));
    let files: Vec<PathBuf> = (0..shards).map(|i| shard_path(dir, i)).collect();
    if marker.exists() {
        return Ok(files);
    }
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let cpu = Device::Cpu;
    let provenance = r#"{"data":"3f1c9a2b7d5e8f60","teacher":"ViT-L-14/laion2b_s32b_b82k","dtype":"f16","shard_size":10000}"#;
    for (s, path) in files.iter().enumerate() {
        let first = s * rows;
        let ids: Vec<i64> = (first as i64..(first + rows) as i64).collect();
        // img2dataset's keys: shard folder and sample number, as LAION's parquet shards have.
        let keys: Vec<String> = ids
            .iter()
            .map(|i| format!("{:05}/{:09}.jpg", i / 10_000, i))
            .collect();
        let tensors = [
            (
                "image".to_string(),
                Tensor::ones((rows, dim), DType::F16, &cpu)?,
            ),
            (
                "text".to_string(),
                Tensor::ones((rows, dim), DType::F16, &cpu)?,
            ),
            ("ids".to_string(), Tensor::from_vec(ids, rows, &cpu)?),
            ("has_text".to_string(), Tensor::ones(rows, DType::U8, &cpu)?),
            (
                IMAGE_DIGEST_TENSOR.to_string(),
                Tensor::zeros((rows, IMAGE_DIGEST_BYTES), DType::U8, &cpu)?,
            ),
        ];
        let meta = [
            ("first_index", first.to_string()),
            ("end_index", (first + rows).to_string()),
            ("provenance", provenance.to_string()),
            ("teacher", "ViT-L-14/laion2b_s32b_b82k".to_string()),
            ("keys", serde_json::to_string(&keys)?),
            ("skipped", "[]".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        write_safetensors(path, tensors, &meta)?;
    }
    std::fs::write(&marker, b"")?;
    Ok(files)
}

/// Bytes of a safetensors file's header (its first 8 bytes say how many).
fn header_len(path: &Path) -> Result<u64, Box<dyn std::error::Error>> {
    use std::io::Read;
    let mut n = [0u8; 8];
    std::fs::File::open(path)?.read_exact(&mut n)?;
    Ok(u64::from_le_bytes(n) + 8)
}

//! The option structs' `new` constructors give exactly what the command line gives when only
//! the required arguments are passed, so library code and `clipcid` run with the same
//! defaults.

use clap::Parser;
use clipcid_pipeline::{BalanceArgs, ClusterArgs, DistillArgs, EmbedArgs, EvalArgs, ExportArgs};

#[derive(Parser)]
struct Cli<A: clap::Args> {
    #[command(flatten)]
    args: A,
}

fn parse<A: clap::Args>(argv: &[&str]) -> A {
    Cli::<A>::try_parse_from(std::iter::once("clipcid").chain(argv.iter().copied()))
        .unwrap_or_else(|e| panic!("{e}"))
        .args
}

#[test]
fn constructors_match_the_command_line_defaults() {
    let embed: EmbedArgs = parse(&["--teacher", "t", "--data", "d", "--out", "o", "--quiet"]);
    assert_eq!(embed, EmbedArgs::new("t", "d", "o"));
    // --data repeats; --part is I/N.
    let split: EmbedArgs = parse(&[
        "--teacher",
        "t",
        "--data",
        "a/{0..9}.tar",
        "--data",
        "b.tar",
        "--out",
        "o",
        "--part",
        "1/3",
    ]);
    assert_eq!(
        split.data,
        ["a/{0..9}.tar", "b.tar"].map(std::path::PathBuf::from)
    );
    assert_eq!(split.part, Some(clipcid_embed::Part::new(1, 3).unwrap()));
    let balance: BalanceArgs = parse(&["--embeddings", "e", "--out", "k", "--quiet"]);
    assert_eq!(balance, BalanceArgs::new("e", "k"));
    let cluster: ClusterArgs = parse(&["--embeddings", "e", "--k", "9", "--out", "c", "--quiet"]);
    assert_eq!(cluster, ClusterArgs::new("e", 9, "c"));
    let distill: DistillArgs = parse(&["--config", "r.toml", "--out", "run", "--quiet"]);
    assert_eq!(distill, DistillArgs::new("r.toml", "run"));
    let eval: EvalArgs = parse(&["--model", "m", "--out", "report"]);
    assert_eq!(eval, EvalArgs::new("m", "report"));
    let export: ExportArgs = parse(&["--model", "m", "--out", "x"]);
    assert_eq!(export, ExportArgs::new("m", "x"));
    assert_eq!(
        eval.probe_options().method,
        clipcid_eval::ProbeMethod::Lbfgs
    );
    let cb: EvalArgs = parse(&[
        "--model",
        "m",
        "--probe-method",
        "clip-benchmark",
        "--probe-validation",
        "0",
    ]);
    let opts = cb.probe_options();
    assert_eq!(
        opts.method,
        clipcid_eval::ProbeMethod::ClipBenchmark(clipcid_eval::AdamWProbe::default())
    );
    assert_eq!(opts.validation_fraction, 0.0);
    // A loader that converts to RGB first: off unless asked, on embed's model options and
    // on eval's run.
    assert!(!embed.model.rgb_first && !eval.rgb_first);
    let embed: EmbedArgs = parse(&["--teacher", "t", "--data", "d", "--out", "o", "--rgb-first"]);
    assert!(embed.model.rgb_first);
    let eval: EvalArgs = parse(&["--model", "m", "--rgb-first"]);
    assert!(eval.rgb_first);
}

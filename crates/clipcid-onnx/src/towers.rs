//! The two towers as ONNX graphs, node for node what `clipcid_models` computes.

use candle_core::Tensor;
use clipcid_models::{Activation, ClipModel, TextTowerKind};

use crate::graph::{value_info, Attr, Dim, GraphBuilder};
use crate::proto::{data_type, GraphProto};
use crate::{OnnxError, OnnxPrecision};

/// One transformer stack's shape.
struct StackSpec<'a> {
    prefix: &'a str,
    layers: usize,
    width: usize,
    heads: usize,
    act: Activation,
    eps: f64,
}

fn tensor<'a>(model: &'a ClipModel, name: &str) -> Result<&'a Tensor, OnnxError> {
    model
        .tensors()
        .get(name)
        .ok_or_else(|| OnnxError::Model(format!("the model has no tensor `{name}`")))
}

/// The model's tensor `name` as an initializer of the same name (transposed when asked, for
/// `MatMul`'s right operand).
fn param(
    g: &mut GraphBuilder,
    model: &ClipModel,
    name: &str,
    transpose: bool,
) -> Result<String, OnnxError> {
    g.weight(name, tensor(model, name)?, transpose, None)
}

/// `LayerNormalization` over the last axis with `{prefix}.weight` and `{prefix}.bias`.
fn layer_norm(
    g: &mut GraphBuilder,
    model: &ClipModel,
    x: &str,
    prefix: &str,
    eps: f64,
) -> Result<String, OnnxError> {
    let w = format!("{prefix}.weight");
    let b = format!("{prefix}.bias");
    let w = param(g, model, &w, false)?;
    let b = param(g, model, &b, false)?;
    Ok(g.op(
        "LayerNormalization",
        &[x, &w, &b],
        vec![
            ("axis", Attr::Int(-1)),
            ("epsilon", Attr::Float(eps as f32)),
        ],
    ))
}

/// `x W^T + b` for the linear layer `prefix` (`[out, in]` weight stored as `[in, out]`),
/// the weight and bias multiplied by `scale` when given.
fn linear(
    g: &mut GraphBuilder,
    model: &ClipModel,
    x: &str,
    prefix: &str,
    scale: Option<f32>,
) -> Result<String, OnnxError> {
    let w = format!("{prefix}.weight");
    let w = g.weight(&w, tensor(model, &w)?, true, scale)?;
    let y = g.op("MatMul", &[x, &w], vec![]);
    let b = format!("{prefix}.bias");
    match model.tensors().get(&b) {
        Some(t) => {
            let b = g.weight(&b, t, false, scale)?;
            Ok(g.op("Add", &[&y, &b], vec![]))
        }
        None => Ok(y),
    }
}

/// The activation of an MLP.
fn activation(g: &mut GraphBuilder, x: &str, act: Activation) -> String {
    match act {
        Activation::QuickGelu => {
            // x * sigmoid(1.702 x)
            let k = g.scalar("quick_gelu_k", 1.702);
            let s = g.op("Mul", &[x, &k], vec![]);
            let s = g.op("Sigmoid", &[&s], vec![]);
            g.op("Mul", &[x, &s], vec![])
        }
        Activation::Gelu => {
            // 0.5 x (1 + erf(x / sqrt 2)), the exact form (PyTorch's nn.GELU default).
            let r = g.scalar("gelu_rsqrt2", std::f32::consts::FRAC_1_SQRT_2);
            let one = g.scalar("gelu_one", 1.0);
            let half = g.scalar("gelu_half", 0.5);
            let e = g.op("Mul", &[x, &r], vec![]);
            let e = g.op("Erf", &[&e], vec![]);
            let e = g.op("Add", &[&e, &one], vec![]);
            let h = g.op("Mul", &[x, &half], vec![]);
            g.op("Mul", &[&h, &e], vec![])
        }
    }
}

/// Every layer of a pre-norm stack on `x` `[N, T, W]`; `mask` `[T, T]` is added to the
/// attention scores.
fn encoder(
    g: &mut GraphBuilder,
    model: &ClipModel,
    mut x: String,
    spec: &StackSpec,
    mask: Option<&str>,
) -> Result<String, OnnxError> {
    let (w, heads) = (spec.width, spec.heads);
    if heads == 0 || w % heads != 0 {
        return Err(OnnxError::Model(format!(
            "{}: width {w} is not a multiple of {heads} heads",
            spec.prefix
        )));
    }
    let hd = w / heads;
    let split = g.ints1("split_heads", &[0, -1, heads as i64, hd as i64]);
    let merge = g.ints1("merge_heads", &[0, -1, w as i64]);
    for i in 0..spec.layers {
        let l = format!("{}.encoder.layers.{i}", spec.prefix);
        let a = format!("{l}.self_attn");
        let h = layer_norm(g, model, &x, &format!("{l}.layer_norm1"), spec.eps)?;
        // The 1/sqrt(head_dim) scale of the scores is folded into q's weight and bias.
        let scale = (hd as f32).powf(-0.5);
        let q = linear(g, model, &h, &format!("{a}.q_proj"), Some(scale))?;
        let k = linear(g, model, &h, &format!("{a}.k_proj"), None)?;
        let v = linear(g, model, &h, &format!("{a}.v_proj"), None)?;
        let mut heads_of = |t: &str, perm: [i64; 4]| {
            let r = g.op("Reshape", &[t, &split], vec![]);
            g.op(
                "Transpose",
                &[&r],
                vec![("perm", Attr::Ints(perm.to_vec()))],
            )
        };
        let q = heads_of(&q, [0, 2, 1, 3]); // [N, H, T, hd]
        let k = heads_of(&k, [0, 2, 3, 1]); // [N, H, hd, T]
        let v = heads_of(&v, [0, 2, 1, 3]); // [N, H, T, hd]
        let mut s = g.op("MatMul", &[&q, &k], vec![]);
        if let Some(m) = mask {
            s = g.op("Add", &[&s, m], vec![]);
        }
        let p = g.op("Softmax", &[&s], vec![("axis", Attr::Int(-1))]);
        let o = g.op("MatMul", &[&p, &v], vec![]);
        let o = g.op(
            "Transpose",
            &[&o],
            vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))],
        );
        let o = g.op("Reshape", &[&o, &merge], vec![]);
        let o = linear(g, model, &o, &format!("{a}.out_proj"), None)?;
        x = g.op("Add", &[&x, &o], vec![]);
        let h = layer_norm(g, model, &x, &format!("{l}.layer_norm2"), spec.eps)?;
        let h = linear(g, model, &h, &format!("{l}.mlp.fc1"), None)?;
        let h = activation(g, &h, spec.act);
        let h = linear(g, model, &h, &format!("{l}.mlp.fc2"), None)?;
        x = g.op("Add", &[&x, &h], vec![]);
    }
    Ok(x)
}

/// Casts `x` to the graph's float type when it is f16 (inputs and outputs stay f32).
fn to_graph_float(g: &mut GraphBuilder, x: &str) -> String {
    match g.precision {
        OnnxPrecision::F32 => x.to_string(),
        OnnxPrecision::F16 => g.op(
            "Cast",
            &[x],
            vec![("to", Attr::Int(data_type::FLOAT16 as i64))],
        ),
    }
}

/// The image tower: `pixel_values` f32 `[batch, C, S, S]` -> `image_embeds` f32
/// `[batch, projection_dim]` (projected, not normalised).
pub(crate) fn vision_graph(
    model: &ClipModel,
    precision: OnnxPrecision,
) -> Result<GraphProto, OnnxError> {
    let cfg = &model.config().vision_config;
    let mut g = GraphBuilder::new(precision);
    let (w, p) = (cfg.hidden_size, cfg.patch_size);
    let x = to_graph_float(&mut g, "pixel_values");
    let kernel = param(
        &mut g,
        model,
        "vision_model.embeddings.patch_embedding.weight",
        false,
    )?;
    let x = g.op(
        "Conv",
        &[&x, &kernel],
        vec![
            ("kernel_shape", Attr::Ints(vec![p as i64, p as i64])),
            ("strides", Attr::Ints(vec![p as i64, p as i64])),
        ],
    ); // [N, W, g, g]
    let flat = g.ints1("patch_rows", &[0, w as i64, -1]);
    let x = g.op("Reshape", &[&x, &flat], vec![]);
    let x = g.op(
        "Transpose",
        &[&x],
        vec![("perm", Attr::Ints(vec![0, 2, 1]))],
    ); // [N, g², W]
       // The class token, one per image: [1, 1, W] expanded to [N, 1, W].
    let cls = tensor(model, "vision_model.embeddings.class_embedding")?.reshape((1, 1, w))?;
    let cls = g.weight("vision_model.embeddings.class_embedding", &cls, false, None)?;
    let batch = g.op(
        "Shape",
        &["pixel_values"],
        vec![("start", Attr::Int(0)), ("end", Attr::Int(1))],
    );
    let one_w = g.ints1("one_width", &[1, w as i64]);
    let cls_shape = g.op("Concat", &[&batch, &one_w], vec![("axis", Attr::Int(0))]);
    let cls = g.op("Expand", &[&cls, &cls_shape], vec![]);
    let x = g.op("Concat", &[&cls, &x], vec![("axis", Attr::Int(1))]);
    let pos = param(
        &mut g,
        model,
        "vision_model.embeddings.position_embedding.weight",
        false,
    )?;
    let x = g.op("Add", &[&x, &pos], vec![]);
    let eps = cfg.layer_norm_eps;
    let x = layer_norm(&mut g, model, &x, "vision_model.pre_layrnorm", eps)?;
    let spec = StackSpec {
        prefix: "vision_model",
        layers: cfg.num_hidden_layers,
        width: w,
        heads: cfg.num_attention_heads,
        act: cfg.hidden_act,
        eps,
    };
    let x = encoder(&mut g, model, x, &spec, None)?;
    let zero = g.ints("class_position", &[0], &[]);
    let x = g.op("Gather", &[&x, &zero], vec![("axis", Attr::Int(1))]); // [N, W]
    let x = layer_norm(&mut g, model, &x, "vision_model.post_layernorm", eps)?;
    let proj = param(&mut g, model, "visual_projection.weight", true)?;
    finish(
        g,
        "vision_model",
        &x,
        &proj,
        ("pixel_values", data_type::FLOAT),
        &[
            Dim::Named("batch"),
            Dim::Fixed(cfg.num_channels),
            Dim::Fixed(cfg.image_size),
            Dim::Fixed(cfg.image_size),
        ],
        "image_embeds",
        model.config().projection_dim,
    )
}

/// The projection, the cast back to f32 and the graph's inputs and outputs.
#[allow(clippy::too_many_arguments)]
fn finish(
    mut g: GraphBuilder,
    name: &str,
    pooled: &str,
    projection: &str,
    (input, input_type): (&str, i32),
    input_dims: &[Dim],
    output: &str,
    out_dim: usize,
) -> Result<GraphProto, OnnxError> {
    match g.precision {
        OnnxPrecision::F32 => g.op_into("MatMul", &[pooled, projection], vec![], output),
        OnnxPrecision::F16 => {
            let y = g.op("MatMul", &[pooled, projection], vec![]);
            let to = Attr::Int(data_type::FLOAT as i64);
            g.op_into("Cast", &[&y], vec![("to", to)], output);
        }
    }
    Ok(GraphProto {
        node: g.nodes,
        name: name.to_string(),
        initializer: g.initializers,
        doc_string: String::new(),
        input: vec![value_info(input, input_type, input_dims)],
        output: vec![value_info(
            output,
            data_type::FLOAT,
            &[Dim::Named("batch"), Dim::Fixed(out_dim)],
        )],
    })
}

/// The text tower: `input_ids` int64 `[batch, sequence]` (sequence <= the context length)
/// -> `text_embeds` f32 `[batch, projection_dim]`, pooled at each row's first end token (or
/// its highest id when the config names no end token), as `clipcid_models` does.
pub(crate) fn text_graph(
    model: &ClipModel,
    precision: OnnxPrecision,
) -> Result<GraphProto, OnnxError> {
    let config = model.config();
    let cfg = &config.text_config;
    if cfg.kind != TextTowerKind::Clip {
        return Err(OnnxError::Unsupported(
            "the text tower is a BERT encoder (a locked-text teacher's); only CLIP text \
             towers are exported to ONNX"
                .into(),
        ));
    }
    let mut g = GraphBuilder::new(precision);
    let (w, ctx) = (cfg.hidden_size, cfg.max_position_embeddings);
    let table = param(
        &mut g,
        model,
        "text_model.embeddings.token_embedding.weight",
        false,
    )?;
    let x = g.op(
        "Gather",
        &[&table, "input_ids"],
        vec![("axis", Attr::Int(0))],
    );
    // Positions and the causal mask, cut to the input's length.
    let len = g.op(
        "Shape",
        &["input_ids"],
        vec![("start", Attr::Int(1)), ("end", Attr::Int(2))],
    );
    let pos = param(
        &mut g,
        model,
        "text_model.embeddings.position_embedding.weight",
        false,
    )?;
    let zero1 = g.ints1("zero", &[0]);
    let axis0 = g.ints1("axis0", &[0]);
    let pos = g.op("Slice", &[&pos, &zero1, &len, &axis0], vec![]);
    let x = g.op("Add", &[&x, &pos], vec![]);
    // Additive mask: 0 on and below the diagonal, the float type's lowest finite value
    // above (as transformers builds it).
    let lowest = match precision {
        OnnxPrecision::F32 => f32::MIN,
        OnnxPrecision::F16 => f32::from(half::f16::MIN),
    };
    let mask: Vec<f32> = (0..ctx)
        .flat_map(|i| (0..ctx).map(move |j| if j > i { lowest } else { 0.0 }))
        .collect();
    let mask = g.floats("causal_mask", &mask, &[ctx, ctx]);
    let zero2 = g.ints1("zeros", &[0, 0]);
    let axes01 = g.ints1("axes01", &[0, 1]);
    let len2 = g.op("Concat", &[&len, &len], vec![("axis", Attr::Int(0))]);
    let mask = g.op("Slice", &[&mask, &zero2, &len2, &axes01], vec![]);
    let spec = StackSpec {
        prefix: "text_model",
        layers: cfg.num_hidden_layers,
        width: w,
        heads: cfg.num_attention_heads,
        act: cfg.hidden_act,
        eps: cfg.layer_norm_eps,
    };
    let x = encoder(&mut g, model, x, &spec, Some(&mask))?;
    let x = layer_norm(
        &mut g,
        model,
        &x,
        "text_model.final_layer_norm",
        cfg.layer_norm_eps,
    )?;
    // Pooling position: the first end token, else the highest id (first occurrence), as
    // ArgMax of `is_end * vocab + id` in f32 (exact: ids < 2^24).
    let ids = g.op(
        "Cast",
        &["input_ids"],
        vec![("to", Attr::Int(data_type::FLOAT as i64))],
    );
    let score = match config.eos_token_id() {
        Some(eos) => {
            let eos = g.ints("eos_token_id", &[i64::from(eos)], &[]);
            let is_end = g.op("Equal", &["input_ids", &eos], vec![]);
            let is_end = g.op(
                "Cast",
                &[&is_end],
                vec![("to", Attr::Int(data_type::FLOAT as i64))],
            );
            let vocab = g.scalar_f32("vocab_size", cfg.vocab_size as f32);
            let lifted = g.op("Mul", &[&is_end, &vocab], vec![]);
            g.op("Add", &[&lifted, &ids], vec![])
        }
        None => ids,
    };
    let at = g.op(
        "ArgMax",
        &[&score],
        vec![("axis", Attr::Int(1)), ("keepdims", Attr::Int(1))],
    ); // [N, 1]
       // One-hot row selector [N, 1, T] times the hidden states [N, T, W] -> [N, 1, W].
    let positions: Vec<i64> = (0..ctx as i64).collect();
    let positions = g.ints1("positions", &positions);
    let positions = g.op("Slice", &[&positions, &zero1, &len, &axis0], vec![]);
    let hot = g.op("Equal", &[&positions, &at], vec![]); // [N, T]
    let to = Attr::Int(i64::from(g.float_type()));
    let hot = g.op("Cast", &[&hot], vec![("to", to)]);
    let axis1 = g.ints1("axis1", &[1]);
    let hot = g.op("Unsqueeze", &[&hot, &axis1], vec![]);
    let pooled = g.op("MatMul", &[&hot, &x], vec![]);
    let rows = g.ints1("pooled_rows", &[0, w as i64]);
    let pooled = g.op("Reshape", &[&pooled, &rows], vec![]);
    let proj = param(&mut g, model, "text_projection.weight", true)?;
    finish(
        g,
        "text_model",
        &pooled,
        &proj,
        ("input_ids", data_type::INT64),
        &[Dim::Named("batch"), Dim::Named("sequence")],
        "text_embeds",
        config.projection_dim,
    )
}

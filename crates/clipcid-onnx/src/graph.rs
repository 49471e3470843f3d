//! A small builder for ONNX graphs: named nodes, initializers from candle tensors, constants.

use candle_core::{DType, Tensor};

use crate::proto::{
    attribute_type, data_type, AttributeProto, Dimension, DimensionValue, NodeProto, TensorProto,
    TensorShapeProto, TensorTypeProto, TypeProto, ValueInfoProto,
};
use crate::{OnnxError, OnnxPrecision};

/// An attribute of a node.
pub(crate) enum Attr {
    Int(i64),
    Ints(Vec<i64>),
    Float(f32),
}

/// Nodes and initializers under construction; every value gets a fresh name.
pub(crate) struct GraphBuilder {
    pub(crate) nodes: Vec<NodeProto>,
    pub(crate) initializers: Vec<TensorProto>,
    /// The element type of the float tensors inside the graph.
    pub(crate) precision: OnnxPrecision,
    counter: usize,
}

impl GraphBuilder {
    pub(crate) fn new(precision: OnnxPrecision) -> Self {
        Self {
            nodes: Vec::new(),
            initializers: Vec::new(),
            precision,
            counter: 0,
        }
    }

    /// ONNX element type of the graph's float tensors.
    pub(crate) fn float_type(&self) -> i32 {
        match self.precision {
            OnnxPrecision::F32 => data_type::FLOAT,
            OnnxPrecision::F16 => data_type::FLOAT16,
        }
    }

    fn fresh(&mut self, hint: &str) -> String {
        self.counter += 1;
        format!("{hint}_{}", self.counter)
    }

    /// One node with one output; returns the output's name.
    pub(crate) fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>) -> String {
        let out = self.fresh(op);
        self.op_into(op, inputs, attrs, &out);
        out
    }

    /// One node writing `out` (a graph output's name).
    pub(crate) fn op_into(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<(&str, Attr)>,
        out: &str,
    ) {
        let attribute = attrs
            .into_iter()
            .map(|(name, a)| {
                let mut p = AttributeProto {
                    name: name.to_string(),
                    ..Default::default()
                };
                match a {
                    Attr::Int(i) => (p.r#type, p.i) = (attribute_type::INT, i),
                    Attr::Ints(v) => (p.r#type, p.ints) = (attribute_type::INTS, v),
                    Attr::Float(f) => (p.r#type, p.f) = (attribute_type::FLOAT, f),
                }
                p
            })
            .collect();
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.to_string()],
            name: format!("{op}_{}", self.nodes.len()),
            op_type: op.to_string(),
            attribute,
        });
    }

    fn push_initializer(&mut self, name: String, dims: &[usize], dtype: i32, raw: Vec<u8>) {
        self.initializers.push(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: dtype,
            name,
            raw_data: raw,
            external_data: Vec::new(),
            data_location: None,
        });
    }

    /// A float initializer named `name` holding `values` (shape `dims`) in the graph's
    /// precision.
    pub(crate) fn floats(&mut self, name: &str, values: &[f32], dims: &[usize]) -> String {
        let raw = match self.precision {
            OnnxPrecision::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            OnnxPrecision::F16 => values
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect(),
        };
        let dtype = self.float_type();
        self.push_initializer(name.to_string(), dims, dtype, raw);
        name.to_string()
    }

    /// A float scalar constant in the graph's precision.
    pub(crate) fn scalar(&mut self, hint: &str, value: f32) -> String {
        let name = self.fresh(hint);
        self.floats(&name, &[value], &[])
    }

    /// An f32 scalar constant whatever the graph's precision.
    pub(crate) fn scalar_f32(&mut self, hint: &str, value: f32) -> String {
        let name = self.fresh(hint);
        let raw = value.to_le_bytes().to_vec();
        self.push_initializer(name.clone(), &[], data_type::FLOAT, raw);
        name
    }

    /// An int64 constant.
    pub(crate) fn ints(&mut self, hint: &str, values: &[i64], dims: &[usize]) -> String {
        let name = self.fresh(hint);
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.push_initializer(name.clone(), dims, data_type::INT64, raw);
        name
    }

    /// A 1-D int64 constant.
    pub(crate) fn ints1(&mut self, hint: &str, values: &[i64]) -> String {
        self.ints(hint, values, &[values.len()])
    }

    /// The model's tensor `t` as an initializer named `name` (optionally transposed, for
    /// `[out, in]` weights used as `MatMul`'s right operand, optionally scaled).
    pub(crate) fn weight(
        &mut self,
        name: &str,
        t: &Tensor,
        transpose: bool,
        scale: Option<f32>,
    ) -> Result<String, OnnxError> {
        let t = t
            .to_device(&candle_core::Device::Cpu)?
            .to_dtype(DType::F32)?;
        let t = if transpose { t.t()? } else { t };
        let dims = t.dims().to_vec();
        let mut values = t.flatten_all()?.to_vec1::<f32>()?;
        if let Some(s) = scale {
            values.iter_mut().for_each(|v| *v *= s);
        }
        if let Some(bad) = values.iter().position(|v| !v.is_finite()) {
            return Err(OnnxError::Model(format!(
                "tensor `{name}` holds a non-finite value at flat index {bad}"
            )));
        }
        if self.precision == OnnxPrecision::F16 {
            if let Some(big) = values.iter().find(|v| v.abs() > f32::from(half::f16::MAX)) {
                return Err(OnnxError::Model(format!(
                    "tensor `{name}` holds {big}, beyond half precision's range (export in f32)"
                )));
            }
        }
        Ok(self.floats(name, &values, &dims))
    }
}

/// A graph input or output: `elem` tensors of `dims` (a name is a dynamic axis).
pub(crate) fn value_info(name: &str, elem: i32, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Dim::Fixed(n) => DimensionValue::DimValue(*n as i64),
                Dim::Named(s) => DimensionValue::DimParam(s.to_string()),
            }),
        })
        .collect();
    ValueInfoProto {
        name: name.to_string(),
        r#type: Some(TypeProto {
            tensor_type: Some(TensorTypeProto {
                elem_type: elem,
                shape: Some(TensorShapeProto { dim }),
            }),
        }),
    }
}

/// One axis of a graph input or output.
pub(crate) enum Dim {
    Fixed(usize),
    Named(&'static str),
}

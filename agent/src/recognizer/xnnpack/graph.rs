//! An ONNX model as an XNNPACK subgraph, described in plain Rust before any XNNPACK call: the values
//! (activations laid out NHWC, weights rearranged into XNNPACK's filter layouts) and the nodes between
//! them. Only the operators an image embedder of the MobileNet/EfficientNet-Lite family is made of are
//! translated (convolutions, depthwise ones included, ReLU/ReLU6, residual adds, global average
//! pooling, flatten and a final projection); a model with anything else is [`Unsupported`] and runs on
//! tract instead. Clips that follow a convolution, an add, a pooling or a projection are fused into it
//! as XNNPACK's output clamp.

use tract_onnx::pb;

/// Why a model has no XNNPACK translation (it runs on tract).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct Unsupported(pub String);

fn unsupported<T>(what: impl Into<String>) -> Result<T, Unsupported> {
    Err(Unsupported(what.into()))
}

/// A value of the subgraph: an activation (no data) or a weight (its data, in XNNPACK's layout).
#[derive(Debug, Clone, PartialEq)]
pub struct Value {
    /// Its dimensions as XNNPACK is told them: activations of rank 4 are NHWC.
    pub dims: Vec<usize>,
    pub data: Option<Vec<f32>>,
}

/// A 2D window: padding (top, right, bottom, left), kernel, stride and dilation as (height, width).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub pads: [u32; 4],
    pub kernel: (u32, u32),
    pub stride: (u32, u32),
    pub dilation: (u32, u32),
}

/// An operation of the subgraph. Value ids index [`Graph::values`]; `clamp` is the output's (min, max).
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    Convolution {
        window: Window,
        groups: u32,
        group_input_channels: usize,
        group_output_channels: usize,
        clamp: (f32, f32),
        input: u32,
        filter: u32,
        bias: u32,
        output: u32,
    },
    Depthwise {
        window: Window,
        multiplier: u32,
        input_channels: usize,
        clamp: (f32, f32),
        input: u32,
        filter: u32,
        bias: u32,
        output: u32,
    },
    Add {
        clamp: (f32, f32),
        inputs: [u32; 2],
        output: u32,
    },
    Clamp {
        clamp: (f32, f32),
        input: u32,
        output: u32,
    },
    GlobalAveragePool {
        clamp: (f32, f32),
        input: u32,
        output: u32,
    },
    /// `filter` is [input channels, output channels] (XNNPACK's transposed-weights flag).
    FullyConnected {
        clamp: (f32, f32),
        input: u32,
        filter: u32,
        bias: Option<u32>,
        output: u32,
    },
}

impl Node {
    fn output(&self) -> u32 {
        match self {
            Node::Convolution { output, .. }
            | Node::Depthwise { output, .. }
            | Node::Add { output, .. }
            | Node::Clamp { output, .. }
            | Node::GlobalAveragePool { output, .. }
            | Node::FullyConnected { output, .. } => *output,
        }
    }

    fn clamp_mut(&mut self) -> &mut (f32, f32) {
        match self {
            Node::Convolution { clamp, .. }
            | Node::Depthwise { clamp, .. }
            | Node::Add { clamp, .. }
            | Node::Clamp { clamp, .. }
            | Node::GlobalAveragePool { clamp, .. }
            | Node::FullyConnected { clamp, .. } => clamp,
        }
    }
}

/// The whole subgraph: one input image, one output embedding.
#[derive(Debug, Clone, PartialEq)]
pub struct Graph {
    pub values: Vec<Value>,
    pub nodes: Vec<Node>,
    /// The image, [1, H, W, 3].
    pub input: u32,
    pub output: u32,
    /// Whether the ONNX model takes its image channel-first (the caller transposes it to NHWC).
    pub input_nchw: bool,
    /// How many values the output has.
    pub output_len: usize,
}

/// An ONNX value as the translation knows it: its subgraph value and its ONNX shape.
#[derive(Clone)]
struct Known {
    id: u32,
    /// The ONNX dimensions (NCHW for rank 4).
    shape: Vec<usize>,
    /// The node that produced it, if it is a node's output.
    producer: Option<usize>,
}

const NO_CLAMP: (f32, f32) = (f32::NEG_INFINITY, f32::INFINITY);

struct Builder<'a> {
    graph: Graph,
    known: std::collections::HashMap<&'a str, Known>,
    weights: std::collections::HashMap<&'a str, &'a pb::TensorProto>,
    /// How many nodes read each ONNX value (a clamp is fused only into a value read once).
    readers: std::collections::HashMap<&'a str, usize>,
}

/// The values of a float or int64 initializer, as f64, and its dimensions.
fn tensor_values(t: &pb::TensorProto) -> Result<(Vec<f64>, Vec<usize>), Unsupported> {
    use pb::tensor_proto::DataType;
    if !t.external_data.is_empty() {
        return unsupported(format!(
            "initializer {:?} keeps its data in another file",
            t.name
        ));
    }
    let dims = t
        .dims
        .iter()
        .map(|d| {
            usize::try_from(*d)
                .map_err(|_| Unsupported(format!("{:?} has dims {:?}", t.name, t.dims)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let values: Vec<f64> = if t.data_type == DataType::Float as i32 {
        if !t.raw_data.is_empty() {
            t.raw_data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64)
                .collect()
        } else {
            t.float_data.iter().map(|v| *v as f64).collect()
        }
    } else if t.data_type == DataType::Int64 as i32 {
        if !t.raw_data.is_empty() {
            t.raw_data
                .chunks_exact(8)
                .map(|b| {
                    i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f64
                })
                .collect()
        } else {
            t.int64_data.iter().map(|v| *v as f64).collect()
        }
    } else {
        return unsupported(format!(
            "initializer {:?} has data type {}",
            t.name, t.data_type
        ));
    };
    let count = dims.iter().try_fold(1usize, |n, d| n.checked_mul(*d));
    if count != Some(values.len()) {
        return unsupported(format!(
            "initializer {:?} holds {} values for dims {:?}",
            t.name,
            values.len(),
            dims
        ));
    }
    Ok((values, dims))
}

fn attr<'n>(node: &'n pb::NodeProto, name: &str) -> Option<&'n pb::AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

fn attr_ints(node: &pb::NodeProto, name: &str, default: &[i64]) -> Vec<i64> {
    attr(node, name).map_or_else(|| default.to_vec(), |a| a.ints.clone())
}

fn attr_int(node: &pb::NodeProto, name: &str, default: i64) -> i64 {
    attr(node, name).map_or(default, |a| a.i)
}

fn pair(v: &[i64], what: &str, op: &str) -> Result<(u32, u32), Unsupported> {
    match v {
        [a, b] if *a >= 1 && *b >= 1 => Ok((*a as u32, *b as u32)),
        _ => unsupported(format!("{op} with {what} {v:?}")),
    }
}

impl<'a> Builder<'a> {
    fn value(&mut self, dims: Vec<usize>, data: Option<Vec<f32>>) -> u32 {
        self.graph.values.push(Value { dims, data });
        (self.graph.values.len() - 1) as u32
    }

    fn activation(&self, name: &str, op: &str) -> Result<Known, Unsupported> {
        match self.known.get(name) {
            Some(k) => Ok(k.clone()),
            None if self.weights.contains_key(name) => {
                unsupported(format!("{op} reads the initializer {name:?} as its data"))
            }
            None => unsupported(format!("{op} reads {name:?}, which nothing produced")),
        }
    }

    fn weight(&self, name: &str, op: &str) -> Result<(Vec<f64>, Vec<usize>), Unsupported> {
        match self.weights.get(name) {
            Some(t) => tensor_values(t),
            None => unsupported(format!(
                "{op} takes {name:?} as a weight, and it is not a constant"
            )),
        }
    }

    fn scalar(&self, name: &str, op: &str) -> Result<f32, Unsupported> {
        let (v, _) = self.weight(name, op)?;
        match v.as_slice() {
            [x] => Ok(*x as f32),
            _ => unsupported(format!("{op} bound {name:?} is not a scalar")),
        }
    }

    fn push(&mut self, out_name: &'a str, node: Node, shape: Vec<usize>) {
        let output = node.output();
        self.graph.nodes.push(node);
        self.known.insert(
            out_name,
            Known {
                id: output,
                shape,
                producer: Some(self.graph.nodes.len() - 1),
            },
        );
    }

    fn conv(&mut self, node: &'a pb::NodeProto) -> Result<(), Unsupported> {
        let op = "Conv";
        let x = self.activation(&node.input[0], op)?;
        let [n, cin, h, w] = x.shape[..] else {
            return unsupported(format!("Conv on a rank-{} input", x.shape.len()));
        };
        let (wv, wd) = self.weight(node.input.get(1).map_or("", |s| s), op)?;
        let [cout, cin_g, kh, kw] = wd[..] else {
            return unsupported(format!("Conv with a rank-{} weight", wd.len()));
        };
        let bias: Vec<f32> = match node.input.get(2).filter(|s| !s.is_empty()) {
            Some(b) => {
                let (bv, bd) = self.weight(b, op)?;
                if bd != [cout] {
                    return unsupported(format!("Conv bias of dims {bd:?} for {cout} channels"));
                }
                bv.iter().map(|v| *v as f32).collect()
            }
            None => vec![0.0; cout],
        };
        let auto_pad = attr(node, "auto_pad").map(|a| String::from_utf8_lossy(&a.s).into_owned());
        if auto_pad.as_deref().is_some_and(|p| p != "NOTSET") {
            return unsupported(format!("Conv with auto_pad {auto_pad:?}"));
        }
        let group = attr_int(node, "group", 1);
        let group = usize::try_from(group).unwrap_or(0);
        if group == 0 || cin % group != 0 || cout % group != 0 || cin / group != cin_g {
            return unsupported(format!(
                "Conv of {cin} channels in {group} groups with a weight of {cin_g} channels"
            ));
        }
        let kernel = pair(
            &attr_ints(node, "kernel_shape", &[kh as i64, kw as i64]),
            "kernel",
            op,
        )?;
        if kernel != (kh as u32, kw as u32) {
            return unsupported(format!(
                "Conv kernel_shape {kernel:?} against a {kh}x{kw} weight"
            ));
        }
        let stride = pair(&attr_ints(node, "strides", &[1, 1]), "strides", op)?;
        let dilation = pair(&attr_ints(node, "dilations", &[1, 1]), "dilations", op)?;
        let pads = attr_ints(node, "pads", &[0, 0, 0, 0]);
        let [pt, pl, pb, pr] = pads[..] else {
            return unsupported(format!("Conv with pads {pads:?}"));
        };
        if [pt, pl, pb, pr].iter().any(|p| *p < 0) {
            return unsupported(format!("Conv with pads {pads:?}"));
        }
        let window = Window {
            pads: [pt as u32, pr as u32, pb as u32, pl as u32],
            kernel,
            stride,
            dilation,
        };
        let out_size = |size: usize, before: i64, after: i64, k: usize, s: u32, d: u32| {
            let span = d as usize * (k - 1) + 1;
            let padded = size + before as usize + after as usize;
            (padded >= span).then(|| (padded - span) / s as usize + 1)
        };
        let (Some(oh), Some(ow)) = (
            out_size(h, pt, pb, kh, stride.0, dilation.0),
            out_size(w, pl, pr, kw, stride.1, dilation.1),
        ) else {
            return unsupported("Conv whose window is larger than its padded input");
        };
        let output = self.value(vec![n, oh, ow, cout], None);
        let bias = self.value(vec![cout], Some(bias));
        let depthwise = group > 1 && group == cin && cin_g == 1;
        let node_out = if depthwise {
            // ONNX [C*m, 1, kh, kw] to XNNPACK's [1, kh, kw, C*m].
            let mut f = vec![0f32; cout * kh * kw];
            for o in 0..cout {
                for y in 0..kh {
                    for xx in 0..kw {
                        f[(y * kw + xx) * cout + o] = wv[(o * kh + y) * kw + xx] as f32;
                    }
                }
            }
            let filter = self.value(vec![1, kh, kw, cout], Some(f));
            Node::Depthwise {
                window,
                multiplier: (cout / cin) as u32,
                input_channels: cin,
                clamp: NO_CLAMP,
                input: x.id,
                filter,
                bias,
                output,
            }
        } else {
            // ONNX [O, I/g, kh, kw] to XNNPACK's [O, kh, kw, I/g].
            let mut f = vec![0f32; cout * kh * kw * cin_g];
            for o in 0..cout {
                for i in 0..cin_g {
                    for y in 0..kh {
                        for xx in 0..kw {
                            f[((o * kh + y) * kw + xx) * cin_g + i] =
                                wv[((o * cin_g + i) * kh + y) * kw + xx] as f32;
                        }
                    }
                }
            }
            let filter = self.value(vec![cout, kh, kw, cin_g], Some(f));
            Node::Convolution {
                window,
                groups: group as u32,
                group_input_channels: cin_g,
                group_output_channels: cout / group,
                clamp: NO_CLAMP,
                input: x.id,
                filter,
                bias,
                output,
            }
        };
        self.push(&node.output[0], node_out, vec![n, cout, oh, ow]);
        Ok(())
    }

    /// Clip or Relu: fused into the node that produced its input when nothing else reads that.
    fn clamp(&mut self, node: &'a pb::NodeProto, bounds: (f32, f32)) -> Result<(), Unsupported> {
        let x = self.activation(&node.input[0], &node.op_type)?;
        let read_once = self.readers.get(node.input[0].as_str()) == Some(&1);
        if let (Some(p), true) = (x.producer, read_once) {
            let c = self.graph.nodes[p].clamp_mut();
            *c = (c.0.max(bounds.0), c.1.min(bounds.1));
            self.known.insert(&node.output[0], x);
            return Ok(());
        }
        let dims = self.graph.values[x.id as usize].dims.clone();
        let output = self.value(dims, None);
        self.push(
            &node.output[0],
            Node::Clamp {
                clamp: bounds,
                input: x.id,
                output,
            },
            x.shape,
        );
        Ok(())
    }

    fn translate(&mut self, node: &'a pb::NodeProto) -> Result<(), Unsupported> {
        if !node.domain.is_empty() && node.domain != "ai.onnx" {
            return unsupported(format!(
                "operator {} of domain {:?}",
                node.op_type, node.domain
            ));
        }
        let op = node.op_type.as_str();
        if node.output.len() != 1 && op != "Constant" {
            return unsupported(format!("{op} with {} outputs", node.output.len()));
        }
        match op {
            "Constant" => match (
                &attr(node, "value").and_then(|a| a.t.as_ref()),
                node.output.first(),
            ) {
                (Some(t), Some(name)) => {
                    self.weights.insert(name, t);
                    Ok(())
                }
                _ => unsupported("a Constant without a tensor value"),
            },
            "Conv" => self.conv(node),
            "Relu" => self.clamp(node, (0.0, f32::INFINITY)),
            "Clip" => {
                let bound = |i: usize, key: &str, default: f32| -> Result<f32, Unsupported> {
                    match node.input.get(i).filter(|s| !s.is_empty()) {
                        Some(name) => self.scalar(name, "Clip"),
                        None => Ok(attr(node, key).map_or(default, |a| a.f)),
                    }
                };
                let lo = bound(1, "min", f32::NEG_INFINITY)?;
                let hi = bound(2, "max", f32::INFINITY)?;
                self.clamp(node, (lo, hi))
            }
            "Add" => {
                let a = self.activation(&node.input[0], op)?;
                let b = self.activation(node.input.get(1).map_or("", |s| s), op)?;
                if a.shape != b.shape {
                    return unsupported(format!(
                        "Add of {:?} and {:?} (broadcasting)",
                        a.shape, b.shape
                    ));
                }
                let dims = self.graph.values[a.id as usize].dims.clone();
                let output = self.value(dims, None);
                self.push(
                    &node.output[0],
                    Node::Add {
                        clamp: NO_CLAMP,
                        inputs: [a.id, b.id],
                        output,
                    },
                    a.shape,
                );
                Ok(())
            }
            "GlobalAveragePool" => {
                let x = self.activation(&node.input[0], op)?;
                let [n, c, _, _] = x.shape[..] else {
                    return unsupported(format!("GlobalAveragePool of rank {}", x.shape.len()));
                };
                let output = self.value(vec![n, 1, 1, c], None);
                self.push(
                    &node.output[0],
                    Node::GlobalAveragePool {
                        clamp: NO_CLAMP,
                        input: x.id,
                        output,
                    },
                    vec![n, c, 1, 1],
                );
                Ok(())
            }
            "Flatten" | "Reshape" | "Squeeze" => {
                // Only [N, C, 1, 1] to [N, C]: the same bytes in either layout, so the same value.
                let x = self.activation(&node.input[0], op)?;
                let [n, c, 1, 1] = x.shape[..] else {
                    return unsupported(format!("{op} of {:?}", x.shape));
                };
                let to = vec![n, c];
                match op {
                    "Flatten" if attr_int(node, "axis", 1) != 1 => {
                        return unsupported("Flatten not at axis 1");
                    }
                    "Reshape" => {
                        let (shape, _) = self.weight(node.input.get(1).map_or("", |s| s), op)?;
                        let ok = shape.len() == 2
                            && (shape[0] == n as f64 || shape[0] == 0.0 || shape[0] == -1.0)
                            && (shape[1] == c as f64 || shape[1] == -1.0);
                        if !ok {
                            return unsupported(format!("Reshape of {:?} to {shape:?}", x.shape));
                        }
                    }
                    "Squeeze" => {
                        let axes = match node.input.get(1).filter(|s| !s.is_empty()) {
                            Some(a) => self.weight(a, op)?.0.iter().map(|v| *v as i64).collect(),
                            None => attr_ints(node, "axes", &[2, 3]),
                        };
                        let mut axes: Vec<i64> = axes
                            .iter()
                            .map(|a| if *a < 0 { a + 4 } else { *a })
                            .collect();
                        axes.sort_unstable();
                        if axes != [2, 3] {
                            return unsupported(format!("Squeeze of axes {axes:?}"));
                        }
                    }
                    _ => {}
                }
                self.known.insert(
                    &node.output[0],
                    Known {
                        id: x.id,
                        shape: to,
                        // A clamp after it is not fused: the value before may have other readers.
                        producer: None,
                    },
                );
                Ok(())
            }
            "MatMul" | "Gemm" => self.projection(node),
            other => unsupported(format!("operator {other}")),
        }
    }

    /// MatMul or Gemm of an activation [N, K] by a constant: a fully connected node.
    fn projection(&mut self, node: &'a pb::NodeProto) -> Result<(), Unsupported> {
        let op = node.op_type.as_str();
        let x = self.activation(&node.input[0], op)?;
        let [n, k] = x.shape[..] else {
            return unsupported(format!("{op} of an input of dims {:?}", x.shape));
        };
        let (mut wv, wd) = self.weight(node.input.get(1).map_or("", |s| s), op)?;
        let mut bias = None;
        let mut trans_b = false;
        if op == "Gemm" {
            if attr_int(node, "transA", 0) != 0 {
                return unsupported("Gemm with transA");
            }
            trans_b = attr_int(node, "transB", 0) != 0;
            let alpha = attr(node, "alpha").map_or(1.0, |a| a.f) as f64;
            wv.iter_mut().for_each(|v| *v *= alpha);
            if let Some(c) = node.input.get(2).filter(|s| !s.is_empty()) {
                let beta = attr(node, "beta").map_or(1.0, |a| a.f) as f64;
                let (cv, _) = self.weight(c, op)?;
                bias = Some(cv.iter().map(|v| (v * beta) as f32).collect::<Vec<_>>());
            }
        }
        // The filter as [K, D] (XNNPACK's transposed weights).
        let (rows, cols) = match wd[..] {
            [r, c] => (r, c),
            _ => return unsupported(format!("{op} by a weight of dims {wd:?}")),
        };
        let (kk, d, filter): (usize, usize, Vec<f32>) = if trans_b {
            let mut f = vec![0f32; rows * cols];
            for r in 0..rows {
                for c in 0..cols {
                    f[c * rows + r] = wv[r * cols + c] as f32;
                }
            }
            (cols, rows, f)
        } else {
            (rows, cols, wv.iter().map(|v| *v as f32).collect())
        };
        if kk != k {
            return unsupported(format!("{op} of {k} features by a weight of dims {wd:?}"));
        }
        let bias = match bias {
            Some(b) if b.len() == d => Some(self.value(vec![d], Some(b))),
            Some(b) if b.len() == 1 => Some(self.value(vec![d], Some(vec![b[0]; d]))),
            Some(b) => {
                return unsupported(format!("Gemm bias of {} values for {d} outputs", b.len()));
            }
            None => None,
        };
        let filter = self.value(vec![k, d], Some(filter));
        // The input may be a pooled [N, 1, 1, K] value: XNNPACK projects its last dimension and keeps
        // the rest, so the output has the input's rank.
        let mut dims = self.graph.values[x.id as usize].dims.clone();
        if let Some(last) = dims.last_mut() {
            *last = d;
        }
        let output = self.value(dims, None);
        self.push(
            &node.output[0],
            Node::FullyConnected {
                clamp: NO_CLAMP,
                input: x.id,
                filter,
                bias,
                output,
            },
            vec![n, d],
        );
        Ok(())
    }
}

/// Translates `model` for one image of `shape` (its ONNX input shape, batch 1, NCHW or NHWC).
pub fn translate(model: &pb::ModelProto, shape: [usize; 4]) -> Result<Graph, Unsupported> {
    let Some(g) = &model.graph else {
        return unsupported("the model has no graph");
    };
    let weights: std::collections::HashMap<&str, &pb::TensorProto> =
        g.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
    let inputs: Vec<&pb::ValueInfoProto> = g
        .input
        .iter()
        .filter(|i| !weights.contains_key(i.name.as_str()))
        .collect();
    let [input] = inputs[..] else {
        return unsupported(format!("the model has {} inputs", inputs.len()));
    };
    let [output] = &g.output[..] else {
        return unsupported(format!("the model has {} outputs", g.output.len()));
    };
    let mut readers = std::collections::HashMap::new();
    for n in &g.node {
        for i in n.input.iter().filter(|i| !i.is_empty()) {
            *readers.entry(i.as_str()).or_insert(0) += 1;
        }
    }
    // The model's output counts as a reader: a clamp is never fused into it from below.
    *readers.entry(output.name.as_str()).or_insert(0) += 1;
    let input_nchw = shape[1] == 3 && shape[3] != 3;
    let (h, w) = if input_nchw {
        (shape[2], shape[3])
    } else {
        (shape[1], shape[2])
    };
    if shape[0] != 1 || (input_nchw && shape[1] != 3) || (!input_nchw && shape[3] != 3) {
        return unsupported(format!("an input of shape {shape:?}"));
    }
    let mut b = Builder {
        graph: Graph {
            values: Vec::new(),
            nodes: Vec::new(),
            input: 0,
            output: 0,
            input_nchw,
            output_len: 0,
        },
        known: Default::default(),
        weights,
        readers,
    };
    let id = b.value(vec![1, h, w, 3], None);
    b.graph.input = id;
    if !input_nchw {
        // An NHWC model: its convolutions would need their layout checked; not translated.
        return unsupported("a channel-last input");
    }
    b.known.insert(
        &input.name,
        Known {
            id,
            shape: vec![1, 3, h, w],
            producer: None,
        },
    );
    for node in &g.node {
        b.translate(node)?;
    }
    let out = b.activation(&output.name, "the model's output")?;
    if out.id == b.graph.input {
        return unsupported("the model's output is its input");
    }
    b.graph.output = out.id;
    b.graph.output_len = b.graph.values[out.id as usize].dims.iter().product();
    Ok(b.graph)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model whose only node is a 1x1 convolution by `weight` (dims and raw little-endian bytes).
    fn one_conv(dims: Vec<i64>, raw: Vec<u8>) -> pb::ModelProto {
        let input = |name: &str| pb::ValueInfoProto {
            name: name.into(),
            ..Default::default()
        };
        pb::ModelProto {
            graph: Some(pb::GraphProto {
                node: vec![pb::NodeProto {
                    input: vec!["image".into(), "w".into()],
                    output: vec!["out".into()],
                    op_type: "Conv".into(),
                    ..Default::default()
                }],
                initializer: vec![pb::TensorProto {
                    name: "w".into(),
                    dims,
                    data_type: pb::tensor_proto::DataType::Float as i32,
                    raw_data: raw,
                    ..Default::default()
                }],
                input: vec![input("image")],
                output: vec![input("out")],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_weight_whose_dims_do_not_match_its_data_is_refused_not_trusted() {
        let shape = [1, 3, 8, 8];
        // Dims whose product overflows, over 4 bytes.
        let huge = translate(&one_conv(vec![1 << 33, 1 << 33, 1, 1], vec![0; 4]), shape);
        assert!(matches!(huge, Err(Unsupported(m)) if m.contains("holds 1 values")));
        let short = translate(&one_conv(vec![4, 3, 1, 1], vec![0; 8]), shape);
        assert!(matches!(short, Err(Unsupported(m)) if m.contains("holds 2 values")));
        let negative = translate(&one_conv(vec![4, -3, 1, 1], vec![]), shape);
        assert!(matches!(negative, Err(Unsupported(m)) if m.contains("has dims")));
        // And a well-formed one translates: 4 output channels from 3, 1x1.
        let good = translate(&one_conv(vec![4, 3, 1, 1], vec![0; 48]), shape).unwrap();
        assert_eq!(good.output_len, 4 * 8 * 8);
        assert!(matches!(
            good.nodes[..],
            [Node::Convolution {
                groups: 1,
                group_input_channels: 3,
                group_output_channels: 4,
                ..
            }]
        ));
    }
}

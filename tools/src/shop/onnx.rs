//! Generated ONNX models, written with tract's own protobuf types: the small sample embedder every test
//! uses, and an EfficientNet-Lite0-shaped embedder for measuring the CPU backend on a real-sized network.
//! Weights come from a seeded generator, so the same seed always gives the same bytes.

use deckhand_protocol::testdata::SplitMix;
use prost::Message as _;
use tract_onnx::pb;

/// A graph under construction: nodes, weights, and a counter for fresh value names.
struct Graph {
    nodes: Vec<pb::NodeProto>,
    weights: Vec<pb::TensorProto>,
    next: usize,
}

fn ints(name: &str, v: Vec<i64>) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Ints as i32,
        ints: v,
        ..Default::default()
    }
}

fn int(name: &str, v: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i: v,
        ..Default::default()
    }
}

/// A float tensor type whose first dimension is the symbolic batch `N`.
fn batched_f32(rest: &[i64]) -> pb::TypeProto {
    let dim = |value| pb::tensor_shape_proto::Dimension {
        denotation: String::new(),
        value: Some(value),
    };
    let mut dims = vec![dim(pb::tensor_shape_proto::dimension::Value::DimParam(
        "N".into(),
    ))];
    dims.extend(
        rest.iter()
            .map(|v| dim(pb::tensor_shape_proto::dimension::Value::DimValue(*v))),
    );
    pb::TypeProto {
        denotation: String::new(),
        value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
            elem_type: pb::tensor_proto::DataType::Float as i32,
            shape: Some(pb::TensorShapeProto { dim: dims }),
        })),
    }
}

impl Graph {
    fn new() -> Self {
        Self {
            nodes: Vec::new(),
            weights: Vec::new(),
            next: 0,
        }
    }

    fn fresh(&mut self, what: &str) -> String {
        self.next += 1;
        format!("{what}{}", self.next)
    }

    /// Adds a node with one output; returns the output's name.
    fn node(&mut self, op: &str, inputs: &[&str], attribute: Vec<pb::AttributeProto>) -> String {
        let output = self.fresh(&op.to_lowercase());
        self.node_named(op, inputs, &output, attribute);
        output
    }

    fn node_named(
        &mut self,
        op: &str,
        inputs: &[&str],
        output: &str,
        attribute: Vec<pb::AttributeProto>,
    ) {
        self.nodes.push(pb::NodeProto {
            op_type: op.into(),
            input: inputs.iter().map(|s| (*s).into()).collect(),
            output: vec![output.into()],
            name: output.into(),
            attribute,
            ..Default::default()
        });
    }

    /// Adds a float initializer; returns its name.
    fn weight(&mut self, dims: &[i64], values: &[f32]) -> String {
        let name = self.fresh("w");
        self.weights.push(pb::TensorProto {
            name: name.clone(),
            dims: dims.to_vec(),
            data_type: pb::tensor_proto::DataType::Float as i32,
            raw_data: values.iter().flat_map(|w| w.to_le_bytes()).collect(),
            ..Default::default()
        });
        name
    }

    /// A convolution with bias (batch norm folded in, as exported models have it): He-scaled random
    /// weights, "same" padding.
    fn conv(
        &mut self,
        rng: &mut SplitMix,
        input: &str,
        (cin, cout): (usize, usize),
        kernel: usize,
        stride: usize,
        group: usize,
    ) -> String {
        let fan_in = cin / group * kernel * kernel;
        let scale = (2.0 / fan_in as f32).sqrt();
        let w: Vec<f32> = (0..cout * fan_in).map(|_| rng.normal() * scale).collect();
        let b: Vec<f32> = (0..cout).map(|_| rng.normal() * 0.01).collect();
        let k = kernel as i64;
        let w = self.weight(&[cout as i64, (cin / group) as i64, k, k], &w);
        let b = self.weight(&[cout as i64], &b);
        let pad = (kernel / 2) as i64;
        self.node(
            "Conv",
            &[input, &w, &b],
            vec![
                ints("kernel_shape", vec![k, k]),
                ints("strides", vec![stride as i64; 2]),
                ints("pads", vec![pad; 4]),
                int("group", group as i64),
            ],
        )
    }

    fn relu6(&mut self, input: &str) -> String {
        let lo = self.weight(&[], &[0.0]);
        let hi = self.weight(&[], &[6.0]);
        self.node("Clip", &[input, &lo, &hi], vec![])
    }

    /// A model with input `image` [N, 3, side, side] and output `embedding` [N, dim].
    fn finish(self, name: &str, side: u32, dim: usize) -> Vec<u8> {
        self.finish_as(
            name,
            &[3, side as i64, side as i64],
            "embedding",
            &[dim as i64],
        )
    }

    /// A model with input `image` [N, ...input] and one output [N, ...output].
    fn finish_as(self, name: &str, input: &[i64], output: &str, output_dims: &[i64]) -> Vec<u8> {
        let graph = pb::GraphProto {
            name: name.into(),
            node: self.nodes,
            initializer: self.weights,
            input: vec![pb::ValueInfoProto {
                name: "image".into(),
                r#type: Some(batched_f32(input)),
                doc_string: String::new(),
            }],
            output: vec![pb::ValueInfoProto {
                name: output.into(),
                r#type: Some(batched_f32(output_dims)),
                doc_string: String::new(),
            }],
            ..Default::default()
        };
        pb::ModelProto {
            ir_version: 7,
            opset_import: vec![pb::OperatorSetIdProto {
                domain: String::new(),
                version: 13,
            }],
            producer_name: "deckhand-fixtures".into(),
            graph: Some(graph),
            ..Default::default()
        }
        .encode_to_vec()
    }
}

/// The sample model's projection weights, which the sample HEF shares.
pub(crate) fn projection(features: usize, dim: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix(seed);
    let scale = 1.0 / (features as f32).sqrt();
    (0..features * dim).map(|_| rng.normal() * scale).collect()
}

/// The sample embedding model: input `image` [N, 3, size, size] (float, normalised RGB), average-pooled
/// by `pool` to a small colour thumbnail, flattened, centred, and projected by a fixed random matrix to
/// `dim` outputs named `embedding`. Deterministic for a given seed.
pub fn embedding_model_onnx(size: u32, pool: u32, dim: usize, seed: u64) -> Vec<u8> {
    let side = (size / pool) as usize;
    let features = 3 * side * side;
    let mut g = Graph::new();
    let p = pool as i64;
    let pooled = g.node(
        "AveragePool",
        &["image"],
        vec![
            ints("kernel_shape", vec![p, p]),
            ints("strides", vec![p, p]),
        ],
    );
    let flat = g.node("Flatten", &[&pooled], vec![int("axis", 1)]);
    let mean = g.node(
        "ReduceMean",
        &[&flat],
        vec![ints("axes", vec![1]), int("keepdims", 1)],
    );
    let centred = g.node("Sub", &[&flat, &mean], vec![]);
    let w = g.weight(
        &[features as i64, dim as i64],
        &projection(features, dim, seed),
    );
    g.node_named("MatMul", &[&centred, &w], "embedding", vec![]);
    g.finish("deckhand-sample-embedder", size, dim)
}

/// EfficientNet-Lite0's blocks: (expansion, kernel, stride, output channels, repeats). Lite0 is B0
/// without squeeze-and-excitation, with ReLU6, and with a fixed 32-channel stem and 1280-channel head.
const LITE0_STAGES: [(usize, usize, usize, usize, usize); 7] = [
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
];

/// How many MBConv blocks [`efficientnet_lite0_onnx`] has.
pub const LITE0_BLOCKS: usize = 16;

/// An EfficientNet-Lite0-shaped embedder: input `image` [N, 3, 224, 224]; stem 3x3 stride 2 to 32
/// channels; 16 MBConv blocks (1x1 expansion, depthwise 3x3 or 5x5, ReLU6, 1x1 projection, residual
/// when the shape allows); 1x1 head to 1280 channels; global average pool; a 1280 -> `dim` projection to
/// `embedding`. Random weights (He-scaled): the shape and the arithmetic are the real network's, the
/// embeddings mean nothing. About 17 MB for `dim` 768.
pub fn efficientnet_lite0_onnx(dim: usize, seed: u64) -> Vec<u8> {
    let mut rng = SplitMix(seed);
    let mut g = Graph::new();
    let stem = g.conv(&mut rng, "image", (3, 32), 3, 2, 1);
    let mut x = g.relu6(&stem);
    let mut channels = 32;
    for (expand, kernel, stride, out, repeats) in LITE0_STAGES {
        for r in 0..repeats {
            let stride = if r == 0 { stride } else { 1 };
            let wide = channels * expand;
            let mut h = x.clone();
            if expand != 1 {
                let e = g.conv(&mut rng, &h, (channels, wide), 1, 1, 1);
                h = g.relu6(&e);
            }
            let d = g.conv(&mut rng, &h, (wide, wide), kernel, stride, wide);
            h = g.relu6(&d);
            h = g.conv(&mut rng, &h, (wide, out), 1, 1, 1);
            if stride == 1 && channels == out {
                h = g.node("Add", &[&x, &h], vec![]);
            }
            x = h;
            channels = out;
        }
    }
    let head = g.conv(&mut rng, &x, (channels, 1280), 1, 1, 1);
    let head = g.relu6(&head);
    let pooled = g.node("GlobalAveragePool", &[&head], vec![]);
    let flat = g.node("Flatten", &[&pooled], vec![int("axis", 1)]);
    let scale = 1.0 / (1280f32).sqrt();
    let w: Vec<f32> = (0..1280 * dim).map(|_| rng.normal() * scale).collect();
    let w = g.weight(&[1280, dim as i64], &w);
    g.node_named("MatMul", &[&flat, &w], "embedding", vec![]);
    g.finish("deckhand-efficientnet-lite0-shaped", 224, dim)
}

/// One anchor of a detector's output for a card at `quad` (corners in the detector's input, clockwise
/// from the card's top left) scored `score` for class 0 of `classes`: centre, width, height, scores,
/// angle, as a YOLO-OBB model writes it.
pub fn obb_anchor(quad: &[[f32; 2]; 4], score: f32, classes: usize) -> Vec<f32> {
    let d = |a: [f32; 2], b: [f32; 2]| ((b[0] - a[0]).powi(2) + (b[1] - a[1]).powi(2)).sqrt();
    let centre = [
        quad.iter().map(|p| p[0]).sum::<f32>() / 4.0,
        quad.iter().map(|p| p[1]).sum::<f32>() / 4.0,
    ];
    let angle = (quad[1][1] - quad[0][1]).atan2(quad[1][0] - quad[0][0]);
    let mut a = vec![
        centre[0],
        centre[1],
        d(quad[0], quad[1]),
        d(quad[1], quad[2]),
    ];
    a.extend((0..classes).map(|c| if c == 0 { score } else { 0.0 }));
    a.push(angle);
    a
}

/// A detector's output for `anchors` (each anchor's values), channel by channel: `[channels, anchors]`.
pub fn channel_major(anchors: &[Vec<f32>]) -> Vec<f32> {
    let channels = anchors.first().map_or(0, Vec::len);
    (0..channels)
        .flat_map(|c| {
            anchors
                .iter()
                .map(move |a| a.get(c).copied().unwrap_or(0.0))
        })
        .collect()
}

/// A detector whose output is known: input `image` [N, 3, height, width], output `output0`
/// [N, channels, anchors] equal to `anchors` (each anchor's `channels` values: centre, width, height in
/// input pixels, class scores, angle) whatever the image. It still reads its input (the output adds
/// zero times the image's mean), so a runtime plans and runs it as it would a real one.
pub fn known_output_detector_onnx(width: u32, height: u32, anchors: &[Vec<f32>]) -> Vec<u8> {
    let channels = anchors.first().map_or(0, Vec::len);
    let mut g = Graph::new();
    let mean = g.node(
        "ReduceMean",
        &["image"],
        vec![ints("axes", vec![1, 2, 3]), int("keepdims", 1)],
    );
    let mean = g.node(
        "ReduceMean",
        &[&mean],
        vec![ints("axes", vec![3]), int("keepdims", 0)],
    );
    let zero = g.weight(&[], &[0.0]);
    let nothing = g.node("Mul", &[&mean, &zero], vec![]);
    let values = channel_major(anchors);
    let known = g.weight(&[1, channels as i64, anchors.len() as i64], &values);
    g.node_named("Add", &[&known, &nothing], "output0", vec![]);
    g.finish_as(
        "deckhand-known-output-detector",
        &[3, i64::from(height), i64::from(width)],
        "output0",
        &[channels as i64, anchors.len() as i64],
    )
}

//! Generated ONNX models, written with tract's own protobuf types: the small sample embedder every test
//! uses, an EfficientNet-Lite0-shaped embedder and a YOLO11n-OBB-shaped detector for measuring the CPU
//! backend on real-sized networks, and a detector whose output is known for testing the decoding.
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

    /// Adds an int64 initializer (shapes for Reshape); returns its name.
    fn int64s(&mut self, values: &[i64]) -> String {
        let name = self.fresh("s");
        self.weights.push(pb::TensorProto {
            name: name.clone(),
            dims: vec![values.len() as i64],
            data_type: pb::tensor_proto::DataType::Int64 as i32,
            int64_data: values.to_vec(),
            ..Default::default()
        });
        name
    }

    /// x * sigmoid(x), YOLO's activation.
    fn silu(&mut self, input: &str) -> String {
        let s = self.node("Sigmoid", &[input], vec![]);
        self.node("Mul", &[input, &s], vec![])
    }

    /// A YOLO `Conv`: convolution (batch norm folded in) and SiLU.
    fn conv_silu(
        &mut self,
        rng: &mut SplitMix,
        input: &str,
        channels: (usize, usize),
        kernel: usize,
        stride: usize,
    ) -> String {
        let c = self.conv(rng, input, channels, kernel, stride, 1);
        self.silu(&c)
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
    efficientnet_lite0_onnx_at(224, dim, seed)
}

/// [`efficientnet_lite0_onnx`] taking images of `side` x `side` (the same weights; the work grows with
/// the image's area).
pub fn efficientnet_lite0_onnx_at(side: u32, dim: usize, seed: u64) -> Vec<u8> {
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
    g.finish("deckhand-efficientnet-lite0-shaped", side, dim)
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

/// YOLO11's C3k2 block as the n-scale model has it (one bottleneck): two 1x1 halves, a bottleneck of
/// two 3x3 convolutions with a residual on the second half, the three concatenated and fused by 1x1.
fn c3k2(
    g: &mut Graph,
    rng: &mut SplitMix,
    x: &str,
    (cin, cout): (usize, usize),
    hidden: usize,
) -> String {
    let a = g.conv_silu(rng, x, (cin, hidden), 1, 1);
    let b = g.conv_silu(rng, x, (cin, hidden), 1, 1);
    let m = g.conv_silu(rng, &b, (hidden, hidden), 3, 1);
    let m = g.conv_silu(rng, &m, (hidden, hidden), 3, 1);
    let m = g.node("Add", &[&b, &m], vec![]);
    let cat = g.node("Concat", &[&a, &b, &m], vec![int("axis", 1)]);
    g.conv_silu(rng, &cat, (3 * hidden, cout), 1, 1)
}

/// Nearest-neighbour upsampling by 2 (a depthwise transposed convolution of ones).
fn upsample2(g: &mut Graph, x: &str, channels: usize) -> String {
    let w = g.weight(&[channels as i64, 1, 2, 2], &vec![1.0; channels * 4]);
    g.node(
        "ConvTranspose",
        &[x, &w],
        vec![
            ints("kernel_shape", vec![2, 2]),
            ints("strides", vec![2, 2]),
            int("group", channels as i64),
        ],
    )
}

/// One scale of YOLO11's OBB head: box (16-bin distributions per side, reduced to their expectation),
/// class scores (sigmoid) and angle, as `[N, 4 + classes + 1, cells]`. The class branch's last bias is
/// -10, so the random network finds no card: the decoding costs what an empty counter's does.
fn obb_head(
    g: &mut Graph,
    rng: &mut SplitMix,
    x: &str,
    channels: usize,
    cells: usize,
    classes: usize,
) -> String {
    const BINS: usize = 16;
    let c2 = 64.max(channels / 4);
    let c3 = channels.max(classes.min(100));
    let bx = g.conv_silu(rng, x, (channels, c2), 3, 1);
    let bx = g.conv_silu(rng, &bx, (c2, c2), 3, 1);
    let bx = g.conv(rng, &bx, (c2, 4 * BINS), 1, 1, 1);
    let shape = g.int64s(&[1, 4, BINS as i64, cells as i64]);
    let bx = g.node("Reshape", &[&bx, &shape], vec![]);
    let bx = g.node("Softmax", &[&bx], vec![int("axis", 2)]);
    let bins: Vec<f32> = (0..BINS).map(|i| i as f32 * BINS as f32).collect();
    let bins = g.weight(&[1, 1, BINS as i64, 1], &bins);
    let bx = g.node("Mul", &[&bx, &bins], vec![]);
    let bx = g.node(
        "ReduceMean",
        &[&bx],
        vec![ints("axes", vec![2]), int("keepdims", 0)],
    );
    let cl = g.conv(rng, x, (channels, channels), 3, 1, channels);
    let cl = g.silu(&cl);
    let cl = g.conv_silu(rng, &cl, (channels, c3), 1, 1);
    let cl = g.conv(rng, &cl, (c3, c3), 3, 1, c3);
    let cl = g.silu(&cl);
    let cl = g.conv_silu(rng, &cl, (c3, c3), 1, 1);
    let w: Vec<f32> = (0..classes * c3).map(|_| rng.normal() * 0.01).collect();
    let w = g.weight(&[classes as i64, c3 as i64, 1, 1], &w);
    let b = g.weight(&[classes as i64], &vec![-10.0; classes]);
    let cl = g.node(
        "Conv",
        &[&cl, &w, &b],
        vec![ints("kernel_shape", vec![1, 1])],
    );
    let shape = g.int64s(&[1, classes as i64, cells as i64]);
    let cl = g.node("Reshape", &[&cl, &shape], vec![]);
    let cl = g.node("Sigmoid", &[&cl], vec![]);
    let c4 = (channels / 4).max(1);
    let an = g.conv_silu(rng, x, (channels, c4), 3, 1);
    let an = g.conv_silu(rng, &an, (c4, c4), 3, 1);
    let an = g.conv(rng, &an, (c4, 1), 1, 1, 1);
    let shape = g.int64s(&[1, 1, cells as i64]);
    let an = g.node("Reshape", &[&an, &shape], vec![]);
    let an = g.node("Sigmoid", &[&an], vec![]);
    g.node("Concat", &[&bx, &cl, &an], vec![int("axis", 1)])
}

/// The settings a one-class [`yolo11n_obb_shaped_onnx`] at 640 is published with.
pub fn yolo_settings() -> deckhand_protocol::manifest::DetectorSettings {
    deckhand_protocol::manifest::DetectorSettings {
        input_width: 640,
        input_height: 640,
        classes: 1,
        card_class: 0,
        min_score: 0.5,
        iou: 0.45,
    }
}

/// A YOLO11n-OBB-shaped detector: input `image` [N, 3, side, side] (`side` a multiple of 32), output
/// `output0` [N, 4 + classes + 1, anchors] over the three scales (8400 anchors at 640), as the
/// agent's detector decodes it. The n-scale backbone (stride-2 3x3 convolutions, C3k2 blocks, SPPF),
/// the feature pyramid (upsampling, concatenation, C3k2) and the OBB head, with SiLU throughout; the
/// attention block (C2PSA) is stood in for by its 1x1 convolutions. Random weights: the arithmetic
/// and memory traffic are those of the n-scale widths, the boxes mean nothing.
pub fn yolo11n_obb_shaped_onnx(side: u32, classes: usize, seed: u64) -> Vec<u8> {
    let mut rng = SplitMix(seed);
    let mut g = Graph::new();
    let r = &mut rng;
    let x = g.conv_silu(r, "image", (3, 16), 3, 2);
    let x = g.conv_silu(r, &x, (16, 32), 3, 2);
    let x = c3k2(&mut g, r, &x, (32, 64), 8);
    let x = g.conv_silu(r, &x, (64, 64), 3, 2);
    let p3 = c3k2(&mut g, r, &x, (64, 128), 16);
    let x = g.conv_silu(r, &p3, (128, 128), 3, 2);
    let p4 = c3k2(&mut g, r, &x, (128, 128), 64);
    let x = g.conv_silu(r, &p4, (128, 256), 3, 2);
    let x = c3k2(&mut g, r, &x, (256, 256), 128);
    // SPPF: three 5x5 max pools in a row, concatenated.
    let s = g.conv_silu(r, &x, (256, 128), 1, 1);
    let pool = |g: &mut Graph, v: &str| {
        g.node(
            "MaxPool",
            &[v],
            vec![
                ints("kernel_shape", vec![5, 5]),
                ints("strides", vec![1, 1]),
                ints("pads", vec![2; 4]),
            ],
        )
    };
    let m1 = pool(&mut g, &s);
    let m2 = pool(&mut g, &m1);
    let m3 = pool(&mut g, &m2);
    let cat = g.node("Concat", &[&s, &m1, &m2, &m3], vec![int("axis", 1)]);
    let x = g.conv_silu(r, &cat, (512, 256), 1, 1);
    // C2PSA's convolutions.
    let a = g.conv_silu(r, &x, (256, 256), 1, 1);
    let a = g.conv(r, &a, (256, 256), 3, 1, 256);
    let p5 = g.conv_silu(r, &a, (256, 256), 1, 1);
    // The pyramid, top down and bottom up.
    let up = upsample2(&mut g, &p5, 256);
    let cat = g.node("Concat", &[&up, &p4], vec![int("axis", 1)]);
    let h4 = c3k2(&mut g, r, &cat, (384, 128), 32);
    let up = upsample2(&mut g, &h4, 128);
    let cat = g.node("Concat", &[&up, &p3], vec![int("axis", 1)]);
    let o3 = c3k2(&mut g, r, &cat, (256, 64), 16);
    let d = g.conv_silu(r, &o3, (64, 64), 3, 2);
    let cat = g.node("Concat", &[&d, &h4], vec![int("axis", 1)]);
    let o4 = c3k2(&mut g, r, &cat, (192, 128), 32);
    let d = g.conv_silu(r, &o4, (128, 128), 3, 2);
    let cat = g.node("Concat", &[&d, &p5], vec![int("axis", 1)]);
    let o5 = c3k2(&mut g, r, &cat, (384, 256), 64);
    let side = side as usize;
    let heads: Vec<String> = [(o3, 64, 8), (o4, 128, 16), (o5, 256, 32)]
        .into_iter()
        .map(|(o, c, stride)| obb_head(&mut g, r, &o, c, (side / stride).pow(2), classes))
        .collect();
    let anchors: usize = [8, 16, 32].iter().map(|s| (side / s).pow(2)).sum();
    g.node_named(
        "Concat",
        &[&heads[0], &heads[1], &heads[2]],
        "output0",
        vec![int("axis", 2)],
    );
    g.finish_as(
        "deckhand-yolo11n-obb-shaped",
        &[3, side as i64, side as i64],
        "output0",
        &[(4 + classes + 1) as i64, anchors as i64],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bench's detector loads and plans in the agent's CPU detector, answers the shape the agent
    /// decodes (4 + 1 class + 1 values for 8400 anchors at 640), and finds nothing on a bare counter.
    #[test]
    fn the_yolo_shaped_detector_runs_in_the_agents_detector_and_finds_no_card() {
        use deckhand_agent::camera::detector::CpuDetector;
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("detector.onnx");
        std::fs::write(&model, yolo11n_obb_shaped_onnx(640, 1, 3)).unwrap();
        let mut detector = CpuDetector::load(&model, &yolo_settings()).unwrap();
        use tract_onnx::prelude::*;
        let plan = tract_onnx::onnx()
            .model_for_path(&model)
            .unwrap()
            .with_input_fact(0, f32::fact([1, 3, 640, 640]).into())
            .unwrap()
            .into_optimized()
            .unwrap()
            .into_runnable()
            .unwrap();
        let image = Tensor::from_shape(&[1, 3, 640, 640], &vec![0.5f32; 3 * 640 * 640]).unwrap();
        let out = plan.run(tvec!(image.into())).unwrap();
        assert_eq!(out[0].shape(), [1, 6, 8400]);
        let values = out[0].clone().into_tensor();
        let values = values.to_plain_array_view::<f32>().unwrap();
        assert!(values.iter().all(|v| v.is_finite()));
        let frame = image::RgbImage::from_pixel(1280, 960, image::Rgb([90, 110, 80]));
        assert!(detector.detect(&frame).unwrap().is_empty());
    }

    /// XNNPACK (Debian's libxnnpack0, which the README's test command installs) embeds the
    /// EfficientNet-Lite0-shaped model as tract does: every value within 1e-4 of the embedding's
    /// scale, on one thread, on two (planned on first use) and on two prepared ahead.
    #[test]
    fn the_lite0_shaped_model_embeds_the_same_on_xnnpack_and_on_tract() {
        use deckhand_agent::recognizer::Embedder as _;
        use deckhand_agent::recognizer::cpu::{Cores, CpuEmbedder, EngineChoice};
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("lite0.onnx");
        std::fs::write(&model, efficientnet_lite0_onnx(96, 5)).unwrap();
        let settings = crate::shop::fixtures::reference_settings(96);
        let mut xnn = CpuEmbedder::load_with(&model, &settings, EngineChoice::Fastest).unwrap();
        assert_eq!(xnn.engine(), "xnnpack", "is libxnnpack0 installed?");
        let mut tract = CpuEmbedder::load_with(&model, &settings, EngineChoice::Tract).unwrap();
        assert_eq!(tract.engine(), "tract");
        let mut rng = SplitMix(11);
        let image: Vec<f32> = (0..2 * 3 * 224 * 224).map(|_| rng.normal()).collect();
        let want = tract.embed(&image, 2).unwrap();
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.0);
        let (first, second) = want.split_at(96);
        assert!(
            first
                .iter()
                .zip(second)
                .any(|(a, b)| (a - b).abs() > 1e-2 * scale)
        );
        let (two, _) = Cores::new(2);
        let check = |xnn: &mut CpuEmbedder, cores: &Cores, what: &str| {
            let got = cores.run(|| xnn.embed(&image, 2)).unwrap();
            assert_eq!(got.len(), want.len());
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                worst <= 1e-4 * scale,
                "{what}: off by {worst} at scale {scale}"
            );
        };
        check(&mut xnn, &Cores::one(), "one thread");
        check(&mut xnn, &two, "two threads");
        check(&mut xnn, &Cores::one(), "one thread again");
        xnn.prepare(2).unwrap();
        check(&mut xnn, &two, "two threads prepared");
    }

    /// What XNNPACK is given: the lite0-shaped model with every ReLU6 fused into the node before it
    /// and its depthwise convolutions as such; models with other operators are refused with the
    /// operator named (they run on tract).
    #[test]
    fn xnnpack_translates_the_lite0_shaped_model_and_names_what_it_cannot() {
        use deckhand_agent::recognizer::xnnpack::graph::{Node, Unsupported, translate};
        use prost::Message as _;
        let proto = |bytes: Vec<u8>| tract_onnx::pb::ModelProto::decode(bytes.as_slice()).unwrap();
        let g = translate(&proto(efficientnet_lite0_onnx(64, 5)), [1, 3, 224, 224]).unwrap();
        let count = |f: fn(&Node) -> bool| g.nodes.iter().filter(|n| f(n)).count();
        assert_eq!(count(|n| matches!(n, Node::Depthwise { .. })), LITE0_BLOCKS);
        assert_eq!(count(|n| matches!(n, Node::Clamp { .. })), 0);
        assert_eq!(
            count(|n| matches!(
                n,
                Node::Convolution {
                    clamp: (0.0, 6.0),
                    ..
                }
            ) || matches!(
                n,
                Node::Depthwise {
                    clamp: (0.0, 6.0),
                    ..
                }
            )),
            // the stem, the head, every expansion and every depthwise convolution
            2 + LITE0_BLOCKS - 1 + LITE0_BLOCKS
        );
        assert_eq!(count(|n| matches!(n, Node::FullyConnected { .. })), 1);
        assert_eq!(g.output_len, 64);
        assert!(g.input_nchw);
        let refused = |bytes: Vec<u8>, shape| translate(&proto(bytes), shape).unwrap_err();
        assert_eq!(
            refused(yolo11n_obb_shaped_onnx(320, 1, 3), [1, 3, 320, 320]),
            Unsupported("operator Sigmoid".into())
        );
        assert_eq!(
            refused(embedding_model_onnx(224, 8, 64, 1), [1, 3, 224, 224]),
            Unsupported("operator AveragePool".into())
        );
    }
}

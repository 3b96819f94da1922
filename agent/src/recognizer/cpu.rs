//! The CPU backend: the release's ONNX model run by XNNPACK where it has a translation of the model
//! and Debian's libxnnpack0 is installed ([`super::xnnpack`]), else by tract.
//!
//! On tract, one plan is optimised at load for one image (a concrete batch of 1), and a batch runs
//! image by image: nothing is padded, and the weights are held once. A symbolic batch dimension looked
//! attractive (one plan for every batch size) but costs tract most of its convolution optimisations:
//! on the generated EfficientNet-Lite0-shaped model an image took 117 ms with it and 28 ms without
//! (`deckhand bench recognizer`; batching gained nothing on either model). It runs on the inference
//! thread, which may lend one image's convolutions and matrix products to a small pool of threads
//! ([`Cores`]).

use super::{BackendError, Embedder};
use deckhand_protocol::manifest::{ChannelLayout, RecognizerSettings};
use std::path::Path;
use tract_onnx::prelude::*;

/// The cores one image runs on. Set once per thread with [`Cores::run`]: the inference thread runs with
/// the agent's `cpu_threads`; every other thread that runs a model (shadow evaluation at nice 19, a
/// camera's detector on its `deckhand-cam-*` analysis thread) keeps tract's default, its own thread
/// alone.
#[derive(Clone, Debug)]
pub struct Cores(tract_linalg::multithread::Executor);

impl Cores {
    /// `threads` cores for one image: 0 for every core this process may use, 1 for the calling thread
    /// alone. The pool is built here; if the system will not give it threads the calling thread
    /// works alone, and the error says why.
    pub fn new(threads: usize) -> (Self, Option<std::io::Error>) {
        let threads = match threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        if threads <= 1 {
            return (Self::one(), None);
        }
        match rayon::ThreadPoolBuilder::new()
            .thread_name(|n| format!("deckhand-cpu-{n}"))
            .num_threads(threads)
            .build()
        {
            Ok(pool) => (
                Self(tract_linalg::multithread::Executor::MultiThread(
                    std::sync::Arc::new(pool),
                )),
                None,
            ),
            Err(e) => (Self::one(), Some(std::io::Error::other(e))),
        }
    }

    /// The calling thread alone.
    pub fn one() -> Self {
        Self(tract_linalg::multithread::Executor::SingleThread)
    }

    /// How many threads one image runs on.
    pub fn threads(&self) -> usize {
        match &self.0 {
            tract_linalg::multithread::Executor::MultiThread(pool) => pool.current_num_threads(),
            _ => 1,
        }
    }

    /// How many cores one image gets on the calling thread (set by [`Cores::run`]; 1 elsewhere).
    pub fn current_threads() -> usize {
        match tract_linalg::multithread::current_tract_executor() {
            tract_linalg::multithread::Executor::MultiThread(pool) => pool.current_num_threads(),
            _ => 1,
        }
    }

    /// Runs `f` on this thread, with the models it runs spreading over these cores.
    pub fn run<R>(&self, f: impl FnOnce() -> R) -> R {
        tract_linalg::multithread::multithread_tract_scope(self.0.clone(), f)
    }
}

/// Whether tract has a vectorised kernel for depthwise convolutions on this machine (where it has none,
/// they run a scalar loop). `deckhand bench recognizer` prints it beside where the embed's time goes.
pub fn vectorised_depthwise() -> bool {
    tract_linalg::routines::depthwise_w_f32().is_some()
}

/// A model optimised and planned for one image.
pub type Plan = std::sync::Arc<TypedRunnableModel>;

pub struct CpuEmbedder {
    engine: Engine,
    /// The input shape of one image, batch dimension (1) first.
    shape: [usize; 4],
    input_len: usize,
    dim: usize,
}

/// What runs a CPU embedder's model.
enum Engine {
    Xnnpack(Box<super::xnnpack::XnnpackModel>),
    Tract(Plan),
}

/// Which engine a CPU embedder may use: XNNPACK when it is installed and has a translation of the
/// model, else tract ([`EngineChoice::Fastest`]); or tract alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineChoice {
    Fastest,
    Tract,
}

/// The shape of one image as the release's model takes it (its channel layout).
pub fn image_shape(s: &RecognizerSettings) -> [usize; 4] {
    let (h, w) = (s.input_height as usize, s.input_width as usize);
    match s.layout {
        ChannelLayout::Nchw => [1, 3, h, w],
        ChannelLayout::Nhwc => [1, h, w, 3],
    }
}

/// The release's ONNX model at `path`, optimised by tract for one image of the release's input size.
pub fn plan(path: &Path, s: &RecognizerSettings) -> Result<Plan, BackendError> {
    Ok(plan_model(path, "onnx", &image_shape(s), DepthwiseLayout::Chosen)?.0)
}

/// Where a model's depthwise convolutions run: as the ONNX file lays them out, or channel-last where
/// that is faster ([`choose_depthwise_layout`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DepthwiseLayout {
    Chosen,
    AsExported,
}

/// An ONNX model at `path` (`what` names it in errors), optimised and planned by tract for one input of
/// `shape`, with the number of depthwise convolutions moved channel-last.
pub fn plan_model(
    path: &Path,
    what: &str,
    shape: &[usize],
    layout: DepthwiseLayout,
) -> Result<(Plan, usize), BackendError> {
    let fail = |step: &str, e: TractError| {
        BackendError::Load(format!("{what} {}: {step}: {e}", path.display()))
    };
    let mut model = tract_onnx::onnx()
        .model_for_path(path)
        .map_err(|e| fail("does not load", e))?
        .with_input_fact(0, f32::fact(shape).into())
        .map_err(|e| fail("input does not accept the release's input size", e))?
        .into_typed()
        .map_err(|e| fail("cannot be typed", e))?;
    let moved = match layout {
        DepthwiseLayout::Chosen => choose_depthwise_layout(&mut model)
            .map_err(|e| fail("cannot lay out its depthwise convolutions", e))?,
        DepthwiseLayout::AsExported => 0,
    };
    let plan = model
        .into_optimized()
        .map_err(|e| fail("cannot be optimised", e))?
        .into_runnable()
        .map_err(|e| fail("cannot be planned", e))?;
    Ok((plan, moved))
}

/// Moves a depthwise convolution channel-last (each output point a run of channels, contiguous for
/// the vector units: tract's NEON kernel on aarch64, a loop the compiler vectorises elsewhere) where
/// the row-wise kernel it has as exported cannot fill vectors: a strided one (the row-wise kernel
/// vectorises stride 1; on aarch64 strides 2 and 3 only up to four taps, so a 3x3 or 5x5 kernel runs
/// scalar) and one whose output rows are shorter than 8. On this project's x86_64 machine that made
/// the strided ones 3x faster and the 7x7 ones 2x; the others ran faster as exported (`deckhand bench
/// recognizer` prints the embed both ways). tract's own pass moves them only when the whole graph
/// can follow, which an exported model's first convolution stops, and only where it has a
/// channel-inner kernel. Each moved convolution is wrapped in two axis moves, which tract folds into
/// the pointwise convolutions around it. Returns how many moved.
pub fn choose_depthwise_layout(model: &mut TypedModel) -> TractResult<usize> {
    use tract_onnx::tract_core::ops::change_axes::AxisOp;
    use tract_onnx::tract_core::ops::cnn::{Conv, PoolSpec};
    use tract_onnx::tract_core::ops::nn::DataFormat;
    /// Output rows shorter than this run channel-last.
    const NARROW: usize = 8;
    let mut chosen = Vec::new();
    for node in &model.nodes {
        let Some(op) = node.op_as::<Conv>() else {
            continue;
        };
        let depthwise = op.q_params.is_none()
            && node.inputs.len() == 3
            && op.group > 1
            && op.group == op.input_channels()
            && op.group == op.output_channels()
            && matches!(op.pool_spec.data_format, DataFormat::NCHW | DataFormat::CHW);
        let Some(out) = node
            .outputs
            .first()
            .and_then(|o| o.fact.shape.as_concrete())
        else {
            continue;
        };
        if !depthwise
            || model
                .outlet_fact(node.inputs[0])?
                .shape
                .as_concrete()
                .is_none()
        {
            continue;
        }
        let out = op.pool_spec.data_format.shape(out.to_vec())?;
        let strided = op.pool_spec.strides().iter().any(|s| *s > 1);
        let narrow = out.hw_dims().last().is_some_and(|w| *w < NARROW);
        if strided || narrow {
            chosen.push(node.id);
        }
    }
    for &id in &chosen {
        let node = &model.nodes[id];
        let Some(op) = node.op_as::<Conv>() else {
            continue;
        };
        let name = node.name.clone();
        let fact = model.outlet_fact(node.inputs[0])?;
        let rank = fact.rank();
        let c_axis = op.pool_spec.data_format.shape(&fact.shape)?.c_axis();
        let data_format = match op.pool_spec.data_format {
            DataFormat::NCHW => DataFormat::NHWC,
            _ => DataFormat::HWC,
        };
        let conv = Conv {
            pool_spec: PoolSpec {
                data_format,
                ..op.pool_spec.clone()
            },
            ..op.clone()
        };
        let mut patch = TypedModelPatch::default();
        let inputs = patch.taps(model, &node.inputs)?;
        let mut wires = patch.wire_node(
            format!("{name}.channel_last"),
            AxisOp::Move(c_axis, rank - 1),
            &[inputs[0]],
        )?;
        wires.extend_from_slice(&inputs[1..]);
        let y = conv.wire_as_depth_wise(&mut patch, &name, &wires)?;
        let back = patch.wire_node(
            format!("{name}.channel_first"),
            AxisOp::Move(rank - 1, c_axis),
            &[y],
        )?;
        patch.shunt_outside(model, id.into(), back[0])?;
        patch.apply(model)?;
    }
    Ok(chosen.len())
}

impl CpuEmbedder {
    /// The release's ONNX model at `path`, on XNNPACK where it can run it, else on tract.
    pub fn load(path: &Path, s: &RecognizerSettings) -> Result<Self, BackendError> {
        Self::load_with(path, s, EngineChoice::Fastest)
    }

    /// The model at `path` on the engine `choice` allows. XNNPACK's runtime is planned for the cores
    /// of the calling thread ([`Cores::current_threads`]); [`Embedder::prepare`] re-plans it for
    /// another thread count (the inference thread's) before a swap goes live.
    pub fn load_with(
        path: &Path,
        s: &RecognizerSettings,
        choice: EngineChoice,
    ) -> Result<Self, BackendError> {
        let input_len = 3 * s.input_width as usize * s.input_height as usize;
        let shape = image_shape(s);
        let engine = match choice {
            EngineChoice::Fastest => {
                match super::xnnpack::XnnpackModel::load(path, shape, Cores::current_threads()) {
                    Ok(model) => Engine::Xnnpack(Box::new(model)),
                    Err(e) => {
                        tracing::info!(model = %path.display(), reason = %e, "the cpu backend runs this model on tract");
                        Engine::Tract(plan(path, s)?)
                    }
                }
            }
            EngineChoice::Tract => Engine::Tract(plan(path, s)?),
        };
        let mut me = Self {
            engine,
            shape,
            input_len,
            dim: 0,
        };
        // One run tells the real output size, whatever the ONNX file declares.
        let probe = me.run(&vec![0.0; input_len])?;
        me.dim = probe.len();
        Ok(me)
    }

    /// The engine running the model: "xnnpack" or "tract".
    pub fn engine(&self) -> &'static str {
        match self.engine {
            Engine::Xnnpack(_) => "xnnpack",
            Engine::Tract(_) => "tract",
        }
    }

    /// Runs one image.
    fn run(&mut self, input: &[f32]) -> Result<Vec<f32>, BackendError> {
        let out = match &mut self.engine {
            Engine::Tract(plan) => run_plan(plan, &self.shape, input)?.0,
            Engine::Xnnpack(model) => model
                .run(input, Cores::current_threads())
                .map_err(|e| BackendError::Run(e.to_string()))?
                .to_vec(),
        };
        if out.is_empty() {
            return Err(BackendError::Run(
                "the model produced an empty output".into(),
            ));
        }
        Ok(out)
    }
}

/// Runs a plan on one input of `shape`: its first output's values and shape.
pub fn run_plan(
    plan: &Plan,
    shape: &[usize],
    input: &[f32],
) -> Result<(Vec<f32>, Vec<usize>), BackendError> {
    let tensor = Tensor::from_shape(shape, input).map_err(|e| BackendError::Run(e.to_string()))?;
    let out = plan
        .run(tvec!(tensor.into()))
        .map_err(|e| BackendError::Run(e.to_string()))?;
    let first = out
        .first()
        .ok_or_else(|| BackendError::Run("the model produced no output".into()))?;
    let values = first
        .to_plain_array_view::<f32>()
        .map_err(|e| BackendError::Run(format!("output is not float32: {e}")))?
        .iter()
        .copied()
        .collect();
    Ok((values, first.shape().to_vec()))
}

impl Embedder for CpuEmbedder {
    fn embed(&mut self, input: &[f32], batch: usize) -> Result<Vec<f32>, BackendError> {
        if input.len() != batch * self.input_len {
            return Err(BackendError::Run(format!(
                "expected {} input values for {batch} images, got {}",
                batch * self.input_len,
                input.len()
            )));
        }
        let mut out = Vec::with_capacity(batch * self.dim);
        for image in input.chunks(self.input_len) {
            let embedding = self.run(image)?;
            if embedding.len() != self.dim {
                return Err(BackendError::Run(format!(
                    "the model gave {} values for an image, {} before",
                    embedding.len(),
                    self.dim
                )));
            }
            out.extend(embedding);
        }
        Ok(out)
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn engine(&self) -> &'static str {
        CpuEmbedder::engine(self)
    }

    fn prepare(&mut self, threads: usize) -> Result<(), BackendError> {
        match &mut self.engine {
            Engine::Xnnpack(model) => model
                .prepare(threads)
                .map_err(|e| BackendError::Run(e.to_string())),
            Engine::Tract(_) => Ok(()),
        }
    }
}

//! The CPU backend: the release's ONNX model run by tract.
//!
//! Two plans are optimised at load, one for a single image and one for a full batch; a partial batch is
//! padded to the full one. Both run on the inference thread.

use super::{BackendError, Embedder, MAX_BATCH};
use deckhand_protocol::manifest::{ChannelLayout, RecognizerSettings};
use std::path::Path;
use tract_onnx::prelude::*;

type Plan = std::sync::Arc<TypedRunnableModel>;

pub struct CpuEmbedder {
    single: Plan,
    batched: Plan,
    input_len: usize,
    dim: usize,
}

fn plan(path: &Path, s: &RecognizerSettings, batch: usize) -> Result<Plan, BackendError> {
    let (h, w) = (s.input_height as usize, s.input_width as usize);
    let shape: [usize; 4] = match s.layout {
        ChannelLayout::Nchw => [batch, 3, h, w],
        ChannelLayout::Nhwc => [batch, h, w, 3],
    };
    let fail = |what: &str, e: TractError| {
        BackendError::Load(format!("onnx {}: {what}: {e}", path.display()))
    };
    tract_onnx::onnx()
        .model_for_path(path)
        .map_err(|e| fail("does not load", e))?
        .with_input_fact(0, f32::fact(shape).into())
        .map_err(|e| fail("input does not accept the release's input size", e))?
        .into_optimized()
        .map_err(|e| fail("cannot be optimised", e))?
        .into_runnable()
        .map_err(|e| fail("cannot be planned", e))
}

impl CpuEmbedder {
    pub fn load(path: &Path, s: &RecognizerSettings) -> Result<Self, BackendError> {
        let single = plan(path, s, 1)?;
        let batched = plan(path, s, MAX_BATCH)?;
        let input_len = 3 * s.input_width as usize * s.input_height as usize;
        let mut me = Self {
            single,
            batched,
            input_len,
            dim: 0,
        };
        // One run tells the real output size, whatever the ONNX file declares.
        let probe = me.run(&vec![0.0; input_len], 1)?;
        me.dim = probe.len();
        Ok(me)
    }

    fn run(&self, input: &[f32], batch: usize) -> Result<Vec<f32>, BackendError> {
        let (plan, rows) = if batch == 1 {
            (&self.single, 1)
        } else {
            (&self.batched, MAX_BATCH)
        };
        let mut data = input.to_vec();
        data.resize(rows * self.input_len, 0.0);
        let shape: Vec<usize> = plan
            .model()
            .input_fact(0)
            .map_err(|e| BackendError::Run(e.to_string()))?
            .shape
            .as_concrete()
            .map(<[usize]>::to_vec)
            .ok_or_else(|| BackendError::Run("input shape is not concrete".into()))?;
        let tensor =
            Tensor::from_shape(&shape, &data).map_err(|e| BackendError::Run(e.to_string()))?;
        let out = plan
            .run(tvec!(tensor.into()))
            .map_err(|e| BackendError::Run(e.to_string()))?;
        let first = out
            .first()
            .ok_or_else(|| BackendError::Run("the model produced no output".into()))?;
        let out = first
            .to_plain_array_view::<f32>()
            .map_err(|e| BackendError::Run(format!("output is not float32: {e}")))?
            .iter()
            .copied()
            .collect::<Vec<f32>>();
        if out.len() % rows != 0 {
            return Err(BackendError::Run(format!(
                "output of {} values does not split into {rows} rows",
                out.len()
            )));
        }
        let per = out.len() / rows;
        Ok(out[..batch * per].to_vec())
    }
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
        for (chunk, n) in input
            .chunks(MAX_BATCH * self.input_len)
            .map(|c| (c, c.len() / self.input_len))
        {
            out.extend(self.run(chunk, n)?);
        }
        Ok(out)
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn name(&self) -> &'static str {
        "cpu"
    }
}

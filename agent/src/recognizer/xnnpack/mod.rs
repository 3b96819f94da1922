//! The CPU backend's fast path: XNNPACK, the kernels onnxruntime and TensorFlow Lite run MobileNet-
//! and EfficientNet-shaped models with on ARM, from Debian's `libxnnpack0` (bookworm and Raspberry Pi
//! OS have it). The library is opened at run time, for the first model [`graph::translate`] has a
//! translation for: an agent on a machine without it, or with a model it cannot translate, runs on
//! tract as before. The package recommends `libxnnpack0`, it does not depend on it.
//!
//! A model is translated once into a [`graph::Graph`] (weights rearranged into XNNPACK's layouts),
//! then planned into a runtime for a number of threads: the calling thread alone, or a pthreadpool of
//! that many (the cores [`super::cpu::Cores`] gives the inference thread). A model holds one runtime:
//! run from a thread with another number of cores it is planned again for them
//! ([`XnnpackModel::prepare`] does that ahead, and the service does it before a release goes live).

pub mod graph;

use graph::{Graph, Node};
use std::ffi::c_void;
use std::sync::OnceLock;

/// The library's file, as Debian's `libxnnpack0` installs it.
pub const LIBRARY: &str = "libXNNPACK.so.0";

/// Why XNNPACK cannot run a model here.
#[derive(Debug, Clone, thiserror::Error)]
pub enum XnnpackError {
    #[error("xnnpack is not available: {0}")]
    Unavailable(String),
    #[error("the model has no xnnpack translation: {0}")]
    Unsupported(#[from] graph::Unsupported),
    #[error("xnnpack refused the model: {0}")]
    Refused(String),
    #[error("xnnpack failed to run the model: {0}")]
    Run(String),
}

type Sub = *mut c_void;

#[repr(C)]
struct ExternalValue {
    id: u32,
    data: *mut c_void,
}

const XNN_SUCCESS: i32 = 0;
const XNN_DATATYPE_FP32: u32 = 1;
const XNN_VALUE_FLAG_EXTERNAL_INPUT: u32 = 1;
const XNN_VALUE_FLAG_EXTERNAL_OUTPUT: u32 = 2;
const XNN_INVALID_VALUE_ID: u32 = u32::MAX;
const XNN_FLAG_TRANSPOSE_WEIGHTS: u32 = 1;
/// Bytes XNNPACK may read past the end of an input.
const XNN_EXTRA_BYTES: usize = 16;
/// The external ids of the image and the embedding.
const INPUT_ID: u32 = 0;
const OUTPUT_ID: u32 = 1;

/// The library's entry points this backend calls (xnnpack.h and pthreadpool.h of the 2022-02 snapshot
/// Debian ships).
struct Api {
    create_subgraph: unsafe extern "C" fn(u32, u32, *mut Sub) -> i32,
    delete_subgraph: unsafe extern "C" fn(Sub) -> i32,
    #[allow(clippy::type_complexity)]
    define_tensor_value: unsafe extern "C" fn(
        Sub,
        u32,
        usize,
        *const usize,
        *const c_void,
        u32,
        u32,
        *mut u32,
    ) -> i32,
    #[allow(clippy::type_complexity)]
    define_convolution_2d: unsafe extern "C" fn(
        Sub,
        u32,
        u32,
        u32,
        u32,
        u32,
        u32,
        u32,
        u32,
        u32,
        u32,
        u32,
        usize,
        usize,
        f32,
        f32,
        u32,
        u32,
        u32,
        u32,
        u32,
    ) -> i32,
    #[allow(clippy::type_complexity)]
    define_depthwise_convolution_2d: unsafe extern "C" fn(
        Sub,
        u32,
        u32,
        u32,
        u32,
        u32,
        u32,
        u32,
        u32,
        u32,
        u32,
        u32,
        usize,
        f32,
        f32,
        u32,
        u32,
        u32,
        u32,
        u32,
    ) -> i32,
    define_add2: unsafe extern "C" fn(Sub, f32, f32, u32, u32, u32, u32) -> i32,
    define_clamp: unsafe extern "C" fn(Sub, f32, f32, u32, u32, u32) -> i32,
    define_global_average_pooling_2d: unsafe extern "C" fn(Sub, f32, f32, u32, u32, u32) -> i32,
    define_fully_connected: unsafe extern "C" fn(Sub, f32, f32, u32, u32, u32, u32, u32) -> i32,
    create_runtime_v2: unsafe extern "C" fn(Sub, *mut c_void, u32, *mut *mut c_void) -> i32,
    setup_runtime: unsafe extern "C" fn(*mut c_void, usize, *const ExternalValue) -> i32,
    invoke_runtime: unsafe extern "C" fn(*mut c_void) -> i32,
    delete_runtime: unsafe extern "C" fn(*mut c_void) -> i32,
    pthreadpool_create: unsafe extern "C" fn(usize) -> *mut c_void,
    pthreadpool_destroy: unsafe extern "C" fn(*mut c_void),
    /// Kept open for the process's life: the entry points above point into it.
    _library: libloading::Library,
}

fn open() -> Result<Api, String> {
    // SAFETY: opening Debian's libXNNPACK runs its (and cpuinfo's, pthreadpool's) initialisers, which
    // only set up their own state.
    let library = unsafe { libloading::Library::new(LIBRARY) }
        .map_err(|e| format!("{LIBRARY} does not load ({e}); install libxnnpack0"))?;
    macro_rules! sym {
        ($name:literal) => {
            // SAFETY: the symbol is declared with xnnpack.h's (or pthreadpool.h's) signature, and the
            // library stays open in `Api`.
            *unsafe { library.get($name) }.map_err(|e| format!("{LIBRARY}: {e}"))?
        };
    }
    let initialize: unsafe extern "C" fn(*const c_void) -> i32 = sym!(b"xnn_initialize\0");
    // SAFETY: a null allocator selects XNNPACK's own; initialising twice is allowed.
    let status = unsafe { initialize(std::ptr::null()) };
    if status != XNN_SUCCESS {
        return Err(format!(
            "xnn_initialize answered {status} (5: this CPU is not supported)"
        ));
    }
    Ok(Api {
        create_subgraph: sym!(b"xnn_create_subgraph\0"),
        delete_subgraph: sym!(b"xnn_delete_subgraph\0"),
        define_tensor_value: sym!(b"xnn_define_tensor_value\0"),
        define_convolution_2d: sym!(b"xnn_define_convolution_2d\0"),
        define_depthwise_convolution_2d: sym!(b"xnn_define_depthwise_convolution_2d\0"),
        define_add2: sym!(b"xnn_define_add2\0"),
        define_clamp: sym!(b"xnn_define_clamp\0"),
        define_global_average_pooling_2d: sym!(b"xnn_define_global_average_pooling_2d\0"),
        define_fully_connected: sym!(b"xnn_define_fully_connected\0"),
        create_runtime_v2: sym!(b"xnn_create_runtime_v2\0"),
        setup_runtime: sym!(b"xnn_setup_runtime\0"),
        invoke_runtime: sym!(b"xnn_invoke_runtime\0"),
        delete_runtime: sym!(b"xnn_delete_runtime\0"),
        pthreadpool_create: sym!(b"pthreadpool_create\0"),
        pthreadpool_destroy: sym!(b"pthreadpool_destroy\0"),
        _library: library,
    })
}

/// The library, opened and initialised once per process.
fn api() -> Result<&'static Api, XnnpackError> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(open)
        .as_ref()
        .map_err(|e| XnnpackError::Unavailable(e.clone()))
}

/// Whether XNNPACK can be used here, or why not.
pub fn available() -> Result<(), XnnpackError> {
    api().map(|_| ())
}

fn check(what: &str, status: i32) -> Result<(), XnnpackError> {
    if status == XNN_SUCCESS {
        Ok(())
    } else {
        Err(XnnpackError::Refused(format!(
            "{what} answered status {status}"
        )))
    }
}

/// A planned runtime and the threads it runs on.
struct Runtime {
    api: &'static Api,
    runtime: *mut c_void,
    pool: *mut c_void,
    threads: usize,
}

// SAFETY: a runtime and its pool belong to whoever holds this value, which uses them from one thread
// at a time (`&mut self`); XNNPACK keeps no thread affinity.
unsafe impl Send for Runtime {}

impl Drop for Runtime {
    fn drop(&mut self) {
        // SAFETY: both were created by this value and are deleted once, the runtime before its pool.
        unsafe {
            (self.api.delete_runtime)(self.runtime);
            if !self.pool.is_null() {
                (self.api.pthreadpool_destroy)(self.pool);
            }
        }
    }
}

struct Subgraph<'a>(&'a Api, Sub);

impl Drop for Subgraph<'_> {
    fn drop(&mut self) {
        // SAFETY: created by `plan`, deleted once; a runtime made from it does not need it.
        unsafe { (self.0.delete_subgraph)(self.1) };
    }
}

/// Plans `graph` into a runtime on `threads` threads. `graph`'s weights must outlive the runtime.
fn plan(api: &'static Api, graph: &Graph, threads: usize) -> Result<Runtime, XnnpackError> {
    let mut sub: Sub = std::ptr::null_mut();
    // SAFETY: an out-pointer to a local.
    check("xnn_create_subgraph", unsafe {
        (api.create_subgraph)(2, 0, &mut sub)
    })?;
    let sub = Subgraph(api, sub);
    let mut ids = Vec::with_capacity(graph.values.len());
    for (i, v) in graph.values.iter().enumerate() {
        let i = i as u32;
        let (external, flags) = if i == graph.input {
            (INPUT_ID, XNN_VALUE_FLAG_EXTERNAL_INPUT)
        } else if i == graph.output {
            (OUTPUT_ID, XNN_VALUE_FLAG_EXTERNAL_OUTPUT)
        } else {
            (XNN_INVALID_VALUE_ID, 0)
        };
        let data = v
            .data
            .as_ref()
            .map_or(std::ptr::null(), |d| d.as_ptr().cast::<c_void>());
        let mut id = 0u32;
        // SAFETY: dims and data point into `graph`, which outlives the subgraph and the runtime.
        check("xnn_define_tensor_value", unsafe {
            (api.define_tensor_value)(
                sub.1,
                XNN_DATATYPE_FP32,
                v.dims.len(),
                v.dims.as_ptr(),
                data,
                external,
                flags,
                &mut id,
            )
        })?;
        ids.push(id);
    }
    let id = |v: u32| ids[v as usize];
    for node in &graph.nodes {
        // SAFETY: every id names a value defined above; the calls only read their arguments.
        let status = unsafe {
            match *node {
                Node::Convolution {
                    window: w,
                    groups,
                    group_input_channels,
                    group_output_channels,
                    clamp: c,
                    input,
                    filter,
                    bias,
                    output,
                } => {
                    let (lo, hi) = c;
                    (api.define_convolution_2d)(
                        sub.1,
                        w.pads[0],
                        w.pads[1],
                        w.pads[2],
                        w.pads[3],
                        w.kernel.0,
                        w.kernel.1,
                        w.stride.0,
                        w.stride.1,
                        w.dilation.0,
                        w.dilation.1,
                        groups,
                        group_input_channels,
                        group_output_channels,
                        lo,
                        hi,
                        id(input),
                        id(filter),
                        id(bias),
                        id(output),
                        0,
                    )
                }
                Node::Depthwise {
                    window: w,
                    multiplier,
                    input_channels,
                    clamp: c,
                    input,
                    filter,
                    bias,
                    output,
                } => {
                    let (lo, hi) = c;
                    (api.define_depthwise_convolution_2d)(
                        sub.1,
                        w.pads[0],
                        w.pads[1],
                        w.pads[2],
                        w.pads[3],
                        w.kernel.0,
                        w.kernel.1,
                        w.stride.0,
                        w.stride.1,
                        w.dilation.0,
                        w.dilation.1,
                        multiplier,
                        input_channels,
                        lo,
                        hi,
                        id(input),
                        id(filter),
                        id(bias),
                        id(output),
                        0,
                    )
                }
                Node::Add {
                    clamp: (lo, hi),
                    inputs: [a, b],
                    output,
                } => (api.define_add2)(sub.1, lo, hi, id(a), id(b), id(output), 0),
                Node::Clamp {
                    clamp: (lo, hi),
                    input,
                    output,
                } => (api.define_clamp)(sub.1, lo, hi, id(input), id(output), 0),
                Node::GlobalAveragePool {
                    clamp: (lo, hi),
                    input,
                    output,
                } => {
                    (api.define_global_average_pooling_2d)(sub.1, lo, hi, id(input), id(output), 0)
                }
                Node::FullyConnected {
                    clamp: (lo, hi),
                    input,
                    filter,
                    bias,
                    output,
                } => (api.define_fully_connected)(
                    sub.1,
                    lo,
                    hi,
                    id(input),
                    id(filter),
                    bias.map_or(XNN_INVALID_VALUE_ID, id),
                    id(output),
                    XNN_FLAG_TRANSPOSE_WEIGHTS,
                ),
            }
        };
        if status != XNN_SUCCESS {
            return Err(XnnpackError::Refused(format!(
                "defining {} answered status {status}",
                node_name(node)
            )));
        }
    }
    let pool = if threads > 1 {
        // The pool's threads take the name of the thread that makes them: they are deckhand-xnn in
        // top and /proc, whoever plans the runtime.
        let pool = named_like(POOL_THREAD_NAME, || {
            // SAFETY: plain constructor; null on failure, handled below.
            unsafe { (api.pthreadpool_create)(threads) }
        });
        if pool.is_null() {
            return Err(XnnpackError::Refused(format!(
                "a pool of {threads} threads could not be made"
            )));
        }
        pool
    } else {
        std::ptr::null_mut()
    };
    let mut runtime = std::ptr::null_mut();
    // SAFETY: the subgraph is complete; the pool is null (the calling thread) or owned below.
    let status = unsafe { (api.create_runtime_v2)(sub.1, pool, 0, &mut runtime) };
    if status != XNN_SUCCESS {
        if !pool.is_null() {
            // SAFETY: made above and used by nothing.
            unsafe { (api.pthreadpool_destroy)(pool) };
        }
        return Err(XnnpackError::Refused(format!(
            "xnn_create_runtime_v2 answered status {status}"
        )));
    }
    Ok(Runtime {
        api,
        runtime,
        pool,
        threads,
    })
}

/// The name of the threads of a runtime's pool.
pub const POOL_THREAD_NAME: &str = "deckhand-xnn";

/// Runs `f` with the calling thread named `name` (threads it starts inherit it), then names it back.
fn named_like<R>(name: &str, f: impl FnOnce() -> R) -> R {
    let mut old = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes, NUL included, into `old`.
    let got = unsafe { libc::prctl(libc::PR_GET_NAME, old.as_mut_ptr()) } == 0;
    let Ok(new) = std::ffi::CString::new(name) else {
        return f();
    };
    // SAFETY: a NUL-terminated name; the kernel keeps its first 15 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, new.as_ptr()) };
    let r = f();
    if got {
        // SAFETY: `old` is the NUL-terminated name the kernel gave above.
        unsafe { libc::prctl(libc::PR_SET_NAME, old.as_ptr()) };
    }
    r
}

fn node_name(node: &Node) -> &'static str {
    match node {
        Node::Convolution { .. } => "a convolution",
        Node::Depthwise { .. } => "a depthwise convolution",
        Node::Add { .. } => "an add",
        Node::Clamp { .. } => "a clamp",
        Node::GlobalAveragePool { .. } => "a global average pooling",
        Node::FullyConnected { .. } => "a fully connected layer",
    }
}

/// A translated model and its runtime: one image in, one embedding out.
pub struct XnnpackModel {
    graph: Graph,
    runtime: Runtime,
    /// The image, NHWC, with XNNPACK's extra bytes after it.
    input: Vec<f32>,
    output: Vec<f32>,
    /// A number of threads no runtime could be planned for (not tried again).
    refused_threads: Option<usize>,
}

impl XnnpackModel {
    /// Translates the ONNX model at `path` for one image of `shape` (its ONNX input shape) and plans it
    /// for `threads` threads.
    pub fn load(
        path: &std::path::Path,
        shape: [usize; 4],
        threads: usize,
    ) -> Result<Self, XnnpackError> {
        use tract_onnx::prelude::Framework;
        let proto = tract_onnx::onnx().proto_model_for_path(path).map_err(|e| {
            XnnpackError::Refused(format!("{} does not parse: {e}", path.display()))
        })?;
        let graph = graph::translate(&proto, shape)?;
        drop(proto);
        // Opened for the first model it can run: an agent whose models all run on tract never maps it.
        let api = api()?;
        let runtime = plan(api, &graph, threads.max(1))?;
        let input_len = graph.values[graph.input as usize]
            .dims
            .iter()
            .product::<usize>();
        Ok(Self {
            input: vec![0.0; input_len + XNN_EXTRA_BYTES / 4],
            output: vec![0.0; graph.output_len],
            refused_threads: None,
            runtime,
            graph,
        })
    }

    /// The number of values per image in and out.
    pub fn sizes(&self) -> (usize, usize) {
        (self.input.len() - XNN_EXTRA_BYTES / 4, self.output.len())
    }

    /// The threads the runtime runs on.
    pub fn threads(&self) -> usize {
        self.runtime.threads
    }

    /// Plans the runtime for `threads` threads unless it is planned for that many already. The
    /// runtime for the previous number is deleted after the new one is made; if the new one cannot
    /// be made, the previous one stays, and runs on its own number of threads from then on.
    pub fn prepare(&mut self, threads: usize) -> Result<(), XnnpackError> {
        let threads = threads.max(1);
        if threads == self.runtime.threads || self.refused_threads == Some(threads) {
            return Ok(());
        }
        match plan(self.runtime.api, &self.graph, threads) {
            Ok(runtime) => {
                self.runtime = runtime;
                Ok(())
            }
            Err(e) => {
                self.refused_threads = Some(threads);
                Err(e)
            }
        }
    }

    /// Runs one image (laid out as the ONNX model takes it) on `threads` threads, planning a runtime
    /// for that number first if the last one was for another.
    pub fn run(&mut self, image: &[f32], threads: usize) -> Result<&[f32], XnnpackError> {
        let (n, _) = self.sizes();
        if image.len() != n {
            return Err(XnnpackError::Run(format!(
                "expected {n} input values, got {}",
                image.len()
            )));
        }
        if let Err(e) = self.prepare(threads) {
            tracing::warn!(threads, kept = self.runtime.threads, error = %e, "xnnpack keeps the runtime it has");
        }
        if self.graph.input_nchw {
            let plane = n / 3;
            for (p, px) in self.input[..n].chunks_exact_mut(3).enumerate() {
                px[0] = image[p];
                px[1] = image[plane + p];
                px[2] = image[2 * plane + p];
            }
        } else {
            self.input[..n].copy_from_slice(image);
        }
        let externals = [
            ExternalValue {
                id: INPUT_ID,
                data: self.input.as_mut_ptr().cast(),
            },
            ExternalValue {
                id: OUTPUT_ID,
                data: self.output.as_mut_ptr().cast(),
            },
        ];
        let api = self.runtime.api;
        // SAFETY: both buffers have the sizes the subgraph declares (the input XNNPACK's extra bytes
        // more) and outlive the call; the runtime is used by this thread alone.
        unsafe {
            let s = (api.setup_runtime)(self.runtime.runtime, externals.len(), externals.as_ptr());
            if s != XNN_SUCCESS {
                return Err(XnnpackError::Run(format!(
                    "xnn_setup_runtime answered status {s}"
                )));
            }
            let s = (api.invoke_runtime)(self.runtime.runtime);
            if s != XNN_SUCCESS {
                return Err(XnnpackError::Run(format!(
                    "xnn_invoke_runtime answered status {s}"
                )));
            }
        }
        Ok(&self.output)
    }
}

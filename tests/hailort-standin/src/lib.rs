//! FOR TESTS ONLY: a stand-in for HailoRT 4.x. It is not HailoRT and drives no device.
//!
//! It exports, with HailoRT 4.20's C signatures, the functions deckhand's Hailo backend calls, so the
//! backend's FFI path runs in CI: handles, status codes and messages, vstream parameters (156-byte
//! `hailo_*_vstream_params_by_name_t`), frame sizes, raw buffer writes and reads, and output quantisation.
//! A "network" is deckhand's sample HEF: a version-0 HEF header around a body `DHSTANDIN1`, input size,
//! pool and dimension (u32 LE), then the projection weights (f32 LE), then optionally `OUT1`, the
//! output's bits (8 or 16) and whether it is quantised per channel (0 or 1). Writing a float32 NHWC frame
//! computes the same embedding as the sample ONNX model, quantised as the network's output is (8-bit:
//! zero point 128, scale 1/32; 16-bit: zero point 32768, scale 1/4096; per channel, the scale varies by
//! channel and there is one quantisation entry per channel). The output is read as the network's own
//! type (`HAILO_FORMAT_TYPE_AUTO` or that type) or as float32, dequantised, as HailoRT 4.20 does.
//! A detector network's body is `DHSTANDINDET1`, its input width and height and an output size (u32
//! LE), then that many f32 LE: the output every frame gets (as deckhand's known-output ONNX detector
//! answers), float32, not quantised (as a HEF whose box decoding runs on the host gives its output).
//!
//! Like a board without HailoRT's multi-process service, it allows one vdevice at a time (a second is
//! `HAILO_OUT_OF_PHYSICAL_DEVICES`) and [`MAX_GROUPS`] configured network groups per vdevice. HailoRT 4.x
//! has no call that releases one network group: they are freed with their vdevice, and so here.
//! `deckhand_standin_set_device_present(false)`, or `DECKHAND_STANDIN_NO_DEVICE` set in the environment
//! of a process that loads it (a whole agent, for the aarch64 test under qemu), makes
//! `hailo_create_vdevice` fail as a Pi without a Hailo board does; `deckhand_standin_network_groups()` counts the groups configured on live vdevices.

#![allow(clippy::missing_safety_doc)]

use std::collections::VecDeque;
use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

const SUCCESS: c_int = 0;
const INVALID_ARGUMENT: c_int = 2;
const TIMEOUT: c_int = 4;
const INSUFFICIENT_BUFFER: c_int = 5;
const INVALID_OPERATION: c_int = 6;
const OPEN_FILE_FAILURE: c_int = 13;
const INVALID_HEF: c_int = 26;
const OUT_OF_PHYSICAL_DEVICES: c_int = 74;

const FORMAT_TYPE_AUTO: c_int = 0;
const FORMAT_TYPE_UINT8: c_int = 1;
const FORMAT_TYPE_UINT16: c_int = 2;
const FORMAT_TYPE_FLOAT32: c_int = 3;
const FORMAT_ORDER_AUTO: c_int = 0;
const FORMAT_ORDER_NHWC: c_int = 1;
const FORMAT_ORDER_NC: c_int = 6;

/// The body of a detector network: this, then input width, height and the output's value count (u32
/// LE), then the output (f32 LE).
const DETECTOR: &[u8] = b"DHSTANDINDET1";

/// Network groups one vdevice holds.
pub const MAX_GROUPS: usize = 32;

static DEVICE_PRESENT: AtomicBool = AtomicBool::new(true);
/// Groups configured on each live vdevice (one at most), by vdevice address.
static VDEVICES: Mutex<Vec<(usize, Vec<usize>)>> = Mutex::new(Vec::new());

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Format {
    pub type_: c_int,
    pub order: c_int,
    pub flags: c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct VstreamParams {
    pub user_buffer_format: Format,
    pub timeout_ms: u32,
    pub queue_size: u32,
    pub vstream_stats_flags: c_int,
    pub pipeline_elements_stats_flags: c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct ParamsByName {
    pub name: [c_char; 128],
    pub params: VstreamParams,
}

#[repr(C)]
pub struct QuantInfo {
    pub qp_zp: f32,
    pub qp_scale: f32,
    pub limvals_min: f32,
    pub limvals_max: f32,
}

// HailoRT 4.20's sizes (x86_64 and aarch64 alike).
const _: () = assert!(std::mem::size_of::<Format>() == 12);
const _: () = assert!(std::mem::size_of::<VstreamParams>() == 28);
const _: () = assert!(std::mem::size_of::<ParamsByName>() == 156);
const _: () = assert!(std::mem::size_of::<QuantInfo>() == 16);

struct Network {
    /// The input frame, NHWC float32 (an embedder's is square).
    width: usize,
    height: usize,
    pool: usize,
    dim: usize,
    weights: Vec<f32>,
    /// 8 or 16; 32 for a float32 output (a detector's), not quantised.
    bits: u32,
    per_channel: bool,
    /// A detector's output, whatever the frame: `dim` values.
    known: Option<Vec<f32>>,
    /// Quantised output frames (one value per channel) waiting to be read.
    outputs: Mutex<VecDeque<Vec<u32>>>,
}

impl Network {
    fn parse(data: &[u8]) -> Option<Network> {
        let be = |at: usize| {
            data.get(at..at + 4)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        };
        if be(0)? != 0x0148_4546 || be(4)? != 0 {
            return None;
        }
        let body = data.get(32..)?;
        if body.len() != be(8)? as usize {
            return None;
        }
        let le = |at: usize| {
            body.get(at..at + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        };
        let floats = |raw: &[u8]| -> Vec<f32> {
            raw.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        };
        if body.starts_with(DETECTOR) {
            let at = DETECTOR.len();
            let (width, height, dim) = (le(at)?, le(at + 4)?, le(at + 8)?);
            let raw = body.get(at + 12..)?;
            if width == 0 || height == 0 || dim == 0 || raw.len() != dim * 4 {
                return None;
            }
            return Some(Network {
                width,
                height,
                pool: 1,
                dim,
                weights: Vec::new(),
                bits: 32,
                per_channel: false,
                known: Some(floats(raw)),
                outputs: Mutex::new(VecDeque::new()),
            });
        }
        if !body.starts_with(b"DHSTANDIN1") {
            return None;
        }
        let (input, pool, dim) = (le(10)?, le(14)?, le(18)?);
        if pool == 0 || input % pool != 0 {
            return None;
        }
        let side = input / pool;
        let features = 3 * side * side;
        let raw = body.get(22..22 + features * dim * 4)?;
        let (bits, per_channel) = match body.get(22 + features * dim * 4..)? {
            [] => (8, false),
            [b'O', b'U', b'T', b'1', bits @ (8 | 16), pc @ (0 | 1)] => (u32::from(*bits), *pc == 1),
            _ => return None,
        };
        Some(Network {
            width: input,
            height: input,
            pool,
            dim,
            weights: floats(raw),
            bits,
            per_channel,
            known: None,
            outputs: Mutex::new(VecDeque::new()),
        })
    }

    /// The quantisation of output channel `c`: (zero point, scale).
    fn quant(&self, c: usize) -> (f32, f32) {
        let (zp, scale) = if self.bits == 32 {
            (0.0, 1.0)
        } else if self.bits == 16 {
            (32768.0, 1.0 / 4096.0)
        } else {
            (128.0, 1.0 / 32.0)
        };
        if self.per_channel {
            (zp, scale * (1.0 + (c % 4) as f32 * 0.25))
        } else {
            (zp, scale)
        }
    }

    /// Bytes of one output frame read as `format_type`.
    fn frame_out(&self, format_type: c_int) -> usize {
        self.dim
            * match format_type {
                FORMAT_TYPE_FLOAT32 => 4,
                _ if self.bits == 32 => 4,
                _ if self.bits == 16 => 2,
                _ => 1,
            }
    }

    /// Whether HailoRT would give this network's output as `format_type`.
    fn output_type_ok(&self, format_type: c_int) -> bool {
        match format_type {
            FORMAT_TYPE_AUTO | FORMAT_TYPE_FLOAT32 => true,
            _ if self.bits == 32 => false,
            FORMAT_TYPE_UINT8 => self.bits == 8,
            FORMAT_TYPE_UINT16 => self.bits == 16,
            _ => false,
        }
    }

    fn frame_in(&self) -> usize {
        self.width * self.height * 3 * 4
    }

    /// The sample model: average-pool, flatten channel-major, centre, project; then quantise. A
    /// detector: its known output, as float32 bits.
    fn infer(&self, nhwc: &[f32]) -> Vec<u32> {
        if let Some(known) = &self.known {
            return known.iter().map(|v| v.to_bits()).collect();
        }
        let (s, p) = (self.width, self.pool);
        let side = s / p;
        let mut features = vec![0f32; 3 * side * side];
        for y in 0..s {
            for x in 0..s {
                for c in 0..3 {
                    features[c * side * side + (y / p) * side + x / p] += nhwc[(y * s + x) * 3 + c];
                }
            }
        }
        let n = (p * p) as f32;
        features.iter_mut().for_each(|f| *f /= n);
        let mean = features.iter().sum::<f32>() / features.len() as f32;
        features.iter_mut().for_each(|f| *f -= mean);
        let mut out = vec![0f32; self.dim];
        for (i, f) in features.iter().enumerate() {
            let row = &self.weights[i * self.dim..(i + 1) * self.dim];
            for (o, w) in out.iter_mut().zip(row) {
                *o += f * w;
            }
        }
        let max = if self.bits == 16 { 65535.0 } else { 255.0 };
        out.iter()
            .enumerate()
            .map(|(c, v)| {
                let (zp, scale) = self.quant(c);
                (v / scale + zp).round().clamp(0.0, max) as u32
            })
            .collect()
    }
}

struct Hef(Arc<Network>);
struct Group(Arc<Network>);
struct InputStream(Arc<Network>);
struct OutputStream {
    net: Arc<Network>,
    format_type: c_int,
}

/// Test control: whether `hailo_create_vdevice` finds a device.
#[unsafe(no_mangle)]
pub extern "C" fn deckhand_standin_set_device_present(present: bool) {
    DEVICE_PRESENT.store(present, Ordering::SeqCst);
}

/// Test control: the network groups configured on live vdevices.
#[unsafe(no_mangle)]
pub extern "C" fn deckhand_standin_network_groups() -> usize {
    VDEVICES
        .lock()
        .map(|v| v.iter().map(|(_, g)| g.len()).sum())
        .unwrap_or(0)
}

#[unsafe(no_mangle)]
pub extern "C" fn hailo_get_status_message(status: c_int) -> *const c_char {
    let msg: &'static CStr = match status {
        SUCCESS => c"HAILO_SUCCESS",
        INVALID_ARGUMENT => c"HAILO_INVALID_ARGUMENT",
        TIMEOUT => c"HAILO_TIMEOUT",
        INSUFFICIENT_BUFFER => c"HAILO_INSUFFICIENT_BUFFER",
        INVALID_OPERATION => c"HAILO_INVALID_OPERATION",
        OPEN_FILE_FAILURE => c"HAILO_OPEN_FILE_FAILURE",
        INVALID_HEF => c"HAILO_INVALID_HEF",
        OUT_OF_PHYSICAL_DEVICES => c"HAILO_OUT_OF_PHYSICAL_DEVICES",
        _ => c"HAILO_UNKNOWN_STATUS",
    };
    msg.as_ptr()
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn hailo_create_vdevice(
    _params: *mut c_void,
    vdevice: *mut *mut c_void,
) -> c_int {
    if vdevice.is_null() {
        return INVALID_ARGUMENT;
    }
    if !DEVICE_PRESENT.load(Ordering::SeqCst)
        || std::env::var_os("DECKHAND_STANDIN_NO_DEVICE").is_some()
    {
        return OUT_OF_PHYSICAL_DEVICES;
    }
    let Ok(mut live) = VDEVICES.lock() else {
        return INVALID_OPERATION;
    };
    // One board, no multi-process service: the device is taken while a vdevice holds it.
    if !live.is_empty() {
        return OUT_OF_PHYSICAL_DEVICES;
    }
    let handle = Box::into_raw(Box::new(0u8));
    live.push((handle as usize, Vec::new()));
    // SAFETY: the caller passes a valid out-pointer.
    unsafe { *vdevice = handle.cast() };
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn hailo_release_vdevice(vdevice: *mut c_void) -> c_int {
    if vdevice.is_null() {
        return INVALID_ARGUMENT;
    }
    let Ok(mut live) = VDEVICES.lock() else {
        return INVALID_OPERATION;
    };
    let Some(at) = live.iter().position(|(v, _)| *v == vdevice as usize) else {
        return INVALID_ARGUMENT;
    };
    // Its network groups go with it.
    let (_, groups) = live.remove(at);
    for g in groups {
        // SAFETY: created by hailo_configure_vdevice on this vdevice, freed once, here.
        drop(unsafe { Box::from_raw(g as *mut Group) });
    }
    // SAFETY: created by hailo_create_vdevice.
    drop(unsafe { Box::from_raw(vdevice.cast::<u8>()) });
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn hailo_create_hef_file(
    hef: *mut *mut c_void,
    file_name: *const c_char,
) -> c_int {
    if hef.is_null() || file_name.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: a NUL-terminated path from the caller.
    let Ok(path) = unsafe { CStr::from_ptr(file_name) }.to_str() else {
        return INVALID_ARGUMENT;
    };
    let Ok(data) = std::fs::read(path) else {
        return OPEN_FILE_FAILURE;
    };
    let Some(net) = Network::parse(&data) else {
        return INVALID_HEF;
    };
    // SAFETY: valid out-pointer.
    unsafe { *hef = Box::into_raw(Box::new(Hef(Arc::new(net)))).cast() };
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn hailo_release_hef(hef: *mut c_void) -> c_int {
    if !hef.is_null() {
        // SAFETY: created by hailo_create_hef_file.
        drop(unsafe { Box::from_raw(hef.cast::<Hef>()) });
    }
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn hailo_configure_vdevice(
    vdevice: *mut c_void,
    hef: *mut c_void,
    _params: *mut c_void,
    groups: *mut *mut c_void,
    count: *mut usize,
) -> c_int {
    if vdevice.is_null() || hef.is_null() || groups.is_null() || count.is_null() {
        return INVALID_ARGUMENT;
    }
    let Ok(mut live) = VDEVICES.lock() else {
        return INVALID_OPERATION;
    };
    let Some((_, configured)) = live.iter_mut().find(|(v, _)| *v == vdevice as usize) else {
        return INVALID_ARGUMENT;
    };
    if configured.len() >= MAX_GROUPS {
        return INVALID_OPERATION;
    }
    // SAFETY: pointers from this library and the caller's out-pointers.
    unsafe {
        if *count < 1 {
            return INSUFFICIENT_BUFFER;
        }
        let net = (&*hef.cast::<Hef>()).0.clone();
        let group = Box::into_raw(Box::new(Group(net)));
        configured.push(group as usize);
        *groups = group.cast();
        *count = 1;
    }
    SUCCESS
}

unsafe fn make_params(
    count: *mut usize,
    out: *mut ParamsByName,
    format_type: c_int,
    name: &[u8],
    order: c_int,
) -> c_int {
    if count.is_null() || out.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: the caller gives an array of *count entries.
    unsafe {
        if *count < 1 {
            return INSUFFICIENT_BUFFER;
        }
        let mut p = ParamsByName {
            name: [0; 128],
            params: VstreamParams {
                user_buffer_format: Format {
                    type_: format_type,
                    order,
                    flags: 0,
                },
                timeout_ms: 10_000,
                queue_size: 2,
                vstream_stats_flags: 0,
                pipeline_elements_stats_flags: 0,
            },
        };
        for (d, s) in p.name.iter_mut().zip(name) {
            *d = *s as c_char;
        }
        *out = p;
        *count = 1;
    }
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn hailo_make_input_vstream_params(
    group: *mut c_void,
    _unused: bool,
    format_type: c_int,
    params: *mut ParamsByName,
    count: *mut usize,
) -> c_int {
    if group.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: forwarded caller pointers.
    unsafe {
        make_params(
            count,
            params,
            format_type,
            b"standin/input_layer1",
            FORMAT_ORDER_NHWC,
        )
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn hailo_make_output_vstream_params(
    group: *mut c_void,
    _unused: bool,
    format_type: c_int,
    params: *mut ParamsByName,
    count: *mut usize,
) -> c_int {
    if group.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: forwarded caller pointers.
    unsafe {
        make_params(
            count,
            params,
            format_type,
            b"standin/embedding",
            FORMAT_ORDER_NC,
        )
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn hailo_create_input_vstreams(
    group: *mut c_void,
    params: *const ParamsByName,
    count: usize,
    out: *mut *mut c_void,
) -> c_int {
    if group.is_null() || params.is_null() || out.is_null() || count != 1 {
        return INVALID_ARGUMENT;
    }
    // SAFETY: caller's array of one entry and out-pointer; group from this library.
    unsafe {
        let f = (*params).params.user_buffer_format;
        if f.type_ != FORMAT_TYPE_FLOAT32
            || !matches!(f.order, FORMAT_ORDER_NHWC | FORMAT_ORDER_AUTO)
        {
            // (HailoRT also takes uint8 frames; deckhand's sample network is written in float32.)
            return INVALID_ARGUMENT;
        }
        *out = Box::into_raw(Box::new(InputStream((&*group.cast::<Group>()).0.clone()))).cast();
    }
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn hailo_create_output_vstreams(
    group: *mut c_void,
    params: *const ParamsByName,
    count: usize,
    out: *mut *mut c_void,
) -> c_int {
    if group.is_null() || params.is_null() || out.is_null() || count != 1 {
        return INVALID_ARGUMENT;
    }
    // SAFETY: as above.
    unsafe {
        let f = (*params).params.user_buffer_format;
        let net = (&*group.cast::<Group>()).0.clone();
        if !net.output_type_ok(f.type_) || !matches!(f.order, FORMAT_ORDER_NC | FORMAT_ORDER_AUTO) {
            return INVALID_ARGUMENT;
        }
        let format_type = if f.type_ == FORMAT_TYPE_AUTO {
            if net.bits == 16 {
                FORMAT_TYPE_UINT16
            } else {
                FORMAT_TYPE_UINT8
            }
        } else {
            f.type_
        };
        *out = Box::into_raw(Box::new(OutputStream { net, format_type })).cast();
    }
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn hailo_get_input_vstream_frame_size(
    vs: *mut c_void,
    size: *mut usize,
) -> c_int {
    if vs.is_null() || size.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: stream from this library, caller's out-pointer.
    unsafe { *size = (&*vs.cast::<InputStream>()).0.frame_in() };
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn hailo_get_output_vstream_frame_size(
    vs: *mut c_void,
    size: *mut usize,
) -> c_int {
    if vs.is_null() || size.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: as above.
    unsafe {
        let s = &*vs.cast::<OutputStream>();
        *size = s.net.frame_out(s.format_type);
    }
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn hailo_vstream_write_raw_buffer(
    vs: *mut c_void,
    buffer: *const c_void,
    size: usize,
) -> c_int {
    if vs.is_null() || buffer.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: stream from this library; the caller's buffer holds `size` bytes.
    unsafe {
        let net = &(&*vs.cast::<InputStream>()).0;
        if size != net.frame_in() {
            return INVALID_ARGUMENT;
        }
        let floats = std::slice::from_raw_parts(buffer.cast::<f32>(), size / 4);
        let out = net.infer(floats);
        match net.outputs.lock() {
            Ok(mut q) => q.push_back(out),
            Err(_) => return INVALID_ARGUMENT,
        }
    }
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn hailo_vstream_read_raw_buffer(
    vs: *mut c_void,
    buffer: *mut c_void,
    size: usize,
) -> c_int {
    if vs.is_null() || buffer.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: stream from this library; the caller's buffer holds `size` bytes.
    unsafe {
        let s = &*vs.cast::<OutputStream>();
        let net = &s.net;
        if size != net.frame_out(s.format_type) {
            return INVALID_ARGUMENT;
        }
        let Some(frame) = net.outputs.lock().ok().and_then(|mut q| q.pop_front()) else {
            return TIMEOUT;
        };
        let mut bytes = Vec::with_capacity(size);
        for (c, q) in frame.iter().enumerate() {
            match s.format_type {
                _ if net.bits == 32 => bytes.extend_from_slice(&q.to_ne_bytes()),
                FORMAT_TYPE_FLOAT32 => {
                    let (zp, scale) = net.quant(c);
                    bytes.extend_from_slice(&((*q as f32 - zp) * scale).to_ne_bytes());
                }
                FORMAT_TYPE_UINT16 => bytes.extend_from_slice(&(*q as u16).to_ne_bytes()),
                _ => bytes.push(*q as u8),
            }
        }
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), buffer.cast::<u8>(), size);
    }
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn hailo_get_output_vstream_quant_infos(
    vs: *mut c_void,
    infos: *mut QuantInfo,
    count: *mut usize,
) -> c_int {
    if vs.is_null() || infos.is_null() || count.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: caller's array of *count entries.
    unsafe {
        let net = &(&*vs.cast::<OutputStream>()).net;
        let entries = if net.per_channel { net.dim } else { 1 };
        if *count < entries {
            *count = entries;
            return INSUFFICIENT_BUFFER;
        }
        for c in 0..entries {
            let (zp, scale) = net.quant(c);
            *infos.add(c) = QuantInfo {
                qp_zp: zp,
                qp_scale: scale,
                limvals_min: -zp * scale,
                limvals_max: zp * scale,
            };
        }
        *count = entries;
    }
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn hailo_release_input_vstreams(
    vs: *const *mut c_void,
    count: usize,
) -> c_int {
    if vs.is_null() {
        return INVALID_ARGUMENT;
    }
    for i in 0..count {
        // SAFETY: an array of `count` streams created by this library.
        unsafe { drop(Box::from_raw((*vs.add(i)).cast::<InputStream>())) };
    }
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn hailo_release_output_vstreams(
    vs: *const *mut c_void,
    count: usize,
) -> c_int {
    if vs.is_null() {
        return INVALID_ARGUMENT;
    }
    for i in 0..count {
        // SAFETY: as above.
        unsafe { drop(Box::from_raw((*vs.add(i)).cast::<OutputStream>())) };
    }
    SUCCESS
}

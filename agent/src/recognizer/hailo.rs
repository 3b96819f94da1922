//! The Hailo-8 backend, through HailoRT 4.x (targeted: HailoRT 4.20, the `hailo8` line).
//!
//! hailort-sys 0.1.1 is used where it matches 4.x: the vdevice, the HEF from a file, configuring with NULL
//! parameters, creating vstreams, output quantisation info, status messages. The calls it lacks or gets
//! wrong for 4.x are declared in [`ffi4`], each checked against `hailort/libhailort/include/hailo/hailort.h`
//! on the `hailo8` branch. Its configure-params structs have 5.x sizes, so this module never passes one
//! (NULL asks HailoRT for defaults).
//!
//! Input is written as float32 NHWC (HailoRT quantises) and output read as float32 (HailoRT dequantises,
//! whatever the network's output is: 8 or 16 bits, one quantisation entry or one per channel).
//!
//! ## Network groups and the vdevice, over months of swaps
//!
//! One vdevice is shared by every release loaded in the process: a second vdevice on the same board fails
//! while the first exists (no multi-process service), and the old release must keep serving while the
//! new one loads. HailoRT 4.x frees a configured network group only with its vdevice, and a vdevice holds
//! [`GROUP_LIMIT`] of them, so configuring one per load would fail after about 31 swaps. Hence:
//!
//! - A configured network (its group, vstreams and HEF handle: [`Net`]) is kept per HEF *content* (blake3
//!   of the file) for the vdevice's life, and a release whose HEF is already configured reuses it. That
//!   is the common case (a reference-DB update keeps the HEF) and also a rollback or a fleet alternating
//!   two models: no group is added.
//! - A new HEF is configured beside the live one on the same vdevice, so the old release serves (on the
//!   Hailo) until the new one is loaded, checked and swapped in. The old release's network stays cached.
//! - When a new HEF finds the vdevice full, the cached networks no live release uses are dropped; if
//!   none is in use any more the vdevice is released (freeing every group) and a fresh one created. If a
//!   live release still holds it (the old one, still serving), the load fails with
//!   [`BackendError::DeviceFull`]: under `--backend auto` that release runs on the CPU, and the next load
//!   after the old release drained finds the vdevice free and recreates it. Nothing in flight is ever
//!   cut off: a network lives as long as a recognizer (and so an in-flight batch) holds it.
//! - Two recognizers sharing a network (the old one finishing a batch while the new one checks its
//!   canaries) take turns on its vstreams (`Net::io`).

use super::{BackendError, Embedder};
use crate::camera::detector::{Detect, Detection, decode, output_shape};
use deckhand_protocol::manifest::{ChannelLayout, DetectorSettings, RecognizerSettings};
use hailort_sys as sys;
use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// HailoRT 4.x calls hailort-sys 0.1.1 lacks. Signatures from hailort.h (4.20).
pub mod ffi4 {
    use hailort_sys::{
        hailo_configured_network_group, hailo_format_type_t, hailo_input_vstream,
        hailo_input_vstream_params_by_name_t, hailo_output_vstream,
        hailo_output_vstream_params_by_name_t, hailo_status,
    };
    use std::ffi::c_void;

    unsafe extern "C" {
        /// `hailo_status hailo_make_input_vstream_params(hailo_configured_network_group, bool unused,
        ///  hailo_format_type_t, hailo_input_vstream_params_by_name_t *, size_t *)`
        pub fn hailo_make_input_vstream_params(
            network_group: hailo_configured_network_group,
            unused: bool,
            format_type: hailo_format_type_t,
            input_params: *mut hailo_input_vstream_params_by_name_t,
            input_params_count: *mut usize,
        ) -> hailo_status;
        pub fn hailo_make_output_vstream_params(
            network_group: hailo_configured_network_group,
            unused: bool,
            format_type: hailo_format_type_t,
            output_params: *mut hailo_output_vstream_params_by_name_t,
            output_params_count: *mut usize,
        ) -> hailo_status;
        pub fn hailo_get_input_vstream_frame_size(
            input_vstream: hailo_input_vstream,
            frame_size: *mut usize,
        ) -> hailo_status;
        pub fn hailo_get_output_vstream_frame_size(
            output_vstream: hailo_output_vstream,
            frame_size: *mut usize,
        ) -> hailo_status;
        pub fn hailo_vstream_write_raw_buffer(
            input_vstream: hailo_input_vstream,
            buffer: *const c_void,
            buffer_size: usize,
        ) -> hailo_status;
        pub fn hailo_vstream_read_raw_buffer(
            output_vstream: hailo_output_vstream,
            buffer: *mut c_void,
            buffer_size: usize,
        ) -> hailo_status;
        pub fn hailo_release_input_vstreams(
            input_vstreams: *const hailo_input_vstream,
            inputs_count: usize,
        ) -> hailo_status;
        pub fn hailo_release_output_vstreams(
            output_vstreams: *const hailo_output_vstream,
            outputs_count: usize,
        ) -> hailo_status;
    }
}

/// Network groups one vdevice holds; HailoRT frees them only with the vdevice.
pub const GROUP_LIMIT: usize = 32;

// HailoRT 4.20's struct sizes, the same on x86_64 and aarch64: hailort-sys must match them.
const _: () = assert!(std::mem::size_of::<sys::hailo_format_t>() == 12);
const _: () = assert!(std::mem::size_of::<sys::hailo_vstream_params_t>() == 28);
const _: () = assert!(std::mem::size_of::<sys::hailo_input_vstream_params_by_name_t>() == 156);
const _: () = assert!(std::mem::size_of::<sys::hailo_output_vstream_params_by_name_t>() == 156);
const _: () = assert!(std::mem::size_of::<sys::hailo_quant_info_t>() == 16);

fn message(status: sys::hailo_status) -> String {
    // SAFETY: HailoRT returns a static NUL-terminated string (or NULL) for any status value.
    let p = unsafe { sys::hailo_get_status_message(status) };
    if p.is_null() {
        return format!("HailoRT status {status}");
    }
    // SAFETY: non-null, static, NUL-terminated.
    let s = unsafe { CStr::from_ptr(p) }.to_string_lossy();
    format!("{s} ({status})")
}

fn check(status: sys::hailo_status, what: &str) -> Result<(), BackendError> {
    if status == sys::HAILO_SUCCESS {
        Ok(())
    } else {
        Err(BackendError::Load(format!("{what}: {}", message(status))))
    }
}

/// A release call's status, logged if it failed (a release runs in `Drop`, where nothing can be
/// returned; a failure there is HailoRT's to report, and the handle is not used again either way).
fn released(status: sys::hailo_status, what: &'static str) {
    if status != sys::HAILO_SUCCESS {
        tracing::warn!(what, status = %message(status), "HailoRT release call failed");
    }
}

/// The process-wide vdevice.
struct VDevice(sys::hailo_vdevice);

// SAFETY: HailoRT handles may be used from any thread; the vdevice is only released on drop.
unsafe impl Send for VDevice {}
unsafe impl Sync for VDevice {}

impl Drop for VDevice {
    fn drop(&mut self) {
        // SAFETY: created by hailo_create_vdevice, released once; every network on it was dropped first
        // (each holds an Arc of it).
        released(
            unsafe { sys::hailo_release_vdevice(self.0) },
            "hailo_release_vdevice",
        );
    }
}

/// One HEF configured on the vdevice: its network group's vstreams and the HEF handle.
struct Net {
    hef: sys::hailo_hef,
    input: sys::hailo_input_vstream,
    output: sys::hailo_output_vstream,
    /// Bytes of one input frame (float32 NHWC) and one output frame (float32).
    in_frame: usize,
    out_frame: usize,
    /// A frame is written then read under this lock: the vstreams are a pipe.
    io: Mutex<()>,
    // Last, so it is released after this network's streams and HEF.
    _vdevice: Arc<VDevice>,
}

// SAFETY: HailoRT handles may be used from any thread; writes and reads are serialised by `io`.
unsafe impl Send for Net {}
unsafe impl Sync for Net {}

impl Drop for Net {
    fn drop(&mut self) {
        // SAFETY: each handle was created once by HailoRT and is released once, streams before the HEF.
        // The network group itself has no release call in HailoRT 4.x: it goes with the vdevice.
        unsafe {
            if !self.input.is_null() {
                released(
                    ffi4::hailo_release_input_vstreams(&self.input, 1),
                    "hailo_release_input_vstreams",
                );
            }
            if !self.output.is_null() {
                released(
                    ffi4::hailo_release_output_vstreams(&self.output, 1),
                    "hailo_release_output_vstreams",
                );
            }
            if !self.hef.is_null() {
                released(sys::hailo_release_hef(self.hef), "hailo_release_hef");
            }
        }
    }
}

/// The vdevice and what is configured on it.
#[derive(Default)]
struct Registry {
    vdevice: Option<Arc<VDevice>>,
    /// Network groups configured on `vdevice` (they are freed only with it).
    configured: usize,
    nets: HashMap<[u8; 32], Arc<Net>>,
}

static REGISTRY: Mutex<Option<Registry>> = Mutex::new(None);

/// The configured network for the HEF at `hef_path`: the cached one if this HEF was configured on the
/// current vdevice, else a new one (see the module documentation for when the vdevice is recreated).
fn network(hef_path: &Path) -> Result<Arc<Net>, BackendError> {
    let content = blake3::Hasher::new()
        .update_mmap(hef_path)
        .map(|h| *h.finalize().as_bytes())
        .map_err(|e| BackendError::Load(format!("hef {}: {e}", hef_path.display())))?;
    let mut guard = REGISTRY
        .lock()
        .map_err(|_| BackendError::Load("the Hailo registry lock is poisoned".into()))?;
    let reg = guard.get_or_insert_with(Registry::default);
    if reg.vdevice.is_some()
        && let Some(net) = reg.nets.get(&content)
    {
        return Ok(net.clone());
    }
    if reg.vdevice.is_some() && reg.configured >= GROUP_LIMIT {
        // Full: forget what no live release uses; with nothing in use, start a fresh vdevice.
        reg.nets.retain(|_, n| Arc::strong_count(n) > 1);
        if !reg.nets.is_empty() {
            return Err(BackendError::DeviceFull(format!(
                "the Hailo vdevice holds its {GROUP_LIMIT} network groups and a live release still \
                 uses {} of them; it is recreated once that release is replaced",
                reg.nets.len()
            )));
        }
        tracing::info!(
            groups = reg.configured,
            "releasing the full Hailo vdevice to recreate it"
        );
        reg.vdevice = None;
        reg.configured = 0;
    }
    let vdevice = match &reg.vdevice {
        Some(v) => v.clone(),
        None => {
            let mut handle: sys::hailo_vdevice = std::ptr::null_mut();
            // SAFETY: NULL params ask for HailoRT's defaults; `handle` is a valid out-pointer.
            let status = unsafe { sys::hailo_create_vdevice(std::ptr::null_mut(), &mut handle) };
            if status != sys::HAILO_SUCCESS {
                return Err(BackendError::NoDevice(message(status)));
            }
            let v = Arc::new(VDevice(handle));
            reg.vdevice = Some(v.clone());
            v
        }
    };
    let net = Arc::new(configure(hef_path, vdevice, &mut reg.configured)?);
    reg.nets.insert(content, net.clone());
    tracing::info!(
        hef = %hef_path.display(),
        groups = reg.configured,
        limit = GROUP_LIMIT,
        "configured a Hailo network group"
    );
    Ok(net)
}

/// Loads a HEF and configures it on `vdevice` (counting the group in `configured` once it exists, even
/// if a later step fails), then creates its vstreams: float32 NHWC in, float32 out.
fn configure(
    hef_path: &Path,
    vdevice: Arc<VDevice>,
    configured: &mut usize,
) -> Result<Net, BackendError> {
    let path = CString::new(hef_path.as_os_str().as_encoded_bytes()).map_err(|_| {
        BackendError::Load(format!("hef path {} has a NUL byte", hef_path.display()))
    })?;
    let mut hef: sys::hailo_hef = std::ptr::null_mut();
    // SAFETY: a NUL-terminated path and a valid out-pointer.
    check(
        unsafe { sys::hailo_create_hef_file(&mut hef, path.as_ptr()) },
        &format!("hef {}", hef_path.display()),
    )?;
    let mut net = Net {
        hef,
        input: std::ptr::null_mut(),
        output: std::ptr::null_mut(),
        in_frame: 0,
        out_frame: 0,
        io: Mutex::new(()),
        _vdevice: vdevice.clone(),
    };
    // From here on, Drop releases whatever was created.
    let mut group: sys::hailo_configured_network_group = std::ptr::null_mut();
    let mut groups = 1usize;
    // SAFETY: handles from HailoRT; NULL configure params (hailort-sys's struct has 5.x layout).
    check(
        unsafe {
            sys::hailo_configure_vdevice(
                vdevice.0,
                net.hef,
                std::ptr::null_mut(),
                &mut group,
                &mut groups,
            )
        },
        "configure the network group",
    )?;
    *configured += 1;
    if groups != 1 {
        return Err(BackendError::Load(format!(
            "the HEF has {groups} network groups, expected 1"
        )));
    }
    // SAFETY: zeroed params are valid out-buffers; HailoRT fills every field.
    let mut in_params: [sys::hailo_input_vstream_params_by_name_t; 4] =
        unsafe { std::mem::zeroed() };
    let mut out_params: [sys::hailo_output_vstream_params_by_name_t; 4] =
        unsafe { std::mem::zeroed() };
    let (mut n_in, mut n_out) = (in_params.len(), out_params.len());
    // SAFETY: arrays of n_in / n_out entries; the group is configured.
    check(
        unsafe {
            ffi4::hailo_make_input_vstream_params(
                group,
                false,
                sys::HAILO_FORMAT_TYPE_FLOAT32,
                in_params.as_mut_ptr(),
                &mut n_in,
            )
        },
        "make input vstream params",
    )?;
    // Float32 out: HailoRT dequantises 8- and 16-bit outputs, with every quantisation entry.
    check(
        unsafe {
            ffi4::hailo_make_output_vstream_params(
                group,
                false,
                sys::HAILO_FORMAT_TYPE_FLOAT32,
                out_params.as_mut_ptr(),
                &mut n_out,
            )
        },
        "make output vstream params",
    )?;
    if n_in != 1 || n_out != 1 {
        return Err(BackendError::Load(format!(
            "expected one input and one output vstream, found {n_in} and {n_out}"
        )));
    }
    in_params[0].params.user_buffer_format.order = sys::HAILO_FORMAT_ORDER_NHWC;
    // SAFETY: one params entry each; out-pointers for one vstream each.
    check(
        unsafe { sys::hailo_create_input_vstreams(group, in_params.as_ptr(), 1, &mut net.input) },
        "create the input vstream",
    )?;
    check(
        unsafe {
            sys::hailo_create_output_vstreams(group, out_params.as_ptr(), 1, &mut net.output)
        },
        "create the output vstream",
    )?;
    // SAFETY: vstreams just created; valid out-pointers.
    check(
        unsafe { ffi4::hailo_get_input_vstream_frame_size(net.input, &mut net.in_frame) },
        "input frame size",
    )?;
    check(
        unsafe { ffi4::hailo_get_output_vstream_frame_size(net.output, &mut net.out_frame) },
        "output frame size",
    )?;
    if net.out_frame == 0 || !net.out_frame.is_multiple_of(4) {
        return Err(BackendError::Load(format!(
            "the float32 output frame is {} bytes, not a whole number of values",
            net.out_frame
        )));
    }
    Ok(net)
}

impl Net {
    /// Writes one float32 NHWC frame and reads its float32 output, under the network's turn.
    fn run(&self, frame: &[f32], out: &mut [f32]) -> Result<(), BackendError> {
        if std::mem::size_of_val(frame) != self.in_frame
            || std::mem::size_of_val(out) != self.out_frame
        {
            return Err(BackendError::Run(format!(
                "frames of {} and {} bytes for a network of {} in and {} out",
                std::mem::size_of_val(frame),
                std::mem::size_of_val(out),
                self.in_frame,
                self.out_frame
            )));
        }
        let _turn = self
            .io
            .lock()
            .map_err(|_| BackendError::Run("the Hailo network's lock is poisoned".into()))?;
        // SAFETY: `frame` holds exactly in_frame bytes and `out` exactly out_frame bytes (checked).
        let s = unsafe {
            ffi4::hailo_vstream_write_raw_buffer(self.input, frame.as_ptr().cast(), self.in_frame)
        };
        if s != sys::HAILO_SUCCESS {
            return Err(BackendError::Run(format!(
                "write to the input vstream: {}",
                message(s)
            )));
        }
        let s = unsafe {
            ffi4::hailo_vstream_read_raw_buffer(
                self.output,
                out.as_mut_ptr().cast(),
                self.out_frame,
            )
        };
        if s != sys::HAILO_SUCCESS {
            return Err(BackendError::Run(format!(
                "read from the output vstream: {}",
                message(s)
            )));
        }
        Ok(())
    }
}

/// `chw` (3 planes of `plane` values) as NHWC, into `out`.
fn to_nhwc(chw: &[f32], plane: usize, out: &mut Vec<f32>) {
    out.resize(3 * plane, 0.0);
    for i in 0..plane {
        for c in 0..3 {
            out[i * 3 + c] = chw[c * plane + i];
        }
    }
}

/// One release's network on the Hailo device.
pub struct HailoEmbedder {
    net: Arc<Net>,
    settings: RecognizerSettings,
    nhwc: Vec<f32>,
    frame: Vec<f32>,
}

impl HailoEmbedder {
    pub fn load(hef_path: &Path, settings: &RecognizerSettings) -> Result<Self, BackendError> {
        let net = network(hef_path)?;
        let expected = settings.input_width as usize * settings.input_height as usize * 3 * 4;
        if net.in_frame != expected {
            return Err(BackendError::Load(format!(
                "the HEF's input frame is {} bytes, the release's {}x{} RGB float input is {expected}",
                net.in_frame, settings.input_width, settings.input_height
            )));
        }
        let frame = vec![0.0; net.out_frame / 4];
        Ok(Self {
            net,
            settings: settings.clone(),
            nhwc: Vec::new(),
            frame,
        })
    }
}

impl Embedder for HailoEmbedder {
    fn embed(&mut self, input: &[f32], batch: usize) -> Result<Vec<f32>, BackendError> {
        let per = self.net.in_frame / 4;
        if input.len() != batch * per {
            return Err(BackendError::Run(format!(
                "expected {} values for {batch} images, got {}",
                batch * per,
                input.len()
            )));
        }
        let mut out = Vec::with_capacity(batch * self.frame.len());
        let plane = self.settings.input_width as usize * self.settings.input_height as usize;
        for img in input.chunks(per) {
            let frame: &[f32] = match self.settings.layout {
                ChannelLayout::Nhwc => img,
                ChannelLayout::Nchw => {
                    to_nhwc(img, plane, &mut self.nhwc);
                    &self.nhwc
                }
            };
            self.net.run(frame, &mut self.frame)?;
            out.extend_from_slice(&self.frame);
        }
        Ok(out)
    }

    fn dim(&self) -> usize {
        self.frame.len()
    }

    fn name(&self) -> &'static str {
        "hailo"
    }
}

/// A release's card detector on the Hailo: its HEF configured on the same vdevice as the embedder's (a
/// second network group, cached by content as every network is), float32 NHWC in, float32 out, decoded
/// as the CPU detector's output is.
pub struct HailoDetector {
    net: Arc<Net>,
    settings: DetectorSettings,
    shape: [usize; 3],
    chw: Vec<f32>,
    nhwc: Vec<f32>,
    out: Vec<f32>,
}

impl HailoDetector {
    pub fn load(hef_path: &Path, settings: &DetectorSettings) -> Result<Self, BackendError> {
        let net = network(hef_path)?;
        let (w, h) = (
            settings.input_width as usize,
            settings.input_height as usize,
        );
        if net.in_frame != w * h * 3 * 4 {
            return Err(BackendError::Load(format!(
                "detector hef {}: its input frame is {} bytes, the release's {w}x{h} RGB float input \
                 is {}",
                hef_path.display(),
                net.in_frame,
                w * h * 3 * 4
            )));
        }
        let shape = output_shape(settings, net.out_frame / 4)
            .map_err(|e| BackendError::Load(format!("detector hef {}: {e}", hef_path.display())))?;
        Ok(HailoDetector {
            out: vec![0.0; net.out_frame / 4],
            net,
            settings: settings.clone(),
            shape,
            chw: Vec::new(),
            nhwc: Vec::new(),
        })
    }
}

impl Detect for HailoDetector {
    fn detect(&mut self, frame: &image::RgbImage) -> Result<Vec<Detection>, BackendError> {
        let s = &self.settings;
        let lb = crate::camera::detector::input(frame, s, &mut self.chw);
        to_nhwc(
            &self.chw,
            s.input_width as usize * s.input_height as usize,
            &mut self.nhwc,
        );
        self.net.run(&self.nhwc, &mut self.out)?;
        decode(&self.out, &self.shape, s, &lb).map_err(|e| BackendError::Run(e.to_string()))
    }

    fn name(&self) -> &'static str {
        "hailo"
    }
}

/// Drops the cached networks no live release uses and, if none is left, the vdevice with every group
/// on it (at shutdown, or to hand the board to another process). Returns the networks still in use.
pub fn release_unused() -> usize {
    let mut guard = crate::locks::lock(&REGISTRY, "hailo registry");
    let Some(reg) = guard.as_mut() else {
        return 0;
    };
    reg.nets.retain(|_, n| Arc::strong_count(n) > 1);
    let in_use = reg.nets.len();
    if in_use == 0 {
        *guard = None;
    }
    in_use
}

/// Network groups configured on the current vdevice, and how many HEFs are cached on it (for tests and
/// status).
pub fn configured_groups() -> (usize, usize) {
    crate::locks::lock(&REGISTRY, "hailo registry")
        .as_ref()
        .map_or((0, 0), |r| (r.configured, r.nets.len()))
}

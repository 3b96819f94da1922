//! The Hailo-8 backend, through HailoRT 4.x (targeted: HailoRT 4.20, the `hailo8` line).
//!
//! hailort-sys 0.1.1 is used where it matches 4.x: the vdevice, the HEF from a file, configuring with NULL
//! parameters, creating vstreams, output quantisation info, status messages. The calls it lacks or gets
//! wrong for 4.x are declared in [`ffi4`], each checked against `hailort/libhailort/include/hailo/hailort.h`
//! on the `hailo8` branch. Its configure-params structs have 5.x sizes, so this module never passes one
//! (NULL asks HailoRT for defaults).
//!
//! One vdevice is shared by every release loaded in the process (a second vdevice on the same board would
//! fail while the old release still serves); each release configures its own network group on it, and
//! HailoRT's scheduler switches between them. Input is written as float32 NHWC (HailoRT quantises);
//! output is read as uint8 and dequantised here with the vstream's quantisation info.

use super::{BackendError, Embedder};
use deckhand_protocol::manifest::{ChannelLayout, RecognizerSettings};
use hailort_sys as sys;
use std::ffi::{CStr, CString};
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};

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

/// The process-wide vdevice.
struct VDevice(sys::hailo_vdevice);

// SAFETY: HailoRT handles may be used from any thread; the vdevice is only released on drop.
unsafe impl Send for VDevice {}
unsafe impl Sync for VDevice {}

impl Drop for VDevice {
    fn drop(&mut self) {
        // SAFETY: created by hailo_create_vdevice, released once.
        unsafe { sys::hailo_release_vdevice(self.0) };
    }
}

static SHARED: Mutex<Weak<VDevice>> = Mutex::new(Weak::new());

fn vdevice() -> Result<Arc<VDevice>, BackendError> {
    let mut shared = SHARED
        .lock()
        .map_err(|_| BackendError::Load("vdevice lock poisoned".into()))?;
    if let Some(v) = shared.upgrade() {
        return Ok(v);
    }
    let mut handle: sys::hailo_vdevice = std::ptr::null_mut();
    // SAFETY: NULL params ask for HailoRT's defaults; `handle` is a valid out-pointer.
    let status = unsafe { sys::hailo_create_vdevice(std::ptr::null_mut(), &mut handle) };
    if status != sys::HAILO_SUCCESS {
        return Err(BackendError::NoDevice(message(status)));
    }
    let v = Arc::new(VDevice(handle));
    *shared = Arc::downgrade(&v);
    Ok(v)
}

/// One release's network on the Hailo device.
pub struct HailoEmbedder {
    hef: sys::hailo_hef,
    input: sys::hailo_input_vstream,
    output: sys::hailo_output_vstream,
    in_frame: usize,
    out_frame: usize,
    zero_point: f32,
    scale: f32,
    settings: RecognizerSettings,
    nhwc: Vec<f32>,
    raw: Vec<u8>,
    // Last, so it is released after this release's streams and HEF.
    _vdevice: Arc<VDevice>,
}

// SAFETY: the handles are used by one thread at a time (the recognizer keeps the embedder in a Mutex).
unsafe impl Send for HailoEmbedder {}

impl HailoEmbedder {
    pub fn load(hef_path: &Path, settings: &RecognizerSettings) -> Result<Self, BackendError> {
        let vdevice = vdevice()?;
        let path = CString::new(hef_path.as_os_str().as_encoded_bytes()).map_err(|_| {
            BackendError::Load(format!("hef path {} has a NUL byte", hef_path.display()))
        })?;
        let mut hef: sys::hailo_hef = std::ptr::null_mut();
        // SAFETY: a NUL-terminated path and a valid out-pointer.
        check(
            unsafe { sys::hailo_create_hef_file(&mut hef, path.as_ptr()) },
            &format!("hef {}", hef_path.display()),
        )?;
        let mut me = Self {
            hef,
            input: std::ptr::null_mut(),
            output: std::ptr::null_mut(),
            in_frame: 0,
            out_frame: 0,
            zero_point: 0.0,
            scale: 1.0,
            settings: settings.clone(),
            nhwc: Vec::new(),
            raw: Vec::new(),
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
                    me.hef,
                    std::ptr::null_mut(),
                    &mut group,
                    &mut groups,
                )
            },
            "configure the network group",
        )?;
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
        check(
            unsafe {
                ffi4::hailo_make_output_vstream_params(
                    group,
                    false,
                    sys::HAILO_FORMAT_TYPE_UINT8,
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
            unsafe {
                sys::hailo_create_input_vstreams(group, in_params.as_ptr(), 1, &mut me.input)
            },
            "create the input vstream",
        )?;
        check(
            unsafe {
                sys::hailo_create_output_vstreams(group, out_params.as_ptr(), 1, &mut me.output)
            },
            "create the output vstream",
        )?;
        // SAFETY: vstreams just created; valid out-pointers.
        check(
            unsafe { ffi4::hailo_get_input_vstream_frame_size(me.input, &mut me.in_frame) },
            "input frame size",
        )?;
        check(
            unsafe { ffi4::hailo_get_output_vstream_frame_size(me.output, &mut me.out_frame) },
            "output frame size",
        )?;
        let expected = settings.input_width as usize * settings.input_height as usize * 3 * 4;
        if me.in_frame != expected {
            return Err(BackendError::Load(format!(
                "the HEF's input frame is {} bytes, the release's {}x{} RGB float input is {expected}",
                me.in_frame, settings.input_width, settings.input_height
            )));
        }
        // SAFETY: one quant info entry; valid out-pointers.
        let mut quant: sys::hailo_quant_info_t = unsafe { std::mem::zeroed() };
        let mut n_quant = 1usize;
        check(
            unsafe {
                sys::hailo_get_output_vstream_quant_infos(me.output, &mut quant, &mut n_quant)
            },
            "output quantisation",
        )?;
        if n_quant < 1 || !(quant.qp_scale.is_finite() && quant.qp_scale > 0.0) {
            return Err(BackendError::Load(
                "the output vstream has no usable quantisation info".into(),
            ));
        }
        me.zero_point = quant.qp_zp;
        me.scale = quant.qp_scale;
        me.raw = vec![0; me.out_frame];
        Ok(me)
    }
}

impl Embedder for HailoEmbedder {
    fn embed(&mut self, input: &[f32], batch: usize) -> Result<Vec<f32>, BackendError> {
        let per = self.in_frame / 4;
        if input.len() != batch * per {
            return Err(BackendError::Run(format!(
                "expected {} values for {batch} images, got {}",
                batch * per,
                input.len()
            )));
        }
        let mut out = Vec::with_capacity(batch * self.out_frame);
        let (w, h) = (
            self.settings.input_width as usize,
            self.settings.input_height as usize,
        );
        for img in input.chunks(per) {
            let frame: &[f32] = match self.settings.layout {
                ChannelLayout::Nhwc => img,
                ChannelLayout::Nchw => {
                    self.nhwc.resize(per, 0.0);
                    let plane = w * h;
                    for i in 0..plane {
                        for c in 0..3 {
                            self.nhwc[i * 3 + c] = img[c * plane + i];
                        }
                    }
                    &self.nhwc
                }
            };
            // SAFETY: `frame` holds exactly in_frame bytes; `raw` exactly out_frame bytes.
            let s = unsafe {
                ffi4::hailo_vstream_write_raw_buffer(
                    self.input,
                    frame.as_ptr().cast(),
                    self.in_frame,
                )
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
                    self.raw.as_mut_ptr().cast(),
                    self.out_frame,
                )
            };
            if s != sys::HAILO_SUCCESS {
                return Err(BackendError::Run(format!(
                    "read from the output vstream: {}",
                    message(s)
                )));
            }
            out.extend(
                self.raw
                    .iter()
                    .map(|q| (f32::from(*q) - self.zero_point) * self.scale),
            );
        }
        Ok(out)
    }

    fn dim(&self) -> usize {
        self.out_frame
    }

    fn name(&self) -> &'static str {
        "hailo"
    }
}

impl Drop for HailoEmbedder {
    fn drop(&mut self) {
        // SAFETY: each handle was created once by HailoRT and is released once, streams before the HEF.
        unsafe {
            if !self.input.is_null() {
                ffi4::hailo_release_input_vstreams(&self.input, 1);
            }
            if !self.output.is_null() {
                ffi4::hailo_release_output_vstreams(&self.output, 1);
            }
            if !self.hef.is_null() {
                sys::hailo_release_hef(self.hef);
            }
        }
    }
}

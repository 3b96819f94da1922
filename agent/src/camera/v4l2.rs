//! `v4l2:/dev/videoN`: a USB camera, or any V4L2 capture device, read through the kernel's V4L2 API
//! (videodev2.h's structs and request codes as the `v4l` crate binds them).
//!
//! - **Format.** MJPEG when the device offers it (frames pass through undecoded until analysed, as from
//!   rpicam-vid), else packed YUYV; the frame size the largest the device offers up to 1280x960 (the
//!   smallest when it offers nothing that small); the rate `camera_fps` when the device lets it be set.
//! - **Streaming.** Buffers mapped from the driver (streaming I/O, what UVC cameras do): each filled
//!   buffer is copied into the camera's slot and handed straight back, so the driver always has buffers
//!   to fill and nothing queues here.
//! - **Failing.** The reading thread waits for a frame [`POLL`] at a time, so it sees a stop within that;
//!   a device that fills nothing for the source's silence limit counts as dead, and one unplugged
//!   (`ENODEV`) fails at once; the source reopens either with its backoff.
//!
//! The ioctls are this module's own rather than the `v4l` crate's device and stream types: those
//! panic on what a driver may say (a colour space newer than the crate, a name cut inside a UTF-8
//! character, a stream that will not stop), and a camera must never take the agent down.

use super::{CameraState, Frame, Slot};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use v4l::v4l_sys;
use v4l::v4l2::{self, vidioc};

/// The frame size asked for (the size rpicam-vid is given on a Pi).
pub const WIDTH: u32 = 1280;
pub const HEIGHT: u32 = 960;
/// Buffers mapped from the driver: one being copied, the rest for the driver to fill meanwhile.
const BUFFERS: u32 = 4;
/// How long the reader waits for a frame before it looks at its stop flag.
const POLL: Duration = Duration::from_millis(200);
/// The most bytes one buffer may be (a 4K YUYV frame is 16.6 MB).
const MAX_BUFFER: u32 = 32 << 20;

const CAPTURE: u32 = v4l_sys::v4l2_buf_type_V4L2_BUF_TYPE_VIDEO_CAPTURE;
const MMAP: u32 = v4l_sys::v4l2_memory_V4L2_MEMORY_MMAP;

/// The pixel formats read, in the order preferred.
pub const MJPG: u32 = u32::from_le_bytes(*b"MJPG");
pub const YUYV: u32 = u32::from_le_bytes(*b"YUYV");

/// A pixel format's four characters, for messages.
pub fn fourcc(code: u32) -> String {
    code.to_le_bytes()
        .iter()
        .map(|&b| {
            if b.is_ascii_graphic() {
                char::from(b)
            } else {
                '?'
            }
        })
        .collect::<String>()
        .trim_end_matches('?')
        .to_owned()
}

/// What the device was set to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    pub format: u32,
    pub width: u32,
    pub height: u32,
    /// Bytes a row (YUYV).
    pub stride: u32,
}

/// Reads frames from the V4L2 device at `path` into `slot` until `stop` (then `Ok`); `Err` says why the
/// device cannot be read (it is reopened by the caller).
pub fn capture(
    path: &Path,
    fps: u32,
    silence: Duration,
    slot: &Slot,
    state: &CameraState,
    stop: &AtomicBool,
) -> Result<(), String> {
    let shown = path.display();
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("cannot open {shown}: {e}"))?;
    let caps = query_caps(&dev).map_err(|e| format!("{shown} is not a V4L2 device: {e}"))?;
    let card = c_string(&caps.card);
    let device_caps = if caps.capabilities & v4l_sys::V4L2_CAP_DEVICE_CAPS != 0 {
        caps.device_caps
    } else {
        caps.capabilities
    };
    if device_caps & v4l_sys::V4L2_CAP_VIDEO_CAPTURE == 0 {
        return Err(format!("{shown} ({card}) does not capture video"));
    }
    if device_caps & v4l_sys::V4L2_CAP_STREAMING == 0 {
        return Err(format!("{shown} ({card}) has no streaming I/O"));
    }
    let set = negotiate(&dev, fps).map_err(|e| format!("{shown} ({card}): {e}"))?;
    tracing::info!(
        device = %shown, card = %card, format = %fourcc(set.format), width = set.width,
        height = set.height, "camera streaming"
    );
    let mut ring =
        Ring::map(&dev, BUFFERS).map_err(|e| format!("{shown}: mapping buffers: {e}"))?;
    ring.start()
        .map_err(|e| format!("{shown}: starting the stream: {e}"))?;
    // Unplugged, the device answers ENODEV to whichever call comes next: waiting for a frame or
    // handing one back.
    let failed = |doing: &str, e: io::Error| {
        if e.raw_os_error() == Some(libc::ENODEV) {
            format!("{shown} is gone (unplugged?)")
        } else {
            format!("{shown}: {doing}: {e}")
        }
    };
    let mut last = Instant::now();
    let mut refused = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let filled = ring.next(POLL).map_err(|e| failed("reading a frame", e))?;
        let Some((index, used, error)) = filled else {
            if last.elapsed() >= silence {
                return Err(format!("{shown} sent no frame for {} s", silence.as_secs()));
            }
            continue;
        };
        last = Instant::now();
        let bytes = ring.bytes(index, used);
        if error || bytes.is_empty() {
            refused += 1;
            state.stream(refused, 0);
        } else {
            slot.put(frame(&set, bytes));
        }
        ring.requeue(index)
            .map_err(|e| failed("handing a buffer back", e))?;
    }
    Ok(())
}

/// A filled buffer's bytes as a frame.
fn frame(set: &Negotiated, bytes: &[u8]) -> Frame {
    if set.format == MJPG {
        Frame::Jpeg(bytes.to_vec())
    } else {
        Frame::Yuyv {
            width: set.width,
            height: set.height,
            stride: set.stride,
            data: bytes.to_vec(),
        }
    }
}

/// One ioctl on the device. Each caller pairs `request` with the videodev2.h struct it takes (the
/// request code carries the struct's size, which the kernel copies in and out).
fn ioctl<T>(dev: &File, request: vidioc::_IOC_TYPE, arg: &mut T) -> io::Result<()> {
    loop {
        // SAFETY: `arg` is a live, exclusively borrowed `T` of the size the request names (see above);
        // the kernel reads and writes only within it.
        let r = unsafe { v4l2::ioctl(dev.as_raw_fd(), request, (arg as *mut T).cast()) };
        match r {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// A zeroed videodev2.h struct (all of them are plain data, for which zero bytes are a value).
fn zeroed<T: Copy>() -> T {
    // SAFETY: only instantiated with v4l_sys's C structs and unions of integers, arrays and raw
    // pointers, all valid as zero bytes.
    unsafe { std::mem::zeroed() }
}

fn query_caps(dev: &File) -> io::Result<v4l_sys::v4l2_capability> {
    let mut caps: v4l_sys::v4l2_capability = zeroed();
    ioctl(dev, vidioc::VIDIOC_QUERYCAP, &mut caps)?;
    Ok(caps)
}

/// A fixed-size C string field, up to its first NUL, whatever its bytes.
fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Sets the device's format, size and (when it can) rate.
fn negotiate(dev: &File, fps: u32) -> Result<Negotiated, String> {
    let mut offered = Vec::new();
    for index in 0..64 {
        let mut desc: v4l_sys::v4l2_fmtdesc = zeroed();
        desc.index = index;
        desc.type_ = CAPTURE;
        match ioctl(dev, vidioc::VIDIOC_ENUM_FMT, &mut desc) {
            Ok(()) => offered.push(desc.pixelformat),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
            Err(e) => return Err(format!("listing its formats: {e}")),
        }
    }
    let format = [MJPG, YUYV]
        .into_iter()
        .find(|f| offered.contains(f))
        .ok_or_else(|| {
            let list: Vec<String> = offered.iter().map(|&f| fourcc(f)).collect();
            format!(
                "offers neither MJPEG nor YUYV (it offers {})",
                if list.is_empty() {
                    "nothing".to_owned()
                } else {
                    list.join(", ")
                }
            )
        })?;
    let (width, height) = pick_size(&frame_sizes(dev, format)).unwrap_or((WIDTH, HEIGHT));
    let mut fmt: v4l_sys::v4l2_format = zeroed();
    fmt.type_ = CAPTURE;
    // SAFETY: `pix` is the union's member for a capture format (type_ above), and the union is zeroed.
    let pix = unsafe { &mut fmt.fmt.pix };
    pix.width = width;
    pix.height = height;
    pix.pixelformat = format;
    pix.field = v4l_sys::v4l2_field_V4L2_FIELD_NONE;
    ioctl(dev, vidioc::VIDIOC_S_FMT, &mut fmt)
        .map_err(|e| format!("setting {} {width}x{height}: {e}", fourcc(format)))?;
    // SAFETY: as above; the driver answered with the capture format it chose.
    let pix = unsafe { fmt.fmt.pix };
    if pix.pixelformat != format {
        return Err(format!(
            "asked for {}, it chose {}",
            fourcc(format),
            fourcc(pix.pixelformat)
        ));
    }
    let set = Negotiated {
        format,
        width: pix.width,
        height: pix.height,
        stride: pix.bytesperline,
    };
    if set.width == 0 || set.height == 0 || pix.sizeimage == 0 || pix.sizeimage > MAX_BUFFER {
        return Err(format!(
            "it chose {}x{} in frames of {} bytes",
            set.width, set.height, pix.sizeimage
        ));
    }
    if format == YUYV
        && (!set.width.is_multiple_of(2)
            || u64::from(set.stride) < u64::from(set.width) * 2
            || u64::from(pix.sizeimage) < u64::from(set.stride) * u64::from(set.height))
    {
        return Err(format!(
            "YUYV {}x{} at {} bytes a row in {} bytes is not whole frames",
            set.width, set.height, set.stride, pix.sizeimage
        ));
    }
    if fps > 0 {
        let mut parm: v4l_sys::v4l2_streamparm = zeroed();
        parm.type_ = CAPTURE;
        // SAFETY: `capture` is the union's member for a capture stream (type_ above).
        let cap = unsafe { &mut parm.parm.capture };
        cap.timeperframe.numerator = 1;
        cap.timeperframe.denominator = fps;
        // Not every device sets its rate; the analysis paces itself whatever the camera sends.
        if let Err(e) = ioctl(dev, vidioc::VIDIOC_S_PARM, &mut parm) {
            tracing::debug!(error = %e, fps, "the camera's frame rate cannot be set");
        }
    }
    Ok(set)
}

/// A frame size a device offers for a format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameSize {
    Discrete(u32, u32),
    /// Any width from `min.0` to `max.0` in steps of `step.0`, the same for heights.
    Stepwise {
        min: (u32, u32),
        max: (u32, u32),
        step: (u32, u32),
    },
}

fn frame_sizes(dev: &File, format: u32) -> Vec<FrameSize> {
    let mut sizes = Vec::new();
    for index in 0..256 {
        let mut e: v4l_sys::v4l2_frmsizeenum = zeroed();
        e.index = index;
        e.pixel_format = format;
        if ioctl(dev, vidioc::VIDIOC_ENUM_FRAMESIZES, &mut e).is_err() {
            break;
        }
        if e.type_ == v4l_sys::v4l2_frmsizetypes_V4L2_FRMSIZE_TYPE_DISCRETE {
            // SAFETY: `discrete` is the union's member for a discrete size (type_).
            let d = unsafe { e.__bindgen_anon_1.discrete };
            sizes.push(FrameSize::Discrete(d.width, d.height));
        } else {
            // SAFETY: `stepwise` is the member for stepwise and continuous sizes (type_).
            let s = unsafe { e.__bindgen_anon_1.stepwise };
            sizes.push(FrameSize::Stepwise {
                min: (s.min_width, s.min_height),
                max: (s.max_width, s.max_height),
                step: (s.step_width.max(1), s.step_height.max(1)),
            });
            break;
        }
    }
    sizes
}

/// The size to ask for: the largest offered that fits 1280x960, else the smallest offered; `None`
/// when the device lists none (it is asked for 1280x960 and chooses).
pub fn pick_size(sizes: &[FrameSize]) -> Option<(u32, u32)> {
    let fits = |(w, h): (u32, u32)| w <= WIDTH && h <= HEIGHT;
    let area = |(w, h): (u32, u32)| u64::from(w) * u64::from(h);
    let candidates: Vec<(u32, u32)> = sizes
        .iter()
        .map(|s| match *s {
            FrameSize::Discrete(w, h) => (w, h),
            FrameSize::Stepwise { min, max, step } => {
                // The largest step at or under the goal, kept within the range.
                let fit = |goal: u32, min: u32, max: u32, step: u32| {
                    let g = goal.clamp(min, max.max(min));
                    min + (g - min) / step * step
                };
                (
                    fit(WIDTH, min.0, max.0, step.0),
                    fit(HEIGHT, min.1, max.1, step.1),
                )
            }
        })
        .filter(|&(w, h)| w > 0 && h > 0)
        .collect();
    candidates
        .iter()
        .copied()
        .filter(|&s| fits(s))
        .max_by_key(|&s| area(s))
        .or_else(|| candidates.iter().copied().min_by_key(|&s| area(s)))
}

/// The driver's buffers mapped into the agent. Dropping it stops the stream, unmaps the buffers and
/// frees them, ignoring what a vanished device answers.
struct Ring<'a> {
    dev: &'a File,
    maps: Vec<(*mut libc::c_void, usize)>,
    streaming: bool,
}

impl<'a> Ring<'a> {
    fn map(dev: &'a File, count: u32) -> io::Result<Ring<'a>> {
        let mut req: v4l_sys::v4l2_requestbuffers = zeroed();
        req.count = count;
        req.type_ = CAPTURE;
        req.memory = MMAP;
        ioctl(dev, vidioc::VIDIOC_REQBUFS, &mut req)?;
        let mut ring = Ring {
            dev,
            maps: Vec::new(),
            streaming: false,
        };
        if req.count == 0 {
            return Err(io::Error::other("the driver gave no buffers"));
        }
        for index in 0..req.count.min(count * 2) {
            let mut buf = ring.desc(index);
            ioctl(dev, vidioc::VIDIOC_QUERYBUF, &mut buf)?;
            if buf.length == 0 || buf.length > MAX_BUFFER {
                return Err(io::Error::other(format!(
                    "the driver offers a buffer of {} bytes",
                    buf.length
                )));
            }
            // SAFETY: for an MMAP buffer the driver fills `offset` (the union's member for it).
            let offset = unsafe { buf.m.offset };
            let len = buf.length as usize;
            // SAFETY: a fresh shared mapping of the device at the driver's offset, of the buffer's
            // length; it is unmapped once, on drop, and read only within `len`.
            let ptr = unsafe {
                v4l2::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    dev.as_raw_fd(),
                    libc::off_t::from(offset),
                )
            }?;
            ring.maps.push((ptr, len));
        }
        Ok(ring)
    }

    fn desc(&self, index: u32) -> v4l_sys::v4l2_buffer {
        let mut buf: v4l_sys::v4l2_buffer = zeroed();
        buf.index = index;
        buf.type_ = CAPTURE;
        buf.memory = MMAP;
        buf
    }

    /// Queues every buffer and starts streaming.
    fn start(&mut self) -> io::Result<()> {
        for index in 0..self.maps.len() as u32 {
            self.requeue(index)?;
        }
        let mut typ = CAPTURE as libc::c_int;
        ioctl(self.dev, vidioc::VIDIOC_STREAMON, &mut typ)?;
        self.streaming = true;
        Ok(())
    }

    /// The next filled buffer within `wait`: its index, the bytes used and whether the driver marked
    /// it damaged; `None` when none came.
    fn next(&mut self, wait: Duration) -> io::Result<Option<(u32, usize, bool)>> {
        let mut fd = libc::pollfd {
            fd: self.dev.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(wait.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd, for the call's duration.
        let n = unsafe { libc::poll(&mut fd, 1, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(None)
            } else {
                Err(e)
            };
        }
        if n == 0 {
            return Ok(None);
        }
        // Dequeue even on POLLERR: what the driver answers then says why (ENODEV: unplugged).
        let mut buf = self.desc(0);
        match ioctl(self.dev, vidioc::VIDIOC_DQBUF, &mut buf) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return if fd.revents & (libc::POLLERR | libc::POLLHUP) != 0 {
                    Err(io::Error::other("the device reports an error (POLLERR)"))
                } else {
                    Ok(None)
                };
            }
            Err(e) => return Err(e),
        }
        let Some(&(_, len)) = self.maps.get(buf.index as usize) else {
            return Err(io::Error::other(format!(
                "the driver returned buffer {} of {}",
                buf.index,
                self.maps.len()
            )));
        };
        let error = buf.flags & v4l_sys::V4L2_BUF_FLAG_ERROR != 0;
        Ok(Some((buf.index, (buf.bytesused as usize).min(len), error)))
    }

    /// The first `used` bytes of buffer `index` (dequeued, so the driver is not writing it).
    fn bytes(&self, index: u32, used: usize) -> &[u8] {
        match self.maps.get(index as usize) {
            // SAFETY: the mapping is live until drop and `used` is within its length (`next`).
            Some(&(ptr, len)) => unsafe {
                std::slice::from_raw_parts(ptr.cast::<u8>(), used.min(len))
            },
            None => &[],
        }
    }

    fn requeue(&mut self, index: u32) -> io::Result<()> {
        let mut buf = self.desc(index);
        ioctl(self.dev, vidioc::VIDIOC_QBUF, &mut buf)
    }
}

impl Drop for Ring<'_> {
    fn drop(&mut self) {
        if self.streaming {
            let mut typ = CAPTURE as libc::c_int;
            let _ = ioctl(self.dev, vidioc::VIDIOC_STREAMOFF, &mut typ);
        }
        for &(ptr, len) in &self.maps {
            // SAFETY: each mapping was made by `map` with this length and is unmapped once, here.
            let _ = unsafe { v4l2::munmap(ptr, len) };
        }
        let mut req: v4l_sys::v4l2_requestbuffers = zeroed();
        req.type_ = CAPTURE;
        req.memory = MMAP;
        let _ = ioctl(self.dev, vidioc::VIDIOC_REQBUFS, &mut req);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_size_asked_for_is_the_largest_up_to_1280x960_else_the_smallest() {
        use FrameSize::Discrete as D;
        let uvc = [
            D(640, 480),
            D(1920, 1080),
            D(1280, 960),
            D(1280, 720),
            D(320, 240),
        ];
        assert_eq!(pick_size(&uvc), Some((1280, 960)));
        assert_eq!(pick_size(&[D(800, 600), D(1280, 720)]), Some((1280, 720)));
        assert_eq!(
            pick_size(&[D(2592, 1944), D(1920, 1080)]),
            Some((1920, 1080))
        );
        let step = FrameSize::Stepwise {
            min: (16, 16),
            max: (4096, 2160),
            step: (16, 8),
        };
        assert_eq!(pick_size(&[step]), Some((1280, 960)));
        let odd = FrameSize::Stepwise {
            min: (100, 100),
            max: (1000, 700),
            step: (7, 3),
        };
        assert_eq!(pick_size(&[odd]), Some((996, 700)));
        assert_eq!(pick_size(&[]), None);
    }

    #[test]
    fn pixel_formats_show_as_their_four_characters() {
        assert_eq!(fourcc(MJPG), "MJPG");
        assert_eq!(fourcc(YUYV), "YUYV");
        assert_eq!(fourcc(u32::from_le_bytes(*b"GREY")), "GREY");
        assert_eq!(fourcc(u32::from_le_bytes([b'Y', b'1', b'0', b' '])), "Y10");
        assert_eq!(c_string(b"UVC Camera\0\xff\xfe"), "UVC Camera");
        assert_eq!(c_string(b"Cam\xc3"), "Cam\u{fffd}");
    }
}

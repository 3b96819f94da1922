//! A stand-in USB camera for the `v4l2:` source: a FUSE file that answers the V4L2 ioctls a UVC
//! capture device answers, through the kernel's own ioctl and mmap paths (FUSE passes an ioctl whose
//! code carries its struct's size to the filesystem, and serves a shared mapping from the page cache).
//! No V4L2 driver can be loaded here (no v4l2loopback, no CUSE); this file stands in for
//! `/dev/videoN`, the agent opens it like one and cannot tell.
//!
//! - **Formats.** It offers the formats it is built with (MJPEG, YUYV, or anything else a test wants
//!   refused) at 1920x1080 and 1280x960, and fixes any other size asked for to 1280x960, as drivers do.
//! - **Frames.** The scene script's frames in order, at `fps`, then the empty counter: for MJPEG a JPEG
//!   without Huffman tables (as many UVC cameras send it), for YUYV the frame converted (BT.601,
//!   limited range).
//! - **Buffers.** `VIDIOC_REQBUFS` gives up to 8 buffers at fixed offsets in the file; `VIDIOC_DQBUF`
//!   waits for the next frame (at most 150 ms: a camera that sends nothing answers `EAGAIN`, as with
//!   `O_NONBLOCK`), writes it into the kernel's cached pages of the dequeued buffer (FUSE's store
//!   notification, so the caller's mapping sees it) and says how many bytes it used.
//! - **Faults.** [`StandIn::unplug`] makes the device vanish (`ENODEV` to an open file, `ENOENT` to a
//!   new open) until [`StandIn::plug`].

use deckhand_tools::shop::scenes::Script;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, IoctlFlags, LockOwner,
    OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyOpen,
    Request,
};
use std::collections::VecDeque;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};
use v4l::v4l_sys;
use v4l::v4l2::vidioc;

const ROOT: u64 = 1;
const DEVICE: u64 = 2;
const NAME: &str = "video0";
const TTL: Duration = Duration::ZERO;
/// Every buffer's room: a 1280x960 YUYV frame, whole pages.
const BUF_LEN: u32 = 1280 * 960 * 2;
const MAX_BUFS: u32 = 8;
/// How long a `VIDIOC_DQBUF` waits for a frame before it answers `EAGAIN`.
const DQBUF_WAIT: Duration = Duration::from_millis(150);
const SIZES: [(u32, u32); 2] = [(1920, 1080), (1280, 960)];

pub const MJPG: u32 = u32::from_le_bytes(*b"MJPG");
pub const YUYV: u32 = u32::from_le_bytes(*b"YUYV");

/// What the tests see of the device.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    /// Opens of the device.
    pub opens: u32,
    /// The formats set, in order (fourcc, width, height).
    pub formats: Vec<(u32, u32, u32)>,
    /// Frames handed out.
    pub frames: u64,
    /// Whether the device is streaming now.
    pub streaming: bool,
}

struct State {
    formats: Vec<u32>,
    fps: u32,
    script: Arc<Script>,
    /// The format set: fourcc, width, height.
    format: (u32, u32, u32),
    buffers: u32,
    queued: VecDeque<u32>,
    /// The bytes in each buffer, as the page cache holds them (served again if the kernel drops them).
    contents: Vec<Vec<u8>>,
    streaming: bool,
    started: Instant,
    next: u64,
    unplugged: bool,
    seen: Seen,
}

struct Fs {
    state: Arc<Mutex<State>>,
    notifier: Arc<OnceLock<fuser::Notifier>>,
}

/// The mounted stand-in; unmounted when dropped.
pub struct StandIn {
    state: Arc<Mutex<State>>,
    session: Option<fuser::BackgroundSession>,
    dir: PathBuf,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl StandIn {
    /// Mounts a camera offering `formats` (fourccs, in the order it lists them) at `dir` (an empty
    /// directory), sending `script`'s frames at `fps`.
    pub fn mount(dir: &Path, formats: &[u32], script: Arc<Script>, fps: u32) -> StandIn {
        let state = Arc::new(Mutex::new(State {
            formats: formats.to_vec(),
            fps: fps.max(1),
            script,
            format: (formats.first().copied().unwrap_or(MJPG), 1280, 960),
            buffers: 0,
            queued: VecDeque::new(),
            contents: Vec::new(),
            streaming: false,
            started: Instant::now(),
            next: 0,
            unplugged: false,
            seen: Seen::default(),
        }));
        let notifier = Arc::new(OnceLock::new());
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName("deckhand-v4l2-standin".into()),
            fuser::MountOption::Subtype("v4l2standin".into()),
            fuser::MountOption::RW,
        ];
        // One thread may wait in VIDIOC_DQBUF while another serves the page reads of a mapping.
        config.n_threads = Some(3);
        let fs = Fs {
            state: state.clone(),
            notifier: notifier.clone(),
        };
        let session = fuser::spawn_mount(fs, dir, &config).expect("mount the stand-in camera");
        let _ = notifier.set(session.notifier());
        StandIn {
            state,
            session: Some(session),
            dir: dir.to_owned(),
        }
    }

    /// The device's path, for `v4l2:`.
    pub fn path(&self) -> PathBuf {
        self.dir.join(NAME)
    }

    pub fn seen(&self) -> Seen {
        let s = lock(&self.state);
        Seen {
            streaming: s.streaming,
            ..s.seen.clone()
        }
    }

    /// The camera is pulled out: open files fail with ENODEV, the device node is gone.
    pub fn unplug(&self) {
        let mut s = lock(&self.state);
        s.unplugged = true;
        s.streaming = false;
    }

    /// The camera is back (its frames go on where they were).
    pub fn plug(&self) {
        lock(&self.state).unplugged = false;
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        lock(&self.state).unplugged = true;
        drop(self.session.take());
    }
}

fn attr(ino: u64) -> FileAttr {
    let now = SystemTime::now();
    let (kind, size, perm) = if ino == ROOT {
        (FileType::Directory, 0, 0o755)
    } else {
        (
            FileType::RegularFile,
            u64::from(BUF_LEN) * u64::from(MAX_BUFS),
            0o660,
        )
    };
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: now,
        mtime: now,
        ctime: now,
        crtime: now,
        kind,
        perm,
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

/// A videodev2.h struct read from the ioctl's input (zeroes where the input is short).
fn read<T: Copy>(bytes: &[u8]) -> T {
    // SAFETY: the v4l_sys structs are plain data, valid as any bytes.
    let mut t: T = unsafe { std::mem::zeroed() };
    let n = bytes.len().min(std::mem::size_of::<T>());
    // SAFETY: copies at most size_of::<T>() initialised bytes into `t`.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), (&raw mut t).cast::<u8>(), n) };
    t
}

fn bytes<T: Copy>(t: &T) -> Vec<u8> {
    // SAFETY: reads the struct's own size_of::<T>() bytes, through a live reference.
    unsafe { std::slice::from_raw_parts((t as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
        .to_vec()
}

fn c_name(dst: &mut [u8], name: &str) {
    for (d, s) in dst.iter_mut().zip(name.bytes()) {
        *d = s;
    }
}

/// RGB to packed YUYV, BT.601 limited range (the inverse of the agent's conversion).
pub fn rgb_to_yuyv(img: &image::RgbImage) -> Vec<u8> {
    let mut out = Vec::with_capacity(img.as_raw().len() / 3 * 2);
    let luma = |p: [u8; 3]| {
        let (r, g, b) = (i32::from(p[0]), i32::from(p[1]), i32::from(p[2]));
        (((66 * r + 129 * g + 25 * b + 128) >> 8) + 16) as u8
    };
    for row in img.as_raw().chunks_exact(img.width() as usize * 3) {
        for pair in row.chunks_exact(6) {
            let a = [pair[0], pair[1], pair[2]];
            let b = [pair[3], pair[4], pair[5]];
            let (r, g, bl) = (
                (i32::from(a[0]) + i32::from(b[0])) / 2,
                (i32::from(a[1]) + i32::from(b[1])) / 2,
                (i32::from(a[2]) + i32::from(b[2])) / 2,
            );
            let u = (((-38 * r - 74 * g + 112 * bl + 128) >> 8) + 128).clamp(0, 255) as u8;
            let v = (((112 * r - 94 * g - 18 * bl + 128) >> 8) + 128).clamp(0, 255) as u8;
            out.extend([luma(a), u, luma(b), v]);
        }
    }
    out
}

/// A JPEG without its Huffman tables (its DHT segments), as many UVC cameras send MJPEG (the decoder
/// must know JPEG's standard tables).
pub fn without_huffman_tables(jpeg: &[u8]) -> Vec<u8> {
    let mut out = jpeg[..2].to_vec();
    let mut at = 2;
    while at + 4 <= jpeg.len() && jpeg[at] == 0xFF && jpeg[at + 1] != 0xDA {
        let len = usize::from(u16::from_be_bytes([jpeg[at + 2], jpeg[at + 3]]));
        if jpeg[at + 1] != 0xC4 {
            out.extend(&jpeg[at..at + 2 + len]);
        }
        at += 2 + len;
    }
    out.extend(&jpeg[at..]);
    out
}

impl Fs {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// The frame to hand out as buffer bytes, in the format set.
    fn render(script: &Script, n: u64, format: u32) -> Vec<u8> {
        let i = usize::try_from(n).unwrap_or(usize::MAX);
        let image = if i < script.len() {
            script.frame(i).0
        } else {
            script.empty()
        };
        if format == YUYV {
            rgb_to_yuyv(&image)
        } else {
            let mut jpeg = Vec::new();
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 85)
                .encode_image(&image)
                .expect("encode a frame");
            without_huffman_tables(&jpeg)
        }
    }

    fn dqbuf(&self, mut buf: v4l_sys::v4l2_buffer) -> Result<Vec<u8>, Errno> {
        let (due, format, script, n) = {
            let s = self.lock();
            if !s.streaming {
                return Err(Errno::EINVAL);
            }
            if s.queued.is_empty() {
                drop(s);
                std::thread::sleep(DQBUF_WAIT);
                return Err(Errno::EAGAIN);
            }
            let due = s.started + Duration::from_secs_f64(s.next as f64 / f64::from(s.fps));
            (due, s.format.0, s.script.clone(), s.next)
        };
        let wait = due.saturating_duration_since(Instant::now());
        if wait > DQBUF_WAIT {
            std::thread::sleep(DQBUF_WAIT);
            return Err(Errno::EAGAIN);
        }
        std::thread::sleep(wait);
        let frame = Self::render(&script, n, format);
        let index = {
            let mut s = self.lock();
            if s.unplugged {
                return Err(Errno::ENODEV);
            }
            let Some(index) = s.queued.pop_front() else {
                return Err(Errno::EAGAIN);
            };
            s.next += 1;
            s.seen.frames += 1;
            s.contents[index as usize] = frame.clone();
            index
        };
        if let Some(n) = self.notifier.get() {
            n.store(
                INodeNo(DEVICE),
                u64::from(index) * u64::from(BUF_LEN),
                &frame,
            )
            .map_err(|_| Errno::EIO)?;
        }
        buf.index = index;
        buf.bytesused = frame.len() as u32;
        buf.flags = v4l_sys::V4L2_BUF_FLAG_MAPPED | v4l_sys::V4L2_BUF_FLAG_DONE;
        buf.field = v4l_sys::v4l2_field_V4L2_FIELD_NONE;
        buf.sequence = n as u32;
        buf.m.offset = index * BUF_LEN;
        buf.length = BUF_LEN;
        Ok(bytes(&buf))
    }

    fn ioctl(&self, cmd: vidioc::_IOC_TYPE, input: &[u8]) -> Result<Vec<u8>, Errno> {
        if self.lock().unplugged {
            return Err(Errno::ENODEV);
        }
        let capture = v4l_sys::v4l2_buf_type_V4L2_BUF_TYPE_VIDEO_CAPTURE;
        match cmd {
            c if c == vidioc::VIDIOC_QUERYCAP => {
                let mut caps: v4l_sys::v4l2_capability = read(&[]);
                c_name(&mut caps.driver, "uvcvideo");
                c_name(&mut caps.card, "deckhand stand-in camera");
                c_name(&mut caps.bus_info, "usb-standin-1");
                caps.version = 0x0006_1200;
                caps.device_caps = v4l_sys::V4L2_CAP_VIDEO_CAPTURE | v4l_sys::V4L2_CAP_STREAMING;
                caps.capabilities = caps.device_caps | v4l_sys::V4L2_CAP_DEVICE_CAPS;
                Ok(bytes(&caps))
            }
            c if c == vidioc::VIDIOC_ENUM_FMT => {
                let mut d: v4l_sys::v4l2_fmtdesc = read(input);
                let s = self.lock();
                let f = *s.formats.get(d.index as usize).ok_or(Errno::EINVAL)?;
                d.pixelformat = f;
                d.flags = if f == MJPG { 1 } else { 0 };
                c_name(
                    &mut d.description,
                    if f == MJPG { "Motion-JPEG" } else { "raw" },
                );
                Ok(bytes(&d))
            }
            c if c == vidioc::VIDIOC_ENUM_FRAMESIZES => {
                let mut e: v4l_sys::v4l2_frmsizeenum = read(input);
                if !self.lock().formats.contains(&e.pixel_format) {
                    return Err(Errno::EINVAL);
                }
                let (w, h) = *SIZES.get(e.index as usize).ok_or(Errno::EINVAL)?;
                e.type_ = v4l_sys::v4l2_frmsizetypes_V4L2_FRMSIZE_TYPE_DISCRETE;
                e.__bindgen_anon_1.discrete = v4l_sys::v4l2_frmsize_discrete {
                    width: w,
                    height: h,
                };
                Ok(bytes(&e))
            }
            c if c == vidioc::VIDIOC_G_FMT || c == vidioc::VIDIOC_S_FMT => {
                let mut f: v4l_sys::v4l2_format = read(input);
                if f.type_ != capture {
                    return Err(Errno::EINVAL);
                }
                let mut s = self.lock();
                if c == vidioc::VIDIOC_S_FMT {
                    if s.streaming || s.buffers > 0 {
                        return Err(Errno::EBUSY);
                    }
                    // SAFETY: `pix` is the capture member; the input is plain data.
                    let asked = unsafe { f.fmt.pix };
                    let fourcc = if s.formats.contains(&asked.pixelformat) {
                        asked.pixelformat
                    } else {
                        s.formats.first().copied().unwrap_or(MJPG)
                    };
                    // Only the script's size is sent; anything else asked is fixed to it.
                    s.format = (fourcc, 1280, 960);
                    let set = s.format;
                    s.seen.formats.push(set);
                }
                let (fourcc, w, h) = s.format;
                let pix = v4l_sys::v4l2_pix_format {
                    width: w,
                    height: h,
                    pixelformat: fourcc,
                    field: v4l_sys::v4l2_field_V4L2_FIELD_NONE,
                    bytesperline: if fourcc == YUYV { w * 2 } else { 0 },
                    sizeimage: BUF_LEN,
                    colorspace: if fourcc == YUYV {
                        v4l_sys::v4l2_colorspace_V4L2_COLORSPACE_SMPTE170M
                    } else {
                        v4l_sys::v4l2_colorspace_V4L2_COLORSPACE_JPEG
                    },
                    ..read(&[])
                };
                f.fmt.pix = pix;
                Ok(bytes(&f))
            }
            c if c == vidioc::VIDIOC_S_PARM || c == vidioc::VIDIOC_G_PARM => {
                let mut p: v4l_sys::v4l2_streamparm = read(input);
                let mut s = self.lock();
                // SAFETY: `capture` is the member for a capture stream; plain data.
                let asked = unsafe { p.parm.capture.timeperframe };
                if c == vidioc::VIDIOC_S_PARM && asked.numerator == 1 && asked.denominator > 0 {
                    s.fps = asked.denominator.clamp(1, 30);
                }
                p.parm.capture = v4l_sys::v4l2_captureparm {
                    capability: v4l_sys::V4L2_CAP_TIMEPERFRAME,
                    timeperframe: v4l_sys::v4l2_fract {
                        numerator: 1,
                        denominator: s.fps,
                    },
                    ..read(&[])
                };
                Ok(bytes(&p))
            }
            c if c == vidioc::VIDIOC_REQBUFS => {
                let mut r: v4l_sys::v4l2_requestbuffers = read(input);
                if r.type_ != capture || r.memory != v4l_sys::v4l2_memory_V4L2_MEMORY_MMAP {
                    return Err(Errno::EINVAL);
                }
                let mut s = self.lock();
                if s.streaming {
                    return Err(Errno::EBUSY);
                }
                let n = if r.count == 0 {
                    0
                } else {
                    r.count.clamp(2, MAX_BUFS)
                };
                s.buffers = n;
                s.queued.clear();
                s.contents = vec![Vec::new(); n as usize];
                r.count = n;
                Ok(bytes(&r))
            }
            c if c == vidioc::VIDIOC_QUERYBUF || c == vidioc::VIDIOC_QBUF => {
                let mut b: v4l_sys::v4l2_buffer = read(input);
                let mut s = self.lock();
                if b.type_ != capture || b.index >= s.buffers {
                    return Err(Errno::EINVAL);
                }
                if c == vidioc::VIDIOC_QBUF {
                    if s.queued.contains(&b.index) {
                        return Err(Errno::EINVAL);
                    }
                    s.queued.push_back(b.index);
                    b.flags = v4l_sys::V4L2_BUF_FLAG_MAPPED | v4l_sys::V4L2_BUF_FLAG_QUEUED;
                } else {
                    b.flags = v4l_sys::V4L2_BUF_FLAG_MAPPED;
                }
                b.memory = v4l_sys::v4l2_memory_V4L2_MEMORY_MMAP;
                b.m.offset = b.index * BUF_LEN;
                b.length = BUF_LEN;
                Ok(bytes(&b))
            }
            c if c == vidioc::VIDIOC_DQBUF => self.dqbuf(read(input)),
            c if c == vidioc::VIDIOC_STREAMON || c == vidioc::VIDIOC_STREAMOFF => {
                let mut s = self.lock();
                if c == vidioc::VIDIOC_STREAMON {
                    if s.buffers == 0 {
                        return Err(Errno::EINVAL);
                    }
                    if !s.streaming {
                        s.streaming = true;
                        // Frames go on from where they were, due from now.
                        s.started = Instant::now()
                            - Duration::from_secs_f64(s.next as f64 / f64::from(s.fps));
                    }
                } else {
                    s.streaming = false;
                    s.queued.clear();
                }
                Ok(Vec::new())
            }
            _ => Err(Errno::ENOTTY),
        }
    }
}

impl fuser::Filesystem for Fs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 == ROOT && name == NAME && !self.lock().unplugged {
            reply.entry(&TTL, &attr(DEVICE), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match ino.0 {
            ROOT | DEVICE => reply.attr(&TTL, &attr(ino.0)),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let mut s = self.lock();
        if ino.0 != DEVICE || s.unplugged {
            return reply.error(Errno::ENOENT);
        }
        s.seen.opens += 1;
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // Closing the device stops its stream and frees its buffers, as a driver does.
        let mut s = self.lock();
        s.streaming = false;
        s.buffers = 0;
        s.queued.clear();
        reply.ok();
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino.0 != DEVICE {
            return reply.error(Errno::EISDIR);
        }
        // The pages of a mapping the kernel had dropped: the buffer's bytes as last filled.
        let s = self.lock();
        let index = (offset / u64::from(BUF_LEN)) as usize;
        let within = (offset % u64::from(BUF_LEN)) as usize;
        let end = (within + size as usize).min(BUF_LEN as usize);
        let mut out = vec![0u8; end.saturating_sub(within)];
        if let Some(c) = s.contents.get(index)
            && within < c.len()
        {
            let n = (c.len() - within).min(out.len());
            out[..n].copy_from_slice(&c[within..within + n]);
        }
        reply.data(&out);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino.0 != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (ROOT, FileType::Directory, "."),
            (ROOT, FileType::Directory, ".."),
            (DEVICE, FileType::RegularFile, NAME),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        cmd: u32,
        in_data: &[u8],
        out_size: u32,
        reply: ReplyIoctl,
    ) {
        match self.ioctl(vidioc::_IOC_TYPE::from(cmd), in_data) {
            Ok(mut out) => {
                out.truncate(out_size as usize);
                reply.ioctl(0, &out);
            }
            Err(e) => reply.error(e),
        }
    }
}

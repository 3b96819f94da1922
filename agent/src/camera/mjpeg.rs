//! Motion JPEG: JPEG frames back to back in a byte stream (rpicam-vid's `--codec mjpeg -o -`, an IP
//! camera's multipart body, whose part headers are skipped as bytes between frames).
//!
//! Frames are found by walking the JPEG's own structure, not by searching for an end marker: the
//! header segments (each with its length, so an EXIF thumbnail's markers inside APP1 are passed over)
//! up to the start of scan, then the entropy-coded data, where `FF 00` is a stuffed byte and `FF D0`..
//! `FF D7` restart markers, until `FF D9`. A frame larger than the limit, or bytes that are not a JPEG,
//! are dropped and counted, and the splitter looks for the next start of image: garbage never stops
//! the stream and never grows the buffer past the limit.

/// The largest frame accepted (a 4K MJPEG frame is 1-3 MiB).
pub const MAX_FRAME: usize = 16 << 20;

/// Splits a byte stream into JPEG frames.
#[derive(Debug)]
pub struct Splitter {
    buf: Vec<u8>,
    limit: usize,
    /// Bytes dropped because they were not part of a frame (or a frame over the limit).
    pub skipped: u64,
    /// Frames refused: malformed, or over the limit.
    pub refused: u64,
}

enum Scan {
    /// A whole frame: `buf[start..end]`.
    Frame { start: usize, end: usize },
    /// Not enough bytes yet; keep from `start`.
    More { start: usize },
    /// Not a JPEG at `start` (or over the limit): drop up to `resume` and look again.
    Bad { resume: usize },
}

impl Splitter {
    pub fn new(limit: usize) -> Self {
        Splitter {
            buf: Vec::new(),
            limit,
            skipped: 0,
            refused: 0,
        }
    }

    /// Adds bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame, if the bytes so far hold one.
    pub fn next_frame(&mut self) -> Option<Vec<u8>> {
        loop {
            match scan(&self.buf, self.limit) {
                Scan::Frame { start, end } => {
                    self.skipped += start as u64;
                    let frame = self.buf[start..end].to_vec();
                    self.buf.drain(..end);
                    return Some(frame);
                }
                Scan::More { start } => {
                    self.skipped += start as u64;
                    self.buf.drain(..start);
                    return None;
                }
                Scan::Bad { resume } => {
                    self.refused += 1;
                    self.skipped += resume as u64;
                    self.buf.drain(..resume);
                }
            }
        }
    }

    /// Bytes held waiting for the rest of a frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// Where the next start of image (`FF D8 FF`) is, or where one could still begin.
fn find_soi(buf: &[u8]) -> Result<usize, usize> {
    let mut i = 0;
    while i + 2 < buf.len() {
        if buf[i] == 0xFF && buf[i + 1] == 0xD8 && buf[i + 2] == 0xFF {
            return Ok(i);
        }
        i += 1;
    }
    // Keep a possible partial marker at the end.
    Err(buf.len().saturating_sub(2))
}

fn scan(buf: &[u8], limit: usize) -> Scan {
    let start = match find_soi(buf) {
        Ok(s) => s,
        Err(keep_from) => return Scan::More { start: keep_from },
    };
    let bad = Scan::Bad { resume: start + 2 };
    let mut i = start + 2;
    // Header segments up to the start of scan.
    loop {
        if i - start > limit {
            return bad;
        }
        if i + 4 > buf.len() {
            return Scan::More { start };
        }
        if buf[i] != 0xFF {
            return bad;
        }
        let marker = buf[i + 1];
        match marker {
            // Fill bytes before a marker.
            0xFF => {
                i += 1;
                continue;
            }
            // A marker with no segment: TEM, RSTn outside a scan. Not expected in a header; accept.
            0x01 | 0xD0..=0xD7 => {
                i += 2;
                continue;
            }
            // End of image straight after the header: no scan, not a frame.
            0xD9 | 0xD8 => return bad,
            _ => {}
        }
        let len = usize::from(u16::from_be_bytes([buf[i + 2], buf[i + 3]]));
        if len < 2 {
            return bad;
        }
        i += 2 + len;
        if marker == 0xDA {
            break;
        }
    }
    // Entropy-coded data (and any further scans of a progressive JPEG) until end of image.
    loop {
        if i - start > limit {
            return bad;
        }
        if i + 1 >= buf.len() {
            return Scan::More { start };
        }
        if buf[i] != 0xFF {
            i += 1;
            continue;
        }
        match buf[i + 1] {
            0x00 | 0xD0..=0xD7 | 0xFF => i += if buf[i + 1] == 0xFF { 1 } else { 2 },
            0xD9 => {
                return Scan::Frame { start, end: i + 2 };
            }
            // A start of image inside a frame: the frame before it was cut short.
            0xD8 => return Scan::Bad { resume: i },
            // Another segment between scans (DHT, SOS, DRI...): skip it by its length.
            _ => {
                if i + 4 > buf.len() {
                    return Scan::More { start };
                }
                let len = usize::from(u16::from_be_bytes([buf[i + 2], buf[i + 3]]));
                if len < 2 {
                    return bad;
                }
                i += 2 + len;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jpeg(seed: u8) -> Vec<u8> {
        let img = image::RgbImage::from_fn(64, 48, |x, y| {
            image::Rgb([
                (x as u8).wrapping_mul(seed),
                (y as u8).wrapping_add(seed),
                seed,
            ])
        });
        let mut out = Vec::new();
        let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 80);
        img.write_with_encoder(enc).unwrap();
        out
    }

    #[test]
    fn frames_come_out_whole_however_the_stream_is_cut() {
        let frames: Vec<Vec<u8>> = (1..=5).map(jpeg).collect();
        let stream: Vec<u8> = frames.concat();
        for piece in [1, 7, 100, 4096, stream.len()] {
            let mut s = Splitter::new(MAX_FRAME);
            let mut got = Vec::new();
            for chunk in stream.chunks(piece) {
                s.push(chunk);
                while let Some(f) = s.next_frame() {
                    got.push(f);
                }
            }
            assert_eq!(got, frames, "pieces of {piece}");
            assert_eq!((s.skipped, s.refused), (0, 0));
        }
    }

    #[test]
    fn garbage_and_multipart_headers_between_frames_are_skipped_and_cut_frames_refused() {
        let (a, b, c) = (jpeg(1), jpeg(2), jpeg(3));
        let mut stream = b"--frame\r\nContent-Type: image/jpeg\r\n\r\n".to_vec();
        stream.extend(&a);
        stream.extend(b"\r\n--frame\r\n\r\n");
        // A frame cut short by the next one.
        stream.extend(&b[..b.len() / 2]);
        stream.extend(&c);
        // Random bytes, some of them markers.
        stream.extend([0xFF, 0xD8, 0x00, 0xFF, 0xFF, 0xD9, 0x12, 0xFF]);
        stream.extend(&a);
        let mut s = Splitter::new(MAX_FRAME);
        s.push(&stream);
        let mut got = Vec::new();
        while let Some(f) = s.next_frame() {
            got.push(f);
        }
        assert_eq!(got, [a.clone(), c, a]);
        assert_eq!(s.refused, 1, "the frame cut short: {s:?}");
        assert!(s.skipped > 0);
    }

    #[test]
    fn a_stream_of_garbage_never_grows_the_buffer_past_the_limit() {
        let mut s = Splitter::new(4096);
        let mut x = 0x1234_5678u32;
        for _ in 0..1000 {
            let chunk: Vec<u8> = (0..997)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    // Plenty of start-of-image markers to tempt it.
                    if x.is_multiple_of(97) {
                        0xFF
                    } else {
                        (x >> 8) as u8
                    }
                })
                .collect();
            s.push(&chunk);
            while s.next_frame().is_some() {}
            assert!(s.pending() <= 4096 + 997, "{}", s.pending());
        }
        // A real frame after it all still comes through.
        let a = jpeg(9);
        s.push(&a);
        assert_eq!(s.next_frame(), Some(a));
    }
}

//! Peer wire messages, spoken over QUIC with ALPN `deckhand/1`.
//!
//! Each request opens one bidirectional stream: the requester writes one request frame and finishes its
//! side; the responder writes one response frame and finishes. A frame is a 4-byte big-endian length, then
//! that many bytes: a 1-byte tag and the body. Tags are fixed forever within `deckhand/1`; a new message
//! takes a new tag, and a change of meaning takes a new ALPN. Requests use tags 0x01..=0x7f, responses
//! 0x80..=0xff; unassigned tags are reserved.
//!
//! Every frame has a length limit, checked from the 4-byte header before a single body byte is read or
//! allocated, and every field inside has its own limit.

use crate::chunk::MAX_CHUNK_LEN;
use crate::envelope::MAX_ENVELOPE;
use crate::id::BlobId;

/// The ALPN of this protocol version.
pub const ALPN: &[u8] = b"deckhand/1";
/// The largest request frame body.
pub const MAX_REQUEST: usize = 4 * 1024;
/// The largest response frame body: a maximal chunk plus its tag.
pub const MAX_RESPONSE: usize = MAX_CHUNK_LEN as usize + 64;
/// The longest agent id, deployment name, address or error message carried.
pub const MAX_STR: usize = 256;
/// The largest status document a peer answers `GetStatus` with. Agents serve it; none asks for it yet
/// (`/v1/fleet` is built from Hellos), so the tag is kept for a fleet view relayed through peers.
pub const MAX_STATUS: usize = 256 * 1024;
/// The largest fleet bundle (certificates and revocation lists, PEM) relayed between peers or read from
/// the bucket: a fleet of a few thousand Pis.
pub const MAX_FLEET_BUNDLE: usize = 4 * 1024 * 1024;
/// The largest chunk bitmap: one bit per chunk of a map at its chunk limit.
pub const MAX_BITMAP: usize = (crate::chunk::MAX_CHUNKS as usize).div_ceil(8);

/// The most chunk indices one [`Request::Have`] announces (the frame stays under [`MAX_REQUEST`]); more
/// go in further announcements.
pub const MAX_HAVE: usize = 1000;

/// The TLS server name every agent certificate carries and every client asks for: any fleet member may
/// serve. Who a peer is comes from its certificate's common name, its agent id.
pub const PEER_NAME: &str = "peer.deckhand";
/// The longest agent id.
pub const MAX_AGENT_ID: usize = 63;

/// An agent id that is not 1 to 63 lowercase letters, digits and '-' starting with a letter or digit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "agent id {0:?} is invalid: use 1 to 63 lowercase letters, digits and '-', starting with a letter or digit"
)]
pub struct AgentIdError(pub String);

/// Checks an agent id (a certificate's common name, the name in a `Hello`).
pub fn check_agent_id(id: &str) -> Result<(), AgentIdError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_AGENT_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(AgentIdError(id.to_owned()))
    }
}

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame of {len} bytes is over the limit of {limit}")]
    FrameTooLarge { len: usize, limit: usize },
    #[error("frame is empty")]
    Empty,
    #[error("unknown message tag {0:#04x}")]
    UnknownTag(u8),
    #[error("message ends early while reading {0}")]
    Truncated(&'static str),
    #[error("{what} is {len} bytes, over the limit of {limit}")]
    FieldTooLarge {
        what: &'static str,
        len: usize,
        limit: usize,
    },
    #[error("{0} is not valid UTF-8")]
    Utf8(&'static str),
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    #[error("invalid flag byte {0} for an optional field")]
    Flag(u8),
}

/// A release an agent holds or wants: its version and manifest id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReleaseRef {
    pub version: u64,
    pub manifest: BlobId,
}

/// What an agent tells its peers about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub agent_id: String,
    pub deployment: String,
    /// The release the agent serves recognitions from.
    pub active: Option<ReleaseRef>,
    /// The release the agent is downloading.
    pub pending: Option<ReleaseRef>,
    /// The address the agent's QUIC endpoint listens on, as the agent sees it.
    pub listen: String,
    /// Whether the agent can fetch from the origin now: only such agents share the origin fetches.
    pub origin: bool,
    /// The release the agent holds complete and canary-checked, waiting to switch together with the
    /// shop ([`crate::switch`]). An optional trailing field: a Hello without it is encoded exactly as
    /// before it existed.
    pub ready: Option<ReleaseRef>,
    /// The trust root version the agent follows, when it follows one that was rotated (2 and up): a
    /// peer behind on roots learns of the rotation from it, and releases announced under an older root
    /// are not taken for newer ones. A trailing field after `ready` (written as "none" when only this
    /// is present); a Hello without either is encoded exactly as before they existed.
    pub root: Option<u64>,
    /// The number of the fleet bundle the agent holds (the highest CA-signed revocation list number in
    /// it, see `deckhand fleet`): a peer that holds an older one asks for it ([`Request::GetFleet`]),
    /// so renewed certificates and revocations reach a Pi without S3. A trailing field after `root`
    /// (written as 0, read back as `None`, when only this is present).
    pub fleet: Option<u64>,
    /// The release the agent will not take: it rolled it back (on probation, or after a crash loop),
    /// or learnt that a peer did. A peer does not take it either, until a newer one is published. A
    /// trailing field after `fleet` (written as 0 when only later fields are present).
    pub rejected: Option<ReleaseRef>,
    /// The agent's active release once it passed its probation there ([`crate::probation`]). A
    /// trailing field after `rejected`.
    pub proven: Option<ReleaseRef>,
}

impl Hello {
    /// The newest release the sender announces (active or pending), if any.
    pub fn newest(&self) -> Option<u64> {
        [self.active, self.pending]
            .iter()
            .flatten()
            .map(|r| r.version)
            .max()
    }

    /// Whether the sender announces a release newer than `version` for an agent following root `root`
    /// (`None`: version 1, or a fixed list of keys). A sender on an older root announces what that root's
    /// release keys signed: after a rotation of the release keys the versions start again, so its
    /// larger number is not newer; it catches up from its peers.
    pub fn announces_newer(&self, version: u64, root: Option<u64>) -> bool {
        self.root.unwrap_or(1) >= root.unwrap_or(1) && self.newest().is_some_and(|v| v > version)
    }

    /// The sender's root version, if newer than `root`: it has a rotation to pass on.
    pub fn newer_root(&self, root: Option<u64>) -> Option<u64> {
        self.root.filter(|theirs| *theirs > root.unwrap_or(1))
    }

    /// The sender's fleet bundle number, if newer than `fleet`: it has renewals or revocations to
    /// pass on.
    pub fn newer_fleet(&self, fleet: Option<u64>) -> Option<u64> {
        self.fleet.filter(|theirs| *theirs > fleet.unwrap_or(0))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Exchange hellos; the response is the responder's [`Response::Hello`].
    Hello(Box<Hello>),
    /// The newest verified manifest envelope the responder holds for a deployment.
    GetManifest { deployment: String },
    /// One verified chunk (or a small whole blob such as a chunk map) by content id.
    GetChunk { id: BlobId },
    /// Which chunks of a blob the responder holds, as a bitmap in chunk-map order.
    GetHave { blob: BlobId },
    /// The responder's status document (JSON), for `/v1/fleet`.
    GetStatus,
    /// The requester verified and stored these chunks of `blob` (indices in chunk-map order, ascending):
    /// pushed to the peers that download the same release, so they need not poll for bitmaps. Answered
    /// with [`Response::Ack`].
    Have { blob: BlobId, chunks: Vec<u32> },
    /// The deployment's trust root of `version`, if the responder holds it (a Pi without S3 follows
    /// rotations through its peers).
    GetRoot { deployment: String, version: u64 },
    /// The fleet bundle the responder holds (renewed certificates, CA cross-certificates, revocation
    /// lists), each part verified by the receiver against its own fleet CA.
    GetFleet,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    Hello(Box<Hello>),
    Manifest {
        envelope: Vec<u8>,
    },
    /// A trust root envelope, verified by the receiver along its own chain.
    Root {
        envelope: Vec<u8>,
    },
    /// A fleet bundle (PEM), at most [`MAX_FLEET_BUNDLE`] bytes.
    Fleet {
        bundle: Vec<u8>,
    },
    Chunk {
        data: Vec<u8>,
    },
    /// Bit `i` (least significant bit first within each byte) says chunk `i` is held.
    Have {
        bitmap: Vec<u8>,
    },
    Status {
        json: Vec<u8>,
    },
    /// A [`Request::Have`] was taken in.
    Ack,
    /// The responder is at its serving limit; try another peer or later.
    Busy,
    NotFound,
    Error {
        message: String,
    },
}

mod tag {
    pub const HELLO: u8 = 0x01;
    pub const GET_MANIFEST: u8 = 0x02;
    pub const GET_CHUNK: u8 = 0x03;
    pub const GET_HAVE: u8 = 0x04;
    pub const GET_STATUS: u8 = 0x05;
    pub const HAVE: u8 = 0x06;
    pub const GET_ROOT: u8 = 0x07;
    pub const GET_FLEET: u8 = 0x08;

    pub const R_HELLO: u8 = 0x81;
    pub const R_MANIFEST: u8 = 0x82;
    pub const R_CHUNK: u8 = 0x83;
    pub const R_HAVE: u8 = 0x84;
    pub const R_STATUS: u8 = 0x85;
    pub const R_ACK: u8 = 0x86;
    pub const R_ROOT: u8 = 0x87;
    pub const R_FLEET: u8 = 0x88;
    pub const R_BUSY: u8 = 0xfd;
    pub const R_NOT_FOUND: u8 = 0xfe;
    pub const R_ERROR: u8 = 0xff;
}

/// Reads a frame header and checks it against `limit`: the body length to read next.
pub fn frame_len(header: [u8; 4], limit: usize) -> Result<usize, WireError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > limit {
        return Err(WireError::FrameTooLarge { len, limit });
    }
    if len == 0 {
        return Err(WireError::Empty);
    }
    Ok(len)
}

struct W(Vec<u8>);

impl W {
    fn new(tag: u8) -> Self {
        // Room for the length header, filled in by `finish`.
        W(vec![0, 0, 0, 0, tag])
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(&(b.len() as u32).to_be_bytes());
        self.0.extend_from_slice(b);
    }
    fn id(&mut self, id: &BlobId) {
        self.0.extend_from_slice(id.as_bytes());
    }
    fn release(&mut self, r: &Option<ReleaseRef>) {
        match r {
            None => self.0.push(0),
            Some(r) => {
                self.0.push(1);
                self.u64(r.version);
                self.id(&r.manifest);
            }
        }
    }
    fn hello(&mut self, h: &Hello) {
        self.bytes(h.agent_id.as_bytes());
        self.bytes(h.deployment.as_bytes());
        self.release(&h.active);
        self.release(&h.pending);
        self.bytes(h.listen.as_bytes());
        self.0.push(u8::from(h.origin));
        // Each trailing field is written when it or a later one is present.
        let later = [
            h.proven.is_some(),
            h.rejected.is_some(),
            h.fleet.is_some(),
            h.root.is_some(),
            h.ready.is_some(),
        ];
        let present = |field: usize| later[..=4 - field].iter().any(|p| *p);
        if present(0) {
            self.release(&h.ready);
        }
        if present(1) {
            self.u64(h.root.unwrap_or(0));
        }
        if present(2) {
            self.u64(h.fleet.unwrap_or(0));
        }
        if present(3) {
            self.release(&h.rejected);
        }
        if present(4) {
            self.release(&h.proven);
        }
    }
    fn finish(mut self) -> Vec<u8> {
        let len = (self.0.len() - 4) as u32;
        self.0[..4].copy_from_slice(&len.to_be_bytes());
        self.0
    }
}

struct R<'a>(&'a [u8]);

impl<'a> R<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Truncated(what));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.take(1, what)?[0])
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8, what)?);
        Ok(u64::from_be_bytes(b))
    }
    fn bytes(&mut self, what: &'static str, limit: usize) -> Result<Vec<u8>, WireError> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4, what)?);
        let len = u32::from_be_bytes(b) as usize;
        if len > limit {
            return Err(WireError::FieldTooLarge { what, len, limit });
        }
        // `take` checks the bytes are present before anything is copied, so the allocation is bounded
        // by the frame, which was bounded by its header check.
        Ok(self.take(len, what)?.to_vec())
    }
    fn string(&mut self, what: &'static str) -> Result<String, WireError> {
        String::from_utf8(self.bytes(what, MAX_STR)?).map_err(|_| WireError::Utf8(what))
    }
    fn id(&mut self, what: &'static str) -> Result<BlobId, WireError> {
        let mut b = [0u8; 32];
        b.copy_from_slice(self.take(32, what)?);
        Ok(BlobId::from_bytes(b))
    }
    fn release(&mut self, what: &'static str) -> Result<Option<ReleaseRef>, WireError> {
        match self.u8(what)? {
            0 => Ok(None),
            1 => Ok(Some(ReleaseRef {
                version: self.u64(what)?,
                manifest: self.id(what)?,
            })),
            other => Err(WireError::Flag(other)),
        }
    }
    fn hello(&mut self) -> Result<Hello, WireError> {
        Ok(Hello {
            agent_id: self.string("agent id")?,
            deployment: self.string("deployment")?,
            active: self.release("active release")?,
            pending: self.release("pending release")?,
            listen: self.string("listen address")?,
            origin: match self.u8("origin flag")? {
                0 => false,
                1 => true,
                other => return Err(WireError::Flag(other)),
            },
            ready: if self.0.is_empty() {
                None
            } else {
                self.release("ready release")?
            },
            root: if self.0.is_empty() {
                None
            } else {
                Some(self.u64("trust root version")?).filter(|v| *v != 0)
            },
            fleet: if self.0.is_empty() {
                None
            } else {
                Some(self.u64("fleet bundle number")?).filter(|v| *v != 0)
            },
            rejected: if self.0.is_empty() {
                None
            } else {
                self.release("rejected release")?
            },
            proven: if self.0.is_empty() {
                None
            } else {
                self.release("proven release")?
            },
        })
    }
    fn end<T>(self, value: T) -> Result<T, WireError> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(WireError::Trailing(self.0.len()))
        }
    }
}

fn split_tag(body: &[u8]) -> Result<(u8, R<'_>), WireError> {
    match body.split_first() {
        Some((tag, rest)) => Ok((*tag, R(rest))),
        None => Err(WireError::Empty),
    }
}

impl Request {
    /// The whole frame, header included.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Request::Hello(h) => {
                let mut w = W::new(tag::HELLO);
                w.hello(h);
                w.finish()
            }
            Request::GetManifest { deployment } => {
                let mut w = W::new(tag::GET_MANIFEST);
                w.bytes(deployment.as_bytes());
                w.finish()
            }
            Request::GetChunk { id } => {
                let mut w = W::new(tag::GET_CHUNK);
                w.id(id);
                w.finish()
            }
            Request::GetHave { blob } => {
                let mut w = W::new(tag::GET_HAVE);
                w.id(blob);
                w.finish()
            }
            Request::GetStatus => W::new(tag::GET_STATUS).finish(),
            Request::GetFleet => W::new(tag::GET_FLEET).finish(),
            Request::GetRoot {
                deployment,
                version,
            } => {
                let mut w = W::new(tag::GET_ROOT);
                w.bytes(deployment.as_bytes());
                w.u64(*version);
                w.finish()
            }
            Request::Have { blob, chunks } => {
                let mut w = W::new(tag::HAVE);
                w.id(blob);
                w.0.extend_from_slice(&(chunks.len() as u32).to_be_bytes());
                for c in chunks {
                    w.0.extend_from_slice(&c.to_be_bytes());
                }
                w.finish()
            }
        }
    }

    /// Decodes a frame body (after the header checked by [`frame_len`] with [`MAX_REQUEST`]).
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        if body.len() > MAX_REQUEST {
            return Err(WireError::FrameTooLarge {
                len: body.len(),
                limit: MAX_REQUEST,
            });
        }
        let (t, mut r) = split_tag(body)?;
        let msg = match t {
            tag::HELLO => Request::Hello(Box::new(r.hello()?)),
            tag::GET_MANIFEST => Request::GetManifest {
                deployment: r.string("deployment")?,
            },
            tag::GET_CHUNK => Request::GetChunk {
                id: r.id("chunk id")?,
            },
            tag::GET_HAVE => Request::GetHave {
                blob: r.id("blob id")?,
            },
            tag::GET_STATUS => Request::GetStatus,
            tag::GET_FLEET => Request::GetFleet,
            tag::GET_ROOT => Request::GetRoot {
                deployment: r.string("deployment")?,
                version: r.u64("root version")?,
            },
            tag::HAVE => {
                let blob = r.id("blob id")?;
                let mut n = [0u8; 4];
                n.copy_from_slice(r.take(4, "chunk count")?);
                let count = u32::from_be_bytes(n) as usize;
                if count > MAX_HAVE {
                    return Err(WireError::FieldTooLarge {
                        what: "chunk indices",
                        len: count,
                        limit: MAX_HAVE,
                    });
                }
                let raw = r.take(count * 4, "chunk indices")?;
                let chunks = raw
                    .chunks_exact(4)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                Request::Have { blob, chunks }
            }
            other => return Err(WireError::UnknownTag(other)),
        };
        r.end(msg)
    }
}

impl Response {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Response::Hello(h) => {
                let mut w = W::new(tag::R_HELLO);
                w.hello(h);
                w.finish()
            }
            Response::Manifest { envelope } => {
                let mut w = W::new(tag::R_MANIFEST);
                w.bytes(envelope);
                w.finish()
            }
            Response::Root { envelope } => {
                let mut w = W::new(tag::R_ROOT);
                w.bytes(envelope);
                w.finish()
            }
            Response::Fleet { bundle } => {
                let mut w = W::new(tag::R_FLEET);
                w.bytes(bundle);
                w.finish()
            }
            Response::Chunk { data } => {
                let mut w = W::new(tag::R_CHUNK);
                w.bytes(data);
                w.finish()
            }
            Response::Have { bitmap } => {
                let mut w = W::new(tag::R_HAVE);
                w.bytes(bitmap);
                w.finish()
            }
            Response::Status { json } => {
                let mut w = W::new(tag::R_STATUS);
                w.bytes(json);
                w.finish()
            }
            Response::Ack => W::new(tag::R_ACK).finish(),
            Response::Busy => W::new(tag::R_BUSY).finish(),
            Response::NotFound => W::new(tag::R_NOT_FOUND).finish(),
            Response::Error { message } => {
                let mut w = W::new(tag::R_ERROR);
                let mut end = message.len().min(MAX_STR);
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                w.bytes(&message.as_bytes()[..end]);
                w.finish()
            }
        }
    }

    /// Decodes a frame body (after the header checked by [`frame_len`] with [`MAX_RESPONSE`]).
    pub fn decode(body: &[u8]) -> Result<Self, WireError> {
        if body.len() > MAX_RESPONSE {
            return Err(WireError::FrameTooLarge {
                len: body.len(),
                limit: MAX_RESPONSE,
            });
        }
        let (t, mut r) = split_tag(body)?;
        let msg = match t {
            tag::R_HELLO => Response::Hello(Box::new(r.hello()?)),
            tag::R_MANIFEST => Response::Manifest {
                envelope: r.bytes("manifest envelope", MAX_ENVELOPE)?,
            },
            tag::R_ROOT => Response::Root {
                envelope: r.bytes("root envelope", MAX_ENVELOPE)?,
            },
            tag::R_FLEET => Response::Fleet {
                bundle: r.bytes("fleet bundle", MAX_FLEET_BUNDLE)?,
            },
            tag::R_CHUNK => Response::Chunk {
                data: r.bytes("chunk", MAX_CHUNK_LEN as usize)?,
            },
            tag::R_HAVE => Response::Have {
                bitmap: r.bytes("bitmap", MAX_BITMAP)?,
            },
            tag::R_STATUS => Response::Status {
                json: r.bytes("status", MAX_STATUS)?,
            },
            tag::R_ACK => Response::Ack,
            tag::R_BUSY => Response::Busy,
            tag::R_NOT_FOUND => Response::NotFound,
            tag::R_ERROR => Response::Error {
                message: r.string("error message")?,
            },
            other => return Err(WireError::UnknownTag(other)),
        };
        r.end(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn body(frame: &[u8], limit: usize) -> &[u8] {
        let len = frame_len(frame[..4].try_into().unwrap(), limit).unwrap();
        assert_eq!(len, frame.len() - 4);
        &frame[4..]
    }

    fn hello() -> Hello {
        Hello {
            agent_id: "pi-1".into(),
            deployment: "shop".into(),
            active: Some(ReleaseRef {
                version: 3,
                manifest: BlobId::of(b"m3"),
            }),
            pending: None,
            listen: "127.0.0.1:7000".into(),
            origin: true,
            ready: None,
            root: None,
            fleet: None,
            rejected: None,
            proven: None,
        }
    }

    #[test]
    fn every_message_round_trips() {
        let requests = [
            Request::Hello(Box::new(hello())),
            Request::Hello(Box::new(Hello {
                ready: Some(ReleaseRef {
                    version: 4,
                    manifest: BlobId::of(b"m4"),
                }),
                ..hello()
            })),
            Request::Hello(Box::new(Hello {
                root: Some(2),
                ..hello()
            })),
            Request::Hello(Box::new(Hello {
                ready: Some(ReleaseRef {
                    version: 4,
                    manifest: BlobId::of(b"m4"),
                }),
                root: Some(u64::MAX),
                ..hello()
            })),
            // A fleet number without a rotated root: the root is written as 0 and read back as none.
            Request::Hello(Box::new(Hello {
                fleet: Some(1_800_000_000),
                ..hello()
            })),
            Request::Hello(Box::new(Hello {
                root: Some(3),
                fleet: Some(9),
                ..hello()
            })),
            // A rejected release alone: ready, root and fleet are written as none and 0.
            Request::Hello(Box::new(Hello {
                rejected: Some(ReleaseRef {
                    version: 4,
                    manifest: BlobId::of(b"m4"),
                }),
                ..hello()
            })),
            Request::Hello(Box::new(Hello {
                proven: Some(ReleaseRef {
                    version: 3,
                    manifest: BlobId::of(b"m3"),
                }),
                fleet: Some(2),
                ..hello()
            })),
            Request::GetFleet,
            Request::GetManifest {
                deployment: "shop".into(),
            },
            Request::GetChunk {
                id: BlobId::of(b"c"),
            },
            Request::GetHave {
                blob: BlobId::of(b"b"),
            },
            Request::GetStatus,
            Request::GetRoot {
                deployment: "shop".into(),
                version: 7,
            },
            Request::Have {
                blob: BlobId::of(b"b"),
                chunks: vec![0, 1, 2, 700, u32::MAX],
            },
            Request::Have {
                blob: BlobId::of(b"b"),
                chunks: (0..MAX_HAVE as u32).collect(),
            },
        ];
        // A Hello that is not ready ends with the origin flag, as before the optional field existed.
        let plain = Request::Hello(Box::new(hello())).encode();
        assert_eq!(plain.last(), Some(&1));
        for m in requests {
            assert!(m.encode().len() - 4 <= MAX_REQUEST);
            assert_eq!(Request::decode(body(&m.encode(), MAX_REQUEST)).unwrap(), m);
        }
        let responses = [
            Response::Hello(Box::new(hello())),
            Response::Manifest {
                envelope: b"{}".to_vec(),
            },
            Response::Root {
                envelope: b"{\"r\":1}".to_vec(),
            },
            Response::Fleet {
                bundle: vec![b'-'; MAX_FLEET_BUNDLE],
            },
            Response::Chunk {
                data: vec![7; 70_000],
            },
            Response::Have {
                bitmap: vec![0b1010_0101; 9],
            },
            Response::Status {
                json: b"{\"a\":1}".to_vec(),
            },
            Response::Ack,
            Response::Busy,
            Response::NotFound,
            Response::Error {
                message: "no".into(),
            },
        ];
        for m in responses {
            assert_eq!(
                Response::decode(body(&m.encode(), MAX_RESPONSE)).unwrap(),
                m
            );
        }
    }

    #[test]
    fn limits_are_checked_before_reading_or_allocating() {
        assert_eq!(
            frame_len(u32::MAX.to_be_bytes(), MAX_RESPONSE),
            Err(WireError::FrameTooLarge {
                len: u32::MAX as usize,
                limit: MAX_RESPONSE
            })
        );
        assert_eq!(frame_len([0; 4], MAX_REQUEST), Err(WireError::Empty));
        // A field claiming 4 GiB inside a small frame is refused without allocating it.
        let mut frame = vec![tag::R_CHUNK];
        frame.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            Response::decode(&frame),
            Err(WireError::FieldTooLarge { what: "chunk", .. })
        ));
        // A field claiming more than is present is truncated, not read past.
        let mut frame = vec![tag::R_CHUNK];
        frame.extend_from_slice(&100u32.to_be_bytes());
        frame.extend_from_slice(&[1, 2, 3]);
        assert_eq!(Response::decode(&frame), Err(WireError::Truncated("chunk")));
        let long = Request::GetManifest {
            deployment: "x".repeat(MAX_STR + 1),
        }
        .encode();
        assert!(matches!(
            Request::decode(&long[4..]),
            Err(WireError::FieldTooLarge { .. })
        ));
        // A HAVE claiming more indices than the limit is refused before any is read.
        let mut frame = vec![tag::HAVE];
        frame.extend_from_slice(BlobId::of(b"b").as_bytes());
        frame.extend_from_slice(&(MAX_HAVE as u32 + 1).to_be_bytes());
        assert!(matches!(
            Request::decode(&frame),
            Err(WireError::FieldTooLarge {
                what: "chunk indices",
                ..
            })
        ));
        frame.truncate(33);
        frame.extend_from_slice(&3u32.to_be_bytes());
        frame.extend_from_slice(&[0; 8]);
        assert_eq!(
            Request::decode(&frame),
            Err(WireError::Truncated("chunk indices"))
        );
        assert_eq!(Request::decode(&[0x42]), Err(WireError::UnknownTag(0x42)));
        assert_eq!(
            Request::decode(&[tag::GET_STATUS, 0]),
            Err(WireError::Trailing(1))
        );
        // A response tag is not a request.
        assert_eq!(
            Request::decode(&[tag::R_BUSY]),
            Err(WireError::UnknownTag(tag::R_BUSY))
        );
        let long_error = Response::Error {
            message: "é".repeat(MAX_STR),
        }
        .encode();
        assert!(Response::decode(&long_error[4..]).is_ok());
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Request::decode(&bytes);
            let _ = Response::decode(&bytes);
        }

        /// Valid frames, damaged: random bytes rarely get past the tag, so start from real messages and
        /// mutate them to reach the field parsers. Decoding never panics, and whatever still decodes
        /// encodes back to exactly the bytes it came from.
        #[test]
        fn damaged_valid_frames_never_panic_and_decode_exactly(
            which in 0usize..17,
            edits in proptest::collection::vec((any::<u32>(), any::<u8>(), 0u8..3), 1..6),
        ) {
            let requests = [
                Request::Hello(Box::new(hello())),
                Request::GetManifest { deployment: "shop".into() },
                Request::GetChunk { id: BlobId::of(b"c") },
                Request::GetHave { blob: BlobId::of(b"b") },
                Request::GetStatus,
                Request::GetRoot { deployment: "shop".into(), version: 3 },
                Request::Have { blob: BlobId::of(b"b"), chunks: vec![1, 2, 3, 9] },
            ];
            let responses = [
                Response::Hello(Box::new(hello())),
                Response::Manifest { envelope: b"{}".to_vec() },
                Response::Root { envelope: b"{}".to_vec() },
                Response::Chunk { data: vec![7; 300] },
                Response::Have { bitmap: vec![0b1010_0101; 9] },
                Response::Status { json: b"{\"a\":1}".to_vec() },
                Response::Ack,
                Response::Busy,
                Response::NotFound,
                Response::Error { message: "no".into() },
            ];
            let frame = if which < requests.len() {
                requests[which].encode()
            } else {
                responses[which - requests.len()].encode()
            };
            let mut b = frame[4..].to_vec();
            crate::testdata::mutate(&mut b, &edits);
            if let Ok(m) = Request::decode(&b) {
                prop_assert_eq!(&m.encode()[4..], &b[..]);
            }
            if let Ok(m) = Response::decode(&b) {
                prop_assert_eq!(&m.encode()[4..], &b[..]);
            }
        }
    }
}

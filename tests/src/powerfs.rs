//! A filesystem that forgets what was not synced, for power-cut tests (FUSE, through `fuser`).
//!
//! SIGKILL leaves the page cache to the kernel, which writes it out later: a killed process loses
//! nothing it wrote. A power cut loses everything not yet on the disk. This filesystem keeps two views
//! of every inode, in memory:
//!
//! - **live**: what processes see (every write, rename and unlink at once);
//! - **synced**: what the disk holds. A file's bytes and size as of its last `fsync`/`fdatasync`; a
//!   directory's entries as of its last `fsync` of the directory. A new file is on the disk only once
//!   the directory naming it was synced, and holds only what was synced of its own bytes: the strictest
//!   reading of POSIX, the one a power cut on an SD card with a careless filesystem comes close to.
//!
//! [`PowerFs::arm`] makes the n-th mutating operation from then on the moment the power goes: that
//! operation fails, and so does every request after it (`EIO`), as if the disk were gone. The state that
//! survives is [`Disk`]: the synced view, as far as it is reachable from the root through synced
//! directory entries. Mount it again with [`PowerFs::mount`] to see what a Pi sees after it boots.

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, LockOwner, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

const ROOT: u64 = 1;
/// Attributes and entries are not cached by the kernel: every lookup reaches this filesystem, so
/// nothing the kernel remembers outlives a cut.
const TTL: Duration = Duration::ZERO;
const BLOCK: u64 = 4096;
/// What `statfs` reports as the disk's size (far more than a test writes).
const DISK_BYTES: u64 = 64 << 30;

#[derive(Clone, Debug)]
enum Kind {
    File(Vec<u8>),
    Dir(BTreeMap<OsString, u64>),
}

/// One inode as the disk holds it.
#[derive(Clone, Debug)]
struct Node {
    kind: Kind,
    perm: u16,
}

impl Node {
    fn empty_file(perm: u16) -> Node {
        Node {
            kind: Kind::File(Vec::new()),
            perm,
        }
    }

    fn empty_dir(perm: u16) -> Node {
        Node {
            kind: Kind::Dir(BTreeMap::new()),
            perm,
        }
    }
}

/// What a power cut leaves: every inode reachable from the root through synced directory entries, each
/// as it was last synced.
#[derive(Clone, Debug)]
pub struct Disk {
    nodes: HashMap<u64, Node>,
}

impl Disk {
    /// A disk holding an empty root directory.
    pub fn blank() -> Disk {
        Disk {
            nodes: HashMap::from([(ROOT, Node::empty_dir(0o755))]),
        }
    }

    /// How many files and directories it holds, and the bytes in its files.
    pub fn usage(&self) -> (usize, u64) {
        let bytes = self
            .nodes
            .values()
            .map(|n| match &n.kind {
                Kind::File(d) => d.len() as u64,
                Kind::Dir(_) => 0,
            })
            .sum();
        (self.nodes.len(), bytes)
    }
}

/// The inode as processes see it.
struct Live {
    node: Node,
    nlink: u32,
    /// References the kernel holds (entries replied minus `forget`s): an unlinked inode lives on while
    /// the kernel (an open file) still refers to it.
    lookups: u64,
    mtime: SystemTime,
    /// The name it was last given, for reports.
    parent: u64,
    name: OsString,
}

/// A mutating operation: where the power went, or one of the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    /// Its number, counted from [`PowerFs::arm`] (from the mount before the first arm).
    pub n: u64,
    /// What it was (`write`, `fsync`, `rename`, ...).
    pub kind: &'static str,
    /// The path it was about (the source, for a rename).
    pub path: String,
}

struct State {
    live: HashMap<u64, Live>,
    synced: HashMap<u64, Node>,
    next_ino: u64,
    /// Mutating operations since the last arm.
    ops: u64,
    cut_at: Option<u64>,
    /// Arms `cut_at` when an operation of this kind on a path containing this text happens: the power
    /// goes that many operations later.
    trigger: Option<(&'static str, String, u64)>,
    cut: Option<Op>,
    /// Mutating operations by kind, since the mount.
    counts: BTreeMap<&'static str, u64>,
    /// Every mutating operation since the last arm (at most [`LOG_LIMIT`]).
    log: Vec<Op>,
}

/// The operation log's bound.
const LOG_LIMIT: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PowerFsError {
    #[error(
        "cannot mount the power-cut filesystem at {path} (FUSE: it needs /dev/fuse and root, or \
         fusermount3): {source}"
    )]
    Mount {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot unmount the power-cut filesystem at {path}: {source}")]
    Unmount {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A mounted [`Disk`]. Unmounted (lazily) when dropped.
pub struct PowerFs {
    state: Arc<Mutex<State>>,
    session: Option<fuser::BackgroundSession>,
    path: PathBuf,
}

impl PowerFs {
    /// Mounts `disk` at `path` (an existing, empty directory).
    pub fn mount(path: &Path, disk: Disk) -> Result<PowerFs, PowerFsError> {
        let now = SystemTime::now();
        let mut live = HashMap::new();
        let mut next_ino = ROOT + 1;
        // Parents, to give every inode its name for reports.
        let mut names: HashMap<u64, (u64, OsString)> = HashMap::new();
        for (ino, n) in &disk.nodes {
            if let Kind::Dir(entries) = &n.kind {
                for (name, child) in entries {
                    names.insert(*child, (*ino, name.clone()));
                }
            }
        }
        for (ino, node) in &disk.nodes {
            next_ino = next_ino.max(ino + 1);
            let (parent, name) = names.remove(ino).unwrap_or((ROOT, OsString::new()));
            live.insert(
                *ino,
                Live {
                    nlink: if matches!(node.kind, Kind::Dir(_)) {
                        2
                    } else {
                        1
                    },
                    node: node.clone(),
                    lookups: 0,
                    mtime: now,
                    parent,
                    name,
                },
            );
        }
        let state = Arc::new(Mutex::new(State {
            live,
            synced: disk.nodes,
            next_ino,
            ops: 0,
            cut_at: None,
            trigger: None,
            cut: None,
            counts: BTreeMap::new(),
            log: Vec::new(),
        }));
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName("deckhand-powerfs".into()),
            fuser::MountOption::Subtype("powerfs".into()),
            fuser::MountOption::RW,
        ];
        config.n_threads = Some(1);
        let fs = Fs {
            state: state.clone(),
        };
        let session =
            fuser::spawn_mount(fs, path, &config).map_err(|source| PowerFsError::Mount {
                path: path.to_owned(),
                source,
            })?;
        Ok(PowerFs {
            state,
            session: Some(session),
            path: path.to_owned(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The power goes at the `n`-th mutating operation from now (1 = the next one).
    pub fn arm(&self, n: u64) {
        let mut s = self.lock();
        s.ops = 0;
        s.log.clear();
        s.trigger = None;
        s.cut_at = Some(n.max(1));
    }

    /// The power goes `after` operations past the first `kind` operation (`write`, `rename`, ...) on a
    /// path containing `path` (0: at that operation itself), counting from now. Nothing happens if no
    /// such operation comes.
    pub fn arm_after(&self, kind: &'static str, path: &str, after: u64) {
        let mut s = self.lock();
        s.ops = 0;
        s.log.clear();
        s.cut_at = None;
        s.trigger = Some((kind, path.to_owned(), after));
    }

    /// The power goes now, whatever is in flight.
    pub fn cut_now(&self) {
        let mut s = self.lock();
        if s.cut.is_none() {
            let n = s.ops;
            s.cut = Some(Op {
                n,
                kind: "idle",
                path: String::new(),
            });
        }
    }

    /// Where the power went, once it has.
    pub fn cut(&self) -> Option<Op> {
        self.lock().cut.clone()
    }

    /// Mutating operations since the last [`PowerFs::arm`].
    pub fn ops(&self) -> u64 {
        self.lock().ops
    }

    /// Every mutating operation since the last arm, in order.
    pub fn log(&self) -> Vec<Op> {
        self.lock().log.clone()
    }

    /// Mutating operations by kind since the mount.
    pub fn counts(&self) -> BTreeMap<&'static str, u64> {
        self.lock().counts.clone()
    }

    /// Unmounts, and returns what is on the disk: all of it if the power never went (a clean shutdown
    /// that syncs), only what was synced if it did.
    pub fn unmount(mut self) -> Result<Disk, PowerFsError> {
        if let Some(session) = self.session.take() {
            match session.umount_and_join() {
                Ok(()) => {}
                // The session's last read of /dev/fuse can come back ECONNABORTED instead of ENODEV when
                // the kernel ends the connection at this unmount while a killed process's request was
                // still in flight (seen twice in this project: once beside other stories, once at the
                // 53rd of 110 unmounts, none in 220 others). The mount is gone either way, and what the
                // disk holds is this
                // filesystem's own record below, which the kernel's ending does not touch.
                Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) && !self.mounted() => {
                    eprintln!(
                        "powerfs: the FUSE session ended ECONNABORTED at unmount; the mount is gone"
                    );
                }
                Err(source) => {
                    return Err(PowerFsError::Unmount {
                        path: self.path.clone(),
                        source,
                    });
                }
            }
        }
        let s = self.lock();
        Ok(if s.cut.is_some() {
            s.disk()
        } else {
            s.everything()
        })
    }
}

impl PowerFs {
    /// Whether a FUSE filesystem is still mounted at this path (`/proc/self/mountinfo`).
    fn mounted(&self) -> bool {
        let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
            return true;
        };
        let path = self.path.to_string_lossy();
        info.lines().any(|l| {
            let mut f = l.split(' ');
            f.nth(4) == Some(path.as_ref()) && l.contains(" - fuse")
        })
    }
}

impl Drop for PowerFs {
    /// Not unmounted by [`PowerFs::unmount`] (a test failed): detach it lazily, so that a process still
    /// holding files in it cannot keep it mounted after the test.
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            use std::os::unix::ffi::OsStrExt as _;
            if let Ok(c) = std::ffi::CString::new(self.path.as_os_str().as_bytes()) {
                // SAFETY: umount2(2) with a valid NUL-terminated path.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
            drop(session);
        }
    }
}

impl State {
    /// What survives a cut: the synced view, from the root through synced entries.
    fn disk(&self) -> Disk {
        let mut nodes = HashMap::new();
        let mut todo = vec![ROOT];
        while let Some(ino) = todo.pop() {
            if nodes.contains_key(&ino) {
                continue;
            }
            let Some(n) = self.synced.get(&ino) else {
                continue;
            };
            if let Kind::Dir(entries) = &n.kind {
                todo.extend(entries.values().copied());
            }
            nodes.insert(ino, n.clone());
        }
        // An entry synced in its directory whose inode is gone from the synced view cannot happen (the
        // synced view keeps what synced entries name); drop such names anyway rather than dangle.
        let present: HashSet<u64> = nodes.keys().copied().collect();
        for n in nodes.values_mut() {
            if let Kind::Dir(entries) = &mut n.kind {
                entries.retain(|_, ino| present.contains(ino));
            }
        }
        Disk { nodes }
    }

    /// Everything live, as after `sync` and a clean unmount.
    fn everything(&self) -> Disk {
        Disk {
            nodes: self
                .live
                .iter()
                .filter(|(ino, l)| **ino == ROOT || l.nlink > 0)
                .map(|(ino, l)| (*ino, l.node.clone()))
                .collect(),
        }
    }

    fn check(&self) -> Result<(), Errno> {
        if self.cut.is_some() {
            Err(Errno::EIO)
        } else {
            Ok(())
        }
    }

    /// Counts a mutating operation about `ino`, and cuts the power if it is the chosen one.
    fn mutate(&mut self, kind: &'static str, ino: u64, name: Option<&OsStr>) -> Result<(), Errno> {
        self.check()?;
        self.ops += 1;
        *self.counts.entry(kind).or_default() += 1;
        let mut path = self.path_of(ino);
        if let Some(name) = name {
            path.push(name);
        }
        let op = Op {
            n: self.ops,
            kind,
            path: path.display().to_string(),
        };
        if let Some((k, p, after)) = &self.trigger
            && *k == kind
            && op.path.contains(p.as_str())
        {
            self.cut_at = Some(self.ops + after);
            self.trigger = None;
        }
        if self.log.len() < LOG_LIMIT {
            self.log.push(op.clone());
        }
        if self.cut_at == Some(self.ops) {
            self.cut = Some(op);
            return Err(Errno::EIO);
        }
        Ok(())
    }

    fn path_of(&self, mut ino: u64) -> PathBuf {
        let mut parts = Vec::new();
        while ino != ROOT {
            let Some(l) = self.live.get(&ino) else {
                break;
            };
            parts.push(l.name.clone());
            ino = l.parent;
        }
        parts.iter().rev().collect()
    }

    fn live(&self, ino: u64) -> Result<&Live, Errno> {
        self.live.get(&ino).ok_or(Errno::ENOENT)
    }

    fn live_mut(&mut self, ino: u64) -> Result<&mut Live, Errno> {
        self.live.get_mut(&ino).ok_or(Errno::ENOENT)
    }

    fn entries(&self, dir: u64) -> Result<&BTreeMap<OsString, u64>, Errno> {
        match &self.live(dir)?.node.kind {
            Kind::Dir(e) => Ok(e),
            Kind::File(_) => Err(Errno::ENOTDIR),
        }
    }

    fn entries_mut(&mut self, dir: u64) -> Result<&mut BTreeMap<OsString, u64>, Errno> {
        match &mut self.live_mut(dir)?.node.kind {
            Kind::Dir(e) => Ok(e),
            Kind::File(_) => Err(Errno::ENOTDIR),
        }
    }

    fn file_mut(&mut self, ino: u64) -> Result<&mut Vec<u8>, Errno> {
        let l = self.live_mut(ino)?;
        l.mtime = SystemTime::now();
        match &mut l.node.kind {
            Kind::File(d) => Ok(d),
            Kind::Dir(_) => Err(Errno::EISDIR),
        }
    }

    fn attr(&self, ino: u64) -> Result<FileAttr, Errno> {
        let l = self.live(ino)?;
        let (kind, size) = match &l.node.kind {
            Kind::File(d) => (FileType::RegularFile, d.len() as u64),
            Kind::Dir(e) => (FileType::Directory, e.len() as u64),
        };
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: l.mtime,
            mtime: l.mtime,
            ctime: l.mtime,
            crtime: l.mtime,
            kind,
            perm: l.node.perm,
            nlink: l.nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: BLOCK as u32,
            flags: 0,
        })
    }

    /// An entry reply: the kernel now holds one more reference.
    fn entry(&mut self, ino: u64) -> Result<FileAttr, Errno> {
        let attr = self.attr(ino)?;
        self.live_mut(ino)?.lookups += 1;
        Ok(attr)
    }

    fn new_inode(&mut self, parent: u64, name: &OsStr, node: Node) -> Result<u64, Errno> {
        if self.entries(parent)?.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let dir = matches!(node.kind, Kind::Dir(_));
        // On the disk the inode exists from now, empty; only a synced entry makes it reachable.
        self.synced.insert(
            ino,
            if dir {
                Node::empty_dir(node.perm)
            } else {
                Node::empty_file(node.perm)
            },
        );
        self.live.insert(
            ino,
            Live {
                node,
                nlink: if dir { 2 } else { 1 },
                lookups: 0,
                mtime: SystemTime::now(),
                parent,
                name: name.to_owned(),
            },
        );
        self.entries_mut(parent)?.insert(name.to_owned(), ino);
        Ok(ino)
    }

    /// A create, mknod or mkdir: counted, then the inode, then the kernel's reference to it.
    fn make(
        &mut self,
        op: &'static str,
        parent: u64,
        name: &OsStr,
        node: Node,
    ) -> Result<FileAttr, Errno> {
        self.mutate(op, parent, Some(name))?;
        let ino = self.new_inode(parent, name, node)?;
        self.entry(ino)
    }

    /// Drops one link to `ino` (an unlink, or a rename over it).
    fn unlinked(&mut self, ino: u64) {
        if let Some(l) = self.live.get_mut(&ino) {
            l.nlink = if matches!(l.node.kind, Kind::Dir(_)) {
                0
            } else {
                l.nlink.saturating_sub(1)
            };
        }
        self.reap(ino);
    }

    /// Forgets an inode nothing refers to any more, and what the disk kept of inodes nothing can reach.
    fn reap(&mut self, ino: u64) {
        let gone = self
            .live
            .get(&ino)
            .is_some_and(|l| l.nlink == 0 && l.lookups == 0 && ino != ROOT);
        if gone {
            self.live.remove(&ino);
            self.collect_synced();
        }
    }

    /// The synced view keeps an inode while it is live (a later sync can make it reachable) or
    /// reachable from the root through synced entries.
    fn collect_synced(&mut self) {
        let reachable: HashSet<u64> = self.disk().nodes.into_keys().collect();
        let live = &self.live;
        self.synced
            .retain(|ino, _| reachable.contains(ino) || live.contains_key(ino));
    }
}

struct Fs {
    state: Arc<Mutex<State>>,
}

impl Fs {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn answer(reply: ReplyEmpty, r: Result<(), Errno>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

fn answer_entry(reply: ReplyEntry, r: Result<FileAttr, Errno>) {
    match r {
        Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
        Err(e) => reply.error(e),
    }
}

fn mode_perm(mode: u32, umask: u32) -> u16 {
    ((mode & !umask) & 0o7777) as u16
}

impl fuser::Filesystem for Fs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut s = self.lock();
        let r = s.check().and_then(|()| {
            let ino = *s.entries(parent.0)?.get(name).ok_or(Errno::ENOENT)?;
            s.entry(ino)
        });
        answer_entry(reply, r);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let mut s = self.lock();
        if let Some(l) = s.live.get_mut(&ino.0) {
            l.lookups = l.lookups.saturating_sub(nlookup);
        }
        s.reap(ino.0);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let s = self.lock();
        match s.check().and_then(|()| s.attr(ino.0)) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut s = self.lock();
        let r = (|| {
            s.check()?;
            if let Some(size) = size {
                s.mutate("truncate", ino.0, None)?;
                let len = usize::try_from(size).map_err(|_| Errno::EFBIG)?;
                s.file_mut(ino.0)?.resize(len, 0);
            }
            if let Some(mode) = mode {
                s.mutate("chmod", ino.0, None)?;
                s.live_mut(ino.0)?.node.perm = mode_perm(mode, 0);
            }
            s.attr(ino.0)
        })();
        match r {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        let mut s = self.lock();
        let r = (|| {
            if mode & libc::S_IFMT != libc::S_IFREG {
                return Err(Errno::EPERM);
            }
            s.make(
                "create",
                parent.0,
                name,
                Node::empty_file(mode_perm(mode, umask)),
            )
        })();
        answer_entry(reply, r);
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let mut s = self.lock();
        let r = s.make(
            "mkdir",
            parent.0,
            name,
            Node::empty_dir(mode_perm(mode, umask)),
        );
        answer_entry(reply, r);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut s = self.lock();
        let r = (|| {
            s.mutate("unlink", parent.0, Some(name))?;
            let ino = *s.entries(parent.0)?.get(name).ok_or(Errno::ENOENT)?;
            if matches!(s.live(ino)?.node.kind, Kind::Dir(_)) {
                return Err(Errno::EISDIR);
            }
            s.entries_mut(parent.0)?.remove(name);
            s.unlinked(ino);
            Ok(())
        })();
        answer(reply, r);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut s = self.lock();
        let r = (|| {
            s.mutate("rmdir", parent.0, Some(name))?;
            let ino = *s.entries(parent.0)?.get(name).ok_or(Errno::ENOENT)?;
            if !s.entries(ino)?.is_empty() {
                return Err(Errno::ENOTEMPTY);
            }
            s.entries_mut(parent.0)?.remove(name);
            s.unlinked(ino);
            Ok(())
        })();
        answer(reply, r);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut s = self.lock();
        let r = (|| {
            s.mutate("rename", parent.0, Some(name))?;
            if flags.contains(RenameFlags::RENAME_EXCHANGE)
                || flags.contains(RenameFlags::RENAME_WHITEOUT)
            {
                return Err(Errno::EINVAL);
            }
            let ino = *s.entries(parent.0)?.get(name).ok_or(Errno::ENOENT)?;
            let moving_dir = matches!(s.live(ino)?.node.kind, Kind::Dir(_));
            if let Some(&old) = s.entries(newparent.0)?.get(newname) {
                if old == ino {
                    return Ok(());
                }
                if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                    return Err(Errno::EEXIST);
                }
                match (&s.live(old)?.node.kind, moving_dir) {
                    (Kind::Dir(e), true) if !e.is_empty() => return Err(Errno::ENOTEMPTY),
                    (Kind::Dir(_), false) => return Err(Errno::EISDIR),
                    (Kind::File(_), true) => return Err(Errno::ENOTDIR),
                    _ => {}
                }
                s.entries_mut(newparent.0)?.remove(newname);
                s.unlinked(old);
            }
            s.entries_mut(parent.0)?.remove(name);
            s.entries_mut(newparent.0)?.insert(newname.to_owned(), ino);
            let l = s.live_mut(ino)?;
            l.parent = newparent.0;
            l.name = newname.to_owned();
            Ok(())
        })();
        answer(reply, r);
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let s = self.lock();
        match s.check().and_then(|()| s.live(ino.0).map(|_| ())) {
            Ok(()) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
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
        let s = self.lock();
        let r = (|| {
            s.check()?;
            match &s.live(ino.0)?.node.kind {
                Kind::File(d) => {
                    let start = usize::try_from(offset).unwrap_or(usize::MAX).min(d.len());
                    let end = start.saturating_add(size as usize).min(d.len());
                    Ok(&d[start..end])
                }
                Kind::Dir(_) => Err(Errno::EISDIR),
            }
        })();
        match r {
            Ok(bytes) => reply.data(bytes),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut s = self.lock();
        let r = (|| {
            s.mutate("write", ino.0, None)?;
            let start = usize::try_from(offset).map_err(|_| Errno::EFBIG)?;
            let end = start.checked_add(data.len()).ok_or(Errno::EFBIG)?;
            let file = s.file_mut(ino.0)?;
            if file.len() < end {
                file.resize(end, 0);
            }
            file[start..end].copy_from_slice(data);
            Ok(data.len() as u32)
        })();
        match r {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) makes nothing durable.
        match self.lock().check() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut s = self.lock();
        let r = (|| {
            s.mutate(if datasync { "fdatasync" } else { "fsync" }, ino.0, None)?;
            let node = s.live(ino.0)?.node.clone();
            if matches!(node.kind, Kind::Dir(_)) {
                return Err(Errno::EISDIR);
            }
            s.synced.insert(ino.0, node);
            Ok(())
        })();
        answer(reply, r);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let s = self.lock();
        let r = (|| {
            s.check()?;
            let parent = s.live(ino.0)?.parent;
            let mut all = vec![
                (ino.0, FileType::Directory, OsString::from(".")),
                (parent, FileType::Directory, OsString::from("..")),
            ];
            for (name, child) in s.entries(ino.0)? {
                let kind = match s.live(*child)?.node.kind {
                    Kind::Dir(_) => FileType::Directory,
                    Kind::File(_) => FileType::RegularFile,
                };
                all.push((*child, kind, name.clone()));
            }
            Ok(all)
        })();
        match r {
            Ok(all) => {
                for (i, (child, kind, name)) in all.into_iter().enumerate().skip(offset as usize) {
                    if reply.add(INodeNo(child), i as u64 + 1, kind, name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut s = self.lock();
        let r = (|| {
            s.mutate("fsyncdir", ino.0, None)?;
            let node = s.live(ino.0)?.node.clone();
            s.synced.insert(ino.0, node);
            s.collect_synced();
            Ok(())
        })();
        answer(reply, r);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.lock();
        if let Err(e) = s.check() {
            return reply.error(e);
        }
        let used: u64 = s
            .live
            .values()
            .map(|l| match &l.node.kind {
                Kind::File(d) => (d.len() as u64).div_ceil(BLOCK),
                Kind::Dir(_) => 1,
            })
            .sum();
        let blocks = DISK_BYTES / BLOCK;
        let free = blocks.saturating_sub(used);
        reply.statfs(
            blocks,
            free,
            free,
            1 << 20,
            1 << 20,
            BLOCK as u32,
            255,
            BLOCK as u32,
        );
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        let s = self.lock();
        match s.check().and_then(|()| s.live(ino.0).map(|_| ())) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let mut s = self.lock();
        let r = s.make(
            "create",
            parent.0,
            name,
            Node::empty_file(mode_perm(mode, umask)),
        );
        match r {
            Ok(attr) => reply.created(
                &TTL,
                &attr,
                Generation(0),
                FileHandle(0),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let mut s = self.lock();
        let r = (|| {
            s.mutate("fallocate", ino.0, None)?;
            match mode {
                0 => {
                    let end = offset.checked_add(length).ok_or(Errno::EFBIG)?;
                    let end = usize::try_from(end).map_err(|_| Errno::EFBIG)?;
                    let file = s.file_mut(ino.0)?;
                    if file.len() < end {
                        file.resize(end, 0);
                    }
                    Ok(())
                }
                libc::FALLOC_FL_KEEP_SIZE => Ok(()),
                _ => Err(Errno::from_i32(libc::EOPNOTSUPP)),
            }
        })();
        answer(reply, r);
    }
}

//! A file system that forgets what was not synced, for power-cut tests.
//!
//! A FUSE file system held in memory, in two layers per inode:
//! - the live state, which every process sees and every write changes;
//! - the durable state, what a disk would still hold after a power cut:
//!   a file's data and size as of its last `fsync`/`fdatasync`, a
//!   directory's entries as of its last `fsync` on the directory.
//!
//! [`CutFs::cut`] unmounts, throws the live state away, keeps the durable
//! one and mounts again: every unsynced write, size change, new name,
//! rename and removal is gone, as after pulling the plug under a kernel
//! that had cached them (the fault LazyFS injects, plus names). Unlike a
//! real disk it never loses a synced byte, never tears a sector and never
//! writes unsynced data back by chance, so it finds missing syncs, not
//! hardware faults. `sync_file_range` is no sync here: FUSE never hears
//! of it, as a disk's write cache would not.
//!
//! Pages are shared between the layers (copy on write), so an `fsync`
//! costs a clone of the page map, not of the data. The kernel keeps no
//! cache of its own: entries and attributes are returned with a zero
//! timeout and files are opened with direct I/O.
#![allow(clippy::too_many_arguments)]

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

const PAGE: usize = 4096;
const NO_CACHE: Duration = Duration::ZERO;
const ROOT: u64 = 1;

type Page = Arc<[u8; PAGE]>;

/// A file's bytes: sparse pages (a missing page reads as zeros) and a size.
#[derive(Clone, Default)]
struct Data {
    pages: BTreeMap<u64, Page>,
    size: u64,
}

impl Data {
    fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let end = (offset + len as u64).min(self.size);
        let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
        let mut at = offset;
        while at < end {
            let (index, within) = (at / PAGE as u64, (at % PAGE as u64) as usize);
            let take = (PAGE - within).min((end - at) as usize);
            match self.pages.get(&index) {
                Some(page) => out.extend_from_slice(&page[within..within + take]),
                None => out.resize(out.len() + take, 0),
            }
            at += take as u64;
        }
        out
    }

    fn write(&mut self, offset: u64, bytes: &[u8]) {
        let mut at = offset;
        let mut rest = bytes;
        while !rest.is_empty() {
            let (index, within) = (at / PAGE as u64, (at % PAGE as u64) as usize);
            let take = (PAGE - within).min(rest.len());
            let page = self
                .pages
                .entry(index)
                .or_insert_with(|| Arc::new([0; PAGE]));
            Arc::make_mut(page)[within..within + take].copy_from_slice(&rest[..take]);
            rest = &rest[take..];
            at += take as u64;
        }
        self.size = self.size.max(offset + bytes.len() as u64);
    }

    fn truncate(&mut self, size: u64) {
        let keep = size.div_ceil(PAGE as u64);
        self.pages.split_off(&keep);
        if !size.is_multiple_of(PAGE as u64) {
            if let Some(page) = self.pages.get_mut(&(size / PAGE as u64)) {
                Arc::make_mut(page)[(size % PAGE as u64) as usize..].fill(0);
            }
        }
        self.size = size;
    }
}

#[derive(Clone)]
enum Body {
    File(Data),
    Dir(BTreeMap<OsString, u64>),
}

#[derive(Clone)]
struct Node {
    body: Body,
    perm: u16,
    uid: u32,
    gid: u32,
    mtime: SystemTime,
}

impl Node {
    /// What a disk holds of a node nothing was synced for: the inode, empty.
    fn empty_like(&self) -> Node {
        Node {
            body: match self.body {
                Body::File(_) => Body::File(Data::default()),
                Body::Dir(_) => Body::Dir(BTreeMap::new()),
            },
            ..self.clone()
        }
    }
}

/// What the file system saw, for a test to report.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    pub file_syncs: u64,
    pub dir_syncs: u64,
    pub cuts: u64,
    /// Bytes written but not synced when a cut dropped them.
    pub bytes_dropped: u64,
}

struct State {
    live: HashMap<u64, Node>,
    durable: HashMap<u64, Node>,
    next_ino: u64,
    /// Bytes written since each inode's last sync (for [`Counts`]).
    unsynced: HashMap<u64, u64>,
    counts: Counts,
}

impl State {
    fn new() -> State {
        let root = Node {
            body: Body::Dir(BTreeMap::new()),
            perm: 0o755,
            uid: 0,
            gid: 0,
            mtime: SystemTime::now(),
        };
        State {
            live: HashMap::from([(ROOT, root.clone())]),
            durable: HashMap::from([(ROOT, root)]),
            next_ino: ROOT + 1,
            unsynced: HashMap::new(),
            counts: Counts::default(),
        }
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let node = self.live.get(&ino)?;
        let (kind, size) = match &node.body {
            Body::File(d) => (FileType::RegularFile, d.size),
            Body::Dir(e) => (FileType::Directory, e.len() as u64),
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: node.mtime,
            mtime: node.mtime,
            ctime: node.mtime,
            crtime: node.mtime,
            kind,
            perm: node.perm,
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            uid: node.uid,
            gid: node.gid,
            rdev: 0,
            blksize: PAGE as u32,
            flags: 0,
        })
    }

    fn dir(&mut self, ino: u64) -> Result<&mut BTreeMap<OsString, u64>, Errno> {
        match self.live.get_mut(&ino).map(|n| &mut n.body) {
            Some(Body::Dir(entries)) => Ok(entries),
            Some(Body::File(_)) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn file(&mut self, ino: u64) -> Result<&mut Data, Errno> {
        match self.live.get_mut(&ino).map(|n| &mut n.body) {
            Some(Body::File(data)) => Ok(data),
            Some(Body::Dir(_)) => Err(Errno::EISDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn child(&mut self, parent: u64, name: &OsStr) -> Result<u64, Errno> {
        self.dir(parent)?.get(name).copied().ok_or(Errno::ENOENT)
    }

    fn make(
        &mut self,
        req: &Request,
        parent: u64,
        name: &OsStr,
        body: Body,
        mode: u32,
    ) -> Result<u64, Errno> {
        if self.dir(parent)?.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.live.insert(
            ino,
            Node {
                body,
                perm: (mode & 0o7777) as u16,
                uid: req.uid(),
                gid: req.gid(),
                mtime: SystemTime::now(),
            },
        );
        self.dir(parent)?.insert(name.to_owned(), ino);
        Ok(ino)
    }

    fn sync_file(&mut self, ino: u64) -> Result<(), Errno> {
        let node = self.live.get(&ino).ok_or(Errno::ENOENT)?.clone();
        self.durable.insert(ino, node);
        self.unsynced.remove(&ino);
        self.counts.file_syncs += 1;
        Ok(())
    }

    /// A directory's entries become durable; a child the disk has never
    /// seen is there from now on as an empty inode of its kind.
    fn sync_dir(&mut self, ino: u64) -> Result<(), Errno> {
        let entries = self.dir(ino)?.clone();
        for &child in entries.values() {
            if !self.durable.contains_key(&child) {
                let empty = self.live[&child].empty_like();
                self.durable.insert(child, empty);
            }
        }
        let mut node = self
            .durable
            .get(&ino)
            .cloned()
            .unwrap_or_else(|| self.live[&ino].clone());
        node.body = Body::Dir(entries);
        self.durable.insert(ino, node);
        self.counts.dir_syncs += 1;
        Ok(())
    }

    /// The power cut: only what is durable and reachable from the root stays.
    fn cut(&mut self) {
        self.counts.cuts += 1;
        self.counts.bytes_dropped += self.unsynced.values().sum::<u64>();
        self.unsynced.clear();
        let mut live = HashMap::new();
        let mut todo = vec![ROOT];
        while let Some(ino) = todo.pop() {
            let Some(node) = self.durable.get(&ino) else {
                continue;
            };
            if let Body::Dir(entries) = &node.body {
                todo.extend(entries.values().filter(|c| !live.contains_key(*c)));
            }
            live.insert(ino, node.clone());
        }
        self.durable.retain(|ino, _| live.contains_key(ino));
        self.live = live;
    }
}

#[derive(Clone)]
struct Fs(Arc<Mutex<State>>);

fn done(reply: ReplyEmpty, result: Result<(), Errno>) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

impl Fs {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Filesystem for Fs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut s = self.state();
        match s.child(parent.0, name) {
            Ok(ino) => reply.entry(&NO_CACHE, &s.attr(ino).unwrap(), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.state().attr(ino.0) {
            Some(attr) => reply.attr(&NO_CACHE, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
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
        let mut s = self.state();
        if let Some(size) = size {
            match s.file(ino.0) {
                Ok(data) => data.truncate(size),
                Err(e) => return reply.error(e),
            }
        }
        let Some(node) = s.live.get_mut(&ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        if let Some(mode) = mode {
            node.perm = (mode & 0o7777) as u16;
        }
        node.uid = uid.unwrap_or(node.uid);
        node.gid = gid.unwrap_or(node.gid);
        reply.attr(&NO_CACHE, &s.attr(ino.0).unwrap());
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let mut s = self.state();
        match s.make(
            req,
            parent.0,
            name,
            Body::Dir(BTreeMap::new()),
            mode & !umask,
        ) {
            Ok(ino) => reply.entry(&NO_CACHE, &s.attr(ino).unwrap(), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let mut s = self.state();
        match s.make(
            req,
            parent.0,
            name,
            Body::File(Data::default()),
            mode & !umask,
        ) {
            Ok(ino) => reply.created(
                &NO_CACHE,
                &s.attr(ino).unwrap(),
                Generation(0),
                FileHandle(0),
                FopenFlags::FOPEN_DIRECT_IO,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut s = self.state();
        let result = s
            .child(parent.0, name)
            .and_then(|ino| match s.live[&ino].body {
                Body::Dir(_) => Err(Errno::EISDIR),
                Body::File(_) => Ok(()),
            });
        match result.and_then(|()| s.dir(parent.0)) {
            Ok(entries) => {
                entries.remove(name);
                reply.ok()
            }
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let mut s = self.state();
        let result = s
            .child(parent.0, name)
            .and_then(|ino| match &s.live[&ino].body {
                Body::Dir(e) if e.is_empty() => Ok(()),
                Body::Dir(_) => Err(Errno::ENOTEMPTY),
                Body::File(_) => Err(Errno::ENOTDIR),
            });
        match result.and_then(|()| s.dir(parent.0)) {
            Ok(entries) => {
                entries.remove(name);
                reply.ok()
            }
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut s = self.state();
        let result = (|| {
            let ino = s.child(parent.0, name)?;
            if let Ok(old) = s.child(newparent.0, newname) {
                if let Body::Dir(e) = &s.live[&old].body {
                    if !e.is_empty() {
                        return Err(Errno::ENOTEMPTY);
                    }
                }
            }
            s.dir(newparent.0)?;
            s.dir(parent.0)?.remove(name);
            s.dir(newparent.0)?.insert(newname.to_owned(), ino);
            Ok(())
        })();
        done(reply, result);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let mut s = self.state();
        let result = (|| {
            match s.live.get(&ino.0).map(|n| &n.body) {
                Some(Body::File(_)) => {}
                Some(Body::Dir(_)) => return Err(Errno::EPERM),
                None => return Err(Errno::ENOENT),
            }
            let entries = s.dir(newparent.0)?;
            if entries.contains_key(newname) {
                return Err(Errno::EEXIST);
            }
            entries.insert(newname.to_owned(), ino.0);
            Ok(())
        })();
        match result {
            Ok(()) => reply.entry(&NO_CACHE, &s.attr(ino.0).unwrap(), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // O_TRUNC comes as a setattr: this file system does not ask for
        // atomic truncation on open.
        match self.state().live.contains_key(&ino.0) {
            true => reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            false => reply.error(Errno::ENOENT),
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
        match self.state().file(ino.0) {
            Ok(data) => reply.data(&data.read(offset, size as usize)),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        bytes: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut s = self.state();
        match s.file(ino.0) {
            Ok(data) => {
                data.write(offset, bytes);
                *s.unsynced.entry(ino.0).or_default() += bytes.len() as u64;
                reply.written(bytes.len() as u32)
            }
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok() // close(2) is no sync
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        done(reply, self.state().sync_file(ino.0));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.state().dir(ino.0) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let mut s = self.state();
        let entries = match s.dir(ino.0) {
            Ok(e) => e.clone(),
            Err(e) => return reply.error(e),
        };
        let listing = [
            (ino.0, FileType::Directory, OsString::from(".")),
            (ino.0, FileType::Directory, OsString::from("..")),
        ]
        .into_iter()
        .chain(entries.into_iter().filter_map(|(name, child)| {
            let kind = match s.live.get(&child)?.body {
                Body::File(_) => FileType::RegularFile,
                Body::Dir(_) => FileType::Directory,
            };
            Some((child, kind, name))
        }));
        for (i, (child, kind, name)) in listing.enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), i as u64 + 1, kind, &name) {
                break;
            }
        }
        reply.ok()
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        done(reply, self.state().sync_dir(ino.0));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // 64 GiB, mostly free: nothing here should hit a full disk.
        let blocks = (64u64 << 30) / PAGE as u64;
        reply.statfs(
            blocks,
            blocks,
            blocks,
            1 << 20,
            1 << 20,
            PAGE as u32,
            255,
            PAGE as u32,
        );
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        match self.state().live.contains_key(&ino.0) {
            true => reply.ok(),
            false => reply.error(Errno::ENOENT),
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
        if mode != 0 {
            return reply.error(Errno::EOPNOTSUPP);
        }
        match self.state().file(ino.0) {
            Ok(data) => {
                if offset + length > data.size {
                    data.size = offset + length;
                }
                reply.ok()
            }
            Err(e) => reply.error(e),
        }
    }
}

/// A mounted [`CutFs`]; unmounted when dropped.
pub struct CutFs {
    fs: Fs,
    mountpoint: PathBuf,
    session: Option<fuser::BackgroundSession>,
}

impl CutFs {
    /// True where FUSE can be mounted here (`/dev/fuse` and the right to
    /// mount it); the tests that need it say so loudly and skip otherwise.
    pub fn available() -> bool {
        Path::new("/dev/fuse").exists() && is_root()
    }

    /// Mounts an empty file system on `mountpoint` (an existing directory).
    pub fn mount(mountpoint: &Path) -> std::io::Result<CutFs> {
        let mut fs = CutFs {
            fs: Fs(Arc::new(Mutex::new(State::new()))),
            mountpoint: mountpoint.to_owned(),
            session: None,
        };
        fs.attach()?;
        Ok(fs)
    }

    fn attach(&mut self) -> std::io::Result<()> {
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName("cutfs".into()),
            fuser::MountOption::DefaultPermissions,
        ];
        self.session = Some(fuser::spawn_mount(
            self.fs.clone(),
            &self.mountpoint,
            &config,
        )?);
        Ok(())
    }

    /// The power cut. Whoever had files open must be gone first (the
    /// gateway killed and reaped): the mount is taken down and made anew
    /// from what was synced.
    pub fn cut(&mut self) {
        if let Some(session) = self.session.take() {
            match session.umount_and_join() {
                Ok(()) => {}
                // The unmount went through (fuser unmounts before it joins
                // its thread), but the kernel ended that thread's read with
                // ECONNABORTED instead of ENODEV: seen once, on Linux 6.18,
                // in a CI rehearsal. The mount is down either way, which is
                // all a cut needs; the checks after it are unchanged.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => {
                    eprintln!("cutfs: the kernel reported the unmounted connection aborted: {e}");
                }
                Err(e) => panic!("unmounting cutfs: {e}"),
            }
        }
        self.fs.state().cut();
        self.attach().expect("mounting cutfs again");
    }

    pub fn counts(&self) -> Counts {
        self.fs.state().counts
    }
}

impl Drop for CutFs {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            let _ = session.umount_and_join();
        }
    }
}

/// Mounting without fusermount takes root; /proc/self belongs to the
/// process's effective user.
fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

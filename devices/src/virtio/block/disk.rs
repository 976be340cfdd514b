//! Disk backends: a raw image file, or a read-only raw base with a private
//! copy-on-write overlay.
//!
//! An overlay can be saved to a file and loaded into another overlay over
//! the same base (snapshots; format at [`Overlay::save_file`]). A loaded
//! file is untrusted: its header must match this disk, its map must be
//! strictly ascending clusters of this disk, its length must be exactly
//! what the map implies and its checksum must match, or nothing of it is
//! believed; nothing read from it sizes an allocation.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{
    GuestMemoryBackend, GuestMemoryMmap, ReadVolatile, VolatileMemoryError, WriteVolatile,
};

use super::request::Segment;

/// Granularity of the copy-on-write overlay.
pub const OVERLAY_CLUSTER_SIZE: u64 = 64 * 1024;

fn volatile_err(e: VolatileMemoryError) -> io::Error {
    match e {
        VolatileMemoryError::IOError(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

fn mem_err(e: vm_memory::GuestMemoryError) -> io::Error {
    io::Error::other(e.to_string())
}

/// Reads `segments` in order from `file` starting at byte `offset`.
fn read_file_into(
    file: &File,
    offset: u64,
    mem: &GuestMemoryMmap,
    segments: &[Segment],
) -> io::Result<()> {
    let mut f = file;
    f.seek(SeekFrom::Start(offset))?;
    for seg in segments {
        for slice in mem.get_slices(seg.addr, seg.len as usize) {
            let mut slice = slice.map_err(mem_err)?;
            f.read_exact_volatile(&mut slice).map_err(volatile_err)?;
        }
    }
    Ok(())
}

/// Writes `segments` in order to `file` starting at byte `offset`.
fn write_file_from(
    file: &File,
    offset: u64,
    mem: &GuestMemoryMmap,
    segments: &[Segment],
) -> io::Result<()> {
    let mut f = file;
    f.seek(SeekFrom::Start(offset))?;
    for seg in segments {
        for slice in mem.get_slices(seg.addr, seg.len as usize) {
            let slice = slice.map_err(mem_err)?;
            f.write_all_volatile(&slice).map_err(volatile_err)?;
        }
    }
    Ok(())
}

/// Splits `segments` at byte `at`: returns the part before and after.
fn split_segments(segments: &[Segment], at: u64) -> (Vec<Segment>, Vec<Segment>) {
    let mut head = Vec::new();
    let mut tail = Vec::new();
    let mut pos = 0u64;
    for s in segments {
        let len = u64::from(s.len);
        if pos + len <= at {
            head.push(*s);
        } else if pos >= at {
            tail.push(*s);
        } else {
            let n = at - pos; // 0 < n < len <= u32::MAX
            head.push(Segment {
                addr: s.addr,
                len: n as u32,
            });
            tail.push(Segment {
                addr: vm_memory::Address::unchecked_add(&s.addr, n),
                len: s.len - n as u32,
            });
        }
        pos += len;
    }
    (head, tail)
}

/// An unlinked temporary file in `dir`: O_TMPFILE where the file system
/// has it (the file never has a name), else created and removed at once.
pub fn anonymous_temp_file(dir: &Path) -> io::Result<File> {
    match OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)
    {
        Ok(f) => Ok(f),
        Err(_) => named_then_unlinked(dir),
    }
}

fn named_then_unlinked(dir: &Path) -> io::Result<File> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("skiff-overlay-{}-{n}", std::process::id()));
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(f) => {
                std::fs::remove_file(&path)?;
                return Ok(f);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

/// A read-only base image plus a private writable layer holding every
/// cluster the guest has written.
pub struct Overlay {
    base: File,
    layer: File,
    /// One bit per cluster: set when the cluster lives in `layer`.
    present: Vec<u64>,
    size: u64,
}

impl Overlay {
    /// An empty overlay over `base` (`size` bytes) in a new temp file in `dir`.
    pub fn new(base: File, size: u64, dir: &Path) -> io::Result<Self> {
        let layer = anonymous_temp_file(dir)?;
        layer.set_len(size)?;
        let clusters = size.div_ceil(OVERLAY_CLUSTER_SIZE);
        let words = usize::try_from(clusters.div_ceil(64)).map_err(io::Error::other)?;
        Ok(Overlay {
            base,
            layer,
            present: vec![0; words],
            size,
        })
    }

    fn is_present(&self, cluster: u64) -> bool {
        self.present
            .get((cluster / 64) as usize)
            .is_some_and(|w| w & (1 << (cluster % 64)) != 0)
    }

    fn set_present(&mut self, cluster: u64) {
        if let Some(w) = self.present.get_mut((cluster / 64) as usize) {
            *w |= 1 << (cluster % 64);
        }
    }

    /// Number of clusters in the layer so far.
    pub fn clusters_in_layer(&self) -> u64 {
        self.present.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Number of clusters of the disk.
    fn clusters(&self) -> u64 {
        self.size.div_ceil(OVERLAY_CLUSTER_SIZE)
    }

    /// Bytes of cluster `cluster` (the last one may be cut by the disk's end).
    fn cluster_len(&self, cluster: u64) -> u64 {
        let start = cluster * OVERLAY_CLUSTER_SIZE;
        (start + OVERLAY_CLUSTER_SIZE).min(self.size) - start
    }

    /// Forgets every cluster written: the disk reads as its base again.
    pub fn clear(&mut self) {
        self.present.fill(0);
    }

    /// Saves the layer to a new file at `path` (written under a temporary
    /// name in the same directory, synced, then renamed, so that `path` is
    /// either absent or whole). The format, all integers little-endian:
    /// `b"SKIFFOVL"`, version (u32, 1), 0 (u32), cluster size (u64), disk
    /// size (u64), N (u64), the N clusters present (u64 each, ascending),
    /// their bytes in that order (the disk's last cluster may be short),
    /// and a checksum of everything before it (u64, see [`Checksum`]).
    pub fn save_file(&self, path: &Path) -> io::Result<()> {
        let mut tmp_name = path.as_os_str().to_owned();
        tmp_name.push(".part");
        let tmp = Path::new(&tmp_name);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(tmp)?;
        let written = self.save(BufWriter::with_capacity(1 << 20, file));
        match written.and_then(|f| f.sync_all()) {
            Ok(()) => std::fs::rename(tmp, path),
            Err(e) => {
                let _ = std::fs::remove_file(tmp);
                Err(e)
            }
        }
    }

    fn save(&self, mut out: BufWriter<File>) -> io::Result<File> {
        let mut sum = Checksum::default();
        let mut put = |out: &mut BufWriter<File>, bytes: &[u8]| {
            sum.update(bytes);
            out.write_all(bytes)
        };
        let mut header = Vec::with_capacity(OVERLAY_HEADER_LEN);
        header.extend_from_slice(OVERLAY_MAGIC);
        header.extend_from_slice(&OVERLAY_VERSION.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        header.extend_from_slice(&OVERLAY_CLUSTER_SIZE.to_le_bytes());
        header.extend_from_slice(&self.size.to_le_bytes());
        header.extend_from_slice(&self.clusters_in_layer().to_le_bytes());
        put(&mut out, &header)?;
        for c in present_clusters(&self.present) {
            put(&mut out, &c.to_le_bytes())?;
        }
        let mut buf = vec![0u8; OVERLAY_CLUSTER_SIZE as usize];
        for c in present_clusters(&self.present) {
            // A cluster is at most OVERLAY_CLUSTER_SIZE bytes.
            let chunk = &mut buf[..self.cluster_len(c) as usize];
            self.layer.read_exact_at(chunk, c * OVERLAY_CLUSTER_SIZE)?;
            put(&mut out, chunk)?;
        }
        out.write_all(&sum.finish().to_le_bytes())?;
        out.into_inner().map_err(|e| e.into_error())
    }

    /// Loads a file [`Overlay::save_file`] wrote for a disk of this size
    /// into the layer, in place of what it held. On error the overlay is
    /// left empty (or unchanged, if the file was refused before its data).
    pub fn load_file(&mut self, path: &Path) -> Result<(), OverlayFileError> {
        self.load(File::open(path)?)
    }

    /// [`Overlay::load_file`] on an open file, read from its start.
    pub fn load(&mut self, file: File) -> Result<(), OverlayFileError> {
        let file_len = file.metadata()?.len();
        let mut r = Reader {
            inner: BufReader::with_capacity(1 << 20, file),
            sum: Checksum::default(),
        };
        let mut header = [0u8; OVERLAY_HEADER_LEN];
        r.read(&mut header)?;
        let word = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&header[at..at + 8]);
            u64::from_le_bytes(w)
        };
        let invalid = |s: String| Err(OverlayFileError::Invalid(s));
        if &header[..8] != OVERLAY_MAGIC {
            return invalid("it does not start with an overlay file's magic".into());
        }
        let version_and_flags = word(8);
        if version_and_flags != u64::from(OVERLAY_VERSION) {
            return invalid(format!(
                "unknown version or flags {version_and_flags:#x} (version {OVERLAY_VERSION} expected)"
            ));
        }
        let (cluster_size, disk_size, count) = (word(16), word(24), word(32));
        if cluster_size != OVERLAY_CLUSTER_SIZE {
            return invalid(format!(
                "cluster size {cluster_size} where this disk's overlay has {OVERLAY_CLUSTER_SIZE}"
            ));
        }
        if disk_size != self.size {
            return invalid(format!(
                "it is for a disk of {disk_size} bytes; this disk has {}",
                self.size
            ));
        }
        let clusters = self.clusters();
        if count > clusters {
            return invalid(format!("it maps {count} clusters; the disk has {clusters}"));
        }
        let mut present = vec![0u64; self.present.len()];
        let mut data_len = 0u64;
        let mut next = 0u64;
        for _ in 0..count {
            let mut w = [0u8; 8];
            r.read(&mut w)?;
            let c = u64::from_le_bytes(w);
            if c < next || c >= clusters {
                return invalid(format!(
                    "its map holds cluster {c} out of order or beyond the disk's {clusters}"
                ));
            }
            set_bit(&mut present, c);
            data_len += self.cluster_len(c);
            next = c + 1;
        }
        // count <= clusters and data_len <= size: no overflow.
        let expected = OVERLAY_HEADER_LEN as u64 + 8 * count + data_len + 8;
        if file_len != expected {
            return invalid(format!(
                "it has {file_len} bytes where its map makes {expected} (truncated or extended)"
            ));
        }
        self.clear();
        let mut buf = vec![0u8; OVERLAY_CLUSTER_SIZE as usize];
        for c in present_clusters(&present) {
            let chunk = &mut buf[..self.cluster_len(c) as usize];
            r.read(chunk)?;
            self.layer.write_all_at(chunk, c * OVERLAY_CLUSTER_SIZE)?;
        }
        let computed = r.sum.finish();
        let mut w = [0u8; 8];
        r.inner
            .read_exact(&mut w)
            .map_err(OverlayFileError::from_read)?;
        if u64::from_le_bytes(w) != computed {
            return invalid(
                "its checksum does not match its contents (the file is corrupt)".into(),
            );
        }
        self.present = present;
        Ok(())
    }

    /// Reads `[offset, offset + len)` into `segments`, each run of clusters
    /// from the layer or the base.
    fn read(
        &self,
        offset: u64,
        len: u64,
        mem: &GuestMemoryMmap,
        segments: &[Segment],
    ) -> io::Result<()> {
        let mut pos = offset;
        let end = offset + len;
        let mut rest = segments.to_vec();
        while pos < end {
            let in_layer = self.is_present(pos / OVERLAY_CLUSTER_SIZE);
            // Extend the run while the clusters come from the same file.
            let mut run_end = (pos / OVERLAY_CLUSTER_SIZE + 1) * OVERLAY_CLUSTER_SIZE;
            while run_end < end && self.is_present(run_end / OVERLAY_CLUSTER_SIZE) == in_layer {
                run_end += OVERLAY_CLUSTER_SIZE;
            }
            let run_end = run_end.min(end);
            let (now, later) = split_segments(&rest, run_end - pos);
            let file = if in_layer { &self.layer } else { &self.base };
            read_file_into(file, pos, mem, &now)?;
            rest = later;
            pos = run_end;
        }
        Ok(())
    }

    /// Copies cluster `cluster` from the base into the layer unless it is
    /// there already.
    fn copy_up(&mut self, cluster: u64) -> io::Result<()> {
        if self.is_present(cluster) {
            return Ok(());
        }
        let start = cluster * OVERLAY_CLUSTER_SIZE;
        let end = (start + OVERLAY_CLUSTER_SIZE).min(self.size);
        let mut buf = vec![0u8; (end - start) as usize];
        self.base.read_exact_at(&mut buf, start)?;
        self.layer.write_all_at(&buf, start)?;
        self.set_present(cluster);
        Ok(())
    }

    /// Writes `segments` to `[offset, offset + len)` of the layer. Clusters
    /// only partly covered are copied from the base first.
    fn write(
        &mut self,
        offset: u64,
        len: u64,
        mem: &GuestMemoryMmap,
        segments: &[Segment],
    ) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let first = offset / OVERLAY_CLUSTER_SIZE;
        let last = (end - 1) / OVERLAY_CLUSTER_SIZE;
        if !offset.is_multiple_of(OVERLAY_CLUSTER_SIZE) {
            self.copy_up(first)?;
        }
        if !end.is_multiple_of(OVERLAY_CLUSTER_SIZE) && end != self.size {
            self.copy_up(last)?;
        }
        write_file_from(&self.layer, offset, mem, segments)?;
        for c in first..=last {
            self.set_present(c);
        }
        Ok(())
    }
}

/// The first bytes of an overlay file.
const OVERLAY_MAGIC: &[u8; 8] = b"SKIFFOVL";
/// The overlay file format's version.
const OVERLAY_VERSION: u32 = 1;
/// Bytes of an overlay file's header.
const OVERLAY_HEADER_LEN: usize = 40;

/// Why an overlay file could not be loaded.
#[derive(Debug)]
pub enum OverlayFileError {
    /// Reading the file or writing the layer failed.
    Io(io::Error),
    /// The file is not an overlay of this disk (or is truncated, or
    /// corrupt): what is wrong.
    Invalid(String),
}

impl From<io::Error> for OverlayFileError {
    fn from(e: io::Error) -> Self {
        OverlayFileError::Io(e)
    }
}

impl OverlayFileError {
    /// A read error, where running out of file means a truncated file.
    fn from_read(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            OverlayFileError::Invalid("it is truncated".into())
        } else {
            OverlayFileError::Io(e)
        }
    }
}

/// Reads an overlay file, summing what it reads.
struct Reader {
    inner: BufReader<File>,
    sum: Checksum,
}

impl Reader {
    fn read(&mut self, buf: &mut [u8]) -> Result<(), OverlayFileError> {
        self.inner
            .read_exact(buf)
            .map_err(OverlayFileError::from_read)?;
        self.sum.update(buf);
        Ok(())
    }
}

/// A 64-bit checksum of a byte stream, to catch truncated and corrupted
/// overlay files (not an authenticator: it is not cryptographic). The
/// stream is taken as little-endian u64 words, each folded in by a step
/// that is a bijection of the state for a given word and of the word for
/// a given state, so that any change to one word changes the result; the
/// length closes it.
#[derive(Default)]
struct Checksum {
    state: u64,
    len: u64,
    partial: [u8; 8],
    filled: usize,
}

impl Checksum {
    fn word(&mut self, w: u64) {
        self.state = (self.state ^ w)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(29);
    }

    fn update(&mut self, mut data: &[u8]) {
        self.len = self.len.wrapping_add(data.len() as u64);
        while self.filled > 0 && !data.is_empty() {
            self.partial[self.filled] = data[0];
            self.filled += 1;
            data = &data[1..];
            if self.filled == 8 {
                self.word(u64::from_le_bytes(self.partial));
                self.filled = 0;
            }
        }
        if self.filled > 0 {
            // `data` ran out before the word was whole.
            return;
        }
        let mut words = data.chunks_exact(8);
        for chunk in &mut words {
            let mut w = [0u8; 8];
            w.copy_from_slice(chunk);
            self.word(u64::from_le_bytes(w));
        }
        let rest = words.remainder();
        self.partial[..rest.len()].copy_from_slice(rest);
        self.filled = rest.len();
    }

    fn finish(mut self) -> u64 {
        if self.filled > 0 {
            self.partial[self.filled..].fill(0);
            self.word(u64::from_le_bytes(self.partial));
        }
        let len = self.len;
        self.word(len);
        self.state
    }
}

/// Sets bit `bit` of `words` (which must hold it).
fn set_bit(words: &mut [u64], bit: u64) {
    if let Some(w) = words.get_mut((bit / 64) as usize) {
        *w |= 1 << (bit % 64);
    }
}

/// The bits set in `words`, ascending.
fn present_clusters(words: &[u64]) -> impl Iterator<Item = u64> + '_ {
    (0u64..)
        .zip(words)
        .filter(|(_, &w)| w != 0)
        .flat_map(|(i, &w)| {
            (0..64u64)
                .filter(move |b| w & (1 << b) != 0)
                .map(move |b| i * 64 + b)
        })
}

/// Where the sectors live.
pub enum Backend {
    /// A raw image, opened read-only or read-write.
    Raw(File),
    /// A read-only raw base with a private writable layer.
    Overlay(Overlay),
}

impl Backend {
    /// Reads `len` bytes at `offset` into the guest buffers `segments`.
    /// The range must lie within the disk.
    pub fn read(
        &self,
        offset: u64,
        len: u64,
        mem: &GuestMemoryMmap,
        segments: &[Segment],
    ) -> io::Result<()> {
        match self {
            Backend::Raw(f) => read_file_into(f, offset, mem, segments),
            Backend::Overlay(o) => o.read(offset, len, mem, segments),
        }
    }

    /// Writes `len` bytes at `offset` from the guest buffers `segments`.
    /// The range must lie within the disk.
    pub fn write(
        &mut self,
        offset: u64,
        len: u64,
        mem: &GuestMemoryMmap,
        segments: &[Segment],
    ) -> io::Result<()> {
        match self {
            Backend::Raw(f) => write_file_from(f, offset, mem, segments),
            Backend::Overlay(o) => o.write(offset, len, mem, segments),
        }
    }

    /// Makes completed writes durable. The overlay is discarded when the VM
    /// exits, so there is nothing to make durable there.
    pub fn flush(&mut self, writable: bool) -> io::Result<()> {
        match self {
            Backend::Raw(f) if writable => f.sync_data(),
            _ => Ok(()),
        }
    }
}

/// Why [`open_image`] failed.
#[derive(Debug)]
pub enum OpenError {
    /// `open` failed.
    Open(io::Error),
    /// The size could not be read.
    Size(io::Error),
    /// Another process holds a conflicting lock on the image.
    Locked,
}

/// Opens a disk image for [`Backend`]; returns the file and its size in
/// bytes (block devices included).
pub fn open_image(path: &Path, writable: bool) -> Result<(File, u64), OpenError> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .map_err(OpenError::Open)?;
    let ft = file.metadata().map_err(OpenError::Size)?.file_type();
    if !ft.is_file() && !ft.is_block_device() {
        return Err(OpenError::Open(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file or block device",
        )));
    }
    // Like QEMU: a writer takes an exclusive lock, readers (read-only
    // disks and overlay bases) a shared one, so no VM writes an image
    // another VM is reading or writing. The lock goes with the process.
    let locked = if writable {
        file.try_lock()
    } else {
        file.try_lock_shared()
    };
    match locked {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Err(OpenError::Locked),
        Err(std::fs::TryLockError::Error(e)) => return Err(OpenError::Open(e)),
    }
    let size = file.seek(SeekFrom::End(0)).map_err(OpenError::Size)?;
    Ok((file, size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use vmm_sys_util::tempdir::TempDir;

    fn checksum(parts: &[&[u8]]) -> u64 {
        let mut c = Checksum::default();
        for p in parts {
            c.update(p);
        }
        c.finish()
    }

    #[test]
    fn checksum_ignores_how_the_stream_is_cut_and_sees_any_change() {
        let data: Vec<u8> = (0..1001u32).map(|i| (i * 31 % 251) as u8).collect();
        let whole = checksum(&[&data]);
        for cut in [0, 1, 3, 7, 8, 9, 500, 1000, 1001] {
            let (a, b) = data.split_at(cut);
            assert_eq!(checksum(&[a, b]), whole, "cut at {cut}");
        }
        let (a, rest) = data.split_at(3);
        let (b, c) = rest.split_at(2);
        assert_eq!(checksum(&[a, b, c]), whole);
        for i in [0, 7, 8, 500, 1000] {
            let mut changed = data.clone();
            changed[i] ^= 0x40;
            assert_ne!(checksum(&[&changed]), whole, "byte {i}");
        }
        // A trailing zero byte changes it too (the length is in it).
        let mut longer = data.clone();
        longer.push(0);
        assert_ne!(checksum(&[&longer]), whole);
    }

    /// An overlay of `size` bytes over a base of `0xbb` bytes, with
    /// `clusters` copied up and filled with their index plus one.
    fn overlay(dir: &Path, size: u64, clusters: &[u64]) -> Overlay {
        let base = anonymous_temp_file(dir).unwrap();
        base.write_all_at(&vec![0xbb; size as usize], 0).unwrap();
        let mut o = Overlay::new(base, size, dir).unwrap();
        for &c in clusters {
            let len = o.cluster_len(c) as usize;
            o.layer
                .write_all_at(&vec![c as u8 + 1; len], c * OVERLAY_CLUSTER_SIZE)
                .unwrap();
            o.set_present(c);
        }
        o
    }

    fn cluster_bytes(o: &Overlay, c: u64) -> Vec<u8> {
        let mut buf = vec![0u8; o.cluster_len(c) as usize];
        o.layer
            .read_exact_at(&mut buf, c * OVERLAY_CLUSTER_SIZE)
            .unwrap();
        buf
    }

    /// Three clusters and a short fourth.
    const SIZE: u64 = 3 * OVERLAY_CLUSTER_SIZE + 4096;

    #[test]
    fn an_overlay_file_loads_into_another_overlay() {
        let dir = TempDir::new().unwrap();
        let src = overlay(dir.as_path(), SIZE, &[1, 3]);
        let path = dir.as_path().join("vda.overlay");
        src.save_file(&path).unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.as_path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["vda.overlay"], "no temporary file is left");
        let len = std::fs::metadata(&path).unwrap().len();
        assert_eq!(len, 40 + 16 + OVERLAY_CLUSTER_SIZE + 4096 + 8);

        // The target had cluster 0 of its own: the file replaces it.
        let mut dst = overlay(dir.as_path(), SIZE, &[0]);
        dst.load_file(&path).unwrap();
        assert_eq!(dst.present, src.present);
        assert_eq!(dst.clusters_in_layer(), 2);
        assert_eq!(
            cluster_bytes(&dst, 1),
            vec![2; OVERLAY_CLUSTER_SIZE as usize]
        );
        assert_eq!(cluster_bytes(&dst, 3), vec![4; 4096]);

        // An empty overlay saves and loads as well.
        let empty = overlay(dir.as_path(), SIZE, &[]);
        let path = dir.as_path().join("empty.overlay");
        empty.save_file(&path).unwrap();
        dst.load_file(&path).unwrap();
        assert_eq!(dst.clusters_in_layer(), 0);

        // A directory that is not there.
        assert!(src.save_file(Path::new("/nonexistent/skiff/x")).is_err());
    }

    #[test]
    fn fuzz_entry_point() {
        use crate::virtio::block::{fuzz_overlay, FUZZ_OVERLAY_DISK_SIZE};
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("x.overlay");
        overlay(dir.as_path(), FUZZ_OVERLAY_DISK_SIZE, &[1, 3])
            .save_file(&path)
            .unwrap();
        let good = std::fs::read(&path).unwrap();
        assert!(fuzz_overlay(&good));
        for len in (0..good.len()).step_by(4099) {
            assert!(!fuzz_overlay(&good[..len]), "a prefix of {len} bytes");
        }
        let mut x = 0x1234_5678u32;
        for i in 0..200 {
            let mut bad = good.clone();
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let at = x as usize % bad.len();
            bad[at] ^= 1 << (i % 8);
            assert!(!fuzz_overlay(&bad), "bit {} of byte {at}", i % 8);
        }
        assert!(!fuzz_overlay(&[0xff; 64]));
    }

    #[test]
    fn a_bad_overlay_file_is_refused() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("vda.overlay");
        overlay(dir.as_path(), SIZE, &[0, 3])
            .save_file(&path)
            .unwrap();
        let good = std::fs::read(&path).unwrap();
        let data_at = 40 + 16;
        let mut cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("empty", Vec::new(), "truncated"),
            ("short header", good[..20].to_vec(), "truncated"),
            (
                "truncated",
                good[..good.len() - 1].to_vec(),
                "(truncated or extended)",
            ),
            (
                "extended",
                [&good[..], &[0]].concat(),
                "(truncated or extended)",
            ),
        ];
        let mut patched = |name, at: usize, bytes: &[u8], why| {
            let mut v = good.clone();
            v[at..at + bytes.len()].copy_from_slice(bytes);
            cases.push((name, v, why));
        };
        patched("magic", 0, b"SKIFFOVX", "magic");
        patched("version", 8, &2u32.to_le_bytes(), "unknown version");
        patched("flags", 12, &1u32.to_le_bytes(), "unknown version");
        patched(
            "cluster size",
            16,
            &4096u64.to_le_bytes(),
            "cluster size 4096",
        );
        patched("disk size", 24, &(SIZE * 2).to_le_bytes(), "a disk of");
        patched("count", 32, &5u64.to_le_bytes(), "maps 5 clusters");
        patched(
            "count",
            32,
            &u64::MAX.to_le_bytes(),
            "clusters; the disk has 4",
        );
        patched("count", 32, &1u64.to_le_bytes(), "(truncated or extended)");
        patched("order", 40, &3u64.to_le_bytes(), "out of order");
        patched("beyond", 48, &4u64.to_le_bytes(), "beyond the disk's 4");
        patched("huge", 48, &u64::MAX.to_le_bytes(), "beyond");
        patched("data", data_at + 100, &[0x55], "checksum");
        patched("last byte", good.len() - 9, &[0x55], "checksum");
        patched("checksum", good.len() - 8, &[0; 8], "checksum");
        for (name, bytes, why) in cases {
            std::fs::write(&path, &bytes).unwrap();
            let mut dst = overlay(dir.as_path(), SIZE, &[]);
            match dst.load_file(&path) {
                Err(OverlayFileError::Invalid(msg)) => {
                    assert!(msg.contains(why), "{name}: {msg}")
                }
                other => panic!("{name}: {other:?}"),
            }
            assert_eq!(dst.clusters_in_layer(), 0, "{name}: nothing is believed");
        }
        // A file that is not there is an I/O error.
        let mut dst = overlay(dir.as_path(), SIZE, &[]);
        let missing = dir.as_path().join("missing");
        assert!(matches!(
            dst.load_file(&missing),
            Err(OverlayFileError::Io(_))
        ));
    }

    #[test]
    fn writers_exclude_everyone_readers_share() {
        let path = std::env::temp_dir().join(format!("skiff-lock-test-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let (r1, _) = open_image(&path, false).unwrap();
        let (_r2, _) = open_image(&path, false).unwrap();
        assert!(matches!(open_image(&path, true), Err(OpenError::Locked)));
        drop(r1);
        drop(_r2);
        let (_w, _) = open_image(&path, true).unwrap();
        assert!(matches!(open_image(&path, true), Err(OpenError::Locked)));
        assert!(matches!(open_image(&path, false), Err(OpenError::Locked)));
        std::fs::remove_file(&path).unwrap();
    }

    fn is_unlinked(f: &File) -> bool {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd())).unwrap();
        link.to_string_lossy().ends_with(" (deleted)")
    }

    #[test]
    fn temp_files_have_no_name() {
        let dir = std::env::temp_dir();
        let a = anonymous_temp_file(&dir).unwrap();
        assert!(is_unlinked(&a));
        let b = named_then_unlinked(&dir).unwrap();
        assert!(is_unlinked(&b));
        b.write_all_at(b"xyz", 4096).unwrap();
        let mut buf = [0u8; 3];
        b.read_exact_at(&mut buf, 4096).unwrap();
        assert_eq!(&buf, b"xyz");
        assert!(anonymous_temp_file(Path::new("/nonexistent/skiff")).is_err());
    }

    #[test]
    fn split_segments_at_any_byte() {
        use vm_memory::GuestAddress;
        let segs = [
            Segment {
                addr: GuestAddress(0x1000),
                len: 100,
            },
            Segment {
                addr: GuestAddress(0x5000),
                len: 50,
            },
        ];
        let (a, b) = split_segments(&segs, 0);
        assert!(a.is_empty());
        assert_eq!(b, segs);
        let (a, b) = split_segments(&segs, 120);
        assert_eq!(
            a,
            vec![
                segs[0],
                Segment {
                    addr: GuestAddress(0x5000),
                    len: 20
                }
            ]
        );
        assert_eq!(
            b,
            vec![Segment {
                addr: GuestAddress(0x5014),
                len: 30
            }]
        );
        let (a, b) = split_segments(&segs, 100);
        assert_eq!((a, b), (vec![segs[0]], vec![segs[1]]));
        let (a, b) = split_segments(&segs, 1000);
        assert_eq!(a, segs);
        assert!(b.is_empty());
    }
}

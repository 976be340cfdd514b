//! Disk backends: a raw image file, or a read-only raw base with a private
//! copy-on-write overlay.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
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
fn anonymous_temp_file(dir: &Path) -> io::Result<File> {
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
    #[cfg(test)]
    pub fn clusters_in_layer(&self) -> u64 {
        self.present.iter().map(|w| u64::from(w.count_ones())).sum()
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

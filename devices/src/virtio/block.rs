//! virtio-blk (device 2): one request queue over a raw disk image.
//!
//! The image is used read-write, read-only (one image may back many VMs at
//! once), or read-only with a private copy-on-write overlay in an unlinked
//! temp file, so a shared image can be written by the guest without being
//! changed. Requests are parsed by [`parse_request`], which trusts nothing
//! the guest wrote, and executed synchronously on the device event loop.
//!
//! In a snapshot, an overlay's written clusters are saved to a file in the
//! snapshot directory and loaded into the restored device's own new layer;
//! an image used as it is stays the user's (its size must match).

mod disk;
pub mod request;
#[cfg(test)]
mod tests;

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{debug, warn};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use self::disk::OVERLAY_CLUSTER_SIZE;
use self::disk::{Backend, Overlay, OverlayFileError};
pub use self::request::{
    parse_request, InvalidRequest, Request, RequestError, RequestType, Segment, ID_BYTES,
    MAX_CHAIN_DESCRIPTORS,
};
use super::queue::{drain, Drained, Handled};
use super::{
    read_config_bytes, ActivateContext, ActivateError, DeviceState, Interrupt, VirtioDevice,
    VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1,
};
use crate::snapshot::{
    restore_activation, BlobDir, BlockBackendSnapshot, BlockSnapshot, DeviceExtra, DeviceSnapshot,
    SnapshotError,
};

/// virtio device id of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// virtio-blk sectors are always 512 bytes.
pub const SECTOR_SIZE: u64 = 512;
/// Largest (and offered) size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// `seg_max` in the config space: data segments per request.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// `size_max` in the config space: bytes per data segment.
pub const SIZE_MAX: u32 = 1 << 20;
/// Chains handled per queue event before yielding to other devices.
const MAX_CHAINS_PER_EVENT: usize = 256;
/// Request errors logged as warnings per device; later ones go to debug.
pub const GUEST_WARNINGS: u32 = 32;
/// capacity (8) + size_max (4) + seg_max (4) + geometry (4) + blk_size (4).
const CONFIG_SPACE_LEN: usize = 24;

/// How to back a virtio-blk device. The same type is a disk of a test
/// description (JSON/TOML, hence `Deserialize`) and of `skiff-vmm --disk`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockConfig {
    /// The raw disk image (a file or a block device).
    pub path: PathBuf,
    /// The guest may not write (VIRTIO_BLK_F_RO); the image is opened
    /// read-only, so any number of VMs may share it.
    #[serde(default)]
    pub readonly: bool,
    /// The image is opened read-only and guest writes go to a private
    /// copy-on-write layer that disappears with the VM. Excludes
    /// `readonly` (an overlay is writable).
    #[serde(default)]
    pub overlay: bool,
    /// The serial the guest reads with GET_ID (at most 20 bytes); by
    /// default the image's file name.
    #[serde(default)]
    pub id: Option<String>,
}

/// A [`BlockConfig`] whose options contradict each other.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockConfigError {
    /// `readonly` and `overlay` together.
    #[error("readonly=on and overlay=on exclude each other (an overlay is writable)")]
    ReadonlyOverlay,
    /// An id longer than GET_ID returns.
    #[error("id={0}: at most {ID_BYTES} bytes")]
    IdTooLong(String),
}

impl BlockConfig {
    /// Checks the rules of a disk's options. Every way of making a disk
    /// (the command line, a test description, [`Block::new`]) goes
    /// through this one check.
    pub fn validate(&self) -> Result<(), BlockConfigError> {
        if self.readonly && self.overlay {
            return Err(BlockConfigError::ReadonlyOverlay);
        }
        match &self.id {
            Some(id) if id.len() > ID_BYTES => Err(BlockConfigError::IdTooLong(id.clone())),
            _ => Ok(()),
        }
    }
}

/// Why a block device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The options contradict each other.
    #[error(transparent)]
    Config(#[from] BlockConfigError),
    /// The image could not be opened.
    #[error("cannot open disk image {}: {}", .path.display(), os_message(.err))]
    Open {
        /// The image.
        path: PathBuf,
        /// The cause.
        err: io::Error,
    },
    /// Another VM uses the image in a conflicting way.
    #[error(
        "disk image {} is in use by another process (it is locked; share it with readonly=on or overlay=on)",
        .path.display()
    )]
    Locked {
        /// The image.
        path: PathBuf,
    },
    /// The image's size could not be read.
    #[error("cannot read the size of disk image {}: {}", .path.display(), os_message(.err))]
    Size {
        /// The image.
        path: PathBuf,
        /// The cause.
        err: io::Error,
    },
    /// The copy-on-write layer could not be created.
    #[error(
        "cannot create the copy-on-write overlay for disk image {} in {}: {}",
        .path.display(), .dir.display(), os_message(.err)
    )]
    Overlay {
        /// The image.
        path: PathBuf,
        /// Where the layer was to be created.
        dir: PathBuf,
        /// The cause.
        err: io::Error,
    },
    /// An eventfd could not be created.
    #[error("cannot create an eventfd for disk image {}: {}", .path.display(), os_message(.err))]
    EventFd {
        /// The image.
        path: PathBuf,
        /// The cause.
        err: io::Error,
    },
}

/// An I/O error's message without the " (os error N)" suffix.
fn os_message(err: &io::Error) -> String {
    let s = err.to_string();
    match s.rfind(" (os error ") {
        Some(i) if s.ends_with(')') => s[..i].to_owned(),
        _ => s,
    }
}

/// The disk and what the guest may do with it.
struct Disk {
    backend: Backend,
    /// The image.
    path: PathBuf,
    readonly: bool,
    /// Size in bytes (a whole number of sectors).
    size: u64,
    id: [u8; ID_BYTES],
    /// For log lines.
    name: String,
    /// Request errors still to be logged as warnings.
    warnings_left: u32,
}

impl Disk {
    /// Logs a request error the guest caused: the first
    /// [`GUEST_WARNINGS`] as warnings, the rest at debug level, so that a
    /// misbehaving guest cannot flood the log.
    fn guest_error(&mut self, msg: std::fmt::Arguments<'_>) {
        match self.warnings_left {
            0 => debug!("{}: {msg}", self.name),
            1 => {
                warn!(
                    "{}: {msg} (further request errors are logged at debug level)",
                    self.name
                );
                self.warnings_left = 0;
            }
            _ => {
                warn!("{}: {msg}", self.name);
                self.warnings_left -= 1;
            }
        }
    }

    /// The byte offset of `sector` if `[sector, sector + len)` is on the disk.
    fn byte_range(&self, sector: u64, len: u64) -> Option<u64> {
        let offset = sector.checked_mul(SECTOR_SIZE)?;
        let end = offset.checked_add(len)?;
        (end <= self.size).then_some(offset)
    }

    /// Runs a parsed request; returns the status and how many data bytes
    /// were written to the guest.
    fn execute(&mut self, mem: &GuestMemoryMmap, req: &Request) -> (u8, u64) {
        match req.request_type {
            RequestType::In | RequestType::Out => {
                let is_out = req.request_type == RequestType::Out;
                let Some(offset) = self.byte_range(req.sector, req.data_len) else {
                    self.guest_error(format_args!(
                        "{} of {} bytes at sector {} is beyond the end of the disk ({} sectors)",
                        if is_out { "write" } else { "read" },
                        req.data_len,
                        req.sector,
                        self.size / SECTOR_SIZE
                    ));
                    return (VIRTIO_BLK_S_IOERR as u8, 0);
                };
                if is_out && self.readonly {
                    self.guest_error(format_args!("write to a read-only disk refused"));
                    return (VIRTIO_BLK_S_IOERR as u8, 0);
                }
                let res = if is_out {
                    self.backend.write(offset, req.data_len, mem, &req.data)
                } else {
                    self.backend.read(offset, req.data_len, mem, &req.data)
                };
                match res {
                    Ok(()) if is_out => (VIRTIO_BLK_S_OK as u8, 0),
                    Ok(()) => (VIRTIO_BLK_S_OK as u8, req.data_len),
                    Err(e) => {
                        warn!(
                            "{}: {} of {} bytes at sector {} failed: {e}",
                            self.name,
                            if is_out { "write" } else { "read" },
                            req.data_len,
                            req.sector
                        );
                        (VIRTIO_BLK_S_IOERR as u8, 0)
                    }
                }
            }
            RequestType::Flush => match self.backend.flush(!self.readonly) {
                Ok(()) => (VIRTIO_BLK_S_OK as u8, 0),
                Err(e) => {
                    warn!("{}: flush failed: {e}", self.name);
                    (VIRTIO_BLK_S_IOERR as u8, 0)
                }
            },
            RequestType::GetId => {
                let mut left: &[u8] = &self.id;
                for seg in &req.data {
                    if left.is_empty() {
                        break;
                    }
                    let n = left.len().min(seg.len as usize);
                    if let Err(e) = mem.write_slice(&left[..n], seg.addr) {
                        warn!("{}: cannot write the disk id: {e}", self.name);
                        return (VIRTIO_BLK_S_IOERR as u8, 0);
                    }
                    left = &left[n..];
                }
                (VIRTIO_BLK_S_OK as u8, ID_BYTES as u64)
            }
            RequestType::Unsupported(t) => {
                debug!("{}: unsupported request type {t}", self.name);
                (VIRTIO_BLK_S_UNSUPP as u8, 0)
            }
        }
    }

    /// Parses and runs one chain; returns the used length (0 when nothing
    /// could be written back).
    fn handle_chain<I>(&mut self, mem: &GuestMemoryMmap, head: u16, chain: I) -> u32
    where
        I: IntoIterator<Item = virtio_queue::desc::split::Descriptor>,
    {
        let (status_addr, status, written) = match parse_request(mem, chain) {
            Ok(req) => {
                let (status, written) = self.execute(mem, &req);
                (req.status, status, written)
            }
            Err(InvalidRequest { error, status }) => {
                let Some(addr) = status else {
                    self.guest_error(format_args!(
                        "invalid request (descriptor {head}): {error}; completed without a status"
                    ));
                    return 0;
                };
                self.guest_error(format_args!("invalid request (descriptor {head}): {error}"));
                (addr, VIRTIO_BLK_S_IOERR as u8, 0)
            }
        };
        if let Err(e) = mem.write_obj(status, status_addr) {
            warn!("{}: cannot write the request status: {e}", self.name);
            return 0;
        }
        u32::try_from(written).unwrap_or(u32::MAX).saturating_add(1)
    }
}

/// A virtio-blk device.
pub struct Block {
    disk: Disk,
    features: u64,
    config: [u8; CONFIG_SPACE_LEN],
    queue_evts: [EventFd; 1],
    interrupt: Arc<Interrupt>,
    state: DeviceState,
}

impl Block {
    /// Opens the image described by `config`.
    ///
    /// `interrupt_evt` is the eventfd the VMM registers as the irqfd.
    pub fn new(config: &BlockConfig, interrupt_evt: EventFd) -> Result<Block, BlockError> {
        config.validate()?;
        let path = &config.path;
        let overlay = config.overlay;
        let writable = !config.readonly && !overlay;
        let (file, file_size) = disk::open_image(path, writable).map_err(|err| match err {
            disk::OpenError::Open(err) => BlockError::Open {
                path: path.clone(),
                err,
            },
            disk::OpenError::Size(err) => BlockError::Size {
                path: path.clone(),
                err,
            },
            disk::OpenError::Locked => BlockError::Locked { path: path.clone() },
        })?;
        let size = file_size / SECTOR_SIZE * SECTOR_SIZE;
        let backend = if overlay {
            let dir = std::env::temp_dir();
            let o = Overlay::new(file, size, &dir).map_err(|err| BlockError::Overlay {
                path: path.clone(),
                dir: dir.clone(),
                err,
            })?;
            Backend::Overlay(o)
        } else {
            Backend::Raw(file)
        };
        if file_size % SECTOR_SIZE != 0 {
            warn!(
                "disk image {}: size {file_size} is not a multiple of 512; the last {} bytes are not visible",
                path.display(),
                file_size % SECTOR_SIZE
            );
        }

        let queue_evt = EventFd::new(EFD_NONBLOCK).map_err(|err| BlockError::EventFd {
            path: path.clone(),
            err,
        })?;

        let mut features = VIRTIO_F_VERSION_1
            | VIRTIO_F_RING_EVENT_IDX
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_SIZE_MAX;
        if config.readonly {
            features |= 1 << VIRTIO_BLK_F_RO;
        }

        let mut cfg = [0u8; CONFIG_SPACE_LEN];
        cfg[0..8].copy_from_slice(&(size / SECTOR_SIZE).to_le_bytes());
        cfg[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        cfg[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());

        Ok(Block {
            disk: Disk {
                backend,
                path: path.clone(),
                readonly: config.readonly,
                size,
                id: disk_id(config.id.as_deref(), path),
                name: format!("virtio-blk {}", path.display()),
                warnings_left: GUEST_WARNINGS,
            },
            features,
            config: cfg,
            queue_evts: [queue_evt],
            interrupt: Arc::new(Interrupt::new(interrupt_evt)),
            state: DeviceState::Inactive,
        })
    }

    /// Disk size in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.disk.size / SECTOR_SIZE
    }

    /// The GET_ID serial (up to 20 bytes, zero padded).
    pub fn id(&self) -> &[u8; ID_BYTES] {
        &self.disk.id
    }

    /// Processes every available request, then signals the driver if the
    /// used ring changed and the driver wants to hear about it. Does nothing
    /// before activation. The event loop calls this on each queue
    /// notification; it is public for VMMs without an event loop and for
    /// fuzzing the whole device.
    pub fn process_queue(&mut self) {
        let Some(active) = self.state.running() else {
            return;
        };
        let disk = &mut self.disk;
        let drained = drain(active, 0, Some(MAX_CHAINS_PER_EVENT), |mem, chain| {
            let head = chain.head_index();
            Handled::Used(disk.handle_chain(mem, head, chain))
        });
        if drained == Drained::Budget {
            // Let other devices run; come back on the next turn.
            if let Err(e) = self.queue_evts[0].write(1) {
                warn!("{}: cannot re-arm the queue event: {e}", self.disk.name);
            }
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.state
            .activate(ctx, &self.interrupt, &self.disk.name, 1)
    }

    fn reset(&mut self) {
        self.state.reset();
    }

    /// Requests run to completion on the event loop, so none is in flight:
    /// the disk is flushed, and an overlay's clusters are saved to a file
    /// of the snapshot (none when the guest wrote nothing). A raw image is
    /// the user's: only its path and size are recorded.
    fn snapshot(&mut self, blobs: &BlobDir) -> Result<DeviceSnapshot, SnapshotError> {
        let disk = &mut self.disk;
        disk.backend
            .flush(!disk.readonly)
            .map_err(|source| SnapshotError::Io {
                device: blobs.name(),
                action: "flush disk image",
                path: disk.path.clone(),
                source,
            })?;
        let backend = match &disk.backend {
            Backend::Raw(_) => BlockBackendSnapshot::Image {
                path: disk.path.to_string_lossy().into_owned(),
            },
            Backend::Overlay(o) if o.clusters_in_layer() == 0 => {
                BlockBackendSnapshot::Overlay { file: None }
            }
            Backend::Overlay(o) => {
                let file = blobs.file_name("overlay");
                let path = blobs.path(&file)?;
                o.save_file(&path).map_err(|source| SnapshotError::Io {
                    device: blobs.name(),
                    action: "write the overlay file",
                    path,
                    source,
                })?;
                BlockBackendSnapshot::Overlay { file: Some(file) }
            }
        };
        Ok(self.state.snapshot(DeviceExtra::Block(BlockSnapshot {
            size: disk.size,
            readonly: disk.readonly,
            backend,
        })))
    }

    /// The disk must have the snapshot's size and keep the guest's view:
    /// an overlay's saved clusters are loaded into this device's own new
    /// layer (the snapshot's file is only read); an image snapshot may be
    /// restored over an image (the user's copy; its path may differ) or
    /// under an overlay, but an overlay's writes cannot be restored onto a
    /// raw image.
    fn restore(
        &mut self,
        snap: &DeviceSnapshot,
        ctx: Option<ActivateContext>,
        blobs: &BlobDir,
    ) -> Result<(), SnapshotError> {
        let DeviceExtra::Block(b) = &snap.extra else {
            return Err(snap.extra.wrong(blobs, "block"));
        };
        if b.size != self.disk.size {
            return Err(SnapshotError::DiskSize {
                device: blobs.name(),
                snapshot: b.size,
                this: self.disk.size,
            });
        }
        let mode = |readonly: bool, overlay: bool| match (readonly, overlay) {
            (true, _) => "read-only",
            (false, true) => "a copy-on-write overlay",
            (false, false) => "a writable image",
        };
        let snap_overlay = matches!(b.backend, BlockBackendSnapshot::Overlay { .. });
        let this_overlay = matches!(self.disk.backend, Backend::Overlay(_));
        if b.readonly != self.disk.readonly || (snap_overlay && !this_overlay) {
            return Err(SnapshotError::DiskMode {
                device: blobs.name(),
                snapshot: mode(b.readonly, snap_overlay),
                this: mode(self.disk.readonly, this_overlay),
            });
        }
        restore_activation(self, snap, ctx, blobs, |d| &mut d.state)?;
        match (&b.backend, &mut self.disk.backend) {
            (BlockBackendSnapshot::Image { path }, _) => {
                if Path::new(path) != self.disk.path {
                    debug!(
                        "{}: restoring a snapshot of image {path} over {}",
                        blobs.device,
                        self.disk.path.display()
                    );
                }
            }
            (BlockBackendSnapshot::Overlay { file: None }, Backend::Overlay(o)) => o.clear(),
            (BlockBackendSnapshot::Overlay { file: Some(file) }, Backend::Overlay(o)) => {
                let path = blobs.path(file)?;
                o.load_file(&path).map_err(|e| match e {
                    OverlayFileError::Io(source) => SnapshotError::Io {
                        device: blobs.name(),
                        action: "load the overlay file",
                        path,
                        source,
                    },
                    OverlayFileError::Invalid(reason) => SnapshotError::BadOverlay {
                        device: blobs.name(),
                        path,
                        reason,
                    },
                })?;
            }
            // Refused above.
            (BlockBackendSnapshot::Overlay { .. }, Backend::Raw(_)) => {}
        }
        Ok(())
    }
}

impl MutEventSubscriber for Block {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let Some(evt) = self.queue_evts.get(events.data() as usize) else {
            warn!(
                "{}: event for unknown source {}",
                self.disk.name,
                events.data()
            );
            return;
        };
        if let Err(e) = evt.read() {
            if e.kind() != io::ErrorKind::WouldBlock {
                warn!("{}: cannot read the queue event: {e}", self.disk.name);
            }
        }
        self.process_queue();
    }

    fn init(&mut self, ops: &mut EventOps) {
        let queues: Vec<Events> = (0u32..)
            .zip(&self.queue_evts)
            .map(|(i, evt)| Events::with_data(evt, i, EventSet::IN))
            .collect();
        super::watch(ops, &self.disk.name, &queues);
    }
}

/// Guest memory size used by [`fuzz_parse`].
pub const FUZZ_MEM_SIZE: usize = 0x1_0000;
/// Queue size used by [`fuzz_parse`].
const FUZZ_QUEUE_SIZE: u16 = 16;

/// Fuzzing entry point: `data` becomes the first bytes of a 64 KiB guest
/// memory that holds a split queue of 16 entries (descriptor table at 0x0,
/// available ring at 0x100, used ring at 0x140); every chain the available
/// ring offers is walked and handed to [`parse_request`], as the device
/// does, then completed. Returns how many chains parsed as valid requests.
/// Never touches a disk, so any input is safe to run; it must never panic
/// or loop.
pub fn fuzz_parse(data: &[u8]) -> usize {
    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), FUZZ_MEM_SIZE)]) else {
        return 0;
    };
    let _ = mem.write_slice(&data[..data.len().min(FUZZ_MEM_SIZE)], GuestAddress(0));
    let Ok(mut queue) = Queue::new(FUZZ_QUEUE_SIZE) else {
        return 0;
    };
    queue.set_size(FUZZ_QUEUE_SIZE);
    queue.set_desc_table_address(Some(0), Some(0));
    queue.set_avail_ring_address(Some(0x100), Some(0));
    queue.set_used_ring_address(Some(0x140), Some(0));
    queue.set_ready(true);
    let mut valid = 0;
    // The available index comes from the input; the queue refuses one more
    // than the queue size ahead, so this loop is bounded.
    for _ in 0..FUZZ_QUEUE_SIZE {
        let chain = match queue.iter(&mem) {
            Ok(mut avail) => avail.next(),
            Err(_) => break,
        };
        let Some(chain) = chain else {
            break;
        };
        let head = chain.head_index();
        if parse_request(&mem, chain).is_ok() {
            valid += 1;
        }
        if queue.add_used(&mem, head, 0).is_err() {
            break;
        }
    }
    valid
}

/// Size of the disk of [`fuzz_overlay`]: three clusters and a short fourth.
pub const FUZZ_OVERLAY_DISK_SIZE: u64 = 3 * OVERLAY_CLUSTER_SIZE + 4096;

/// Fuzzing entry point for overlay files (from a snapshot: untrusted):
/// `data` is loaded as an overlay file into an overlay of a disk of
/// [`FUZZ_OVERLAY_DISK_SIZE`] bytes (in unlinked temp files). Returns
/// whether it was accepted; must never panic or allocate by what `data`
/// says.
pub fn fuzz_overlay(data: &[u8]) -> bool {
    use std::os::unix::fs::FileExt;
    let dir = std::env::temp_dir();
    let (Ok(base), Ok(file)) = (
        disk::anonymous_temp_file(&dir),
        disk::anonymous_temp_file(&dir),
    ) else {
        return false;
    };
    if base.set_len(FUZZ_OVERLAY_DISK_SIZE).is_err() || file.write_all_at(data, 0).is_err() {
        return false;
    }
    let Ok(mut overlay) = Overlay::new(base, FUZZ_OVERLAY_DISK_SIZE, &dir) else {
        return false;
    };
    overlay.load(file).is_ok()
}

/// The GET_ID bytes: `id`, or the file name of `path`, cut to 20 bytes.
fn disk_id(id: Option<&str>, path: &Path) -> [u8; ID_BYTES] {
    let src: &[u8] = match id {
        Some(id) => id.as_bytes(),
        None => path.file_name().map_or(b"skiff-disk", |n| n.as_bytes()),
    };
    let mut out = [0u8; ID_BYTES];
    let n = src.len().min(ID_BYTES);
    out[..n].copy_from_slice(&src[..n]);
    out
}

//! Device state for snapshots: what each device saves so that a whole VM
//! can be written to a file and restored in a new process, and the checks
//! that a restore makes before it believes any of it.
//!
//! Who does what:
//! * [`MmioTransport::snapshot`](crate::virtio::mmio::MmioTransport::snapshot)
//!   is called with the vCPUs paused. It quiesces the device (block: flush;
//!   console and net: write out what the backend takes now) and records the
//!   transport's registers, the interrupt and the device
//!   ([`TransportSnapshot`]). A device may write a file of its own into the
//!   snapshot directory (a block overlay's contents, see
//!   [`BlockBackendSnapshot::Overlay`]).
//! * [`MmioTransport::restore`](crate::virtio::mmio::MmioTransport::restore)
//!   is called in the new process on a transport built the usual way from
//!   the same command line, after guest memory holds the snapshot's bytes
//!   and before any vCPU runs. It refuses a snapshot of another kind of
//!   device or with other features, sets the registers, activates the device
//!   with the queues at the positions the *device* had reached, and applies
//!   the device's own state ([`DeviceExtra`]). Nothing is processed yet.
//! * [`MmioTransport::kick`](crate::virtio::mmio::MmioTransport::kick),
//!   just before the vCPUs resume, writes every queue eventfd and raises
//!   the interrupt again if a status bit is set, so that anything made
//!   available while paused is served and no interrupt is lost.
//! * The legacy devices: [`crate::legacy::Serial`] ([`SerialSnapshot`]) and
//!   [`crate::legacy::Ged`] ([`GedSnapshot`]). The ACPI PM port, the pvpanic
//!   port and the i8042 hold no state of their own: nothing to save.
//!
//! A snapshot is untrusted input (it is read back from a file, and fuzzed):
//! every size, index, address and length is checked before use, a queue
//! goes through `virtio_queue`'s validating conversion and, when the device
//! was activated, must lie in guest memory; nothing from a snapshot sizes an
//! allocation beyond a bound the device sets (the console's [`CHUNK`], the
//! serial FIFO, a disk's cluster count). A failed restore is an error, never
//! a panic, and leaves the transport reset. [`fuzz_restore`] and
//! [`crate::virtio::block::fuzz_overlay`] are the fuzzing entry points.
//!
//! What is not saved, on purpose:
//! * the host side of backends: open files and sockets are those of the new
//!   process (a console or network socket is connected afresh);
//! * frames on their way through a network card's socket buffers (framed
//!   output the peer has not taken, input read but not yet given to the
//!   guest): they are dropped, as a network may drop any frame;
//! * counters and log rate limits, which start again in the new process;
//! * a writable or read-only disk image's contents: the image is the user's
//!   (only its path and size are recorded, and the size must match).
//!
//! [`CHUNK`]: crate::virtio::console::CHUNK

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use crate::virtio::net::MacAddr;
use crate::virtio::{ActivateContext, ActivateError, DeviceState, VirtioDevice};

/// Why a snapshot could not be taken or restored. Every variant names the
/// device (its name in the VM: `vda`, `hvc0`, `serial`).
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The snapshot is of another kind of virtio device.
    #[error(
        "{device}: snapshot has a virtio device of type {snapshot} ({}) where this VM has type {this} ({})",
        virtio_type_name(*.snapshot),
        virtio_type_name(*.this)
    )]
    DeviceType {
        /// The device.
        device: String,
        /// The type in the snapshot.
        snapshot: u32,
        /// This device's type.
        this: u32,
    },
    /// The device offered other features when the snapshot was taken (it
    /// was configured differently).
    #[error(
        "{device}: snapshot's device offers features {snapshot:#x} where this one offers {this:#x} \
         (differing bits {:#x})",
        .snapshot ^ .this
    )]
    Features {
        /// The device.
        device: String,
        /// The features in the snapshot.
        snapshot: u64,
        /// This device's features.
        this: u64,
    },
    /// The snapshot has another number of queues than the device.
    #[error("{device}: snapshot has {snapshot} queues where this device has {this}")]
    QueueCount {
        /// The device.
        device: String,
        /// The queues in the snapshot.
        snapshot: usize,
        /// This device's queues.
        this: usize,
    },
    /// A queue in the snapshot is not one the device could have.
    #[error("{device}: queue {index} in the snapshot is invalid: {reason}")]
    InvalidQueue {
        /// The device.
        device: String,
        /// The queue.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// A value in the snapshot is out of range or contradicts another.
    #[error("{device}: invalid snapshot: {reason}")]
    Invalid {
        /// The device.
        device: String,
        /// What is wrong.
        reason: String,
    },
    /// The device-specific part of the snapshot is another device's.
    #[error("{device}: snapshot holds the state of a {found} device where this is a {expected}")]
    WrongDevice {
        /// The device.
        device: String,
        /// This device's kind.
        expected: &'static str,
        /// The kind in the snapshot.
        found: &'static str,
    },
    /// The device refused the restored queues.
    #[error("{device}: cannot activate the restored device: {source}")]
    Activate {
        /// The device.
        device: String,
        /// Why.
        source: ActivateError,
    },
    /// A file of the snapshot (or a disk image) could not be used.
    #[error("{device}: cannot {action} {}: {source}", .path.display())]
    Io {
        /// The device.
        device: String,
        /// What was being done ("write the overlay file").
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A host resource the restored device needs could not be had.
    #[error("{device}: cannot {what}: {source}")]
    Host {
        /// The device.
        device: String,
        /// What was being done ("duplicate the interrupt eventfd").
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// A block overlay file is truncated, garbled or for another disk.
    #[error("{device}: {} is not a valid overlay for this disk: {reason}", .path.display())]
    BadOverlay {
        /// The device.
        device: String,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The disk has another size than when the snapshot was taken.
    #[error("{device}: snapshot's disk has {snapshot} bytes where this disk has {this}")]
    DiskSize {
        /// The device.
        device: String,
        /// The size in the snapshot.
        snapshot: u64,
        /// This disk's size.
        this: u64,
    },
    /// The disk is used another way (overlay, read-only, writable) than
    /// when the snapshot was taken, and the guest's view cannot be kept.
    #[error("{device}: snapshot's disk is {snapshot} where this disk is {this}")]
    DiskMode {
        /// The device.
        device: String,
        /// The snapshot's mode.
        snapshot: &'static str,
        /// This disk's mode.
        this: &'static str,
    },
    /// A network card has another MAC address than the snapshot's, which
    /// the guest's driver has already read.
    #[error("{device}: snapshot's card has MAC address {snapshot} where this card has {this}")]
    Mac {
        /// The device.
        device: String,
        /// The address in the snapshot.
        snapshot: MacAddr,
        /// This card's address.
        this: MacAddr,
    },
}

/// The name of a virtio device type, for messages.
pub fn virtio_type_name(device_type: u32) -> &'static str {
    match device_type {
        1 => "network",
        2 => "block",
        3 => "console",
        4 => "entropy",
        16 => "gpu",
        18 => "input",
        _ => "unknown",
    }
}

/// Where a device may keep files of its own in a snapshot: the snapshot
/// directory, and the device's name in the VM (`vda`), which names its
/// files and its errors.
#[derive(Debug, Clone, Copy)]
pub struct BlobDir<'a> {
    /// The snapshot directory.
    pub dir: &'a Path,
    /// The device's name in the VM.
    pub device: &'a str,
}

/// Longest file name a snapshot may name (NAME_MAX).
const MAX_FILE_NAME: usize = 255;

impl<'a> BlobDir<'a> {
    /// The blob directory `dir` for device `device`.
    pub fn new(dir: &'a Path, device: &'a str) -> Self {
        BlobDir { dir, device }
    }

    /// The device's name, for errors.
    pub fn name(&self) -> String {
        self.device.to_owned()
    }

    /// A file name for the device's blob with `suffix` (`overlay`): the
    /// device's name with anything but letters, digits, `-`, `_` and `.`
    /// replaced, so that it is one plain file in the directory.
    pub fn file_name(&self, suffix: &str) -> String {
        let stem: String = self
            .device
            .chars()
            .take(64)
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let stem = stem.trim_start_matches('.');
        let stem = if stem.is_empty() { "device" } else { stem };
        format!("{stem}.{suffix}")
    }

    /// The path of file `name` (from a snapshot: untrusted) in the
    /// directory; refused unless `name` is one plain file name, so that a
    /// snapshot cannot point outside its directory.
    pub fn path(&self, name: &str) -> Result<PathBuf, SnapshotError> {
        let plain = !name.is_empty()
            && name.len() <= MAX_FILE_NAME
            && name != "."
            && name != ".."
            && !name.contains(['/', '\0']);
        if !plain {
            return Err(SnapshotError::Invalid {
                device: self.name(),
                reason: format!("{name:?} is not a file name in the snapshot directory"),
            });
        }
        Ok(self.dir.join(name))
    }
}

/// One virtqueue: `virtio_queue::QueueState`, serializable.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSnapshot {
    /// The largest size the device offers.
    pub max_size: u16,
    /// The size the driver chose.
    pub size: u16,
    /// The driver made the queue ready.
    pub ready: bool,
    /// Guest address of the descriptor table.
    pub desc_table: u64,
    /// Guest address of the available ring.
    pub avail_ring: u64,
    /// Guest address of the used ring.
    pub used_ring: u64,
    /// The next available ring entry the device takes.
    pub next_avail: u16,
    /// The next used ring entry the device writes.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX was negotiated.
    pub event_idx_enabled: bool,
}

impl From<QueueState> for QueueSnapshot {
    fn from(s: QueueState) -> Self {
        QueueSnapshot {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(s: QueueSnapshot) -> Self {
        QueueState {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl From<&Queue> for QueueSnapshot {
    fn from(q: &Queue) -> Self {
        q.state().into()
    }
}

/// Validating: a size that is not a power of two up to `max_size`, or a
/// misaligned ring, is refused (guest memory is not checked here).
impl TryFrom<&QueueSnapshot> for Queue {
    type Error = virtio_queue::Error;

    fn try_from(s: &QueueSnapshot) -> Result<Self, Self::Error> {
        Queue::try_from(QueueState::from(*s))
    }
}

impl QueueSnapshot {
    /// Whether the two describe the same queue as the driver configured it
    /// (positions aside).
    pub(crate) fn same_config(&self, other: &QueueSnapshot) -> bool {
        (
            self.max_size,
            self.size,
            self.ready,
            self.desc_table,
            self.avail_ring,
            self.used_ring,
            self.event_idx_enabled,
        ) == (
            other.max_size,
            other.size,
            other.ready,
            other.desc_table,
            other.avail_ring,
            other.used_ring,
            other.event_idx_enabled,
        )
    }
}

/// Builds queue `index` from its snapshot for a device whose queue has
/// `max_size` entries at most: `virtio_queue`'s checks, plus, with `mem`
/// (an activated queue), that the queue is ready and lies in guest memory.
pub(crate) fn queue_from_snapshot(
    device: &str,
    index: usize,
    snap: &QueueSnapshot,
    max_size: u16,
    mem: Option<&vm_memory::GuestMemoryMmap>,
) -> Result<Queue, SnapshotError> {
    let invalid = |reason: String| SnapshotError::InvalidQueue {
        device: device.to_owned(),
        index,
        reason,
    };
    if snap.max_size != max_size {
        return Err(invalid(format!(
            "largest size {} where the device offers {max_size}",
            snap.max_size
        )));
    }
    let queue = Queue::try_from(snap).map_err(|e| invalid(format!("{e:?}")))?;
    if let Some(mem) = mem {
        if !queue.ready() {
            return Err(invalid("the device was activated with it not ready".into()));
        }
        if !queue.is_valid(mem) {
            return Err(invalid(format!(
                "its rings (size {}, descriptors at {:#x}, available at {:#x}, used at {:#x}) \
                 are not in guest memory",
                snap.size, snap.desc_table, snap.avail_ring, snap.used_ring
            )));
        }
    }
    Ok(queue)
}

/// The state of a virtio-mmio transport and its device.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct TransportSnapshot {
    /// virtio device id (must match the restoring device's).
    pub device_type: u32,
    /// Features the device offered (must match).
    pub device_features: u64,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// QueueSel.
    pub queue_sel: u32,
    /// The device status register (DEVICE_NEEDS_RESET is `needs_reset`).
    pub status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// InterruptStatus bits not yet acknowledged.
    pub interrupt_status: u32,
    /// The device asked for a reset (DEVICE_NEEDS_RESET).
    pub needs_reset: bool,
    /// The device was activated (DRIVER_OK, and the device accepted).
    pub activated: bool,
    /// The transport's queues as the driver configured them (their
    /// positions are those of activation; the device's are in `device`).
    pub queues: Vec<QueueSnapshot>,
    /// The device.
    pub device: DeviceSnapshot,
}

/// The state of a virtio device.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct DeviceSnapshot {
    /// The queues the device holds, with their positions; `None` when it
    /// is not activated.
    pub queues: Option<Vec<QueueSnapshot>>,
    /// The device found a queue broken and waits for a reset.
    pub broken: bool,
    /// Malformed chains completed so far (rate-limits their log lines).
    pub malformed: u64,
    /// What is particular to the device.
    pub extra: DeviceExtra,
}

/// Device-specific state.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum DeviceExtra {
    /// virtio-blk.
    Block(BlockSnapshot),
    /// virtio-console.
    Console(ConsoleSnapshot),
    /// virtio-net.
    Net(NetSnapshot),
    /// virtio-rng: nothing beyond its queue.
    Rng,
    /// virtio-input.
    Input(InputSnapshot),
    /// virtio-gpu.
    Gpu(GpuSnapshot),
    /// A device with nothing of its own to save.
    None,
}

impl DeviceExtra {
    /// The kind of device, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            DeviceExtra::Block(_) => "block",
            DeviceExtra::Console(_) => "console",
            DeviceExtra::Net(_) => "network",
            DeviceExtra::Rng => "entropy",
            DeviceExtra::Input(_) => "input",
            DeviceExtra::Gpu(_) => "gpu",
            DeviceExtra::None => "stateless",
        }
    }

    /// The error for a device of kind `expected` given this.
    pub(crate) fn wrong(&self, blobs: &BlobDir, expected: &'static str) -> SnapshotError {
        SnapshotError::WrongDevice {
            device: blobs.name(),
            expected,
            found: self.kind(),
        }
    }
}

/// A virtio-blk device: its disk, and where its overlay's contents are.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct BlockSnapshot {
    /// Size of the disk in bytes (must match).
    pub size: u64,
    /// The guest may not write.
    pub readonly: bool,
    /// What backs the disk.
    pub backend: BlockBackendSnapshot,
}

/// What backs a snapshotted disk.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum BlockBackendSnapshot {
    /// The user's image, used as it is (read-write or read-only): its
    /// contents are the user's to keep (only recorded, for messages).
    Image {
        /// The image's path when the snapshot was taken.
        path: String,
    },
    /// A read-only base under a private copy-on-write layer, whose
    /// contents were saved to `file` in the snapshot directory (`None`:
    /// the guest had written nothing). A restore copies them into the new
    /// device's own layer, so the file is never written again and many
    /// VMs may be restored from it at once.
    Overlay {
        /// The file in the snapshot directory.
        file: Option<String>,
    },
}

/// A virtio-console device's guest output not yet written to the backend.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ConsoleSnapshot {
    /// Guest output taken from the transmit queue that the backend had not
    /// taken (at most [`crate::virtio::console::CHUNK`] bytes); delivered by
    /// the restored device.
    pub pending_output: Vec<u8>,
    /// Bytes of the chain at the head of the transmit queue already taken
    /// (a chain longer than `CHUNK` is taken in pieces); 0 when none.
    pub tx_chain_offset: u64,
}

/// A virtio-input device: what the driver selected in its configuration
/// space, its LEDs, and the host's events it had not taken yet.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct InputSnapshot {
    /// A keyboard (else a tablet).
    pub keyboard: bool,
    /// Host events waiting for buffers, as (type, code, value).
    pub pending: Vec<(u16, u16, u32)>,
    /// The configuration select the driver wrote.
    pub select: u8,
    /// The configuration subselect the driver wrote.
    pub subsel: u8,
    /// The LEDs the driver set.
    pub leds: u32,
}

/// A virtio-gpu: its mode, its resources (each resource's pixels in a
/// file of its own), what the scanout shows and the cursor's place.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct GpuSnapshot {
    /// The display mode's width (must match).
    pub width: u32,
    /// The display mode's height (must match).
    pub height: u32,
    /// The 2D resources.
    pub resources: Vec<GpuResourceSnapshot>,
    /// The scanout's resource and rectangle (x, y, width, height).
    pub scanout: Option<(u32, [u32; 4])>,
    /// The cursor's position.
    pub cursor: (u32, u32),
    /// Display events not yet cleared by the driver.
    pub events_read: u32,
}

/// One 2D resource of a [`GpuSnapshot`].
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct GpuResourceSnapshot {
    /// The guest's id for it.
    pub id: u32,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// virtio-gpu pixel format.
    pub format: u32,
    /// Guest ranges behind it (address, length).
    pub backing: Vec<(u64, u32)>,
    /// The file in the snapshot directory holding its host copy.
    pub file: String,
}

/// A virtio-net card's configuration as the guest sees it. Frames in the
/// socket's buffers are not saved: they are dropped.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct NetSnapshot {
    /// The MAC address in config space (must match).
    pub mac: [u8; 6],
    /// The link status (`set_link`).
    pub link_up: bool,
}

/// The 8250 UART: `vm_superio::serial::SerialState`, serializable, and the
/// output held back for the end of a line.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SerialSnapshot {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// SCR.
    pub scratch: u8,
    /// Received bytes the guest has not read (the FIFO, at most 64).
    pub in_buffer: Vec<u8>,
    /// Guest output held back until its line ends (at most 4096 bytes,
    /// the UART's `SERIAL_HOLD_MAX`); written by the restored UART with its
    /// next line or flush.
    pub held_output: Vec<u8>,
}

/// The ACPI Generic Event Device: events the guest has not read.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct GedSnapshot {
    /// Pending event bits.
    pub pending: u32,
}

impl DeviceState {
    /// The state shared by every device (its queues, broken, malformed),
    /// with `extra`.
    pub fn snapshot(&self, extra: DeviceExtra) -> DeviceSnapshot {
        match self {
            DeviceState::Inactive => DeviceSnapshot {
                queues: None,
                broken: false,
                malformed: 0,
                extra,
            },
            DeviceState::Activated(a) => DeviceSnapshot {
                queues: Some(a.queues.iter().map(QueueSnapshot::from).collect()),
                broken: a.broken,
                malformed: a.malformed,
                extra,
            },
        }
    }
}

/// Restores what every device shares: activates `dev` (its own
/// [`VirtioDevice::activate`], so that it sets itself up as on DRIVER_OK)
/// with `ctx` when the snapshot's device was activated, then sets the
/// broken flag and malformed count in the state `state` returns. `ctx`
/// must be given exactly when `snap.queues` is.
pub fn restore_activation<D: VirtioDevice>(
    dev: &mut D,
    snap: &DeviceSnapshot,
    ctx: Option<ActivateContext>,
    blobs: &BlobDir,
    state: impl FnOnce(&mut D) -> &mut DeviceState,
) -> Result<(), SnapshotError> {
    let invalid = |reason: &str| SnapshotError::Invalid {
        device: blobs.name(),
        reason: reason.to_owned(),
    };
    match (&snap.queues, ctx) {
        (None, None) => {
            if snap.broken || snap.malformed != 0 {
                return Err(invalid(
                    "an inactive device cannot be broken or have seen malformed chains",
                ));
            }
            dev.reset();
            Ok(())
        }
        (Some(queues), Some(ctx)) => {
            if queues.len() != ctx.queues.len() {
                return Err(SnapshotError::QueueCount {
                    device: blobs.name(),
                    snapshot: queues.len(),
                    this: ctx.queues.len(),
                });
            }
            dev.activate(ctx)
                .map_err(|source| SnapshotError::Activate {
                    device: blobs.name(),
                    source,
                })?;
            match state(dev) {
                DeviceState::Activated(a) => {
                    a.broken = snap.broken;
                    a.malformed = snap.malformed;
                    Ok(())
                }
                DeviceState::Inactive => Err(SnapshotError::Activate {
                    device: blobs.name(),
                    source: ActivateError::Other("the device stayed inactive".into()),
                }),
            }
        }
        (Some(_), None) => Err(invalid(
            "the device holds queues but the transport was not activated",
        )),
        (None, Some(_)) => Err(invalid(
            "the transport was activated but the device holds no queues",
        )),
    }
}

/// Guest memory of [`fuzz_restore`].
pub const FUZZ_MEM_SIZE: usize = 0x1_0000;

/// Fuzzing entry point for transport snapshots (untrusted input): `snap`
/// is restored into a fresh virtio-rng device and transport over
/// [`FUZZ_MEM_SIZE`] bytes of zeroed guest memory, which is then kicked
/// and serves its queue. Returns whether the restore was accepted; must
/// never panic or loop, whatever `snap` holds.
pub fn fuzz_restore(snap: &TransportSnapshot) -> bool {
    use std::sync::{Arc, Mutex};

    use vm_memory::{GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use crate::virtio::mmio::MmioTransport;
    use crate::virtio::rng::Rng;

    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), FUZZ_MEM_SIZE)]) else {
        return false;
    };
    let Some(rng) = EventFd::new(EFD_NONBLOCK)
        .ok()
        .and_then(|evt| Rng::new(evt).ok())
    else {
        return false;
    };
    let rng = Arc::new(Mutex::new(rng));
    let dev: Arc<Mutex<dyn VirtioDevice>> = rng.clone();
    let Ok(mut t) = MmioTransport::new(mem, dev, "fuzz") else {
        return false;
    };
    let dir = std::env::temp_dir();
    let accepted = t.restore(snap, &dir).is_ok();
    t.kick();
    if let Ok(mut rng) = rng.lock() {
        rng.process_queue();
    }
    accepted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_snapshots_convert_both_ways_and_validate() {
        let mut q = Queue::new(256).unwrap();
        q.set_size(64);
        q.set_desc_table_address(Some(0x1000), Some(1));
        q.set_avail_ring_address(Some(0x2000), None);
        q.set_used_ring_address(Some(0x3000), None);
        q.set_next_avail(7);
        q.set_next_used(5);
        q.set_event_idx(true);
        q.set_ready(true);
        let s = QueueSnapshot::from(&q);
        assert_eq!(s.desc_table, 0x1_0000_1000);
        assert_eq!((s.next_avail, s.next_used, s.size), (7, 5, 64));
        assert_eq!(QueueState::from(s), q.state());
        assert_eq!(Queue::try_from(&s).unwrap(), q);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<QueueSnapshot>(&json).unwrap(), s);
        for bad in [
            QueueSnapshot {
                size: 128,
                max_size: 100,
                ..s
            },
            QueueSnapshot { size: 512, ..s },
            QueueSnapshot { size: 3, ..s },
            QueueSnapshot { desc_table: 8, ..s },
            QueueSnapshot { avail_ring: 1, ..s },
            QueueSnapshot { used_ring: 2, ..s },
        ] {
            assert!(Queue::try_from(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn blob_files_stay_in_the_directory() {
        let dir = Path::new("/snap");
        let b = BlobDir::new(dir, "vda");
        assert_eq!(b.file_name("overlay"), "vda.overlay");
        assert_eq!(b.path("vda.overlay").unwrap(), dir.join("vda.overlay"));
        for bad in [
            "",
            ".",
            "..",
            "../vda.overlay",
            "/etc/passwd",
            "a/b",
            "a\0b",
        ] {
            let e = b.path(bad).unwrap_err();
            assert!(matches!(e, SnapshotError::Invalid { .. }), "{bad:?}");
            assert!(e.to_string().starts_with("vda: "), "{e}");
        }
        assert!(b.path(&"x".repeat(256)).is_err());
        // Names the VMM gives are made into one plain file name.
        let odd = BlobDir::new(dir, "../disk 1/\u{e9}");
        let name = odd.file_name("overlay");
        assert_eq!(name, "_disk_1__.overlay");
        assert!(odd.path(&name).is_ok());
        assert_eq!(BlobDir::new(dir, "..").file_name("x"), "device.x");
    }

    #[test]
    fn fuzz_entry_point() {
        use vm_memory::{GuestAddress, GuestMemoryMmap};

        use crate::virtio::mmio::MmioTransport;
        use crate::virtio::rng::Rng;
        use crate::virtio::test_utils::{mmio_activate, snapshot_through_json, TestQueue, W};

        // A valid snapshot of the device and memory the entry point uses.
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), FUZZ_MEM_SIZE)]).unwrap();
        let mut q = TestQueue::new(&mem, 0, 16);
        let evt = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let rng = std::sync::Arc::new(std::sync::Mutex::new(Rng::new(evt).unwrap()));
        let mut t = MmioTransport::new(mem.clone(), rng, "fuzz").unwrap();
        mmio_activate(&mut t, 0, &[&q]);
        q.add_chain(&[(0x8000, 16, W)]);
        let good = snapshot_through_json(&mut t, &std::env::temp_dir());
        assert!(fuzz_restore(&good));
        // Every field pushed to odd values: refused or accepted, never a
        // panic or a hang.
        let odd64 = [
            0,
            1,
            0xf,
            0x10,
            0xfff0,
            FUZZ_MEM_SIZE as u64,
            u64::MAX - 15,
            u64::MAX,
        ];
        let odd16 = [0, 1, 3, 16, 17, 256, 0x8000, u16::MAX];
        let mut variants = Vec::new();
        for (&a, &b) in odd64.iter().zip(&odd16) {
            let mut s = good.clone();
            s.status = a as u32;
            s.driver_features = a;
            s.interrupt_status = b.into();
            variants.push(s);
            let mut s = good.clone();
            for q in s
                .queues
                .iter_mut()
                .chain(s.device.queues.iter_mut().flatten())
            {
                q.size = b;
                q.max_size = b;
            }
            variants.push(s);
            for field in 0..3 {
                let mut s = good.clone();
                for q in s
                    .queues
                    .iter_mut()
                    .chain(s.device.queues.iter_mut().flatten())
                {
                    *[&mut q.desc_table, &mut q.avail_ring, &mut q.used_ring][field] = a;
                }
                variants.push(s);
            }
            let mut s = good.clone();
            for q in s.device.queues.iter_mut().flatten() {
                q.next_avail = b;
                q.next_used = b.wrapping_add(3);
            }
            variants.push(s);
        }
        let accepted = variants.iter().filter(|s| fuzz_restore(s)).count();
        assert!(accepted > 0 && accepted < variants.len(), "{accepted}");
    }

    #[test]
    fn type_names_in_messages() {
        assert_eq!(virtio_type_name(2), "block");
        assert_eq!(virtio_type_name(99), "unknown");
    }
}

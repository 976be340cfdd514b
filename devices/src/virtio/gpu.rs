//! virtio-gpu (device id 16), 2D only: one scanout the guest draws into,
//! kept in host memory, from which the monitors take screenshots.
//!
//! The control queue (0) carries the commands Linux's DRM driver sends
//! (display info, EDID, 2D resources, their guest backing, scanout,
//! transfers and flushes); the cursor queue (1) carries cursor updates,
//! which are taken and remembered but not drawn. Each resource has a host
//! copy (`width * height * 4` bytes) that TRANSFER_TO_HOST_2D fills from
//! the guest's backing pages; a screenshot converts the scanout's rectangle
//! of that copy to RGB, as QEMU's display surface shows every transferred
//! pixel.
//!
//! Invariants: everything the guest sends is untrusted. Resource ids,
//! rectangles, offsets, strides and backing entries are checked before use
//! (arithmetic in u64, ranges against guest memory); a bad command gets the
//! virtio-gpu error response QEMU gives, never a panic. Host copies of all
//! resources together stay under [`MAX_HOST_BYTES`]. A fenced command is
//! answered with its fence only once done (all work here is synchronous).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use log::{debug, warn};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::queue::{drain, ChainError, Drained, Handled};
use super::{
    read_config_bytes, watch, ActivateContext, ActivateError, DeviceState, Interrupt, VirtioDevice,
    VIRTIO_F_VERSION_1,
};
use crate::snapshot::{
    restore_activation, BlobDir, DeviceExtra, DeviceSnapshot, GpuResourceSnapshot, GpuSnapshot,
    SnapshotError,
};

mod edid;

/// virtio device id of a GPU.
pub const GPU_DEVICE_ID: u32 = 16;
/// Feature bit: the device answers GET_EDID.
pub const VIRTIO_GPU_F_EDID: u64 = 1 << 1;
/// Largest size of the control queue.
pub const CONTROL_QUEUE_SIZE: u16 = 256;
/// Largest size of the cursor queue.
pub const CURSOR_QUEUE_SIZE: u16 = 16;
/// Host memory that the copies of all resources may take together.
pub const MAX_HOST_BYTES: u64 = 256 << 20;
/// Most entries of one resource's backing (QEMU's limit).
pub const MAX_BACKING_ENTRIES: u32 = 16384;
/// Largest width or height of a resource.
pub const MAX_RESOURCE_DIM: u32 = 16384;
/// Smallest and largest display mode the device offers.
pub const MIN_MODE: (u32, u32) = (320, 200);
/// Largest display mode (EDID holds 12-bit sizes).
pub const MAX_MODE: (u32, u32) = (4095, 4095);
/// Commands served per turn of the event loop.
const CHAINS_PER_EVENT: usize = 64;

/// Control header flags.
const FLAG_FENCE: u32 = 1 << 0;
const FLAG_INFO_RING_IDX: u32 = 1 << 1;

/// Command and response types.
const CMD_GET_DISPLAY_INFO: u32 = 0x0100;
const CMD_RESOURCE_CREATE_2D: u32 = 0x0101;
const CMD_RESOURCE_UNREF: u32 = 0x0102;
const CMD_SET_SCANOUT: u32 = 0x0103;
const CMD_RESOURCE_FLUSH: u32 = 0x0104;
const CMD_TRANSFER_TO_HOST_2D: u32 = 0x0105;
const CMD_RESOURCE_ATTACH_BACKING: u32 = 0x0106;
const CMD_RESOURCE_DETACH_BACKING: u32 = 0x0107;
const CMD_GET_EDID: u32 = 0x010a;
const CMD_UPDATE_CURSOR: u32 = 0x0300;
const CMD_MOVE_CURSOR: u32 = 0x0301;
const RESP_OK_NODATA: u32 = 0x1100;
const RESP_OK_DISPLAY_INFO: u32 = 0x1101;
const RESP_OK_EDID: u32 = 0x1104;
const RESP_ERR_UNSPEC: u32 = 0x1200;
const RESP_ERR_OUT_OF_MEMORY: u32 = 0x1201;
const RESP_ERR_INVALID_SCANOUT_ID: u32 = 0x1202;
const RESP_ERR_INVALID_RESOURCE_ID: u32 = 0x1203;
const RESP_ERR_INVALID_PARAMETER: u32 = 0x1205;
/// Scanouts a display info response lists.
const MAX_SCANOUTS: usize = 16;
/// Size of the control header.
const HDR_SIZE: usize = 24;
/// Configuration space: events_read, events_clear, num_scanouts,
/// num_capsets.
const CONFIG_SIZE: usize = 16;

/// The display mode the device offers the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuConfig {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig {
            width: 1024,
            height: 768,
        }
    }
}

impl GpuConfig {
    /// Checks the mode against [`MIN_MODE`] and [`MAX_MODE`].
    pub fn check(&self) -> Result<(), GpuError> {
        let ok = |v: u32, min: u32, max: u32| (min..=max).contains(&v);
        if ok(self.width, MIN_MODE.0, MAX_MODE.0) && ok(self.height, MIN_MODE.1, MAX_MODE.1) {
            Ok(())
        } else {
            Err(GpuError::Mode {
                width: self.width,
                height: self.height,
            })
        }
    }
}

/// Why the GPU could not be created.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// A display mode outside what the device offers.
    #[error(
        "display mode {width}x{height} is outside {}x{} .. {}x{}",
        MIN_MODE.0, MIN_MODE.1, MAX_MODE.0, MAX_MODE.1
    )]
    Mode {
        /// Width asked for.
        width: u32,
        /// Height asked for.
        height: u32,
    },
    /// An eventfd could not be created.
    #[error("cannot create a queue eventfd: {0}")]
    EventFd(std::io::Error),
}

/// A screenshot: the scanout's pixels as RGB, top row first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Screenshot {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `width * height * 3` bytes.
    pub rgb: Vec<u8>,
}

/// A rectangle, as the guest gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rect {
    /// Left.
    pub x: u32,
    /// Top.
    pub y: u32,
    /// Width.
    pub width: u32,
    /// Height.
    pub height: u32,
}

impl Rect {
    fn parse(b: &[u8]) -> Rect {
        Rect {
            x: le32(b, 0),
            y: le32(b, 4),
            width: le32(b, 8),
            height: le32(b, 12),
        }
    }

    /// Whether the rectangle lies inside a `width` x `height` image.
    fn inside(&self, width: u32, height: u32) -> bool {
        u64::from(self.x) + u64::from(self.width) <= u64::from(width)
            && u64::from(self.y) + u64::from(self.height) <= u64::from(height)
    }
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | (u64::from(le32(b, at + 4)) << 32)
}

/// The RGB byte positions of a pixel format's 4 bytes, or `None` for a
/// format the device does not know (virtio-gpu formats name components in
/// memory byte order).
fn rgb_positions(format: u32) -> Option<[usize; 3]> {
    match format {
        // B8G8R8A8, B8G8R8X8
        1 | 2 => Some([2, 1, 0]),
        // A8R8G8B8, X8R8G8B8
        3 | 4 => Some([1, 2, 3]),
        // R8G8B8A8, R8G8B8X8
        67 | 134 => Some([0, 1, 2]),
        // X8B8G8R8, A8B8G8R8
        68 | 121 => Some([3, 2, 1]),
        _ => None,
    }
}

/// A 2D resource: its host copy and the guest pages behind it.
struct Resource {
    width: u32,
    height: u32,
    format: u32,
    data: Vec<u8>,
    /// Guest ranges (address, length), in order.
    backing: Vec<(u64, u32)>,
    /// Offset of each backing entry in the backing as one buffer.
    starts: Vec<u64>,
}

impl Resource {
    fn stride(&self) -> u64 {
        u64::from(self.width) * 4
    }

    fn set_backing(&mut self, backing: Vec<(u64, u32)>) {
        let mut at = 0u64;
        self.starts = backing
            .iter()
            .map(|&(_, len)| {
                let start = at;
                at += u64::from(len);
                start
            })
            .collect();
        self.backing = backing;
    }

    fn backing_len(&self) -> u64 {
        match (self.starts.last(), self.backing.last()) {
            (Some(s), Some(&(_, len))) => s + u64::from(len),
            _ => 0,
        }
    }

    /// Copies backing bytes from `offset` into `dst`, as many as the
    /// backing holds; returns how many.
    fn read_backing(&self, mem: &GuestMemoryMmap, offset: u64, dst: &mut [u8]) -> usize {
        let mut done = 0usize;
        // The entry holding `offset`.
        let mut i = self
            .starts
            .partition_point(|&s| s <= offset)
            .saturating_sub(1);
        while done < dst.len() && i < self.backing.len() {
            let (addr, len) = self.backing[i];
            let pos = offset + done as u64;
            let within = pos.saturating_sub(self.starts[i]);
            if within < u64::from(len) {
                let n = ((u64::from(len) - within) as usize).min(dst.len() - done);
                // Checked against guest memory when attached.
                if mem
                    .read_slice(&mut dst[done..done + n], GuestAddress(addr + within))
                    .is_err()
                {
                    return done;
                }
                done += n;
            }
            i += 1;
        }
        done
    }
}

/// What the scanout shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Scanout {
    resource_id: u32,
    rect: Rect,
}

/// Everything but the queues: what commands act on.
struct GpuState {
    config: GpuConfig,
    resources: BTreeMap<u32, Resource>,
    host_bytes: u64,
    scanout: Option<Scanout>,
    cursor: (u32, u32),
    events_read: u32,
    edid: Vec<u8>,
    /// Commands answered with an error so far (their log lines are
    /// rate-limited by this count).
    errors: u64,
}

/// An error response, with why (for the log).
struct CmdError(u32, String);

type CmdResult = Result<Vec<u8>, CmdError>;

fn err(code: u32, why: impl Into<String>) -> CmdError {
    CmdError(code, why.into())
}

impl GpuState {
    fn resource(&mut self, id: u32) -> Result<&mut Resource, CmdError> {
        self.resources
            .get_mut(&id)
            .ok_or_else(|| err(RESP_ERR_INVALID_RESOURCE_ID, format!("no resource {id}")))
    }

    /// Runs one control command whose header says `kind` and whose body
    /// follows in `body`; returns the response after the header (its type
    /// first) or the error.
    fn command(&mut self, mem: &GuestMemoryMmap, kind: u32, body: &[u8]) -> CmdResult {
        let need = |n: usize| {
            if body.len() < n {
                Err(err(
                    RESP_ERR_UNSPEC,
                    format!(
                        "command {kind:#x} is {} bytes long, needs {}",
                        body.len() + HDR_SIZE,
                        n + HDR_SIZE
                    ),
                ))
            } else {
                Ok(())
            }
        };
        let ok = || Ok(RESP_OK_NODATA.to_le_bytes().to_vec());
        match kind {
            CMD_GET_DISPLAY_INFO => {
                // After the type: 16 modes of rect, enabled, flags; the
                // first is the one scanout.
                let mut r = vec![0u8; 4 + MAX_SCANOUTS * 24];
                r[0..4].copy_from_slice(&RESP_OK_DISPLAY_INFO.to_le_bytes());
                r[12..16].copy_from_slice(&self.config.width.to_le_bytes());
                r[16..20].copy_from_slice(&self.config.height.to_le_bytes());
                r[20..24].copy_from_slice(&1u32.to_le_bytes());
                Ok(r)
            }
            CMD_GET_EDID => {
                need(8)?;
                let scanout = le32(body, 0);
                if scanout != 0 {
                    return Err(err(
                        RESP_ERR_INVALID_PARAMETER,
                        format!("no scanout {scanout}"),
                    ));
                }
                // After the type: size, padding, 1024 bytes of EDID.
                let mut r = vec![0u8; 4 + 8 + 1024];
                r[0..4].copy_from_slice(&RESP_OK_EDID.to_le_bytes());
                r[4..8].copy_from_slice(&(self.edid.len() as u32).to_le_bytes());
                r[12..12 + self.edid.len()].copy_from_slice(&self.edid);
                Ok(r)
            }
            CMD_RESOURCE_CREATE_2D => {
                need(16)?;
                let (id, format, width, height) =
                    (le32(body, 0), le32(body, 4), le32(body, 8), le32(body, 12));
                if id == 0 || self.resources.contains_key(&id) {
                    return Err(err(
                        RESP_ERR_INVALID_RESOURCE_ID,
                        format!("resource id {id} is taken or 0"),
                    ));
                }
                if rgb_positions(format).is_none() {
                    return Err(err(
                        RESP_ERR_INVALID_PARAMETER,
                        format!("unknown pixel format {format}"),
                    ));
                }
                if !(1..=MAX_RESOURCE_DIM).contains(&width)
                    || !(1..=MAX_RESOURCE_DIM).contains(&height)
                {
                    return Err(err(
                        RESP_ERR_INVALID_PARAMETER,
                        format!("resource size {width}x{height}"),
                    ));
                }
                let bytes = u64::from(width) * u64::from(height) * 4;
                if self.host_bytes + bytes > MAX_HOST_BYTES {
                    return Err(err(
                        RESP_ERR_OUT_OF_MEMORY,
                        format!(
                            "{width}x{height} would take resources past {} MiB",
                            MAX_HOST_BYTES >> 20
                        ),
                    ));
                }
                self.host_bytes += bytes;
                self.resources.insert(
                    id,
                    Resource {
                        width,
                        height,
                        format,
                        data: vec![0; bytes as usize],
                        backing: Vec::new(),
                        starts: Vec::new(),
                    },
                );
                ok()
            }
            CMD_RESOURCE_UNREF => {
                need(8)?;
                let id = le32(body, 0);
                self.resource(id)?;
                if let Some(r) = self.resources.remove(&id) {
                    self.host_bytes -= r.data.len() as u64;
                }
                if self.scanout.is_some_and(|s| s.resource_id == id) {
                    self.scanout = None;
                }
                ok()
            }
            CMD_SET_SCANOUT => {
                need(24)?;
                let rect = Rect::parse(body);
                let (scanout, id) = (le32(body, 16), le32(body, 20));
                if scanout != 0 {
                    return Err(err(
                        RESP_ERR_INVALID_SCANOUT_ID,
                        format!("no scanout {scanout}"),
                    ));
                }
                if id == 0 {
                    self.scanout = None;
                    return ok();
                }
                let r = self.resource(id)?;
                if rect.width == 0 || rect.height == 0 || !rect.inside(r.width, r.height) {
                    return Err(err(
                        RESP_ERR_INVALID_PARAMETER,
                        format!(
                            "scanout rectangle {rect:?} is not inside resource {id} ({}x{})",
                            r.width, r.height
                        ),
                    ));
                }
                self.scanout = Some(Scanout {
                    resource_id: id,
                    rect,
                });
                ok()
            }
            CMD_RESOURCE_FLUSH => {
                need(24)?;
                let rect = Rect::parse(body);
                let id = le32(body, 16);
                let r = self.resource(id)?;
                if !rect.inside(r.width, r.height) {
                    return Err(err(
                        RESP_ERR_INVALID_PARAMETER,
                        format!("flush rectangle {rect:?} is outside resource {id}"),
                    ));
                }
                ok()
            }
            CMD_TRANSFER_TO_HOST_2D => {
                need(32)?;
                let rect = Rect::parse(body);
                let (offset, id) = (le64(body, 16), le32(body, 24));
                let r = self.resource(id)?;
                if !rect.inside(r.width, r.height) {
                    return Err(err(
                        RESP_ERR_INVALID_PARAMETER,
                        format!(
                            "transfer rectangle {rect:?} is outside resource {id} ({}x{})",
                            r.width, r.height
                        ),
                    ));
                }
                if r.backing.is_empty() {
                    return Err(err(
                        RESP_ERR_UNSPEC,
                        format!("resource {id} has no backing"),
                    ));
                }
                transfer(mem, r, rect, offset);
                ok()
            }
            CMD_RESOURCE_ATTACH_BACKING => {
                need(8)?;
                let (id, n) = (le32(body, 0), le32(body, 4));
                if n > MAX_BACKING_ENTRIES {
                    return Err(err(
                        RESP_ERR_UNSPEC,
                        format!("{n} backing entries (at most {MAX_BACKING_ENTRIES})"),
                    ));
                }
                let entries = &body[8..];
                if entries.len() < n as usize * 16 {
                    return Err(err(
                        RESP_ERR_UNSPEC,
                        format!(
                            "{n} backing entries announced, {} bytes given",
                            entries.len()
                        ),
                    ));
                }
                let r = self.resource(id)?;
                if !r.backing.is_empty() {
                    return Err(err(
                        RESP_ERR_UNSPEC,
                        format!("resource {id} has a backing already"),
                    ));
                }
                let mut backing = Vec::with_capacity(n as usize);
                for e in entries.chunks_exact(16).take(n as usize) {
                    let (addr, len) = (le64(e, 0), le32(e, 8));
                    let fits = addr.checked_add(u64::from(len)).is_some()
                        && (len == 0 || mem.check_range(GuestAddress(addr), len as usize));
                    if !fits {
                        return Err(err(
                            RESP_ERR_UNSPEC,
                            format!("backing entry {addr:#x}+{len:#x} of resource {id} is outside guest memory"),
                        ));
                    }
                    backing.push((addr, len));
                }
                r.set_backing(backing);
                ok()
            }
            CMD_RESOURCE_DETACH_BACKING => {
                need(8)?;
                let r = self.resource(le32(body, 0))?;
                r.set_backing(Vec::new());
                ok()
            }
            other => Err(err(
                RESP_ERR_UNSPEC,
                format!("command {other:#x} is not a 2D command"),
            )),
        }
    }

    /// A cursor command: remembered, not drawn.
    fn cursor(&mut self, kind: u32, body: &[u8]) {
        if matches!(kind, CMD_UPDATE_CURSOR | CMD_MOVE_CURSOR) && body.len() >= 12 {
            self.cursor = (le32(body, 4), le32(body, 8));
        }
    }

    fn screenshot(&self) -> Option<Screenshot> {
        let s = self.scanout?;
        let r = self.resources.get(&s.resource_id)?;
        let pos = rgb_positions(r.format)?;
        let (w, h) = (s.rect.width as usize, s.rect.height as usize);
        let mut rgb = Vec::with_capacity(w * h * 3);
        let stride = r.width as usize * 4;
        for y in 0..h {
            let row = (s.rect.y as usize + y) * stride + s.rect.x as usize * 4;
            for px in r.data[row..row + w * 4].chunks_exact(4) {
                rgb.extend_from_slice(&[px[pos[0]], px[pos[1]], px[pos[2]]]);
            }
        }
        Some(Screenshot {
            width: s.rect.width,
            height: s.rect.height,
            rgb,
        })
    }
}

/// TRANSFER_TO_HOST_2D as QEMU does it: row `h` of `rect` comes from
/// backing byte `offset + h * stride`; what the backing does not hold is
/// left as it was. `rect` lies inside the resource.
fn transfer(mem: &GuestMemoryMmap, r: &mut Resource, rect: Rect, offset: u64) {
    let stride = r.stride();
    let row_bytes = rect.width as usize * 4;
    let total = r.backing_len();
    let mut data = std::mem::take(&mut r.data);
    for h in 0..u64::from(rect.height) {
        let Some(src) = offset.checked_add(h * stride) else {
            break;
        };
        if src >= total {
            break;
        }
        let dst = ((u64::from(rect.y) + h) * stride + u64::from(rect.x) * 4) as usize;
        r.read_backing(mem, src, &mut data[dst..dst + row_bytes]);
    }
    r.data = data;
}

/// Event data tags.
const CONTROL_EVENT: u32 = 0;
const CURSOR_EVENT: u32 = 1;

/// The virtio GPU.
pub struct Gpu {
    interrupt: Arc<Interrupt>,
    queue_events: Vec<EventFd>,
    state: DeviceState,
    gpu: GpuState,
}

impl Gpu {
    /// A GPU offering `config`'s mode, raising its interrupt through
    /// `interrupt_evt`.
    pub fn new(config: GpuConfig, interrupt_evt: EventFd) -> Result<Gpu, GpuError> {
        config.check()?;
        let evt = || EventFd::new(EFD_NONBLOCK).map_err(GpuError::EventFd);
        Ok(Gpu {
            interrupt: Arc::new(Interrupt::new(interrupt_evt)),
            queue_events: vec![evt()?, evt()?],
            state: DeviceState::Inactive,
            gpu: GpuState {
                config,
                resources: BTreeMap::new(),
                host_bytes: 0,
                scanout: None,
                cursor: (0, 0),
                events_read: 0,
                edid: edid::edid(config.width, config.height),
                errors: 0,
            },
        })
    }

    /// The mode the device offers.
    pub fn config(&self) -> GpuConfig {
        self.gpu.config
    }

    /// What the scanout shows, as RGB; `None` until the guest set a
    /// scanout (or after it disabled it).
    pub fn screenshot(&self) -> Option<Screenshot> {
        self.gpu.screenshot()
    }

    /// Host memory the resources' copies take.
    pub fn host_bytes(&self) -> u64 {
        self.gpu.host_bytes
    }

    fn process_control(&mut self) {
        let Some(active) = self.state.running() else {
            return;
        };
        let gpu = &mut self.gpu;
        let drained = drain(active, 0, Some(CHAINS_PER_EVENT), |mem, chain| {
            serve(gpu, mem, chain, false)
        });
        if drained == Drained::Budget {
            if let Err(e) = self.queue_events[0].write(1) {
                warn!("virtio-gpu: cannot re-arm the control queue: {e}");
            }
        }
    }

    fn process_cursor(&mut self) {
        let Some(active) = self.state.running() else {
            return;
        };
        let gpu = &mut self.gpu;
        let drained = drain(active, 1, Some(CHAINS_PER_EVENT), |mem, chain| {
            serve(gpu, mem, chain, true)
        });
        if drained == Drained::Budget {
            if let Err(e) = self.queue_events[1].write(1) {
                warn!("virtio-gpu: cannot re-arm the cursor queue: {e}");
            }
        }
    }
}

/// Serves one chain of the control (or cursor) queue: reads the header and
/// the body, runs the command, writes the response with the request's
/// fence.
fn serve(
    gpu: &mut GpuState,
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    cursor: bool,
) -> Handled {
    let mut reader = match chain.clone().reader(mem) {
        Ok(r) => r,
        Err(e) => return Handled::Malformed(ChainError::Malformed(e)),
    };
    let mut writer = match chain.writer(mem) {
        Ok(w) => w,
        Err(e) => return Handled::Malformed(ChainError::Malformed(e)),
    };
    let mut hdr = [0u8; HDR_SIZE];
    if reader.read_exact(&mut hdr).is_err() {
        return Handled::Malformed(ChainError::Invalid("a request shorter than its header"));
    }
    // The largest request: ATTACH_BACKING with its entries.
    let max_body = 8 + MAX_BACKING_ENTRIES as usize * 16;
    let len = reader.available_bytes().min(max_body);
    let mut body = vec![0u8; len];
    if let Err(e) = reader.read_exact(&mut body) {
        return Handled::Malformed(ChainError::Read(e));
    }
    let kind = le32(&hdr, 0);
    let flags = le32(&hdr, 4);
    if cursor {
        gpu.cursor(kind, &body);
        return Handled::Used(0);
    }
    let resp = match gpu.command(mem, kind, &body) {
        Ok(r) => r,
        Err(CmdError(code, why)) => {
            gpu.errors += 1;
            if gpu.errors <= 10 || gpu.errors.is_power_of_two() {
                warn!(
                    "virtio-gpu: command {kind:#x} refused: {why} ({} refused so far)",
                    gpu.errors
                );
            } else {
                debug!("virtio-gpu: command {kind:#x} refused: {why}");
            }
            code.to_le_bytes().to_vec()
        }
    };
    // The response header: type, the request's fence flag, fence id,
    // context and ring index.
    let mut out = Vec::with_capacity(HDR_SIZE + resp.len());
    out.extend_from_slice(&resp[..4]);
    out.extend_from_slice(&(flags & (FLAG_FENCE | FLAG_INFO_RING_IDX)).to_le_bytes());
    out.extend_from_slice(&hdr[8..24]);
    out.extend_from_slice(&resp[4..]);
    if writer.available_bytes() < out.len() {
        return Handled::Malformed(ChainError::Invalid("the response buffer is too small"));
    }
    match writer.write_all(&out) {
        Ok(()) => Handled::Used(out.len() as u32),
        Err(e) => {
            warn!("virtio-gpu: cannot write a response: {e}");
            Handled::Malformed(ChainError::Invalid("the response buffer cannot be written"))
        }
    }
}

impl VirtioDevice for Gpu {
    fn device_type(&self) -> u32 {
        GPU_DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[CONTROL_QUEUE_SIZE, CURSOR_QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_GPU_F_EDID
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; CONFIG_SIZE];
        config[0..4].copy_from_slice(&self.gpu.events_read.to_le_bytes());
        config[8..12].copy_from_slice(&1u32.to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // events_clear: write 1 to clear.
        if offset == 4 && data.len() == 4 {
            self.gpu.events_read &= !le32(data, 0);
        }
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.state.activate(ctx, &self.interrupt, "virtio-gpu", 2)
    }

    fn reset(&mut self) {
        self.state.reset();
        self.gpu.resources.clear();
        self.gpu.host_bytes = 0;
        self.gpu.scanout = None;
        self.gpu.events_read = 0;
    }

    /// The resources' host copies go into files of their own (raw pixels).
    fn snapshot(&mut self, blobs: &BlobDir) -> Result<DeviceSnapshot, SnapshotError> {
        let mut resources = Vec::new();
        for (&id, r) in &self.gpu.resources {
            let file = blobs.file_name(&format!("resource{id}"));
            let path = blobs.path(&file)?;
            std::fs::write(&path, &r.data).map_err(|source| SnapshotError::Io {
                device: blobs.name(),
                action: "write",
                path: path.clone(),
                source,
            })?;
            resources.push(GpuResourceSnapshot {
                id,
                width: r.width,
                height: r.height,
                format: r.format,
                backing: r.backing.clone(),
                file,
            });
        }
        let scanout = self.gpu.scanout.map(|s| {
            (
                s.resource_id,
                [s.rect.x, s.rect.y, s.rect.width, s.rect.height],
            )
        });
        Ok(self.state.snapshot(DeviceExtra::Gpu(GpuSnapshot {
            width: self.gpu.config.width,
            height: self.gpu.config.height,
            resources,
            scanout,
            cursor: self.gpu.cursor,
            events_read: self.gpu.events_read,
        })))
    }

    fn restore(
        &mut self,
        snap: &DeviceSnapshot,
        ctx: Option<ActivateContext>,
        blobs: &BlobDir,
    ) -> Result<(), SnapshotError> {
        let DeviceExtra::Gpu(s) = &snap.extra else {
            return Err(snap.extra.wrong(blobs, "gpu"));
        };
        let invalid = |reason: String| SnapshotError::Invalid {
            device: blobs.name(),
            reason,
        };
        let mode = (self.gpu.config.width, self.gpu.config.height);
        if (s.width, s.height) != mode {
            return Err(invalid(format!(
                "the snapshot's display is {}x{}, this one {}x{}",
                s.width, s.height, mode.0, mode.1
            )));
        }
        // Every resource checked as the commands that made it would be.
        let mut resources = BTreeMap::new();
        let mut host_bytes = 0u64;
        for r in &s.resources {
            let bytes = u64::from(r.width) * u64::from(r.height) * 4;
            let valid = r.id != 0
                && rgb_positions(r.format).is_some()
                && (1..=MAX_RESOURCE_DIM).contains(&r.width)
                && (1..=MAX_RESOURCE_DIM).contains(&r.height)
                && r.backing.len() <= MAX_BACKING_ENTRIES as usize
                && host_bytes + bytes <= MAX_HOST_BYTES
                && !resources.contains_key(&r.id);
            if !valid {
                return Err(invalid(format!(
                    "resource {} is not one the device could hold",
                    r.id
                )));
            }
            let path = blobs.path(&r.file)?;
            let data = std::fs::read(&path).map_err(|source| SnapshotError::Io {
                device: blobs.name(),
                action: "read",
                path: path.clone(),
                source,
            })?;
            if data.len() as u64 != bytes {
                return Err(invalid(format!(
                    "{} holds {} bytes, resource {} needs {bytes}",
                    r.file,
                    data.len(),
                    r.id
                )));
            }
            host_bytes += bytes;
            let mut res = Resource {
                width: r.width,
                height: r.height,
                format: r.format,
                data,
                backing: Vec::new(),
                starts: Vec::new(),
            };
            res.set_backing(r.backing.clone());
            resources.insert(r.id, res);
        }
        let scanout = match s.scanout {
            None => None,
            Some((id, [x, y, width, height])) => {
                let rect = Rect {
                    x,
                    y,
                    width,
                    height,
                };
                match resources.get(&id) {
                    Some(r) if rect.inside(r.width, r.height) && width > 0 && height > 0 => {
                        Some(Scanout {
                            resource_id: id,
                            rect,
                        })
                    }
                    _ => {
                        return Err(invalid(format!(
                            "the scanout shows no valid part of resource {id}"
                        )))
                    }
                }
            }
        };
        restore_activation(self, snap, ctx, blobs, |d| &mut d.state)?;
        if let Some(mem) = match &self.state {
            DeviceState::Activated(a) => Some(a.mem.clone()),
            DeviceState::Inactive => None,
        } {
            let outside = resources
                .values()
                .flat_map(|r| &r.backing)
                .any(|&(addr, len)| len != 0 && !mem.check_range(GuestAddress(addr), len as usize));
            if outside {
                self.state.reset();
                return Err(invalid(
                    "a resource's backing lies outside guest memory".to_owned(),
                ));
            }
        }
        self.gpu.resources = resources;
        self.gpu.host_bytes = host_bytes;
        self.gpu.scanout = scanout;
        self.gpu.cursor = s.cursor;
        self.gpu.events_read = s.events_read;
        Ok(())
    }
}

impl MutEventSubscriber for Gpu {
    fn init(&mut self, ops: &mut EventOps) {
        watch(
            ops,
            "virtio-gpu",
            &[
                Events::with_data(&self.queue_events[0], CONTROL_EVENT, EventSet::IN),
                Events::with_data(&self.queue_events[1], CURSOR_EVENT, EventSet::IN),
            ],
        );
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            CONTROL_EVENT => {
                let _ = self.queue_events[0].read();
                self.process_control();
            }
            CURSOR_EVENT => {
                let _ = self.queue_events[1].read();
                self.process_cursor();
            }
            other => warn!("virtio-gpu: unexpected event tag {other}"),
        }
    }
}

/// Guest memory of [`fuzz_control`].
pub const FUZZ_MEM_SIZE: usize = 0x1_0000;
/// Queue size of [`fuzz_control`].
const FUZZ_QUEUE_SIZE: u16 = 16;

/// Fuzzing entry point: guest memory from `data` (after one byte of
/// flags), the control queue's descriptor table at 0, available ring at
/// 0x100, used ring at 0x140, the cursor queue's at 0x200, 0x300, 0x340.
/// Both queues are drained three times, so that resources made by one
/// round are used by the next. Must never panic or loop; returns the host
/// bytes the resources took, which never exceed [`MAX_HOST_BYTES`].
pub fn fuzz_control(data: &[u8]) -> u64 {
    use virtio_queue::{Queue, QueueT};

    let Ok(mem) = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), FUZZ_MEM_SIZE)]) else {
        return 0;
    };
    let flags = data.first().copied().unwrap_or(0);
    let guest = data.get(1..).unwrap_or_default();
    let _ = mem.write_slice(&guest[..guest.len().min(FUZZ_MEM_SIZE)], GuestAddress(0));
    let Ok(evt) = EventFd::new(EFD_NONBLOCK) else {
        return 0;
    };
    let config = GpuConfig {
        width: 320 + u32::from(flags >> 4) * 64,
        height: 200 + u32::from(flags & 0xf) * 64,
    };
    let Ok(mut gpu) = Gpu::new(config, evt) else {
        return 0;
    };
    let mut queues = Vec::new();
    for base in [0u64, 0x200] {
        let Ok(mut q) = Queue::new(FUZZ_QUEUE_SIZE) else {
            return 0;
        };
        q.set_size(FUZZ_QUEUE_SIZE);
        // Addresses below FUZZ_MEM_SIZE: they fit in u32.
        q.set_desc_table_address(Some(base as u32), Some(0));
        q.set_avail_ring_address(Some((base + 0x100) as u32), Some(0));
        q.set_used_ring_address(Some((base + 0x140) as u32), Some(0));
        q.set_ready(true);
        let valid = q.is_valid(&mem);
        q.set_ready(valid);
        queues.push(q);
    }
    let features = gpu.features();
    if gpu
        .activate(ActivateContext {
            mem,
            queues,
            acked_features: features,
        })
        .is_err()
    {
        return 0;
    }
    for _ in 0..3 {
        gpu.process_control();
        gpu.process_cursor();
        let _ = gpu.screenshot();
    }
    let bytes = gpu.host_bytes();
    assert!(bytes <= MAX_HOST_BYTES);
    bytes
}

#[cfg(test)]
mod tests;

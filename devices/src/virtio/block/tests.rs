use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use vmm_sys_util::tempdir::TempDir;

use crate::snapshot::{BlockBackendSnapshot, TransportSnapshot};
use crate::virtio::mmio::MmioTransport;
use crate::virtio::test_utils::{
    self, mem, mmio_activate, mmio_read, read_guest, snapshot_through_json, Looped, TestQueue,
    NEXT, R, W,
};
use crate::virtio::INT_VRING;

const MEM_SIZE: u64 = test_utils::MEM_SIZE as u64;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x60_0000;
/// A queue size where the mock's rings do not overlap for < 128 requests.
const QSIZE: u16 = 256;

static FILE_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A file under the temp dir, removed on drop.
struct TempImage(PathBuf);

impl TempImage {
    fn new(contents: &[u8]) -> Self {
        let n = FILE_COUNTER.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("skiff-blk-test-{}-{n}.img", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        TempImage(path)
    }

    fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.0).unwrap()
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
}

fn config(img: &TempImage) -> BlockConfig {
    BlockConfig {
        path: img.0.clone(),
        readonly: false,
        overlay: false,
        id: None,
    }
}

fn block(cfg: &BlockConfig) -> Block {
    Block::new(cfg, EventFd::new(EFD_NONBLOCK).unwrap()).unwrap()
}

fn header(mem: &GuestMemoryMmap, t: u32, sector: u64) {
    mem.write_obj(t.to_le(), GuestAddress(HDR)).unwrap();
    mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
    mem.write_obj(sector.to_le(), GuestAddress(HDR + 8))
        .unwrap();
}

fn status(mem: &GuestMemoryMmap) -> u8 {
    mem.read_obj(GuestAddress(STATUS)).unwrap()
}

/// The driver side: a test queue feeding an activated device, which is run
/// by calling `process_queue` directly (no event loop).
struct Driver<'a> {
    mem: &'a GuestMemoryMmap,
    vq: TestQueue<'a>,
    block: Block,
}

impl<'a> Driver<'a> {
    fn new(mem: &'a GuestMemoryMmap, block: Block) -> Self {
        Self::with_event_idx(mem, block, false)
    }

    fn with_event_idx(mem: &'a GuestMemoryMmap, mut block: Block, event_idx: bool) -> Self {
        let vq = TestQueue::new(mem, 0, QSIZE);
        let mut q = vq.queue();
        q.set_event_idx(event_idx);
        block
            .activate(ActivateContext {
                mem: mem.clone(),
                queues: vec![q],
                acked_features: block.features(),
            })
            .unwrap();
        Driver { mem, vq, block }
    }

    /// Processes the queue; returns the used entries added, as (id, len).
    fn run(&mut self) -> Vec<(u32, u32)> {
        self.block.process_queue();
        self.vq.take_used()
    }

    /// Submits one chain of `(addr, len, flags)` (NEXT is added); returns
    /// the used length.
    fn submit(&mut self, parts: &[(u64, u32, u16)]) -> u32 {
        let head = self.vq.add_chain(parts);
        let used = self.run();
        assert_eq!(used.len(), 1, "one chain in, one chain out");
        assert_eq!(used[0].0, u32::from(head));
        used[0].1
    }

    /// A read of `len` bytes at `sector` into DATA; returns (status, used len).
    fn read(&mut self, sector: u64, len: u32) -> (u8, u32) {
        header(self.mem, VIRTIO_BLK_T_IN, sector);
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let used = self.submit(&[(HDR, 16, R), (DATA, len, W), (STATUS, 1, W)]);
        (status(self.mem), used)
    }

    /// A write of `data` at `sector` from DATA; returns (status, used len).
    fn write(&mut self, sector: u64, data: &[u8]) -> (u8, u32) {
        header(self.mem, VIRTIO_BLK_T_OUT, sector);
        self.mem.write_slice(data, GuestAddress(DATA)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let used = self.submit(&[(HDR, 16, R), (DATA, data.len() as u32, R), (STATUS, 1, W)]);
        (status(self.mem), used)
    }
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

#[test]
fn read_sectors() {
    let base = pattern(64 * 1024);
    let img = TempImage::new(&base);
    let m = mem();
    let mut d = Driver::new(&m, block(&config(&img)));
    assert_eq!(d.block.capacity_sectors(), 128);

    assert_eq!(d.read(2, 1024), (OK, 1025));
    assert_eq!(read_guest(&m, DATA, 1024), &base[1024..2048]);

    // Scattered buffers, and header + status framed oddly.
    header(&m, VIRTIO_BLK_T_IN, 0);
    let used = d.submit(&[
        (HDR, 8, R),
        (HDR + 8, 8, R),
        (DATA, 512, W),
        (DATA + 0x3000, 1024, W),
        (STATUS, 1, W),
    ]);
    assert_eq!(used, 1537);
    assert_eq!(status(&m), OK);
    assert_eq!(read_guest(&m, DATA, 512), &base[..512]);
    assert_eq!(read_guest(&m, DATA + 0x3000, 1024), &base[512..1536]);

    // The last sectors of the disk.
    assert_eq!(d.read(126, 1024), (OK, 1025));
    assert_eq!(read_guest(&m, DATA, 1024), &base[base.len() - 1024..]);
    // An interrupt was raised.
    assert_ne!(d.block.interrupt().status() & INT_VRING, 0);
    assert!(d.block.interrupt().eventfd().read().unwrap() >= 1);
}

#[test]
fn write_sectors_and_flush() {
    let base = pattern(64 * 1024);
    let img = TempImage::new(&base);
    let m = mem();
    let mut d = Driver::new(&m, block(&config(&img)));

    let data = vec![0xabu8; 1024];
    assert_eq!(d.write(3, &data), (OK, 1));
    let mut expect = base.clone();
    expect[3 * 512..5 * 512].copy_from_slice(&data);
    assert_eq!(img.contents(), expect);

    // Two scattered buffers.
    header(&m, VIRTIO_BLK_T_OUT, 10);
    m.write_slice(&[1u8; 512], GuestAddress(DATA)).unwrap();
    m.write_slice(&[2u8; 512], GuestAddress(DATA + 0x5000))
        .unwrap();
    let used = d.submit(&[
        (HDR, 16, R),
        (DATA, 512, R),
        (DATA + 0x5000, 512, R),
        (STATUS, 1, W),
    ]);
    assert_eq!((status(&m), used), (OK, 1));
    expect[10 * 512..11 * 512].fill(1);
    expect[11 * 512..12 * 512].fill(2);
    assert_eq!(img.contents(), expect);

    header(&m, VIRTIO_BLK_T_FLUSH, 0);
    m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    assert_eq!(d.submit(&[(HDR, 16, R), (STATUS, 1, W)]), 1);
    assert_eq!(status(&m), OK);

    // Reads see the writes.
    assert_eq!(d.read(10, 1024), (OK, 1025));
    assert_eq!(read_guest(&m, DATA, 1024), &expect[10 * 512..12 * 512]);
}

#[test]
fn get_id() {
    let img = TempImage::new(&pattern(4096));
    let m = mem();
    // Read-only, so that two devices may hold the image at once.
    let readonly = |img: &TempImage| BlockConfig {
        readonly: true,
        ..config(img)
    };
    let mut d = Driver::new(&m, block(&readonly(&img)));
    let name = img
        .0
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .as_bytes()
        .to_vec();
    assert!(name.len() > ID_BYTES);

    header(&m, VIRTIO_BLK_T_GET_ID, 0);
    m.write_slice(&[0xee; 32], GuestAddress(DATA)).unwrap();
    let used = d.submit(&[(HDR, 16, R), (DATA, 20, W), (STATUS, 1, W)]);
    assert_eq!((status(&m), used), (OK, 21));
    assert_eq!(read_guest(&m, DATA, 20), &name[..20]);
    assert_eq!(read_guest(&m, DATA + 20, 1), [0xee]);

    // An explicit, short id is zero padded.
    let mut cfg = readonly(&img);
    cfg.id = Some("root-disk".into());
    let m2 = mem();
    let mut d2 = Driver::new(&m2, block(&cfg));
    header(&m2, VIRTIO_BLK_T_GET_ID, 0);
    m2.write_slice(&[0xee; 32], GuestAddress(DATA)).unwrap();
    assert_eq!(
        d2.submit(&[(HDR, 16, R), (DATA, 20, W), (STATUS, 1, W)]),
        21
    );
    let mut want = b"root-disk".to_vec();
    want.resize(20, 0);
    assert_eq!(read_guest(&m2, DATA, 20), want);

    // A buffer that is too short, readable, or missing: IOERR.
    header(&m, VIRTIO_BLK_T_GET_ID, 0);
    for parts in [
        &[(HDR, 16, R), (DATA, 10, W), (STATUS, 1, W)][..],
        &[(HDR, 16, R), (DATA, 20, R), (STATUS, 1, W)][..],
        &[(HDR, 16, R), (STATUS, 1, W)][..],
    ] {
        m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        assert_eq!(d.submit(parts), 1);
        assert_eq!(status(&m), IOERR);
    }
}

#[test]
fn readonly_disk_refuses_writes() {
    let base = pattern(16 * 1024);
    let img = TempImage::new(&base);
    let mut cfg = config(&img);
    cfg.readonly = true;
    let m = mem();
    let mut d = Driver::new(&m, block(&cfg));
    assert_ne!(d.block.features() & (1 << VIRTIO_BLK_F_RO), 0);

    assert_eq!(d.write(0, &[0u8; 512]), (IOERR, 1));
    assert_eq!(img.contents(), base);
    assert_eq!(d.read(1, 512), (OK, 513));
    assert_eq!(read_guest(&m, DATA, 512), &base[512..1024]);
    header(&m, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(d.submit(&[(HDR, 16, R), (STATUS, 1, W)]), 1);
    assert_eq!(status(&m), OK);
}

#[test]
fn unsupported_request_type() {
    let img = TempImage::new(&pattern(4096));
    let m = mem();
    let mut d = Driver::new(&m, block(&config(&img)));
    for t in [11u32, 13, 2, u32::MAX] {
        header(&m, t, 0);
        m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        assert_eq!(d.submit(&[(HDR, 16, R), (DATA, 16, R), (STATUS, 1, W)]), 1);
        assert_eq!(status(&m), UNSUPP);
    }
}

#[test]
fn out_of_range_and_unaligned_requests() {
    let base = pattern(8 * 512);
    let img = TempImage::new(&base);
    let m = mem();
    let mut d = Driver::new(&m, block(&config(&img)));
    assert_eq!(d.read(8, 512), (IOERR, 1));
    assert_eq!(d.read(7, 1024), (IOERR, 1));
    assert_eq!(d.read(u64::MAX, 512), (IOERR, 1));
    assert_eq!(d.read(u64::MAX / 512 + 1, 512), (IOERR, 1));
    assert_eq!(d.read(0, 100), (IOERR, 1));
    assert_eq!(d.write(8, &[0u8; 512]), (IOERR, 1));
    assert_eq!(d.write(0, &[0u8; 700]), (IOERR, 1));
    assert_eq!(img.contents(), base);
    // The last sector itself is fine.
    assert_eq!(d.read(7, 512), (OK, 513));
}

#[test]
fn short_or_writable_header() {
    let img = TempImage::new(&pattern(4096));
    let m = mem();
    let mut d = Driver::new(&m, block(&config(&img)));
    header(&m, VIRTIO_BLK_T_IN, 0);
    for parts in [
        &[(HDR, 8, R), (DATA, 512, W), (STATUS, 1, W)][..],
        &[(HDR, 16, W), (DATA, 512, W), (STATUS, 1, W)][..],
        &[(STATUS, 1, W)][..],
    ] {
        m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        assert_eq!(d.submit(parts), 1);
        assert_eq!(status(&m), IOERR);
    }
    // Each was logged; a flood would be logged at debug level.
    assert_eq!(d.block.disk.warnings_left, GUEST_WARNINGS - 3);
    for _ in 0..GUEST_WARNINGS {
        d.submit(&[(HDR, 8, R), (STATUS, 1, W)]);
    }
    assert_eq!(d.block.disk.warnings_left, 0);
}

#[test]
fn missing_or_readonly_status() {
    let base = pattern(4096);
    let img = TempImage::new(&base);
    let m = mem();
    let mut d = Driver::new(&m, block(&config(&img)));

    // OUT with no writable descriptor at all: nothing to answer in.
    header(&m, VIRTIO_BLK_T_OUT, 0);
    m.write_obj(0x5au8, GuestAddress(STATUS)).unwrap();
    assert_eq!(d.submit(&[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, R)]), 0);
    assert_eq!(status(&m), 0x5a);
    assert_eq!(img.contents(), base);

    // IN with a read-only status after writable data: no defined status.
    header(&m, VIRTIO_BLK_T_IN, 0);
    m.write_slice(&[0x77; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(d.submit(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, R)]), 0);
    assert_eq!(status(&m), 0x5a);
    assert_eq!(read_guest(&m, DATA, 512), [0x77; 512]);

    // A status byte outside guest memory.
    assert_eq!(
        d.submit(&[(HDR, 16, R), (DATA, 512, W), (MEM_SIZE, 1, W)]),
        0
    );
    assert_eq!(
        d.submit(&[(HDR, 16, R), (DATA, 512, W), (u64::MAX, 1, W)]),
        0
    );

    // The queue still works.
    assert!(!d.block.interrupt().needs_reset());
    assert_eq!(d.read(0, 512), (OK, 513));
}

#[test]
fn buffers_outside_guest_memory() {
    let base = pattern(4096);
    let img = TempImage::new(&base);
    let m = mem();
    let mut d = Driver::new(&m, block(&config(&img)));
    header(&m, VIRTIO_BLK_T_IN, 0);
    for parts in [
        &[(HDR, 16, R), (0x1_0000_0000, 512, W), (STATUS, 1, W)][..],
        &[(HDR, 16, R), (MEM_SIZE - 256, 512, W), (STATUS, 1, W)][..],
        &[(HDR, 16, R), (u64::MAX - 100, 512, W), (STATUS, 1, W)][..],
        &[(MEM_SIZE + 0x1000, 16, R), (DATA, 512, W), (STATUS, 1, W)][..],
    ] {
        m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        assert_eq!(d.submit(parts), 1);
        assert_eq!(status(&m), IOERR);
    }
    header(&m, VIRTIO_BLK_T_OUT, 0);
    m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    assert_eq!(
        d.submit(&[(HDR, 16, R), (MEM_SIZE - 256, 512, R), (STATUS, 1, W)]),
        1
    );
    assert_eq!(status(&m), IOERR);
    assert_eq!(img.contents(), base);
}

#[test]
fn descriptor_loops_and_overlong_chains() {
    let img = TempImage::new(&pattern(4096));
    let m = mem();
    let mut d = Driver::new(&m, block(&config(&img)));
    header(&m, VIRTIO_BLK_T_IN, 0);

    // 0 -> 1 -> 0 -> ...
    d.vq.store(0, HDR, 16, R | NEXT, 1);
    d.vq.store(1, STATUS, 1, W | NEXT, 0);
    d.vq.publish(0);
    // A next index beyond the table.
    d.vq.store(2, HDR, 16, R | NEXT, 3);
    d.vq.store(3, STATUS, 1, W | NEXT, 300);
    d.vq.publish(2);
    // A self loop.
    d.vq.store(4, HDR, 16, R | NEXT, 4);
    d.vq.publish(4);
    // An indirect table longer than any request may be.
    let table = 0x70_0000u64;
    let n = MAX_CHAIN_DESCRIPTORS as u64 + 100;
    for i in 0..n {
        let desc = Descriptor::new(HDR, 16, NEXT, (i + 1) as u16);
        m.write_obj(RawDescriptor::from(desc), GuestAddress(table + 16 * i))
            .unwrap();
    }
    d.vq.store(5, table, (16 * n) as u32, VRING_DESC_F_INDIRECT as u16, 0);
    d.vq.publish(5);
    // An indirect table outside guest memory.
    d.vq.store(6, MEM_SIZE, 64, VRING_DESC_F_INDIRECT as u16, 0);
    d.vq.publish(6);
    // A head beyond the table is handled below (it breaks the queue).

    m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let used = d.run();
    assert_eq!(used, vec![(0, 0), (2, 0), (4, 0), (5, 0), (6, 0)]);
    assert_eq!(status(&m), 0xff);
    assert!(!d.block.interrupt().needs_reset());

    // The queue still works afterwards.
    d.vq.next_desc = 10;
    assert_eq!(d.read(0, 512), (OK, 513));
}

#[test]
fn broken_available_ring_needs_reset() {
    let img = TempImage::new(&pattern(4096));
    let m = mem();
    let mut d = Driver::new(&m, block(&config(&img)));
    // A head index beyond the queue cannot be completed.
    d.vq.publish(QSIZE + 5);
    assert!(d.run().is_empty());
    assert!(d.block.interrupt().needs_reset());
    // Nothing more happens until a reset.
    d.vq.next_desc = 0;
    header(&m, VIRTIO_BLK_T_IN, 0);
    d.vq.store(0, HDR, 16, R | NEXT, 1);
    d.vq.store(1, STATUS, 1, W, 0);
    d.vq.publish(0);
    assert!(d.run().is_empty());

    // More chains announced than the queue holds.
    let m2 = mem();
    drop(d); // the image is locked while a device holds it
    let mut d2 = Driver::new(&m2, block(&config(&img)));
    d2.vq.set_avail_idx(QSIZE + 1);
    assert!(d2.run().is_empty());
    assert!(d2.block.interrupt().needs_reset());
}

#[test]
fn event_idx_suppresses_interrupts() {
    let img = TempImage::new(&pattern(4096));
    let m = mem();
    let mut d = Driver::with_event_idx(&m, block(&config(&img)), true);
    let used_event = d.vq.used_event_addr();

    // The driver wants an interrupt only once used idx passes 5.
    m.write_obj(5u16, used_event).unwrap();
    assert_eq!(d.read(0, 512), (OK, 513));
    assert_eq!(d.block.interrupt().status(), 0);
    // Now after the next one.
    m.write_obj(1u16, used_event).unwrap();
    assert_eq!(d.read(0, 512), (OK, 513));
    assert_eq!(d.block.interrupt().status(), INT_VRING);
}

#[test]
fn overlay_keeps_base_unchanged() {
    const CL: usize = OVERLAY_CLUSTER_SIZE as usize;
    let base = pattern(4 * CL);
    let img = TempImage::new(&base);
    let mut cfg = config(&img);
    cfg.overlay = true;
    let m = mem();
    let mut d = Driver::new(&m, block(&cfg));
    assert_eq!(d.block.features() & (1 << VIRTIO_BLK_F_RO), 0);
    let mut model = base.clone();

    // Partial cluster 0.
    assert_eq!(d.write(1, &[1u8; 512]), (OK, 1));
    model[512..1024].fill(1);
    // All of cluster 2.
    assert_eq!(d.write((2 * CL / 512) as u64, &vec![2u8; CL]), (OK, 1));
    model[2 * CL..3 * CL].fill(2);
    // Across the boundary of clusters 0 and 1.
    assert_eq!(d.write((CL / 512 - 1) as u64, &[3u8; 1024]), (OK, 1));
    model[CL - 512..CL + 512].fill(3);
    // Overwrite inside cluster 0 again (already in the layer).
    assert_eq!(d.write(4, &[4u8; 512]), (OK, 1));
    model[2048..2560].fill(4);
    // The tail of cluster 3: unaligned start, aligned end.
    assert_eq!(d.write((4 * CL / 512 - 2) as u64, &[5u8; 1024]), (OK, 1));
    model[4 * CL - 1024..].fill(5);

    assert_eq!(img.contents(), base, "the base image must not change");
    let Backend::Overlay(o) = &d.block.disk.backend else {
        panic!("not an overlay");
    };
    assert_eq!(o.clusters_in_layer(), 4);

    // One read across all four clusters.
    assert_eq!(d.read(0, (4 * CL) as u32), (OK, 4 * CL as u32 + 1));
    assert_eq!(read_guest(&m, DATA, 4 * CL), model);
    // Unaligned reads within and across clusters, scattered buffers.
    header(&m, VIRTIO_BLK_T_IN, (CL / 512 - 2) as u64);
    let used = d.submit(&[
        (HDR, 16, R),
        (DATA, 1024, W),
        (DATA + 0x10_0000, 1536, W),
        (STATUS, 1, W),
    ]);
    assert_eq!((status(&m), used), (OK, 2561));
    assert_eq!(read_guest(&m, DATA, 1024), &model[CL - 1024..CL]);
    assert_eq!(
        read_guest(&m, DATA + 0x10_0000, 1536),
        &model[CL..CL + 1536]
    );

    header(&m, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(d.submit(&[(HDR, 16, R), (STATUS, 1, W)]), 1);
    assert_eq!(status(&m), OK);

    // Another VM over the same base sees the base.
    let m2 = mem();
    let mut d2 = Driver::new(&m2, block(&cfg));
    assert_eq!(d2.read(0, (4 * CL) as u32), (OK, 4 * CL as u32 + 1));
    assert_eq!(read_guest(&m2, DATA, 4 * CL), base);
    assert_eq!(img.contents(), base);
}

#[test]
fn overlay_with_partial_last_cluster() {
    // 100 KiB plus a stray 100 bytes: 200 sectors, the last cluster short.
    let mut base = pattern(100 * 1024);
    base.extend_from_slice(&[9u8; 100]);
    let img = TempImage::new(&base);
    let mut cfg = config(&img);
    cfg.overlay = true;
    let m = mem();
    let mut d = Driver::new(&m, block(&cfg));
    assert_eq!(d.block.capacity_sectors(), 200);
    let mut model = base[..100 * 1024].to_vec();

    assert_eq!(d.write(150, &[5u8; 512]), (OK, 1));
    model[150 * 512..151 * 512].fill(5);
    assert_eq!(d.write(199, &[6u8; 512]), (OK, 1));
    model[199 * 512..].fill(6);
    assert_eq!(d.write(200, &[6u8; 512]), (IOERR, 1));

    assert_eq!(d.read(0, 200 * 512), (OK, 200 * 512 + 1));
    assert_eq!(read_guest(&m, DATA, 200 * 512), model);
    assert_eq!(img.contents(), base);
}

#[test]
fn config_space_and_identity() {
    let img = TempImage::new(&pattern(1024 * 1024 + 300));
    let b = block(&config(&img));
    assert_eq!(b.device_type(), 2);
    assert_eq!(b.queue_max_sizes(), &[256]);
    assert_eq!(b.queue_events().len(), 1);
    assert_eq!(b.capacity_sectors(), 2048);
    let f = b.features();
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_F_RING_EVENT_IDX,
        1 << VIRTIO_BLK_F_FLUSH,
        1 << VIRTIO_BLK_F_SEG_MAX,
        1 << VIRTIO_BLK_F_SIZE_MAX,
    ] {
        assert_ne!(f & bit, 0);
    }
    assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);

    let mut cfg = [0xffu8; 64];
    b.read_config(0, &mut cfg);
    assert_eq!(&cfg[0..8], &2048u64.to_le_bytes());
    assert_eq!(&cfg[8..12], &SIZE_MAX.to_le_bytes());
    assert_eq!(&cfg[12..16], &254u32.to_le_bytes());
    assert!(cfg[16..].iter().all(|&b| b == 0));
    let mut word = [0u8; 4];
    b.read_config(12, &mut word);
    assert_eq!(u32::from_le_bytes(word), 254);
    b.read_config(u64::MAX, &mut word);
    assert_eq!(word, [0; 4]);
    let mut byte = [0u8; 1];
    b.read_config(1, &mut byte);
    assert_eq!(byte, [0x08]); // 2048 = 0x800
}

#[test]
fn contradicting_options_are_refused_before_the_image_is_opened() {
    let img = TempImage::new(&[0; 4096]);
    let both = BlockConfig {
        readonly: true,
        overlay: true,
        ..config(&img)
    };
    assert_eq!(both.validate(), Err(BlockConfigError::ReadonlyOverlay));
    let err = Block::new(&both, EventFd::new(EFD_NONBLOCK).unwrap())
        .err()
        .unwrap();
    assert!(err.to_string().contains("exclude each other"), "{err}");
    let long = BlockConfig {
        id: Some("x".repeat(ID_BYTES + 1)),
        ..config(&img)
    };
    assert!(matches!(
        long.validate(),
        Err(BlockConfigError::IdTooLong(_))
    ));
    let fits = BlockConfig {
        id: Some("x".repeat(ID_BYTES)),
        ..config(&img)
    };
    assert_eq!(fits.validate(), Ok(()));
}

#[test]
fn open_errors_name_the_file() {
    let cfg = BlockConfig {
        path: PathBuf::from("/nonexistent/skiff/disk.img"),
        readonly: true,
        overlay: false,
        id: None,
    };
    let err = Block::new(&cfg, EventFd::new(EFD_NONBLOCK).unwrap())
        .err()
        .unwrap();
    assert_eq!(
        err.to_string(),
        "cannot open disk image /nonexistent/skiff/disk.img: No such file or directory"
    );
    let mut cfg = cfg;
    cfg.path = std::env::temp_dir();
    let err = Block::new(&cfg, EventFd::new(EFD_NONBLOCK).unwrap())
        .err()
        .unwrap();
    assert_eq!(
        err.to_string(),
        format!(
            "cannot open disk image {}: not a regular file or block device",
            cfg.path.display()
        )
    );
}

#[test]
fn activation_and_reset() {
    let img = TempImage::new(&pattern(4096));
    let mut b = block(&config(&img));
    let m = mem();
    // Before activation, processing does nothing.
    b.process_queue();
    let err = b.activate(ActivateContext {
        mem: m.clone(),
        queues: vec![Queue::new(QSIZE).unwrap()],
        acked_features: 0,
    });
    assert!(matches!(err, Err(ActivateError::QueueNotReady(0))));
    assert!(b
        .activate(ActivateContext {
            mem: m.clone(),
            queues: vec![],
            acked_features: 0
        })
        .is_err());
    let mut vq = TestQueue::new(&m, 0, QSIZE);
    b.activate(ActivateContext {
        mem: m.clone(),
        queues: vec![vq.queue()],
        acked_features: 0,
    })
    .unwrap();
    b.reset();
    header(&m, VIRTIO_BLK_T_IN, 0);
    vq.add_chain(&[(HDR, 16, R), (STATUS, 1, W)]);
    b.process_queue();
    assert_eq!(vq.used_idx(), 0);
}

#[test]
fn event_loop_drives_the_queue() {
    let img = TempImage::new(&pattern(4096));
    let m = mem();
    let mut vq = TestQueue::new(&m, 0, QSIZE);
    let mut blk = Looped::new(|irq| Block::new(&config(&img), irq).unwrap());

    // A notification before activation is drained and ignored.
    blk.kick(0);
    assert_eq!(blk.em.run_with_timeout(100).unwrap(), 1);
    assert!(blk.lock().queue_events()[0].read().is_err());

    blk.activate(&m, &[&vq], false);
    blk.settle();
    header(&m, VIRTIO_BLK_T_IN, 1);
    vq.add_chain(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
    blk.kick(0);
    assert_eq!(blk.em.run_with_timeout(100).unwrap(), 1);
    assert_eq!(vq.used_idx(), 1);
    assert_eq!(vq.used_entry(0).1, 513);
    assert_eq!(status(&m), OK);
    assert_eq!(read_guest(&m, DATA, 512), &pattern(4096)[512..1024]);
    assert_eq!(blk.lock().interrupt().status(), INT_VRING);
}

/// A small deterministic generator for the random-chain test.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[(self.next() % items.len() as u64) as usize]
    }
}

#[test]
fn random_chains_never_panic() {
    let img = TempImage::new(&pattern(64 * 1024));
    let m = mem();
    // Never the rings at 0x1000..0x2000: a guest that scribbles over its own
    // available ring breaks the queue, which is tested elsewhere.
    let addrs = [
        0u64,
        HDR,
        DATA,
        STATUS,
        MEM_SIZE - 1,
        MEM_SIZE - 16,
        MEM_SIZE,
        u64::MAX - 8,
    ];
    let lens = [0u32, 1, 8, 16, 17, 20, 512, 513, 4096, u32::MAX];
    let types = [0u32, 1, 4, 8, 11, 99];
    let sectors = [0u64, 1, 127, 128, u64::MAX];
    let mut rng = Lcg(0x5eed);

    // Straight into the parser.
    for _ in 0..2000 {
        header(&m, rng.pick(&types), rng.pick(&sectors));
        let n = (rng.next() % 6) as usize;
        let descs = (0..n).map(|_| {
            let flags = (rng.next() % 8) as u16;
            Descriptor::new(
                rng.pick(&addrs),
                rng.pick(&lens),
                flags,
                (rng.next() % 8) as u16,
            )
        });
        if let Ok(r) = parse_request(&m, descs.collect::<Vec<_>>()) {
            assert_eq!(
                r.data.iter().map(|s| u64::from(s.len)).sum::<u64>(),
                r.data_len
            );
        }
    }

    // Through the device, in batches.
    let mut d = Driver::new(&m, block(&config(&img)));
    let mut answered = 0;
    for _ in 0..10 {
        let mut published = 0;
        for _ in 0..10 {
            let head = d.vq.next_desc;
            let n = 1 + (rng.next() % 5) as u16;
            let shaped = rng.next().is_multiple_of(2);
            for i in 0..n {
                let last = i + 1 == n;
                let (flags, next) = if shaped {
                    // Header first, status last, NEXT links right; only
                    // addresses, lengths and data direction vary.
                    let dir = match i {
                        0 => R,
                        _ if last => W,
                        _ => rng.pick(&[R, W]),
                    };
                    (if last { dir } else { dir | NEXT }, head + i + 1)
                } else {
                    let next = if rng.next().is_multiple_of(4) {
                        (rng.next() % 40) as u16
                    } else {
                        head + i + 1
                    };
                    ((rng.next() % 8) as u16, next)
                };
                let (addr, len) = match (shaped, i) {
                    (true, 0) => (HDR, 16),
                    (true, _) if last => (STATUS, 1),
                    _ => (rng.pick(&addrs), rng.pick(&lens)),
                };
                d.vq.store(head + i, addr, len, flags, next);
            }
            d.vq.next_desc += n;
            header(&m, rng.pick(&types), rng.pick(&sectors));
            d.vq.publish(head);
            published += 1;
        }
        let used = d.run();
        assert_eq!(used.len(), published);
        answered += used.iter().filter(|u| u.1 > 0).count();
        d.vq.next_desc = 0;
    }
    assert!(!d.block.interrupt().needs_reset());
    assert!(answered > 0);
}

#[test]
fn fuzz_entry_point() {
    assert_eq!(fuzz_parse(&[]), 0);
    // A valid IN request in the fuzz layout: descriptors 0..3, avail ring
    // at 0x100 offering head 0, header at 0x400, data at 0x600, status at 0x900.
    let mut input = vec![0u8; 0x1000];
    let desc = |i: usize, addr: u64, len: u32, flags: u16, next: u16, input: &mut Vec<u8>| {
        let at = 16 * i;
        input[at..at + 8].copy_from_slice(&addr.to_le_bytes());
        input[at + 8..at + 12].copy_from_slice(&len.to_le_bytes());
        input[at + 12..at + 14].copy_from_slice(&flags.to_le_bytes());
        input[at + 14..at + 16].copy_from_slice(&next.to_le_bytes());
    };
    desc(0, 0x400, 16, R | NEXT, 1, &mut input);
    desc(1, 0x600, 512, W | NEXT, 2, &mut input);
    desc(2, 0x900, 1, W, 0, &mut input);
    input[0x102..0x104].copy_from_slice(&1u16.to_le_bytes()); // avail idx
    input[0x400..0x404].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    assert_eq!(fuzz_parse(&input), 1);
    // A loop instead.
    desc(2, 0x900, 1, W | NEXT, 0, &mut input);
    assert_eq!(fuzz_parse(&input), 0);
    // Garbage of every length.
    let mut rng = Lcg(7);
    for len in [1usize, 15, 16, 300, 0x200, 0x1000, FUZZ_MEM_SIZE + 10] {
        for _ in 0..20 {
            let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            fuzz_parse(&data);
        }
    }
}

/// A block device on its own event loop behind a transport named `vda`,
/// as the VMM runs it.
struct Vm {
    blk: Looped<Block>,
    t: MmioTransport,
}

impl Vm {
    fn new(m: &GuestMemoryMmap, cfg: &BlockConfig) -> Self {
        let blk = Looped::new(|irq| Block::new(cfg, irq).unwrap());
        let t = blk.transport(m, "vda");
        Vm { blk, t }
    }

    /// The driver brings the device up with queue `vq`.
    fn boot(m: &GuestMemoryMmap, cfg: &BlockConfig, vq: &TestQueue) -> Self {
        let mut vm = Vm::new(m, cfg);
        mmio_activate(&mut vm.t, VIRTIO_F_RING_EVENT_IDX as u32, &[vq]);
        vm.blk.settle();
        vm
    }

    /// A new VM restored from `snap`, kicked and run.
    fn restored(
        m: &GuestMemoryMmap,
        cfg: &BlockConfig,
        snap: &TransportSnapshot,
        dir: &Path,
    ) -> Self {
        let mut vm = Vm::new(m, cfg);
        vm.t.restore(snap, dir).unwrap();
        vm.t.kick();
        vm.blk.settle();
        vm
    }

    /// Submits one request on `vq`, runs the device, and checks that it
    /// was completed as the next used entry; returns the used length.
    fn submit(&mut self, vq: &mut TestQueue, parts: &[(u64, u32, u16)]) -> u32 {
        let next_used = vq.used_idx();
        let head = vq.add_chain(parts);
        self.blk.kick(0);
        self.blk.settle();
        assert_eq!(vq.used_idx(), next_used.wrapping_add(1));
        let (id, len) = vq.used_entry(next_used);
        assert_eq!(id, u32::from(head));
        len
    }

    fn write(&mut self, m: &GuestMemoryMmap, vq: &mut TestQueue, sector: u64, data: &[u8]) {
        header(m, VIRTIO_BLK_T_OUT, sector);
        m.write_slice(data, GuestAddress(DATA)).unwrap();
        let len = data.len() as u32;
        self.submit(vq, &[(HDR, 16, R), (DATA, len, R), (STATUS, 1, W)]);
        assert_eq!(status(m), OK);
    }

    fn read(
        &mut self,
        m: &GuestMemoryMmap,
        vq: &mut TestQueue,
        sector: u64,
        len: usize,
    ) -> Vec<u8> {
        header(m, VIRTIO_BLK_T_IN, sector);
        let used = self.submit(vq, &[(HDR, 16, R), (DATA, len as u32, W), (STATUS, 1, W)]);
        assert_eq!((status(m), used), (OK, len as u32 + 1));
        read_guest(m, DATA, len)
    }
}

fn overlay_config(img: &TempImage) -> BlockConfig {
    BlockConfig {
        overlay: true,
        ..config(img)
    }
}

#[test]
fn overlay_writes_survive_a_snapshot_in_every_restored_vm() {
    const CL: usize = OVERLAY_CLUSTER_SIZE as usize;
    let base = pattern(4 * CL);
    let img = TempImage::new(&base);
    let cfg = overlay_config(&img);
    let m = mem();
    let mut vq = TestQueue::new(&m, 0, QSIZE);
    let mut a = Vm::boot(&m, &cfg, &vq);
    let mut model = base.clone();
    a.write(&m, &mut vq, 1, &[7u8; 512]);
    model[512..1024].fill(7);
    a.write(&m, &mut vq, (2 * CL / 512) as u64, &vec![8u8; CL]);
    model[2 * CL..3 * CL].fill(8);

    let dir = TempDir::new().unwrap();
    let snap = snapshot_through_json(&mut a.t, dir.as_path());
    let queues = snap.device.queues.as_ref().unwrap();
    assert_eq!((queues[0].next_avail, queues[0].next_used), (2, 2));
    let DeviceExtra::Block(b) = &snap.device.extra else {
        panic!("{:?}", snap.device.extra);
    };
    assert_eq!(b.size, 4 * CL as u64);
    assert_eq!(
        b.backend,
        BlockBackendSnapshot::Overlay {
            file: Some("vda.overlay".into())
        }
    );
    let saved = std::fs::read(dir.as_path().join("vda.overlay")).unwrap();
    // The guest's memory as the snapshot has it, for a second VM.
    let m2 = mem();
    let mut vq2 = vq.fork(&m2);
    drop(a);

    // Two VMs restored from the one snapshot, each on its own layer.
    let mut b = Vm::restored(&m, &cfg, &snap, dir.as_path());
    let mut c = Vm::restored(&m2, &cfg, &snap, dir.as_path());
    assert_eq!(mmio_read(&mut b.t, 0x70), 0xf);
    // Served from next_avail 2, completed at next_used 2.
    assert_eq!(b.read(&m, &mut vq, 0, 4 * CL), model);
    assert_eq!(vq.used_idx(), 3);
    b.write(&m, &mut vq, 3, &[9u8; 512]);
    let mut b_model = model.clone();
    b_model[3 * 512..4 * 512].fill(9);
    assert_eq!(b.read(&m, &mut vq, 0, 4 * CL), b_model);
    // The other VM sees the snapshot's disk, not the first one's writes.
    assert_eq!(c.read(&m2, &mut vq2, 0, 4 * CL), model);
    assert_eq!(vq2.used_idx(), 3);
    // Neither the base nor the snapshot's file changed.
    assert_eq!(img.contents(), base);
    assert_eq!(
        std::fs::read(dir.as_path().join("vda.overlay")).unwrap(),
        saved
    );

    // A restored VM is snapshotted again as any other.
    let dir2 = TempDir::new().unwrap();
    let again = snapshot_through_json(&mut c.t, dir2.as_path());
    assert_eq!(
        std::fs::read(dir2.as_path().join("vda.overlay")).unwrap(),
        saved
    );
    assert_eq!(again.device.queues.unwrap()[0].next_used, 3);
    // With nothing written, no file.
    let m3 = mem();
    let mut fresh = Vm::boot(&m3, &cfg, &TestQueue::new(&m3, 0, QSIZE));
    let dir3 = TempDir::new().unwrap();
    let empty = snapshot_through_json(&mut fresh.t, dir3.as_path());
    let DeviceExtra::Block(b) = &empty.device.extra else {
        panic!("not a block snapshot");
    };
    assert_eq!(b.backend, BlockBackendSnapshot::Overlay { file: None });
    assert_eq!(std::fs::read_dir(dir3.as_path()).unwrap().count(), 0);
}

#[test]
fn an_image_snapshot_records_the_image_and_restores_over_a_copy() {
    let base = pattern(64 * 1024);
    let img = TempImage::new(&base);
    let cfg = config(&img);
    let m = mem();
    let mut vq = TestQueue::new(&m, 0, QSIZE);
    let mut a = Vm::boot(&m, &cfg, &vq);
    a.write(&m, &mut vq, 2, &[3u8; 512]);
    let dir = TempDir::new().unwrap();
    let snap = snapshot_through_json(&mut a.t, dir.as_path());
    drop(a);
    let DeviceExtra::Block(b) = &snap.device.extra else {
        panic!("not a block snapshot");
    };
    assert_eq!(
        b.backend,
        BlockBackendSnapshot::Image {
            path: img.0.to_string_lossy().into_owned()
        }
    );
    assert_eq!(std::fs::read_dir(dir.as_path()).unwrap().count(), 0);
    // The write is in the image (flushed): a copy of it is the disk.
    let copy = TempImage::new(&img.contents());
    let mut b = Vm::restored(&m, &config(&copy), &snap, dir.as_path());
    let mut model = base.clone();
    model[1024..1536].fill(3);
    assert_eq!(b.read(&m, &mut vq, 0, 64 * 1024), model);
    drop(b);
    // Or an overlay over it, as a clone of the VM would have.
    let mut c = Vm::restored(&m, &overlay_config(&copy), &snap, dir.as_path());
    c.write(&m, &mut vq, 0, &[4u8; 512]);
    assert_eq!(copy.contents(), model);
}

/// Restoring `snap` into a fresh VM on `cfg` fails with `needle` in the
/// message, naming the device, and leaves the transport reset.
fn refused(
    m: &GuestMemoryMmap,
    cfg: &BlockConfig,
    snap: &TransportSnapshot,
    dir: &Path,
    needle: &str,
) -> SnapshotError {
    let mut vm = Vm::new(m, cfg);
    let e = vm.t.restore(snap, dir).unwrap_err();
    let msg = e.to_string();
    assert!(msg.starts_with("vda: ") && msg.contains(needle), "{msg}");
    assert_eq!(mmio_read(&mut vm.t, 0x70), 0);
    assert!(!vm.blk.lock().state.is_running());
    e
}

#[test]
fn a_restore_refuses_another_disk_or_a_bad_overlay_file() {
    const CL: usize = OVERLAY_CLUSTER_SIZE as usize;
    let img = TempImage::new(&pattern(2 * CL));
    let cfg = overlay_config(&img);
    let m = mem();
    let mut vq = TestQueue::new(&m, 0, QSIZE);
    let mut a = Vm::boot(&m, &cfg, &vq);
    a.write(&m, &mut vq, 130, &[5u8; 1024]);
    let dir = TempDir::new().unwrap();
    let snap = snapshot_through_json(&mut a.t, dir.as_path());
    let file = dir.as_path().join("vda.overlay");
    let good = std::fs::read(&file).unwrap();

    // Another size of disk.
    let bigger = TempImage::new(&pattern(3 * CL));
    let e = refused(&m, &overlay_config(&bigger), &snap, dir.as_path(), "");
    assert!(
        matches!(e, SnapshotError::DiskSize { snapshot, this, .. }
            if snapshot == 2 * CL as u64 && this == 3 * CL as u64),
        "{e}"
    );
    // The overlay's writes cannot go onto an image itself.
    let copy = TempImage::new(&img.contents());
    let e = refused(&m, &config(&copy), &snap, dir.as_path(), "");
    assert_eq!(
        e.to_string(),
        "vda: snapshot's disk is a copy-on-write overlay where this disk is a writable image"
    );
    // A read-only disk offers other features.
    let ro = BlockConfig {
        readonly: true,
        ..config(&img)
    };
    let e = refused(&m, &ro, &snap, dir.as_path(), "differing bits 0x20");
    assert!(matches!(e, SnapshotError::Features { .. }));

    // A truncated, a garbled, a missing file.
    std::fs::write(&file, &good[..good.len() - 100]).unwrap();
    let e = refused(&m, &cfg, &snap, dir.as_path(), "truncated or extended");
    assert!(matches!(e, SnapshotError::BadOverlay { .. }));
    assert!(e.to_string().contains(file.to_str().unwrap()), "{e}");
    let mut garbled = good.clone();
    garbled[good.len() / 2] ^= 1;
    std::fs::write(&file, &garbled).unwrap();
    refused(&m, &cfg, &snap, dir.as_path(), "checksum");
    std::fs::remove_file(&file).unwrap();
    let e = refused(
        &m,
        &cfg,
        &snap,
        dir.as_path(),
        "cannot load the overlay file",
    );
    assert!(matches!(e, SnapshotError::Io { .. }));
    std::fs::write(&file, &good).unwrap();

    // A file name that leaves the snapshot directory.
    let mut escaping = snap.clone();
    escaping.device.extra = DeviceExtra::Block(BlockSnapshot {
        size: 2 * CL as u64,
        readonly: false,
        backend: BlockBackendSnapshot::Overlay {
            file: Some("../vda.overlay".into()),
        },
    });
    refused(&m, &cfg, &escaping, dir.as_path(), "is not a file name");
    // Another device's state.
    let mut other = snap.clone();
    other.device.extra = DeviceExtra::Rng;
    refused(
        &m,
        &cfg,
        &other,
        dir.as_path(),
        "entropy device where this is a block",
    );

    // The good file still restores.
    let mut b = Vm::restored(&m, &cfg, &snap, dir.as_path());
    assert_eq!(b.read(&m, &mut vq, 130, 1024), vec![5u8; 1024]);
}

//! virtio-gpu against a driver played through mock queues: the commands
//! Linux sends at probe and as fbcon draws (a partial transfer included),
//! fences, every refusal, the memory bound, and a snapshot.

use super::*;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::virtio::test_utils::{
    mem, mmio_activate, read_guest, snapshot_through_json, Looped, TestQueue, MEM_SIZE, R, W,
};

type Setup = Looped<Gpu>;

/// Where requests and responses go in guest memory.
const REQ: u64 = 0x10_000;
const RESP: u64 = 0x20_000;
/// The framebuffer's guest pages.
const FB: u64 = 0x100_000;

struct Driver<'a> {
    s: Setup,
    mem: &'a GuestMemoryMmap,
    ctrl: TestQueue<'a>,
    cursor: TestQueue<'a>,
}

impl<'a> Driver<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Self {
        let s = Looped::new(|irq| Gpu::new(GpuConfig::default(), irq).unwrap());
        let ctrl = TestQueue::new(mem, 0, 64);
        let cursor = TestQueue::new(mem, 0x4000, 16);
        s.activate(mem, &[&ctrl, &cursor], false);
        let mut d = Driver {
            s,
            mem,
            ctrl,
            cursor,
        };
        d.s.settle();
        d
    }

    /// Sends `kind` with `body` (fenced with `fence` if given) and returns
    /// the response: its type, and what follows the header.
    fn cmd_fenced(&mut self, kind: u32, body: &[u8], fence: Option<u64>) -> (u32, Vec<u8>) {
        let mut req = vec![0u8; HDR_SIZE];
        req[0..4].copy_from_slice(&kind.to_le_bytes());
        if let Some(f) = fence {
            req[4..8].copy_from_slice(&FLAG_FENCE.to_le_bytes());
            req[8..16].copy_from_slice(&f.to_le_bytes());
        }
        req.extend_from_slice(body);
        self.mem.write_slice(&req, GuestAddress(REQ)).unwrap();
        self.mem
            .write_slice(&[0xaa; 2048], GuestAddress(RESP))
            .unwrap();
        self.ctrl
            .add_chain(&[(REQ, req.len() as u32, R), (RESP, 2048, W)]);
        self.s.kick(0);
        self.s.settle();
        let used = self.ctrl.take_used();
        assert_eq!(used.len(), 1);
        let resp = read_guest(self.mem, RESP, used[0].1 as usize);
        assert!(resp.len() >= HDR_SIZE, "response of {} bytes", resp.len());
        let flags = le32(&resp, 4);
        match fence {
            Some(f) => {
                assert_eq!(flags & FLAG_FENCE, FLAG_FENCE);
                assert_eq!(le64(&resp, 8), f);
            }
            None => assert_eq!(flags, 0),
        }
        (le32(&resp, 0), resp[HDR_SIZE..].to_vec())
    }

    fn cmd(&mut self, kind: u32, body: &[u8]) -> u32 {
        self.cmd_fenced(kind, body, None).0
    }

    fn create(&mut self, id: u32, format: u32, w: u32, h: u32) -> u32 {
        self.cmd(CMD_RESOURCE_CREATE_2D, &words(&[id, format, w, h]))
    }

    /// Attaches `pages` 4 KiB entries from `FB` (in reverse order, as
    /// scattered pages come) to resource `id`.
    fn attach_pages(&mut self, id: u32, pages: u64) -> u32 {
        let mut body = words(&[id, pages as u32]);
        for i in 0..pages {
            body.extend_from_slice(&entry(FB + (pages - 1 - i) * 4096, 4096));
        }
        self.cmd(CMD_RESOURCE_ATTACH_BACKING, &body)
    }

    /// Byte `offset` of the backing attached by [`Driver::attach_pages`].
    fn backing_addr(pages: u64, offset: u64) -> u64 {
        FB + (pages - 1 - offset / 4096) * 4096 + offset % 4096
    }
}

fn words(w: &[u32]) -> Vec<u8> {
    w.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn entry(addr: u64, len: u32) -> Vec<u8> {
    let mut e = addr.to_le_bytes().to_vec();
    e.extend_from_slice(&len.to_le_bytes());
    e.extend_from_slice(&[0; 4]);
    e
}

fn rect(x: u32, y: u32, w: u32, h: u32) -> Vec<u8> {
    words(&[x, y, w, h])
}

#[test]
fn identity_and_config() {
    let mem = mem();
    let d = Driver::new(&mem);
    let g = d.s.lock();
    assert_eq!(g.device_type(), 16);
    assert_eq!(g.queue_max_sizes(), &[256, 16]);
    assert_ne!(g.features() & VIRTIO_GPU_F_EDID, 0);
    let mut c = [0u8; 16];
    g.read_config(0, &mut c);
    assert_eq!(words(&[0, 0, 1, 0]), c);
    assert!(Gpu::new(
        GpuConfig {
            width: 100,
            height: 768
        },
        EventFd::new(0).unwrap()
    )
    .is_err());
}

#[test]
fn display_info_and_edid_give_the_configured_mode() {
    let mem = mem();
    let mut d = Driver::new(&mem);
    let (t, info) = d.cmd_fenced(CMD_GET_DISPLAY_INFO, &[], None);
    assert_eq!(t, RESP_OK_DISPLAY_INFO);
    assert_eq!(info.len(), 16 * 24);
    assert_eq!(&info[0..24], &words(&[0, 0, 1024, 768, 1, 0])[..]);
    assert!(info[24..].iter().all(|&b| b == 0));
    let (t, e) = d.cmd_fenced(CMD_GET_EDID, &words(&[0, 0]), None);
    assert_eq!(t, RESP_OK_EDID);
    assert_eq!(le32(&e, 0), 128);
    assert_eq!(&e[8..16], &[0, 255, 255, 255, 255, 255, 255, 0]);
    assert_eq!(e.len(), 8 + 1024);
    assert_eq!(
        d.cmd(CMD_GET_EDID, &words(&[1, 0])),
        RESP_ERR_INVALID_PARAMETER
    );
}

#[test]
fn fbcon_draws_and_the_screenshot_shows_it() {
    let mem = mem();
    let mut d = Driver::new(&mem);
    let (w, h) = (64u32, 32u32);
    let pages = u64::from(w * h * 4).div_ceil(4096);
    assert_eq!(d.s.lock().screenshot(), None);
    assert_eq!(d.create(2, 2, w, h), RESP_OK_NODATA);
    assert_eq!(d.attach_pages(2, pages), RESP_OK_NODATA);
    // The guest's framebuffer: pixel (x, y) is B=x G=y R=7 X=0xff.
    for y in 0..h {
        for x in 0..w {
            let off = u64::from((y * w + x) * 4);
            let px = [x as u8, y as u8, 7, 0xff];
            mem.write_slice(&px, GuestAddress(Driver::backing_addr(pages, off)))
                .unwrap();
        }
    }
    // Nothing transferred yet: the scanout shows black.
    assert_eq!(
        d.cmd(
            CMD_SET_SCANOUT,
            &[rect(0, 0, w, h), words(&[0, 2])].concat()
        ),
        RESP_OK_NODATA
    );
    let shot = d.s.lock().screenshot().unwrap();
    assert_eq!((shot.width, shot.height), (w, h));
    assert!(shot.rgb.iter().all(|&b| b == 0));
    // One glyph-sized damage rectangle, as fbcon sends: 8x16 at (16, 8),
    // offset = x * 4 + y * pitch.
    let offset = 16 * 4 + 8 * u64::from(w) * 4;
    let body = [
        rect(16, 8, 8, 16),
        offset.to_le_bytes().to_vec(),
        words(&[2, 0]),
    ]
    .concat();
    assert_eq!(d.cmd(CMD_TRANSFER_TO_HOST_2D, &body), RESP_OK_NODATA);
    assert_eq!(
        d.cmd(
            CMD_RESOURCE_FLUSH,
            &[rect(16, 8, 8, 16), words(&[2, 0])].concat()
        ),
        RESP_OK_NODATA
    );
    let shot = d.s.lock().screenshot().unwrap();
    for y in 0..h {
        for x in 0..w {
            let i = ((y * w + x) * 3) as usize;
            let inside = (16..24).contains(&x) && (8..24).contains(&y);
            let want = if inside {
                [7, y as u8, x as u8]
            } else {
                [0, 0, 0]
            };
            assert_eq!(&shot.rgb[i..i + 3], &want, "pixel ({x}, {y})");
        }
    }
    // The whole screen; a scanout of part of the resource.
    let body = [
        rect(0, 0, w, h),
        0u64.to_le_bytes().to_vec(),
        words(&[2, 0]),
    ]
    .concat();
    assert_eq!(d.cmd(CMD_TRANSFER_TO_HOST_2D, &body), RESP_OK_NODATA);
    assert_eq!(
        d.cmd(
            CMD_SET_SCANOUT,
            &[rect(4, 2, 16, 16), words(&[0, 2])].concat()
        ),
        RESP_OK_NODATA
    );
    let shot = d.s.lock().screenshot().unwrap();
    assert_eq!((shot.width, shot.height), (16, 16));
    assert_eq!(&shot.rgb[0..3], &[7, 2, 4]);
    // Disabling the scanout, then dropping the resource.
    assert_eq!(
        d.cmd(
            CMD_SET_SCANOUT,
            &[rect(0, 0, 0, 0), words(&[0, 0])].concat()
        ),
        RESP_OK_NODATA
    );
    assert_eq!(d.s.lock().screenshot(), None);
    assert_eq!(
        d.cmd(CMD_RESOURCE_DETACH_BACKING, &words(&[2, 0])),
        RESP_OK_NODATA
    );
    assert_eq!(d.cmd(CMD_RESOURCE_UNREF, &words(&[2, 0])), RESP_OK_NODATA);
    assert_eq!(d.s.lock().host_bytes(), 0);
}

#[test]
fn each_pixel_format_converts_to_rgb() {
    let mem = mem();
    let mut d = Driver::new(&mem);
    let cases = [
        (1, [3, 2, 1]),
        (2, [3, 2, 1]),
        (3, [2, 3, 4]),
        (4, [2, 3, 4]),
        (67, [1, 2, 3]),
        (134, [1, 2, 3]),
        (68, [4, 3, 2]),
        (121, [4, 3, 2]),
    ];
    for (i, (format, rgb)) in cases.into_iter().enumerate() {
        let id = 10 + i as u32;
        assert_eq!(d.create(id, format, 1, 1), RESP_OK_NODATA);
        let addr = FB + i as u64 * 4096;
        mem.write_slice(&[1, 2, 3, 4], GuestAddress(addr)).unwrap();
        let body = [words(&[id, 1]), entry(addr, 4)].concat();
        assert_eq!(d.cmd(CMD_RESOURCE_ATTACH_BACKING, &body), RESP_OK_NODATA);
        let body = [
            rect(0, 0, 1, 1),
            0u64.to_le_bytes().to_vec(),
            words(&[id, 0]),
        ]
        .concat();
        assert_eq!(d.cmd(CMD_TRANSFER_TO_HOST_2D, &body), RESP_OK_NODATA);
        assert_eq!(
            d.cmd(
                CMD_SET_SCANOUT,
                &[rect(0, 0, 1, 1), words(&[0, id])].concat()
            ),
            RESP_OK_NODATA
        );
        assert_eq!(d.s.lock().screenshot().unwrap().rgb, rgb, "format {format}");
    }
    assert_eq!(d.create(30, 5, 1, 1), RESP_ERR_INVALID_PARAMETER);
}

#[test]
fn fences_come_back_with_the_response() {
    let mem = mem();
    let mut d = Driver::new(&mem);
    let (t, _) = d.cmd_fenced(CMD_RESOURCE_CREATE_2D, &words(&[1, 2, 8, 8]), Some(77));
    assert_eq!(t, RESP_OK_NODATA);
    let (t, _) = d.cmd_fenced(CMD_RESOURCE_CREATE_2D, &words(&[1, 2, 8, 8]), Some(78));
    assert_eq!(t, RESP_ERR_INVALID_RESOURCE_ID);
}

#[test]
fn bad_commands_get_qemus_errors() {
    let mem = mem();
    let mut d = Driver::new(&mem);
    // Ids: 0, taken, unknown.
    assert_eq!(d.create(0, 2, 8, 8), RESP_ERR_INVALID_RESOURCE_ID);
    assert_eq!(d.create(1, 2, 8, 8), RESP_OK_NODATA);
    assert_eq!(d.create(1, 2, 8, 8), RESP_ERR_INVALID_RESOURCE_ID);
    assert_eq!(
        d.cmd(CMD_RESOURCE_UNREF, &words(&[9, 0])),
        RESP_ERR_INVALID_RESOURCE_ID
    );
    assert_eq!(
        d.cmd(
            CMD_RESOURCE_FLUSH,
            &[rect(0, 0, 1, 1), words(&[9, 0])].concat()
        ),
        RESP_ERR_INVALID_RESOURCE_ID
    );
    // Sizes: zero, too large, past the memory bound.
    assert_eq!(d.create(2, 2, 0, 8), RESP_ERR_INVALID_PARAMETER);
    assert_eq!(
        d.create(2, 2, MAX_RESOURCE_DIM + 1, 8),
        RESP_ERR_INVALID_PARAMETER
    );
    assert_eq!(d.create(2, 2, 8192, 8192), RESP_ERR_OUT_OF_MEMORY);
    assert_eq!(d.create(2, 2, 8192, 8191), RESP_OK_NODATA);
    assert_eq!(d.create(3, 2, 8192, 1), RESP_ERR_OUT_OF_MEMORY);
    assert_eq!(d.cmd(CMD_RESOURCE_UNREF, &words(&[2, 0])), RESP_OK_NODATA);
    assert_eq!(d.create(3, 2, 8192, 1), RESP_OK_NODATA);
    // Rectangles outside the resource, with overflowing sums.
    for r in [
        rect(0, 0, 9, 8),
        rect(4, 0, 5, 8),
        rect(u32::MAX, 0, 2, 1),
        rect(0, u32::MAX, 1, 2),
    ] {
        assert_eq!(
            d.cmd(CMD_SET_SCANOUT, &[r.clone(), words(&[0, 1])].concat()),
            RESP_ERR_INVALID_PARAMETER
        );
        assert_eq!(
            d.cmd(CMD_RESOURCE_FLUSH, &[r.clone(), words(&[1, 0])].concat()),
            RESP_ERR_INVALID_PARAMETER
        );
        let t = [r, 0u64.to_le_bytes().to_vec(), words(&[1, 0])].concat();
        assert_eq!(
            d.cmd(CMD_TRANSFER_TO_HOST_2D, &t),
            RESP_ERR_INVALID_PARAMETER
        );
    }
    assert_eq!(
        d.cmd(
            CMD_SET_SCANOUT,
            &[rect(0, 0, 8, 8), words(&[1, 1])].concat()
        ),
        RESP_ERR_INVALID_SCANOUT_ID
    );
    assert_eq!(
        d.cmd(
            CMD_SET_SCANOUT,
            &[rect(0, 0, 8, 8), words(&[0, 5])].concat()
        ),
        RESP_ERR_INVALID_RESOURCE_ID
    );
    // A transfer without backing.
    let t = [
        rect(0, 0, 8, 8),
        0u64.to_le_bytes().to_vec(),
        words(&[1, 0]),
    ]
    .concat();
    assert_eq!(d.cmd(CMD_TRANSFER_TO_HOST_2D, &t), RESP_ERR_UNSPEC);
    // Backing: outside guest memory, wrapping, too many entries, fewer
    // entries than announced, attached twice.
    for e in [
        entry(MEM_SIZE as u64 - 8, 16),
        entry(u64::MAX - 2, 8),
        entry(0xffff_0000_0000, 1),
    ] {
        assert_eq!(
            d.cmd(CMD_RESOURCE_ATTACH_BACKING, &[words(&[1, 1]), e].concat()),
            RESP_ERR_UNSPEC
        );
    }
    assert_eq!(
        d.cmd(
            CMD_RESOURCE_ATTACH_BACKING,
            &words(&[1, MAX_BACKING_ENTRIES + 1])
        ),
        RESP_ERR_UNSPEC
    );
    assert_eq!(
        d.cmd(
            CMD_RESOURCE_ATTACH_BACKING,
            &[words(&[1, 2]), entry(FB, 8)].concat()
        ),
        RESP_ERR_UNSPEC
    );
    assert_eq!(
        d.cmd(
            CMD_RESOURCE_ATTACH_BACKING,
            &[words(&[1, 1]), entry(FB, 256)].concat()
        ),
        RESP_OK_NODATA
    );
    assert_eq!(
        d.cmd(
            CMD_RESOURCE_ATTACH_BACKING,
            &[words(&[1, 1]), entry(FB, 256)].concat()
        ),
        RESP_ERR_UNSPEC
    );
    // A transfer reaching past a short backing copies what is there.
    let t = [
        rect(0, 0, 8, 8),
        200u64.to_le_bytes().to_vec(),
        words(&[1, 0]),
    ]
    .concat();
    assert_eq!(d.cmd(CMD_TRANSFER_TO_HOST_2D, &t), RESP_OK_NODATA);
    let t = [
        rect(0, 0, 8, 8),
        u64::MAX.to_le_bytes().to_vec(),
        words(&[1, 0]),
    ]
    .concat();
    assert_eq!(d.cmd(CMD_TRANSFER_TO_HOST_2D, &t), RESP_OK_NODATA);
    // Unknown and 3D commands, a body too short.
    for kind in [0x0109, 0x0200, 0x0, 0xffff_ffff] {
        assert_eq!(d.cmd(kind, &[]), RESP_ERR_UNSPEC);
    }
    assert_eq!(
        d.cmd(CMD_RESOURCE_CREATE_2D, &words(&[4, 2, 8])),
        RESP_ERR_UNSPEC
    );
    assert!(d.s.lock().state.is_running());
}

#[test]
fn malformed_chains_are_completed_empty() {
    let mem = mem();
    let mut d = Driver::new(&mem);
    // Shorter than a header; no response buffer; a response buffer too
    // small for display info; outside guest memory.
    d.ctrl.add_chain(&[(REQ, 8, R), (RESP, 64, W)]);
    mem.write_slice(&CMD_GET_DISPLAY_INFO.to_le_bytes(), GuestAddress(REQ))
        .unwrap();
    d.ctrl.add_chain(&[(REQ, 24, R)]);
    d.ctrl.add_chain(&[(REQ, 24, R), (RESP, 64, W)]);
    d.ctrl.add_chain(&[(0xffff_0000, 24, R), (RESP, 64, W)]);
    d.s.kick(0);
    d.s.settle();
    let used = d.ctrl.take_used();
    assert_eq!(used.iter().map(|u| u.1).collect::<Vec<_>>(), [0, 0, 0, 0]);
    assert_eq!(d.cmd(CMD_GET_DISPLAY_INFO, &[]), RESP_OK_DISPLAY_INFO);
}

#[test]
fn cursor_commands_are_taken() {
    let mem = mem();
    let mut d = Driver::new(&mem);
    let mut req = words(&[CMD_MOVE_CURSOR, 0, 0, 0, 0, 0]);
    req.extend(words(&[0, 100, 50, 0, 0, 0, 0, 0]));
    mem.write_slice(&req, GuestAddress(REQ)).unwrap();
    d.cursor.add_chain(&[(REQ, req.len() as u32, R)]);
    d.s.kick(1);
    d.s.settle();
    assert_eq!(d.cursor.take_used(), [(0, 0)]);
    assert_eq!(d.s.lock().gpu.cursor, (100, 50));
}

#[test]
fn a_reset_drops_every_resource() {
    let mem = mem();
    let mut d = Driver::new(&mem);
    assert_eq!(d.create(1, 2, 16, 16), RESP_OK_NODATA);
    assert_eq!(
        d.cmd(
            CMD_SET_SCANOUT,
            &[rect(0, 0, 16, 16), words(&[0, 1])].concat()
        ),
        RESP_OK_NODATA
    );
    d.s.lock().reset();
    assert_eq!(d.s.lock().host_bytes(), 0);
    assert_eq!(d.s.lock().screenshot(), None);
}

#[test]
fn a_snapshot_keeps_the_screen() {
    let mem = mem();
    let s = Looped::new(|irq| Gpu::new(GpuConfig::default(), irq).unwrap());
    let mut t = s.transport(&mem, "gpu");
    let ctrl = TestQueue::new(&mem, 0, 64);
    let cursor = TestQueue::new(&mem, 0x4000, 16);
    mmio_activate(&mut t, VIRTIO_GPU_F_EDID as u32, &[&ctrl, &cursor]);
    let mut d = Driver {
        s,
        mem: &mem,
        ctrl,
        cursor,
    };
    d.s.settle();
    assert_eq!(d.create(5, 2, 32, 32), RESP_OK_NODATA);
    assert_eq!(d.attach_pages(5, 1), RESP_OK_NODATA);
    mem.write_slice(&[9u8; 4096], GuestAddress(FB)).unwrap();
    let body = [
        rect(0, 0, 32, 32),
        0u64.to_le_bytes().to_vec(),
        words(&[5, 0]),
    ]
    .concat();
    assert_eq!(d.cmd(CMD_TRANSFER_TO_HOST_2D, &body), RESP_OK_NODATA);
    assert_eq!(
        d.cmd(
            CMD_SET_SCANOUT,
            &[rect(0, 0, 32, 32), words(&[0, 5])].concat()
        ),
        RESP_OK_NODATA
    );
    let before = d.s.lock().screenshot().unwrap();
    let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
    let snap = snapshot_through_json(&mut t, dir.as_path());

    let s2 = Looped::new(|irq| Gpu::new(GpuConfig::default(), irq).unwrap());
    let mut t2 = s2.transport(&mem, "gpu");
    t2.restore(&snap, dir.as_path()).unwrap();
    assert_eq!(s2.lock().screenshot().unwrap(), before);
    assert_eq!(s2.lock().host_bytes(), 32 * 32 * 4);

    // Another mode, or a resource file that does not match, is refused.
    let s3 = Looped::new(|irq| {
        Gpu::new(
            GpuConfig {
                width: 800,
                height: 600,
            },
            irq,
        )
        .unwrap()
    });
    let e = s3
        .transport(&mem, "gpu")
        .restore(&snap, dir.as_path())
        .unwrap_err();
    assert!(e.to_string().contains("1024x768"), "{e}");
    let DeviceExtra::Gpu(g) = &snap.device.extra else {
        panic!("{:?}", snap.device.extra);
    };
    std::fs::write(dir.as_path().join(&g.resources[0].file), [0u8; 10]).unwrap();
    let s4 = Looped::new(|irq| Gpu::new(GpuConfig::default(), irq).unwrap());
    let e = s4
        .transport(&mem, "gpu")
        .restore(&snap, dir.as_path())
        .unwrap_err();
    assert!(e.to_string().contains("needs 4096"), "{e}");
}

#[test]
fn the_fuzz_entry_point_runs_a_real_command() {
    assert_eq!(fuzz_control(&[]), 0);
    // One chain on the control queue: RESOURCE_CREATE_2D of 16x16 at
    // 0x1000, its response at 0x2000.
    let mut guest = vec![0u8; 0x3000];
    let desc = |i: usize, addr: u64, len: u32, flags: u16, next: u16, g: &mut Vec<u8>| {
        let at = i * 16;
        g[at..at + 8].copy_from_slice(&addr.to_le_bytes());
        g[at + 8..at + 12].copy_from_slice(&len.to_le_bytes());
        g[at + 12..at + 14].copy_from_slice(&flags.to_le_bytes());
        g[at + 14..at + 16].copy_from_slice(&next.to_le_bytes());
    };
    desc(0, 0x1000, 40, 1, 1, &mut guest);
    desc(1, 0x2000, 64, 2, 0, &mut guest);
    // Available ring: flags, idx 1, ring[0] = 0.
    guest[0x102] = 1;
    let req = [
        words(&[CMD_RESOURCE_CREATE_2D, 0, 0, 0, 0, 0]),
        words(&[1, 2, 16, 16]),
    ]
    .concat();
    guest[0x1000..0x1000 + req.len()].copy_from_slice(&req);
    let mut data = vec![0u8];
    data.extend_from_slice(&guest);
    assert_eq!(fuzz_control(&data), 16 * 16 * 4);
    // Random inputs end.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..200 {
        let data: Vec<u8> = (0..0x400)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        fuzz_control(&data);
    }
}

//! Direct Linux boot: kernel (bzImage or ELF vmlinux), initrd, command line
//! and the zero page with its e820 map; the ACPI tables live in [`acpi`].

pub mod acpi;

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::{self, BzImage, Cmdline, Elf, KernelLoader};
#[cfg(test)]
use vm_memory::Bytes;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, ReadVolatile};

use crate::memory::{
    low_ram_end, ACPI_END, CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, MMIO_GAP_END,
    MMIO_GAP_START, RSDP_START, ZERO_PAGE_START,
};

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// Offset of the 64-bit entry point from the protected-mode kernel start.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const XLF_KERNEL_64: u16 = 1 << 0;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const PAGE_SIZE: u64 = 0x1000;

/// Errors while loading the guest's boot images.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A file could not be opened or read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// "kernel image" or "initrd".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Neither an ELF vmlinux nor a bzImage.
    #[error("{path} is not a Linux kernel image (neither an ELF vmlinux nor a bzImage): {detail}")]
    NotAKernel {
        /// The file.
        path: PathBuf,
        /// What the loaders said.
        detail: String,
    },
    /// A bzImage without a 64-bit entry point.
    #[error("{0} is a bzImage without a 64-bit entry point (boot protocol < 2.12 or not an x86_64 kernel)")]
    No64BitEntry(PathBuf),
    /// The kernel does not fit.
    #[error("kernel image {path} does not fit in guest memory: {detail}")]
    KernelTooLarge {
        /// The file.
        path: PathBuf,
        /// What the loader said.
        detail: String,
    },
    /// The initrd does not fit.
    #[error("initrd {path} ({size_mib} MiB) does not fit in guest memory ({room_mib} MiB free between the kernel and the top of low memory)")]
    InitrdTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size_mib: u64,
        /// Room available.
        room_mib: u64,
    },
    /// The command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// Writing to guest memory failed.
    #[error("cannot write {what} to guest memory: {detail}")]
    GuestMemory {
        /// What was written.
        what: &'static str,
        /// Why.
        detail: String,
    },
}

/// Where the kernel landed and how to enter it.
#[derive(Debug, Clone)]
pub struct LoadedKernel {
    /// Guest-physical address of the 64-bit entry point.
    pub entry: GuestAddress,
    /// End of the memory the kernel uses while booting.
    pub end: u64,
    /// The setup header to start the zero page from.
    pub header: setup_header,
}

/// Loads `path` (ELF vmlinux or bzImage) at 1 MiB.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let read_err = |source| BootError::Read {
        what: "kernel image",
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let len = file.seek(SeekFrom::End(0)).map_err(read_err)?;
    file.rewind().map_err(read_err)?;
    if len == 0 {
        return Err(BootError::NotAKernel {
            path: path.to_owned(),
            detail: "the file is empty".into(),
        });
    }
    let too_large = |e: &loader::Error| {
        matches!(
            e,
            loader::Error::Elf(loader::elf::Error::ReadKernelImage)
                | loader::Error::Bzimage(loader::bzimage::Error::ReadBzImageCompressedKernel)
                | loader::Error::MemoryOverflow
        )
    };
    match Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))) {
        Ok(res) => {
            let header = setup_header {
                boot_flag: KERNEL_BOOT_FLAG_MAGIC,
                header: KERNEL_HDR_MAGIC,
                kernel_alignment: KERNEL_MIN_ALIGNMENT_BYTES,
                ..Default::default()
            };
            Ok(LoadedKernel {
                entry: res.kernel_load,
                end: res.kernel_end,
                header,
            })
        }
        Err(loader::Error::Elf(loader::elf::Error::InvalidElfMagicNumber)) => {
            file.rewind().map_err(read_err)?;
            let res = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(|e| {
                    if too_large(&e) && len > mem.last_addr().0 {
                        BootError::KernelTooLarge {
                            path: path.to_owned(),
                            detail: e.to_string(),
                        }
                    } else {
                        BootError::NotAKernel {
                            path: path.to_owned(),
                            detail: e.to_string(),
                        }
                    }
                })?;
            let header = res.setup_header.ok_or_else(|| BootError::NotAKernel {
                path: path.to_owned(),
                detail: "no setup header".into(),
            })?;
            let (version, xloadflags) = (header.version, header.xloadflags);
            if version < 0x020c || xloadflags & XLF_KERNEL_64 == 0 {
                return Err(BootError::No64BitEntry(path.to_owned()));
            }
            // The kernel decompresses itself in place: it needs `init_size`
            // bytes from its load address.
            let init_size = u64::from(header.init_size);
            let end = (res.kernel_load.0 + init_size).max(res.kernel_end);
            Ok(LoadedKernel {
                entry: GuestAddress(res.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET),
                end,
                header,
            })
        }
        Err(e) if too_large(&e) => Err(BootError::KernelTooLarge {
            path: path.to_owned(),
            detail: e.to_string(),
        }),
        Err(e) => Err(BootError::NotAKernel {
            path: path.to_owned(),
            detail: e.to_string(),
        }),
    }
}

/// Where the initrd was placed.
#[derive(Debug, Clone, Copy)]
pub struct LoadedInitrd {
    /// Guest-physical start.
    pub addr: GuestAddress,
    /// Size in bytes.
    pub size: u64,
}

/// Loads the initrd at the top of low RAM (below `initrd_addr_max` and the
/// MMIO gap), page aligned, after checking it clears the kernel.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel: &LoadedKernel,
    mem_size: u64,
) -> Result<LoadedInitrd, BootError> {
    let read_err = |source| BootError::Read {
        what: "initrd",
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.seek(SeekFrom::End(0)).map_err(read_err)?;
    file.rewind().map_err(read_err)?;
    let addr_max = match u64::from(kernel.header.initrd_addr_max) {
        0 => 0x37ff_ffff, // boot protocol < 2.03
        max => max,
    };
    let top = low_ram_end(mem_size).min(addr_max + 1);
    let bottom = kernel.end.next_multiple_of(PAGE_SIZE);
    let room = top.saturating_sub(bottom);
    if size > room {
        return Err(BootError::InitrdTooLarge {
            path: path.to_owned(),
            size_mib: size.div_ceil(1 << 20),
            room_mib: room >> 20,
        });
    }
    let addr = GuestAddress((top - size) & !(PAGE_SIZE - 1));
    let mut slice = mem
        .get_slice(addr, size as usize)
        .map_err(|e| BootError::GuestMemory {
            what: "the initrd",
            detail: e.to_string(),
        })?;
    file.read_exact_volatile(&mut slice)
        .map_err(|e| BootError::Read {
            what: "initrd",
            path: path.to_owned(),
            source: std::io::Error::other(e.to_string()),
        })?;
    Ok(LoadedInitrd { addr, size })
}

/// Writes the command line at [`CMDLINE_START`]; returns its size including
/// the terminating NUL.
pub fn write_cmdline(
    mem: &GuestMemoryMmap,
    cmdline: &str,
    kernel: &LoadedKernel,
) -> Result<u32, BootError> {
    // Boot protocol 2.06+ tells how long a command line the kernel takes.
    let limit = match kernel.header.cmdline_size {
        0 => 255,
        n => n as usize,
    }
    .min(CMDLINE_MAX_SIZE - 1);
    if cmdline.len() > limit {
        return Err(BootError::Cmdline(format!(
            "{} bytes long, the kernel accepts at most {limit}",
            cmdline.len()
        )));
    }
    let cl =
        Cmdline::try_from(cmdline, limit + 1).map_err(|e| BootError::Cmdline(e.to_string()))?;
    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cl).map_err(|e| {
        BootError::GuestMemory {
            what: "the command line",
            detail: e.to_string(),
        }
    })?;
    Ok(cmdline.len() as u32 + 1)
}

/// The e820 map: usable RAM, with the EBDA/ACPI area below 1 MiB and the
/// MMIO gap left out.
pub fn e820_map(mem_size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, ACPI_END - EBDA_START, E820_RESERVED),
        (HIMEM_START, low_ram_end(mem_size) - HIMEM_START, E820_RAM),
    ];
    if mem_size > MMIO_GAP_START {
        map.push((MMIO_GAP_END, mem_size - MMIO_GAP_START, E820_RAM));
    }
    map
}

/// Writes the zero page for the 64-bit boot protocol.
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline_size: u32,
    initrd: Option<LoadedInitrd>,
    mem_size: u64,
) -> Result<(), BootError> {
    let mut params = boot_params {
        hdr: kernel.header,
        ..Default::default()
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_size;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr.0 as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    params.acpi_rsdp_addr = RSDP_START;
    let map = e820_map(mem_size);
    for (i, (addr, size, kind)) in map.iter().enumerate() {
        params.e820_table[i].addr = *addr;
        params.e820_table[i].size = *size;
        params.e820_table[i].r#type = *kind;
    }
    params.e820_entries = map.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(|e| BootError::GuestMemory {
        what: "the zero page",
        detail: e.to_string(),
    })
}

/// Reads back a value, for tests.
#[cfg(test)]
fn read_u32(mem: &GuestMemoryMmap, addr: u64) -> u32 {
    mem.read_obj(GuestAddress(addr)).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;
    use std::io::Write;

    fn temp_file(bytes: &[u8]) -> tempfile_lite::TempFile {
        let f = tempfile_lite::TempFile::new();
        std::fs::File::create(f.path())
            .unwrap()
            .write_all(bytes)
            .unwrap();
        f
    }

    /// A minimal temporary-file helper (no extra dependency for tests).
    mod tempfile_lite {
        use std::path::{Path, PathBuf};
        use std::sync::atomic::{AtomicUsize, Ordering};

        pub struct TempFile(PathBuf);
        static N: AtomicUsize = AtomicUsize::new(0);

        impl TempFile {
            pub fn new() -> Self {
                let n = N.fetch_add(1, Ordering::Relaxed);
                TempFile(
                    std::env::temp_dir()
                        .join(format!("skiff-boot-test-{}-{n}", std::process::id())),
                )
            }
            pub fn path(&self) -> &Path {
                &self.0
            }
        }

        impl Drop for TempFile {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    /// A fake bzImage: a setup header that passes the loader's checks and a
    /// few bytes of "protected-mode code".
    fn fake_bzimage(version: u16, xloadflags: u16) -> Vec<u8> {
        let mut img = vec![0u8; 2 * 512 + 4096];
        img[0x1f1] = 1; // setup_sects
        img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        img[0x202..0x206].copy_from_slice(&KERNEL_HDR_MAGIC.to_le_bytes());
        img[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        img[0x211] = 1; // loadflags: LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&(HIMEM_START as u32).to_le_bytes());
        img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
        img[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        img[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes()); // cmdline_size
        img[0x260..0x264].copy_from_slice(&(1u32 << 20).to_le_bytes()); // init_size
        img
    }

    #[test]
    fn loads_a_bzimage_with_64bit_entry() {
        let mem = create_guest_memory(64).unwrap();
        let f = temp_file(&fake_bzimage(0x020f, XLF_KERNEL_64));
        let k = load_kernel(&mem, f.path()).unwrap();
        assert_eq!(k.entry, GuestAddress(HIMEM_START + 0x200));
        assert_eq!(k.end, HIMEM_START + (1 << 20));
    }

    #[test]
    fn rejects_bzimage_without_64bit_entry() {
        let mem = create_guest_memory(64).unwrap();
        let f = temp_file(&fake_bzimage(0x020f, 0));
        assert!(matches!(
            load_kernel(&mem, f.path()),
            Err(BootError::No64BitEntry(_))
        ));
    }

    #[test]
    fn rejects_files_that_are_not_kernels() {
        let mem = create_guest_memory(64).unwrap();
        let f = temp_file(b"#!/bin/sh\necho not a kernel\n");
        let err = load_kernel(&mem, f.path()).unwrap_err();
        assert!(matches!(err, BootError::NotAKernel { .. }), "{err}");
        assert!(err.to_string().contains("is not a Linux kernel image"));
        let empty = temp_file(b"");
        assert!(matches!(
            load_kernel(&mem, empty.path()),
            Err(BootError::NotAKernel { .. })
        ));
        let missing = Path::new("/nonexistent/skiff/vmlinuz");
        let err = load_kernel(&mem, missing).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/skiff/vmlinuz"));
    }

    #[test]
    fn initrd_goes_on_top_and_too_large_is_refused() {
        let mem = create_guest_memory(64).unwrap();
        let f = temp_file(&fake_bzimage(0x020f, XLF_KERNEL_64));
        let k = load_kernel(&mem, f.path()).unwrap();
        let initrd = temp_file(&[7u8; 5000]);
        let loaded = load_initrd(&mem, initrd.path(), &k, 64 << 20).unwrap();
        assert_eq!(loaded.addr.0 % PAGE_SIZE, 0);
        assert!(loaded.addr.0 + 5000 <= 64 << 20);
        assert!(loaded.addr.0 >= k.end);
        let byte: u8 = mem.read_obj(loaded.addr).unwrap();
        assert_eq!(byte, 7);

        let big = temp_file(&vec![0u8; 64 << 20]);
        let err = load_initrd(&mem, big.path(), &k, 64 << 20).unwrap_err();
        assert!(matches!(err, BootError::InitrdTooLarge { .. }), "{err}");
    }

    #[test]
    fn zero_page_and_cmdline() {
        let mem = create_guest_memory(64).unwrap();
        let f = temp_file(&fake_bzimage(0x020f, XLF_KERNEL_64));
        let k = load_kernel(&mem, f.path()).unwrap();
        let n = write_cmdline(&mem, "console=ttyS0", &k).unwrap();
        assert_eq!(n, 14);
        write_zero_page(&mem, &k, n, None, 64 << 20).unwrap();
        // cmd_line_ptr at 0x228 of the zero page; e820_entries at 0x1e8.
        assert_eq!(
            read_u32(&mem, ZERO_PAGE_START + 0x228),
            CMDLINE_START as u32
        );
        let entries: u8 = mem.read_obj(GuestAddress(ZERO_PAGE_START + 0x1e8)).unwrap();
        assert_eq!(entries, 3);
        let long = "x".repeat(5000);
        assert!(matches!(
            write_cmdline(&mem, &long, &k),
            Err(BootError::Cmdline(_))
        ));
    }

    #[test]
    fn e820_skips_the_gap() {
        let map = e820_map(6 << 30);
        assert_eq!(map.len(), 4);
        assert_eq!(map[3], (MMIO_GAP_END, (6 << 30) - MMIO_GAP_START, E820_RAM));
        let ram: u64 = map.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        assert_eq!(ram, (6 << 30) - (HIMEM_START - EBDA_START));
    }
}

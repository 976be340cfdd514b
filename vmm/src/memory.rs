//! Guest-physical memory layout (x86_64) and the guest memory object.
//!
//! ```text
//! 0x0000_0000  RAM (real-mode area; boot GDT/IDT, zero page, page tables, cmdline)
//! 0x0009_fc00  reserved: EBDA and the ACPI tables (RSDP at 0xe_0000)
//! 0x0010_0000  RAM: kernel at 1 MiB ... initrd at the top of low RAM
//! 0xc000_0000  MMIO gap (1 GiB): virtio-mmio windows, IOAPIC, LAPIC, TSS (`layout.rs`)
//! 0x1_0000_0000 RAM continues above 4 GiB when the guest has more than 3 GiB
//! ```

use std::fs::File;
use std::ops::Deref;
use std::os::fd::AsRawFd;

use vm_memory::mmap::{FromRangesError, MmapRegionBuilder};
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

/// Boot GDT.
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT (one null entry).
pub const BOOT_IDT_START: u64 = 0x520;
/// Linux zero page (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Boot identity page tables: PML4, PDPT, PD.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table of the boot identity map.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory of the boot identity map.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Most bytes of command line we ever place (the kernel may accept fewer).
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// Start of the reserved area below 1 MiB (EBDA).
pub const EBDA_START: u64 = 0x9fc00;
/// The VM generation id (16 bytes) at the start of the reserved EBDA area:
/// the guest never allocates it and the DSDT's `VGEN.ADDR` points at it.
pub const VMGENID_START: u64 = EBDA_START;
/// ACPI RSDP; the other ACPI tables follow it.
pub const RSDP_START: u64 = 0xe0000;
/// End of the area where the ACPI tables may go.
pub const ACPI_END: u64 = 0x10_0000;
/// Where the kernel is loaded (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap (4 GiB).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;

/// Smallest guest we boot: below this a stock kernel cannot unpack itself
/// and an initrd.
pub const MIN_MEMORY_MIB: u64 = 64;
/// Largest guest memory accepted (1 TiB).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

/// Errors building guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Size out of range.
    #[error(
        "guest memory of {0} MiB is out of range ({MIN_MEMORY_MIB} MiB to {MAX_MEMORY_MIB} MiB)"
    )]
    Size(u64),
    /// The host refused the allocation.
    #[error("cannot allocate {size_mib} MiB of guest memory: {source}")]
    Allocate {
        /// Requested size.
        size_mib: u64,
        /// Why.
        source: std::io::Error,
    },
    /// The mappings could not be made into guest memory.
    #[error("cannot set up guest memory: {0}")]
    Regions(#[from] FromRangesError),
    /// The snapshot's memory file could not be read into guest memory.
    #[error("cannot read the snapshot memory file into guest memory: {0}")]
    Load(String),
}

/// How a restore backs guest memory with the snapshot's memory file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RestoreMemory {
    /// `MAP_PRIVATE` of the file: nothing is copied at restore, every VM
    /// restored from one snapshot shares its clean pages (page cache), and
    /// each page is faulted in, 4 KiB at a time, when the guest touches it
    /// (a written one is copied then).
    #[default]
    Map,
    /// The file's data read into the VM's own anonymous memory at restore
    /// (holes skipped), which then runs on 2 MiB pages like a booted VM's:
    /// a copy up front, no sharing, no fault per 4 KiB page later.
    Copy,
}

impl std::str::FromStr for RestoreMemory {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "map" => Ok(RestoreMemory::Map),
            "copy" => Ok(RestoreMemory::Copy),
            _ => Err(format!("'{s}': expected map or copy")),
        }
    }
}

impl std::fmt::Display for RestoreMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RestoreMemory::Map => "map",
            RestoreMemory::Copy => "copy",
        })
    }
}

/// Where guest RAM mappings start in the host's address space: a multiple
/// of the x86 large page size, so that KVM can map guest-physical 2 MiB
/// pages to host 2 MiB pages. KVM maps a memory slot with large pages only
/// where guest-physical and host-virtual addresses agree modulo 2 MiB;
/// without this every 4 KiB page the guest touches costs a nested-paging
/// fault. QEMU aligns its RAM the same way. (Linux 6.7 and later align
/// large anonymous mappings by themselves; older hosts do not.)
pub const HOST_RAM_ALIGN: usize = 2 << 20;

/// One anonymous mapping of guest RAM starting at a [`HOST_RAM_ALIGN`]
/// boundary, unmapped on drop.
struct AlignedMapping {
    addr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; it is only
// unmapped on drop, and the raw pointer is never dereferenced through it.
unsafe impl Send for AlignedMapping {}
// SAFETY: as above; shared references give no access to the memory.
unsafe impl Sync for AlignedMapping {}

impl AlignedMapping {
    const PROT: i32 = libc::PROT_READ | libc::PROT_WRITE;
    const FLAGS: i32 = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;

    fn new(len: usize) -> std::io::Result<Self> {
        let padded = len
            .checked_add(HOST_RAM_ALIGN)
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOMEM))?;
        // SAFETY: a fresh anonymous mapping at an address of the kernel's
        // choosing; nothing else refers to it.
        let base =
            unsafe { libc::mmap(std::ptr::null_mut(), padded, Self::PROT, Self::FLAGS, -1, 0) };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let start = base as usize;
        let aligned = start.next_multiple_of(HOST_RAM_ALIGN);
        let head = aligned - start;
        let tail = padded - head - len;
        // SAFETY: both ranges lie inside the mapping just made and outside
        // [aligned, aligned + len), which is kept; unmapping page-aligned
        // parts of one's own mapping cannot fail in a way that matters here
        // (the worst case is a few unused pages left mapped).
        unsafe {
            if head > 0 {
                libc::munmap(base, head);
            }
            if tail > 0 {
                libc::munmap((aligned + len) as *mut libc::c_void, tail);
            }
        }
        Ok(AlignedMapping {
            addr: aligned as *mut u8,
            len,
        })
    }
}

impl AlignedMapping {
    /// Replaces the mapping's anonymous pages with a private mapping of
    /// `file` from `offset`, at the same address.
    fn map_file(&self, file: &File, offset: u64) -> std::io::Result<()> {
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        // SAFETY: MAP_FIXED over [addr, addr + len), which this value
        // mapped and owns and nothing else uses yet (the guest memory
        // object is built after this); the file stays open for the call
        // and the mapping keeps its own reference to it.
        let addr = unsafe {
            libc::mmap(
                self.addr.cast(),
                self.len,
                Self::PROT,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                offset,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for AlignedMapping {
    fn drop(&mut self) {
        // SAFETY: exactly the range this value mapped; the guest memory
        // object that pointed into it is dropped first (see GuestRam).
        unsafe {
            libc::munmap(self.addr.cast(), self.len);
        }
    }
}

/// Guest RAM: the guest memory object, over mappings this value owns.
/// Dereferences to the [`GuestMemoryMmap`] everything else uses. Clones of
/// that object do not keep the mappings alive: dropping this value unmaps
/// them, so a running VM never drops it (see `Vm`).
pub struct GuestRam {
    // Declared (so dropped) before the mappings it points into.
    mem: GuestMemoryMmap,
    _mappings: Vec<AlignedMapping>,
}

impl Deref for GuestRam {
    type Target = GuestMemoryMmap;

    fn deref(&self) -> &GuestMemoryMmap {
        &self.mem
    }
}

/// The RAM ranges (start, length) for a guest of `size` bytes: one below the
/// MMIO gap and, for guests larger than the gap start, one above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START as usize),
            (GuestAddress(MMIO_GAP_END), (size - MMIO_GAP_START) as usize),
        ]
    }
}

/// End (exclusive) of the RAM below the MMIO gap.
pub fn low_ram_end(size: u64) -> u64 {
    size.min(MMIO_GAP_START)
}

/// Allocates guest memory of `size_mib` MiB (anonymous, lazily backed).
///
/// Each range is mapped at a [`HOST_RAM_ALIGN`] boundary and offered to
/// transparent huge pages (where the host's THP mode is `madvise` or
/// `always`): KVM then maps the guest in 2 MiB pages, which saves a
/// nested-paging fault per 4 KiB page the guest touches.
pub fn create_guest_memory(size_mib: u64) -> Result<GuestRam, MemoryError> {
    build_guest_memory(size_mib, None)
}

/// Guest memory of `size_mib` MiB whose contents come from `file` (a
/// snapshot's memory file: the regions one after another). With
/// [`RestoreMemory::Map`] it is mapped `MAP_PRIVATE`: nothing is copied,
/// pages are read from the file (and its page cache, shared by every VM
/// mapping it) when first touched, and the guest's writes go to private
/// copies. With [`RestoreMemory::Copy`] the file's data extents are read
/// into fresh anonymous memory. The file is never written. The caller
/// checks that the file is as long as the memory.
pub fn create_guest_memory_from_file(
    size_mib: u64,
    file: &File,
    how: RestoreMemory,
) -> Result<GuestRam, MemoryError> {
    match how {
        RestoreMemory::Map => build_guest_memory(size_mib, Some(file)),
        RestoreMemory::Copy => {
            let mem = build_guest_memory(size_mib, None)?;
            load_memory_file(&mem, file)?;
            Ok(mem)
        }
    }
}

/// Reads the data extents of `file` (holes are zero pages, which fresh
/// anonymous memory already is) into `mem`, region after region.
fn load_memory_file(mem: &GuestMemoryMmap, file: &File) -> Result<(), MemoryError> {
    use std::io::{Seek, SeekFrom};
    use vm_memory::{Address, Bytes};
    let load = |e: std::io::Error| MemoryError::Load(e.to_string());
    let mut f = file.try_clone().map_err(load)?;
    let mut offset = 0u64;
    for region in mem.iter() {
        let (start, len) = (region.start_addr(), region.len());
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let Some(data) = seek_data(file, pos, libc::SEEK_DATA).map_err(load)? else {
                break;
            };
            if data >= end {
                break;
            }
            let hole = seek_data(file, data, libc::SEEK_HOLE)
                .map_err(load)?
                .unwrap_or(end)
                .min(end);
            f.seek(SeekFrom::Start(data)).map_err(load)?;
            mem.read_exact_volatile_from(
                start.unchecked_add(data - offset),
                &mut f,
                (hole - data) as usize,
            )
            .map_err(|e| MemoryError::Load(e.to_string()))?;
            pos = hole;
        }
        offset = end;
    }
    Ok(())
}

/// `lseek(fd, pos, whence)` for SEEK_DATA/SEEK_HOLE; None when there is
/// no more data (ENXIO).
fn seek_data(file: &File, pos: u64, whence: i32) -> std::io::Result<Option<u64>> {
    let pos = libc::off_t::try_from(pos)
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    // SAFETY: lseek on a file descriptor `file` keeps open; it only moves
    // the descriptor's offset, which the caller sets again before reading.
    let r = unsafe { libc::lseek(file.as_raw_fd(), pos, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(r as u64))
}

fn build_guest_memory(size_mib: u64, file: Option<&File>) -> Result<GuestRam, MemoryError> {
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&size_mib) {
        return Err(MemoryError::Size(size_mib));
    }
    let mut mappings = Vec::new();
    let mut regions = Vec::new();
    let mut file_offset = 0u64;
    for (start, len) in ram_ranges(size_mib << 20) {
        let map = AlignedMapping::new(len)
            .map_err(|source| MemoryError::Allocate { size_mib, source })?;
        if let Some(file) = file {
            map.map_file(file, file_offset)
                .map_err(|source| MemoryError::Allocate { size_mib, source })?;
            file_offset += len as u64;
        }
        // SAFETY: [map.addr, map.addr + len) is a live mapping that `map`
        // owns; it is kept in the GuestRam beside the region, which is
        // dropped first.
        let region = unsafe {
            MmapRegionBuilder::new(len)
                .with_mmap_prot(AlignedMapping::PROT)
                .with_mmap_flags(AlignedMapping::FLAGS)
                .with_raw_mmap_pointer(map.addr)
        }
        .build()
        .map_err(FromRangesError::from)?;
        mappings.push(map);
        regions
            .push(GuestRegionMmap::new(region, start).ok_or(FromRangesError::InvalidGuestRegion)?);
    }
    let mem = GuestMemoryMmap::from_regions(regions).map_err(FromRangesError::from)?;
    for region in mem.iter() {
        // SAFETY: the range is exactly one mapping that `mem` owns and keeps
        // alive; MADV_HUGEPAGE only changes how the kernel backs it, never
        // its contents or its validity.
        let rc = unsafe {
            libc::madvise(
                region.as_ptr().cast(),
                region.len() as usize,
                libc::MADV_HUGEPAGE,
            )
        };
        if rc != 0 {
            // A kernel without THP: the guest still runs, on 4 KiB pages.
            log::debug!(
                "madvise(MADV_HUGEPAGE) on guest RAM: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(GuestRam {
        mem,
        _mappings: mappings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn small_guest_has_one_region() {
        let r = ram_ranges(256 << 20);
        assert_eq!(r, vec![(GuestAddress(0), 256 << 20)]);
        assert_eq!(low_ram_end(256 << 20), 256 << 20);
    }

    #[test]
    fn large_guest_is_split_around_the_gap() {
        let size = 6u64 << 30;
        let r = ram_ranges(size);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(r[1].0, GuestAddress(1 << 32));
        assert_eq!(r[0].1 + r[1].1, size as usize);
        assert_eq!(low_ram_end(size), MMIO_GAP_START);
    }

    #[test]
    fn ram_starts_on_large_page_boundaries() {
        // Three sizes, the last split around the MMIO gap.
        for mib in [64, 1000, 3 * 1024 + 512] {
            let mem = create_guest_memory(mib).unwrap();
            for region in mem.iter() {
                let host = mem.get_host_address(region.start_addr()).unwrap() as usize;
                assert_eq!(host % HOST_RAM_ALIGN, 0, "{mib} MiB: host {host:#x}");
                assert_eq!(region.start_addr().0 % HOST_RAM_ALIGN as u64, 0);
            }
            let total: u64 = mem.iter().map(|r| r.len()).sum();
            assert_eq!(total, mib << 20);
            // The memory is usable end to end.
            let last = GuestAddress(low_ram_end(mib << 20) - 8);
            mem.write_obj(0x1234_5678u64, last).unwrap();
            assert_eq!(mem.read_obj::<u64>(last).unwrap(), 0x1234_5678);
        }
    }

    #[test]
    fn sizes_are_checked() {
        assert!(matches!(create_guest_memory(1), Err(MemoryError::Size(1))));
        let mem = create_guest_memory(64).unwrap();
        let total: u64 = mem.iter().map(|r| r.len()).sum();
        assert_eq!(total, 64 << 20);
    }
}

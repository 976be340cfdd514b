//! The Virtual Machine Generation ID: 16 bytes in guest memory that change
//! whenever the guest may be a copy of an earlier instant (here: each
//! restore from a snapshot), so that the guest reseeds its random number
//! generator instead of repeating what every other copy produces.
//!
//! The platform describes it in the DSDT as device `VMGENCTR` whose
//! `ADDR` object gives the id's guest-physical address (low and high 32
//! bits), which is what Linux's vmgenid driver (5.18+) reads. A new id is
//! announced with ACPI notification 0x80 on that device, which the
//! platform sends through the GED ([`crate::legacy::GED_EVENT_VMGENID`]);
//! Linux then mixes the id into its entropy pool and reseeds ("crng
//! reseeded due to virtual machine fork").
//!
//! Invariants: the id is random (from the host's `/dev/urandom`), never
//! all zeros, and lives in memory the e820 map reserves, so the guest
//! never allocates it; it is written before any vCPU runs. Its state is
//! guest memory only, so a snapshot carries it without a record of its
//! own.

use std::io::Read;

use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

/// Size of the generation id.
pub const VMGENID_LEN: usize = 16;

/// Errors making or placing a generation id.
#[derive(Debug, thiserror::Error)]
pub enum VmGenIdError {
    /// The host's random source failed.
    #[error("cannot read a random generation id from /dev/urandom: {0}")]
    Random(#[source] std::io::Error),
    /// The id's address is not in guest memory.
    #[error("cannot write the generation id to guest memory: {0}")]
    Write(#[from] GuestMemoryError),
}

/// A generation id and where the guest finds it.
#[derive(Debug)]
pub struct VmGenId {
    addr: GuestAddress,
    id: [u8; VMGENID_LEN],
}

impl VmGenId {
    /// A fresh random id at `addr`.
    pub fn new(addr: GuestAddress) -> Result<Self, VmGenIdError> {
        Ok(VmGenId {
            addr,
            id: random_id()?,
        })
    }

    /// The id's guest-physical address.
    pub fn addr(&self) -> GuestAddress {
        self.addr
    }

    /// The current id.
    pub fn id(&self) -> [u8; VMGENID_LEN] {
        self.id
    }

    /// Writes the id where the guest reads it.
    pub fn write_to<M: Bytes<GuestAddress, E = GuestMemoryError>>(
        &self,
        mem: &M,
    ) -> Result<(), VmGenIdError> {
        mem.write_slice(&self.id, self.addr)?;
        Ok(())
    }
}

fn random_id() -> Result<[u8; VMGENID_LEN], VmGenIdError> {
    let mut urandom = std::fs::File::open("/dev/urandom").map_err(VmGenIdError::Random)?;
    loop {
        let mut id = [0u8; VMGENID_LEN];
        urandom.read_exact(&mut id).map_err(VmGenIdError::Random)?;
        // All zeros reads as "no id" to some guests.
        if id != [0; VMGENID_LEN] {
            return Ok(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn each_id_is_new_and_lands_at_its_address() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let a = VmGenId::new(GuestAddress(0x9fc0)).unwrap();
        let b = VmGenId::new(GuestAddress(0x9fc0)).unwrap();
        assert_ne!(a.id(), b.id());
        assert_ne!(a.id(), [0; VMGENID_LEN]);
        assert_eq!(a.addr(), GuestAddress(0x9fc0));
        a.write_to(&mem).unwrap();
        let mut back = [0u8; VMGENID_LEN];
        mem.read_slice(&mut back, GuestAddress(0x9fc0)).unwrap();
        assert_eq!(back, a.id());
        b.write_to(&mem).unwrap();
        mem.read_slice(&mut back, GuestAddress(0x9fc0)).unwrap();
        assert_eq!(back, b.id());
    }

    #[test]
    fn an_address_outside_guest_memory_is_an_error() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let id = VmGenId::new(GuestAddress(0xff8)).unwrap();
        let e = id.write_to(&mem).unwrap_err();
        assert!(e.to_string().contains("generation id"), "{e}");
    }
}

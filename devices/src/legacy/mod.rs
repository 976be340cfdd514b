//! Legacy PC platform devices: the 8250 UART, the i8042 reset line, the
//! ACPI power-management port, the ACPI Generic Event Device (power
//! button, generation id changes), the pvpanic port and the VM Generation
//! ID.

mod ged;
mod i8042;
mod power;
mod serial;
mod vmgenid;

pub use ged::{Ged, GED_EVENTS, GED_EVENT_POWER_BUTTON, GED_EVENT_VMGENID, GED_PORT_LEN};
pub use i8042::I8042;
pub use power::{
    AcpiPmPort, PvPanic, ACPI_PM_PORT_LEN, ACPI_RESET_VALUE, ACPI_SLP_TYP_S5, PVPANIC_PORT_LEN,
};
pub use serial::{Serial, SerialOutput, SERIAL_PORT_LEN};
pub use vmgenid::{VmGenId, VmGenIdError, VMGENID_LEN};

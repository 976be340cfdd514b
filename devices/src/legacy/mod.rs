//! Legacy PC platform devices: the 8250 UART, the i8042 reset line, the
//! ACPI power-management port, the ACPI Generic Event Device (power
//! button) and the pvpanic port.

mod ged;
mod i8042;
mod power;
mod serial;

pub use ged::{Ged, GED_EVENT_POWER_BUTTON, GED_PORT_LEN};
pub use i8042::I8042;
pub use power::{
    AcpiPmPort, PvPanic, ACPI_PM_PORT_LEN, ACPI_RESET_VALUE, ACPI_SLP_TYP_S5, PVPANIC_PORT_LEN,
};
pub use serial::{Serial, SerialOutput, SERIAL_PORT_LEN};

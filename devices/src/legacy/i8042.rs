//! The i8042 keyboard controller, reduced to what a VMM needs: the CPU reset
//! line (command 0xFE on port 0x64), which `reboot=k` uses.

use crate::{BusDevice, GuestPowerEvent, PowerEventSink};

/// Port 0x60 is offset 0, port 0x64 offset 4.
const COMMAND_OFFSET: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

/// The i8042 at ports 0x60-0x64.
///
/// It holds no state (its status always reads 0): a snapshot has nothing
/// of it to save.
pub struct I8042 {
    events: PowerEventSink,
}

impl I8042 {
    /// An i8042 that reports a CPU reset to `events`.
    pub fn new(events: PowerEventSink) -> Self {
        I8042 { events }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty, so a guest
        // waiting to send a command never spins.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            (self.events)(GuestPowerEvent::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn reset_command_reports_reset() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut dev = I8042::new(Arc::new(move |e| s.lock().unwrap().push(e)));
        dev.write(0, &[CMD_RESET_CPU]);
        dev.write(4, &[0x20]);
        assert!(seen.lock().unwrap().is_empty());
        dev.write(4, &[CMD_RESET_CPU]);
        assert_eq!(*seen.lock().unwrap(), vec![GuestPowerEvent::Reset]);
        let mut status = [0xffu8];
        dev.read(4, &mut status);
        assert_eq!(status[0], 0);
    }
}

//! The 8250 UART (as ttyS0), built on vm-superio.

use std::io::{self, Write};

use log::warn;
use vm_superio::serial::NoEvents;

use crate::{BusDevice, EventFdTrigger};

/// Size of the UART's port range (8 registers).
pub const SERIAL_PORT_LEN: u64 = 8;

/// Where the guest's serial output goes.
pub enum SerialOutput {
    /// Discard it.
    Sink,
    /// Any writer: stdout, a file, a socket.
    Writer(Box<dyn Write + Send>),
}

impl Write for SerialOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            SerialOutput::Sink => Ok(buf.len()),
            SerialOutput::Writer(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            SerialOutput::Sink => Ok(()),
            SerialOutput::Writer(w) => w.flush(),
        }
    }
}

/// An 8250 UART whose interrupt is an eventfd.
pub struct Serial {
    inner: vm_superio::Serial<EventFdTrigger, NoEvents, SerialOutput>,
    output_failed: bool,
}

impl Serial {
    /// A UART raising `irq` and writing what the guest transmits to `out`.
    pub fn new(irq: EventFdTrigger, out: SerialOutput) -> Self {
        Serial {
            inner: vm_superio::Serial::new(irq, out),
            output_failed: false,
        }
    }

    /// The eventfd that signals the UART's interrupt.
    pub fn irq_eventfd(&self) -> &vmm_sys_util::eventfd::EventFd {
        self.inner.interrupt_evt().eventfd()
    }

    /// Queues bytes for the guest to receive; returns how many fit in the
    /// receive FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.inner.fifo_capacity();
        let n = room.min(bytes.len());
        if n == 0 {
            return 0;
        }
        match self.inner.enqueue_raw_bytes(&bytes[..n]) {
            Ok(n) => n,
            Err(e) => {
                warn!("serial: cannot queue input: {e:?}");
                0
            }
        }
    }

    /// Room left in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.inner.fifo_capacity()
    }

    /// Flushes the output.
    pub fn flush(&mut self) -> io::Result<()> {
        self.inner.writer_mut().flush()
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if data.len() == 1 && offset < SERIAL_PORT_LEN {
            data[0] = self.inner.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 || offset >= SERIAL_PORT_LEN {
            return;
        }
        if let Err(e) = self.inner.write(offset as u8, data[0]) {
            // Most likely the output is gone (a closed pipe): say so once
            // and keep the guest running.
            if !self.output_failed {
                warn!("serial: output failed, later output is dropped: {e:?}");
                self.output_failed = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::EventFd;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn serial() -> (Serial, Shared) {
        let out = Shared::default();
        let evt = EventFd::new(libc_nonblock()).unwrap();
        let s = Serial::new(
            EventFdTrigger::new(evt),
            SerialOutput::Writer(Box::new(out.clone())),
        );
        (s, out)
    }

    fn libc_nonblock() -> i32 {
        0o4000 // O_NONBLOCK
    }

    #[test]
    fn transmit_goes_to_output() {
        let (mut s, out) = serial();
        for b in b"hi\n" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn input_is_readable_and_raises_irq() {
        let (mut s, _) = serial();
        // Enable the "received data available" interrupt (IER bit 0).
        s.write(1, &[1]);
        assert_eq!(s.enqueue_input(b"x"), 1);
        assert_eq!(s.irq_eventfd().read().unwrap(), 1);
        // LSR (offset 5) bit 0: data ready.
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1);
        let mut rbr = [0u8];
        s.read(0, &mut rbr);
        assert_eq!(rbr[0], b'x');
    }

    #[test]
    fn odd_sizes_and_offsets_are_ignored() {
        let (mut s, out) = serial();
        s.write(0, b"ab");
        s.write(100, b"a");
        let mut data = [0xffu8; 4];
        s.read(0, &mut data);
        assert_eq!(data, [0; 4]);
        assert!(out.0.lock().unwrap().is_empty());
    }
}

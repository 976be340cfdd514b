//! The 8250 UART (as ttyS0), built on vm-superio.
//!
//! Its state can be saved ([`Serial::snapshot`]) and restored into a UART
//! built by the new process ([`Serial::restore`]), which keeps its own
//! interrupt eventfd and output.

use std::io::{self, Write};

use log::warn;
use vm_superio::serial::{NoEvents, SerialState};

use crate::snapshot::{SerialSnapshot, SnapshotError};
use crate::{BusDevice, EventFdTrigger};

/// Size of the UART's port range (8 registers).
pub const SERIAL_PORT_LEN: u64 = 8;

/// Most bytes of a line held back before they are written anyway.
pub const SERIAL_HOLD_MAX: usize = 4096;

/// Where the guest's serial output goes.
///
/// The UART model flushes after every byte, which would cost a write
/// system call per byte here and wake whoever reads the other end once per
/// byte (a booting Linux prints tens of KiB to ttyS0). So output is held
/// until a line ends or [`SERIAL_HOLD_MAX`] bytes are waiting; the rest of
/// a line (a prompt) goes out on [`Serial::flush`], which the VMM calls
/// soon after it is told that output is held (see
/// [`SerialOutput::notify_held`]) and when the VM ends.
pub struct SerialOutput {
    out: Option<Box<dyn Write + Send>>,
    held: Vec<u8>,
    on_held: Option<Box<dyn Fn() + Send>>,
}

impl SerialOutput {
    /// Output that is discarded.
    pub fn sink() -> Self {
        SerialOutput {
            out: None,
            held: Vec::new(),
            on_held: None,
        }
    }

    /// Output to any writer: stdout, a file, a socket.
    pub fn writer(out: Box<dyn Write + Send>) -> Self {
        SerialOutput {
            out: Some(out),
            held: Vec::new(),
            on_held: None,
        }
    }

    /// Calls `f` whenever output starts being held back (the start of an
    /// unfinished line), so that whoever calls [`Serial::flush`] knows a
    /// flush is due and needs no timer while the guest is quiet. `f` runs
    /// on the thread that handles the guest's write: it must not block.
    pub fn notify_held(mut self, f: impl Fn() + Send + 'static) -> Self {
        self.on_held = Some(Box::new(f));
        self
    }

    /// Writes out what is held back. On failure the held bytes are dropped
    /// (the UART cannot stall the guest) and the error returned.
    fn push(&mut self) -> io::Result<()> {
        let Some(out) = self.out.as_mut() else {
            return Ok(());
        };
        if self.held.is_empty() {
            return Ok(());
        }
        let res = out.write_all(&self.held).and_then(|_| out.flush());
        self.held.clear();
        res
    }
}

impl Write for SerialOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.out.is_none() {
            return Ok(buf.len());
        }
        let was_empty = self.held.is_empty();
        self.held.extend_from_slice(buf);
        if buf.contains(&b'\n') || self.held.len() >= SERIAL_HOLD_MAX {
            self.push()?;
        } else if was_empty {
            if let Some(f) = &self.on_held {
                f();
            }
        }
        Ok(buf.len())
    }

    /// Holds on: see the type's documentation.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
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

    /// Writes out any output held back (the end of an unfinished line).
    pub fn flush(&mut self) -> io::Result<()> {
        self.inner.writer_mut().push()
    }

    /// The UART's registers, the input the guest has not read, and the
    /// output held back for the end of its line.
    pub fn snapshot(&self) -> SerialSnapshot {
        let s = self.inner.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
            held_output: self.inner.writer().held.clone(),
        }
    }

    /// Takes on the state `snap` recorded, keeping this UART's interrupt
    /// (the same eventfd, through a duplicate of its fd) and output; the
    /// interrupt is raised if the state has one pending and enabled, and
    /// held output goes out with the next flush. Refuses a state the UART
    /// cannot have (a FIFO over 64 bytes, unknown interrupt bits, more held
    /// output than `SERIAL_HOLD_MAX`), leaving this UART unchanged.
    pub fn restore(&mut self, snap: &SerialSnapshot) -> Result<(), SnapshotError> {
        let invalid = |reason: String| SnapshotError::Invalid {
            device: "serial".into(),
            reason,
        };
        // IER: the four interrupts of a 16550A; IIR: none, THR empty,
        // received data (the model has no others).
        if snap.interrupt_enable & !0x0f != 0 || snap.interrupt_identification & !0x07 != 0 {
            return Err(invalid(format!(
                "interrupt registers IER {:#x}, IIR {:#x} have bits the UART never sets",
                snap.interrupt_enable, snap.interrupt_identification
            )));
        }
        if snap.held_output.len() > SERIAL_HOLD_MAX {
            return Err(invalid(format!(
                "{} bytes of held output; at most {SERIAL_HOLD_MAX} are held",
                snap.held_output.len()
            )));
        }
        let state = SerialState {
            baud_divisor_low: snap.baud_divisor_low,
            baud_divisor_high: snap.baud_divisor_high,
            interrupt_enable: snap.interrupt_enable,
            interrupt_identification: snap.interrupt_identification,
            line_control: snap.line_control,
            line_status: snap.line_status,
            modem_control: snap.modem_control,
            modem_status: snap.modem_status,
            scratch: snap.scratch,
            in_buffer: snap.in_buffer.clone(),
        };
        let evt = self
            .irq_eventfd()
            .try_clone()
            .map_err(|source| SnapshotError::Host {
                device: "serial".into(),
                what: "duplicate the interrupt eventfd",
                source,
            })?;
        // Built over a sink first: if vm-superio refuses the state (a FIFO
        // too long) or cannot raise the interrupt, this UART keeps its
        // output.
        let mut inner = vm_superio::Serial::from_state(
            &state,
            EventFdTrigger::new(evt),
            NoEvents,
            SerialOutput::sink(),
        )
        .map_err(|e| invalid(format!("the UART refuses the state: {e}")))?;
        std::mem::swap(inner.writer_mut(), self.inner.writer_mut());
        self.inner = inner;
        let out = self.inner.writer_mut();
        out.held.clear();
        if let Err(e) = out.write_all(&snap.held_output) {
            warn!("serial: cannot write the restored output: {e}");
        }
        Ok(())
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
            SerialOutput::writer(Box::new(out.clone())),
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
    fn output_is_written_a_line_at_a_time() {
        let (mut s, out) = serial();
        for b in b"login: " {
            s.write(0, &[*b]);
        }
        assert!(out.0.lock().unwrap().is_empty(), "held until the line ends");
        s.flush().unwrap();
        assert_eq!(&*out.0.lock().unwrap(), b"login: ");
        for b in b"root\nnext" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"login: root\n");
        s.flush().unwrap();
        assert_eq!(&*out.0.lock().unwrap(), b"login: root\nnext");
    }

    #[test]
    fn holding_output_is_announced_once_per_unfinished_line() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let out = Shared::default();
        let told = Arc::new(AtomicUsize::new(0));
        let t = told.clone();
        let evt = EventFd::new(libc_nonblock()).unwrap();
        let mut s = Serial::new(
            EventFdTrigger::new(evt),
            SerialOutput::writer(Box::new(out.clone())).notify_held(move || {
                t.fetch_add(1, Ordering::SeqCst);
            }),
        );
        for b in b"done\n" {
            s.write(0, &[*b]);
        }
        // The line's first byte starts a hold; its newline writes it out.
        assert_eq!(told.load(Ordering::SeqCst), 1, "told once for the line");
        assert_eq!(&*out.0.lock().unwrap(), b"done\n");
        for b in b"login: " {
            s.write(0, &[*b]);
        }
        assert_eq!(
            told.load(Ordering::SeqCst),
            2,
            "told once more for the prompt"
        );
        s.flush().unwrap();
        assert_eq!(&*out.0.lock().unwrap(), b"done\nlogin: ");
        // A complete line written at once is never held.
        s.inner.writer_mut().write_all(b"whole\n").unwrap();
        assert_eq!(told.load(Ordering::SeqCst), 2);
        // Output that goes nowhere is never held either.
        let evt = EventFd::new(libc_nonblock()).unwrap();
        let mut quiet = Serial::new(
            EventFdTrigger::new(evt),
            SerialOutput::sink().notify_held(|| panic!("nothing is held for a sink")),
        );
        quiet.write(0, b"x");
    }

    #[test]
    fn a_long_line_is_written_in_pieces() {
        let (mut s, out) = serial();
        for _ in 0..SERIAL_HOLD_MAX + 10 {
            s.write(0, b"x");
        }
        assert_eq!(out.0.lock().unwrap().len(), SERIAL_HOLD_MAX);
    }

    #[test]
    fn a_failing_output_does_not_grow_or_stop_the_uart() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from(io::ErrorKind::BrokenPipe))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let evt = EventFd::new(libc_nonblock()).unwrap();
        let mut s = Serial::new(
            EventFdTrigger::new(evt),
            SerialOutput::writer(Box::new(Broken)),
        );
        for _ in 0..3 {
            for b in b"line\n" {
                s.write(0, &[*b]);
            }
        }
        assert!(s.output_failed);
        assert!(s.inner.writer_mut().held.is_empty());
        // The line status still says the transmitter is empty.
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60);
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

    #[test]
    fn restore_takes_registers_input_and_held_output() {
        let (mut s, out) = serial();
        s.write(3, &[0x80]); // DLAB
        s.write(0, &[0x01]);
        s.write(1, &[0x00]);
        s.write(3, &[0x03]);
        s.write(7, &[0x5a]);
        s.write(4, &[0x0b]);
        s.write(1, &[0x01]); // received-data interrupt on
        assert_eq!(s.enqueue_input(b"abc"), 3);
        for b in b"login: " {
            s.write(0, &[*b]);
        }
        let snap = s.snapshot();
        assert_eq!(snap.in_buffer, b"abc");
        assert_eq!(snap.held_output, b"login: ");
        let json = serde_json::to_string(&snap).unwrap();
        let back: SerialSnapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back, snap);

        // A new UART whose interrupt eventfd the test also holds.
        let evt = EventFd::new(libc_nonblock()).unwrap();
        let irq = evt.try_clone().unwrap();
        let out2 = Shared::default();
        let mut r = Serial::new(
            EventFdTrigger::new(evt),
            SerialOutput::writer(Box::new(out2.clone())),
        );
        r.restore(&back).unwrap();
        assert_eq!(r.snapshot(), snap);
        // The pending received-data interrupt is raised again, on the
        // same eventfd.
        assert_eq!(irq.read().unwrap(), 1);
        let reg = |r: &mut Serial, off| {
            let mut b = [0u8];
            r.read(off, &mut b);
            b[0]
        };
        assert_eq!(reg(&mut r, 3), 0x03);
        assert_eq!(reg(&mut r, 7), 0x5a);
        assert_eq!(reg(&mut r, 4), 0x0b);
        assert_eq!(reg(&mut r, 1), 0x01);
        assert_eq!([reg(&mut r, 0), reg(&mut r, 0), reg(&mut r, 0)], *b"abc");
        assert_eq!(reg(&mut r, 5) & 1, 0, "no more data");
        // The held prompt goes to the new output, not the old one.
        assert!(out2.0.lock().unwrap().is_empty());
        r.flush().unwrap();
        assert_eq!(&*out2.0.lock().unwrap(), b"login: ");
        assert!(out.0.lock().unwrap().is_empty());
        r.write(0, b"\n");
        assert_eq!(&*out2.0.lock().unwrap(), b"login: \n");
    }

    #[test]
    fn restore_refuses_a_state_the_uart_cannot_have() {
        let (s, _) = serial();
        let good = s.snapshot();
        let cases = [
            (
                SerialSnapshot {
                    in_buffer: vec![0; 65],
                    ..good.clone()
                },
                "refuses the state",
            ),
            (
                SerialSnapshot {
                    interrupt_enable: 0x10,
                    ..good.clone()
                },
                "IER 0x10",
            ),
            (
                SerialSnapshot {
                    interrupt_identification: 0x08,
                    ..good.clone()
                },
                "IIR 0x8",
            ),
            (
                SerialSnapshot {
                    held_output: vec![b'x'; SERIAL_HOLD_MAX + 1],
                    ..good.clone()
                },
                "held output",
            ),
        ];
        for (bad, why) in cases {
            let (mut r, out) = serial();
            r.write(7, &[0x42]);
            let e = r.restore(&bad).unwrap_err();
            assert!(e.to_string().starts_with("serial: "), "{e}");
            assert!(e.to_string().contains(why), "{e}");
            // Unchanged, output included.
            let mut b = [0u8];
            r.read(7, &mut b);
            assert_eq!(b[0], 0x42);
            r.write(0, b"\n");
            assert_eq!(&*out.0.lock().unwrap(), b"\n");
        }
    }
}

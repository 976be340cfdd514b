//! What QMP and HMP share about the QEMU they imitate: the release whose
//! behaviour they follow and the texts both monitors answer with. Both
//! protocol modules import from here, so neither imports the other for it
//! (QMP still runs HMP commands for `human-monitor-command`).

/// The QEMU release whose monitor behaviour Skiff follows (reported in the
/// QMP greeting, by query-version and in the HMP banner).
pub const QEMU_VERSION: (u32, u32, u32) = (7, 2, 0);

/// `package` in the QMP greeting, query-version and `info version`.
pub fn package() -> String {
    format!("skiff-vmm {}", env!("CARGO_PKG_VERSION"))
}

/// QEMU's error when no display device exists.
pub const NO_CONSOLE: &str = "There is no console to take a screendump from";

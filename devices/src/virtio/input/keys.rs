//! QEMU's key names (QKeyCode, as `send-key` and HMP `sendkey` take them)
//! and key numbers (XT set-1 scancodes with an `E0` prefix folded into bit
//! 7, QEMU's "qnum"), mapped to Linux input key codes.
//!
//! Written by hand from QEMU's QKeyCode enum and keycodemapdb's
//! `keymaps.csv` columns "QEMU QKeyCode", "Linux Keycode" and
//! "AT set1 keycode"; every name QEMU 7.2 accepts is here, in its order.
//! Invariant: a name appears once; `sysrq` and `print` are one key, as are
//! `asterisk` and `kp_multiply` (the first listed owns the number).

/// One key: its QEMU name, its Linux code (`KEY_*`) and its QEMU number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    /// The QKeyCode name (lower case).
    pub name: &'static str,
    /// The Linux input event code.
    pub linux: u16,
    /// The XT set-1 scancode, `E0 xx` written as `0x80 | xx`.
    pub qnum: u16,
}

const fn k(name: &'static str, linux: u16, qnum: u16) -> Key {
    Key { name, linux, qnum }
}

/// Every key QEMU names, in QKeyCode order.
pub const KEYS: &[Key] = &[
    k("shift", 42, 0x2a),
    k("shift_r", 54, 0x36),
    k("alt", 56, 0x38),
    k("alt_r", 100, 0xb8),
    k("ctrl", 29, 0x1d),
    k("ctrl_r", 97, 0x9d),
    k("menu", 139, 0x9e),
    k("esc", 1, 0x01),
    k("1", 2, 0x02),
    k("2", 3, 0x03),
    k("3", 4, 0x04),
    k("4", 5, 0x05),
    k("5", 6, 0x06),
    k("6", 7, 0x07),
    k("7", 8, 0x08),
    k("8", 9, 0x09),
    k("9", 10, 0x0a),
    k("0", 11, 0x0b),
    k("minus", 12, 0x0c),
    k("equal", 13, 0x0d),
    k("backspace", 14, 0x0e),
    k("tab", 15, 0x0f),
    k("q", 16, 0x10),
    k("w", 17, 0x11),
    k("e", 18, 0x12),
    k("r", 19, 0x13),
    k("t", 20, 0x14),
    k("y", 21, 0x15),
    k("u", 22, 0x16),
    k("i", 23, 0x17),
    k("o", 24, 0x18),
    k("p", 25, 0x19),
    k("bracket_left", 26, 0x1a),
    k("bracket_right", 27, 0x1b),
    k("ret", 28, 0x1c),
    k("a", 30, 0x1e),
    k("s", 31, 0x1f),
    k("d", 32, 0x20),
    k("f", 33, 0x21),
    k("g", 34, 0x22),
    k("h", 35, 0x23),
    k("j", 36, 0x24),
    k("k", 37, 0x25),
    k("l", 38, 0x26),
    k("semicolon", 39, 0x27),
    k("apostrophe", 40, 0x28),
    k("grave_accent", 41, 0x29),
    k("backslash", 43, 0x2b),
    k("z", 44, 0x2c),
    k("x", 45, 0x2d),
    k("c", 46, 0x2e),
    k("v", 47, 0x2f),
    k("b", 48, 0x30),
    k("n", 49, 0x31),
    k("m", 50, 0x32),
    k("comma", 51, 0x33),
    k("dot", 52, 0x34),
    k("slash", 53, 0x35),
    k("asterisk", 55, 0x37),
    k("spc", 57, 0x39),
    k("caps_lock", 58, 0x3a),
    k("f1", 59, 0x3b),
    k("f2", 60, 0x3c),
    k("f3", 61, 0x3d),
    k("f4", 62, 0x3e),
    k("f5", 63, 0x3f),
    k("f6", 64, 0x40),
    k("f7", 65, 0x41),
    k("f8", 66, 0x42),
    k("f9", 67, 0x43),
    k("f10", 68, 0x44),
    k("num_lock", 69, 0x45),
    k("scroll_lock", 70, 0x46),
    k("kp_divide", 98, 0xb5),
    k("kp_multiply", 55, 0x37),
    k("kp_subtract", 74, 0x4a),
    k("kp_add", 78, 0x4e),
    k("kp_enter", 96, 0x9c),
    k("kp_decimal", 83, 0x53),
    k("sysrq", 99, 0x54),
    k("kp_0", 82, 0x52),
    k("kp_1", 79, 0x4f),
    k("kp_2", 80, 0x50),
    k("kp_3", 81, 0x51),
    k("kp_4", 75, 0x4b),
    k("kp_5", 76, 0x4c),
    k("kp_6", 77, 0x4d),
    k("kp_7", 71, 0x47),
    k("kp_8", 72, 0x48),
    k("kp_9", 73, 0x49),
    k("less", 86, 0x56),
    k("f11", 87, 0x57),
    k("f12", 88, 0x58),
    k("print", 99, 0x54),
    k("home", 102, 0xc7),
    k("pgup", 104, 0xc9),
    k("pgdn", 109, 0xd1),
    k("end", 107, 0xcf),
    k("left", 105, 0xcb),
    k("up", 103, 0xc8),
    k("down", 108, 0xd0),
    k("right", 106, 0xcd),
    k("insert", 110, 0xd2),
    k("delete", 111, 0xd3),
    k("stop", 128, 0xe8),
    k("again", 129, 0x85),
    k("props", 130, 0x86),
    k("undo", 131, 0x87),
    k("front", 132, 0x8c),
    k("copy", 133, 0xf8),
    k("open", 134, 0x64),
    k("paste", 135, 0x65),
    k("find", 136, 0xc1),
    k("cut", 137, 0xbc),
    k("lf", 101, 0x5b),
    k("help", 138, 0xf5),
    k("meta_l", 125, 0xdb),
    k("meta_r", 126, 0xdc),
    k("compose", 127, 0xdd),
    k("pause", 119, 0xc6),
    k("ro", 89, 0x73),
    k("hiragana", 91, 0x77),
    k("henkan", 92, 0x79),
    k("yen", 124, 0x7d),
    k("muhenkan", 94, 0x7b),
    k("katakanahiragana", 93, 0x70),
    k("kp_comma", 121, 0x7e),
    k("kp_equals", 117, 0x59),
    k("power", 116, 0xde),
    k("sleep", 142, 0xdf),
    k("wake", 143, 0xe3),
    k("audionext", 163, 0x99),
    k("audioprev", 165, 0x90),
    k("audiostop", 166, 0xa4),
    k("audioplay", 164, 0xa2),
    k("audiomute", 113, 0xa0),
    k("volumeup", 115, 0xb0),
    k("volumedown", 114, 0xae),
    k("mediaselect", 226, 0xed),
    k("mail", 155, 0xec),
    k("calculator", 140, 0xa1),
    k("computer", 157, 0xeb),
    k("ac_home", 172, 0xb2),
    k("ac_back", 158, 0xea),
    k("ac_forward", 159, 0xe9),
    k("ac_refresh", 173, 0xe7),
    k("ac_bookmarks", 156, 0xe6),
    k("lang1", 122, 0x72),
    k("lang2", 123, 0x71),
    k("f13", 183, 0x5d),
    k("f14", 184, 0x5e),
    k("f15", 185, 0x5f),
    k("f16", 186, 0x55),
    k("f17", 187, 0x83),
    k("f18", 188, 0xf7),
    k("f19", 189, 0x84),
    k("f20", 190, 0x5a),
    k("f21", 191, 0x74),
    k("f22", 192, 0xf9),
    k("f23", 193, 0x6d),
    k("f24", 194, 0x6f),
];

/// The key QEMU calls `name` (case-sensitive, as in QEMU).
pub fn by_name(name: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.name == name)
}

/// The key with QEMU number `qnum`; `0xb7` is also the print key, as
/// QEMU accepts it.
pub fn by_number(qnum: u16) -> Option<&'static Key> {
    let qnum = if qnum == 0xb7 { 0x54 } else { qnum };
    KEYS.iter().find(|k| k.qnum == qnum)
}

/// The largest Linux key code of [`KEYS`].
pub const MAX_LINUX_KEY: u16 = 226;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_qemus() {
        // QEMU 7.2's QKeyCode enum: 161 named keys beside `unmapped`.
        assert_eq!(KEYS.len(), 161);
        for (i, a) in KEYS.iter().enumerate() {
            assert!(
                !KEYS[i + 1..].iter().any(|b| b.name == a.name),
                "{} twice",
                a.name
            );
            assert!(a.linux > 0 && a.linux <= MAX_LINUX_KEY, "{}", a.name);
        }
        assert_eq!(KEYS.iter().map(|k| k.linux).max(), Some(MAX_LINUX_KEY));
    }

    #[test]
    fn names_and_numbers() {
        assert_eq!(by_name("ret").unwrap().linux, 28);
        assert_eq!(by_name("ctrl_r").unwrap().linux, 97);
        assert_eq!(by_name("Ret"), None);
        assert_eq!(by_name("unmapped"), None);
        // The numbers the NixOS driver's send_chars uses are Linux codes.
        for qnum in (0x01..=0x53).chain(0x56..=0x58) {
            assert_eq!(by_number(qnum).unwrap().linux, qnum, "{qnum:#x}");
        }
        // E0-prefixed scancodes.
        assert_eq!(by_number(0xc8).unwrap().name, "up");
        assert_eq!(by_number(0xb7).unwrap().linux, 99);
        assert_eq!(by_number(0x00), None);
        // Aliases: the first listed owns the number.
        assert_eq!(by_number(0x37).unwrap().name, "asterisk");
        assert_eq!(by_number(0x54).unwrap().name, "sysrq");
    }
}

//! JSON output as QEMU writes it: `", "` and `": "` separators, one object
//! per line, ASCII only (anything else as `\uXXXX`, upper-case hex, astral
//! characters as surrogate pairs), so a client cannot tell Skiff's bytes
//! from QEMU's.

use std::io;

use serde::Serialize;
use serde_json::ser::{CharEscape, Formatter, Serializer};

/// serde_json formatter with QEMU's spacing and escaping.
#[derive(Debug, Default, Clone, Copy)]
pub struct QemuFormatter;

fn write_u_escape<W: ?Sized + io::Write>(w: &mut W, unit: u16) -> io::Result<()> {
    write!(w, "\\u{unit:04X}")
}

impl Formatter for QemuFormatter {
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        writer.write_all(b": ")
    }

    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        let mut plain_from = 0;
        for (i, c) in fragment.char_indices() {
            if c.is_ascii() && c != '\x7f' {
                continue;
            }
            writer.write_all(&fragment.as_bytes()[plain_from..i])?;
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                write_u_escape(writer, *unit)?;
            }
            plain_from = i + c.len_utf8();
        }
        writer.write_all(&fragment.as_bytes()[plain_from..])
    }

    fn write_char_escape<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        char_escape: CharEscape,
    ) -> io::Result<()> {
        let s: &[u8] = match char_escape {
            CharEscape::Quote => b"\\\"",
            CharEscape::ReverseSolidus => b"\\\\",
            CharEscape::Solidus => b"\\/",
            CharEscape::Backspace => b"\\b",
            CharEscape::FormFeed => b"\\f",
            CharEscape::LineFeed => b"\\n",
            CharEscape::CarriageReturn => b"\\r",
            CharEscape::Tab => b"\\t",
            CharEscape::AsciiControl(b) => return write_u_escape(writer, u16::from(b)),
        };
        writer.write_all(s)
    }
}

/// `value` as one line of QEMU-style JSON, without the line end.
pub fn to_line<T: Serialize + ?Sized>(value: &T) -> String {
    let mut out = Vec::with_capacity(64);
    let mut ser = Serializer::with_formatter(&mut out, QemuFormatter);
    // Serializing into a Vec fails only for maps with non-string keys,
    // which no QMP message has; fall back to an empty object.
    if value.serialize(&mut ser).is_err() {
        return "{}".to_owned();
    }
    // The formatter writes ASCII only.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn spacing_matches_qemu() {
        assert_eq!(to_line(&json!({})), "{}");
        assert_eq!(to_line(&json!([])), "[]");
        assert_eq!(
            to_line(&json!({"a": [1, 2], "b": {"c": null}})),
            r#"{"a": [1, 2], "b": {"c": null}}"#
        );
    }

    #[test]
    fn output_is_ascii_with_qemu_escapes() {
        assert_eq!(to_line(&json!("é")), r#""\u00E9""#);
        assert_eq!(to_line(&json!("\u{1F600}")), r#""\uD83D\uDE00""#);
        assert_eq!(to_line(&json!("a\u{1}b\u{7f}")), r#""a\u0001b\u007F""#);
        assert_eq!(to_line(&json!("\"\\\n\r\t")), r#""\"\\\n\r\t""#);
        assert_eq!(to_line(&json!("\u{fffd}")), r#""\uFFFD""#);
    }
}

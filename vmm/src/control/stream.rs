//! Splits a QMP client's byte stream into JSON messages the way QEMU's
//! JSON streamer does (`qobject/json-lexer.c`, `json-streamer.c`): no line
//! framing, a message ends when its braces and brackets balance, and a
//! lexical error (a byte no token can start with, a raw control character
//! in a string) is reported at once and followed by recovery, which skips
//! input up to the next structural character or control byte. A client can
//! therefore reset a confused parser by sending a control character such
//! as 0x04 (answered with a `stray` error) and start clean.
//!
//! Each complete message is then parsed with serde_json. QEMU's extension
//! of single-quoted strings (and the `\'` escape) is accepted by rewriting
//! such strings into standard JSON first.
//!
//! Limits: nesting deeper than 1024 (QEMU's limit) or a message above
//! [`MAX_MESSAGE`] bytes is answered with QEMU's limit error; the rest of
//! that message is skipped.

use std::collections::VecDeque;

use serde_json::Value;

/// Longest message accepted, in bytes. QEMU allows 64 MiB; no command
/// Skiff implements needs more than a few KiB, and a smaller bound keeps a
/// misbehaving client's memory use small.
pub const MAX_MESSAGE: usize = 1 << 20;
/// Deepest nesting of objects and arrays (QEMU's `MAX_NESTING`).
pub const MAX_NESTING: i64 = 1024;

/// One complete input message.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A well-formed JSON value.
    Value(Value),
    /// Malformed input: the `desc` of the GenericError to answer with.
    Error(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    /// Between tokens.
    Start,
    /// In a string opened by `quote`; `escape` after a backslash.
    Str { quote: u8, escape: bool },
    /// In a number.
    Number,
    /// In a keyword (`true`, `false`, `null` or an invalid one).
    Keyword,
    /// After a lexical error: skipping to a resynchronisation point.
    Recovery,
}

/// Incremental splitter; feed bytes, take messages.
#[derive(Debug)]
pub struct JsonStream {
    lex: Lex,
    /// The current message, with single-quoted strings rewritten.
    msg: Vec<u8>,
    /// Raw bytes of the current token (for error messages).
    token: Vec<u8>,
    braces: i64,
    brackets: i64,
    /// After a limit error: the rest of the message is dropped.
    discard: bool,
    out: VecDeque<Input>,
}

impl Default for JsonStream {
    fn default() -> Self {
        Self::new()
    }
}

fn is_resync(b: u8) -> bool {
    (b < 0x20 && b != b'\t') || b >= 0xfe || matches!(b, b'[' | b']' | b'{' | b'}' | b':' | b',')
}

impl JsonStream {
    /// An empty stream.
    pub fn new() -> Self {
        JsonStream {
            lex: Lex::Start,
            msg: Vec::new(),
            token: Vec::new(),
            braces: 0,
            brackets: 0,
            discard: false,
            out: VecDeque::new(),
        }
    }

    /// The next complete message, if any.
    pub fn next_input(&mut self) -> Option<Input> {
        self.out.pop_front()
    }

    /// Whether complete messages are waiting.
    pub fn has_input(&self) -> bool {
        !self.out.is_empty()
    }

    /// Consumes `data`.
    pub fn feed(&mut self, data: &[u8]) {
        for &b in data {
            self.byte(b);
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        if self.discard {
            return;
        }
        if self.msg.len() + bytes.len() > MAX_MESSAGE {
            self.limit_error("JSON token size limit exceeded");
            return;
        }
        self.msg.extend_from_slice(bytes);
    }

    fn limit_error(&mut self, what: &str) {
        self.out.push_back(Input::Error(what.to_owned()));
        self.msg.clear();
        self.discard = true;
    }

    fn reset_message(&mut self) {
        self.msg.clear();
        self.braces = 0;
        self.brackets = 0;
        self.discard = false;
    }

    fn lexical_error(&mut self) {
        let text = String::from_utf8_lossy(&self.token).into_owned();
        self.out
            .push_back(Input::Error(format!("JSON parse error, stray '{text}'")));
        self.token.clear();
        self.reset_message();
        self.lex = Lex::Recovery;
    }

    /// A token ended: emit the message if it is complete.
    fn token_end(&mut self) {
        self.token.clear();
        if self.braces < 0 || self.brackets < 0 || (self.braces == 0 && self.brackets == 0) {
            if !self.discard {
                let msg = std::mem::take(&mut self.msg);
                self.out.push_back(parse_message(&msg));
            }
            self.reset_message();
        } else if !self.discard && self.braces + self.brackets > MAX_NESTING {
            self.limit_error("JSON nesting depth limit exceeded");
        }
    }

    fn byte(&mut self, b: u8) {
        match self.lex {
            Lex::Recovery => {
                if is_resync(b) {
                    self.lex = Lex::Start;
                    self.start(b);
                }
            }
            Lex::Start => self.start(b),
            Lex::Str { quote, escape } => self.string(b, quote, escape),
            Lex::Number | Lex::Keyword => {
                let more = match self.lex {
                    Lex::Number => matches!(b, b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-'),
                    _ => b.is_ascii_lowercase(),
                };
                if more {
                    self.token.push(b);
                    self.push(&[b]);
                } else {
                    self.lex = Lex::Start;
                    self.token_end();
                    self.start(b);
                }
            }
        }
    }

    fn start(&mut self, b: u8) {
        match b {
            b' ' | b'\t' | b'\r' | b'\n' => {
                if !self.msg.is_empty() {
                    self.push(b" ");
                }
            }
            b'{' | b'}' | b'[' | b']' | b',' | b':' => {
                match b {
                    b'{' => self.braces += 1,
                    b'}' => self.braces -= 1,
                    b'[' => self.brackets += 1,
                    b']' => self.brackets -= 1,
                    _ => {}
                }
                self.push(&[b]);
                self.token_end();
            }
            b'"' | b'\'' => {
                self.token.push(b);
                self.push(b"\"");
                self.lex = Lex::Str {
                    quote: b,
                    escape: false,
                };
            }
            b'-' | b'0'..=b'9' => {
                self.token.push(b);
                self.push(&[b]);
                self.lex = Lex::Number;
            }
            b'a'..=b'z' => {
                self.token.push(b);
                self.push(&[b]);
                self.lex = Lex::Keyword;
            }
            _ => {
                self.token.push(b);
                self.lexical_error();
            }
        }
    }

    fn string(&mut self, b: u8, quote: u8, escape: bool) {
        self.token.push(b);
        if !(0x20..0xfe).contains(&b) {
            self.lexical_error();
            return;
        }
        if escape {
            if b == b'\'' {
                self.push(b"'");
            } else {
                self.push(&[b'\\', b]);
            }
            self.lex = Lex::Str {
                quote,
                escape: false,
            };
        } else if b == b'\\' {
            self.lex = Lex::Str {
                quote,
                escape: true,
            };
        } else if b == quote {
            self.push(b"\"");
            self.lex = Lex::Start;
            self.token_end();
        } else if b == b'"' {
            // Only inside a single-quoted string.
            self.push(b"\\\"");
        } else {
            self.push(&[b]);
        }
    }
}

/// Parses one framed message, mapping serde_json's errors onto the texts
/// of QEMU's JSON parser.
fn parse_message(msg: &[u8]) -> Input {
    match serde_json::from_slice::<Value>(msg) {
        Ok(v) => Input::Value(v),
        Err(e) => Input::Error(qemu_parse_error(msg, &e)),
    }
}

fn qemu_parse_error(msg: &[u8], e: &serde_json::Error) -> String {
    let text = e.to_string();
    let what = if text.starts_with("recursion limit exceeded") {
        return "JSON nesting depth limit exceeded".to_owned();
    } else if text.starts_with("key must be a string") {
        "key is not a string in object".to_owned()
    } else if text.starts_with("expected `:`") {
        "missing : in object pair".to_owned()
    } else if text.starts_with("expected `,` or `}`") {
        "expected separator in dict".to_owned()
    } else if text.starts_with("expected `,` or `]`") {
        "expected separator in list".to_owned()
    } else if text.starts_with("invalid escape") && !at_unicode_escape(msg, e) {
        "invalid escape sequence in string".to_owned()
    } else if text.starts_with("invalid escape")
        || text.contains("hex escape")
        || text.contains("surrogate")
    {
        "invalid hex escape sequence in string".to_owned()
    } else if text.starts_with("invalid unicode code point") {
        "invalid UTF-8 sequence in string".to_owned()
    } else if let Some(word) = invalid_keyword(msg, e) {
        format!("invalid keyword '{word}'")
    } else {
        "expecting value".to_owned()
    };
    format!("JSON parse error, {what}")
}

/// Whether the escape sequence serde_json stopped in is a `\u` one.
fn at_unicode_escape(msg: &[u8], e: &serde_json::Error) -> bool {
    if e.line() != 1 {
        return false;
    }
    let upto = &msg[..e.column().min(msg.len())];
    upto.iter()
        .rposition(|&b| b == b'\\')
        .is_some_and(|p| msg.get(p + 1) == Some(&b'u'))
}

/// The lower-case word at the error position, when it is not a keyword.
fn invalid_keyword(msg: &[u8], e: &serde_json::Error) -> Option<String> {
    if e.line() != 1 || e.column() == 0 {
        return None;
    }
    // serde_json reports the column of the offending byte (1-based); back
    // up to the start of the word it sits in.
    let at = (e.column() - 1).min(msg.len().saturating_sub(1));
    let mut start = at;
    while start > 0 && msg[start - 1].is_ascii_lowercase() {
        start -= 1;
    }
    let mut end = start;
    while end < msg.len() && msg[end].is_ascii_lowercase() {
        end += 1;
    }
    let word = std::str::from_utf8(&msg[start..end]).ok()?;
    (!word.is_empty() && !matches!(word, "true" | "false" | "null")).then(|| word.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn all(input: &[u8]) -> Vec<Input> {
        let mut s = JsonStream::new();
        s.feed(input);
        std::iter::from_fn(|| s.next_input()).collect()
    }

    fn err(desc: &str) -> Input {
        Input::Error(desc.to_owned())
    }

    #[test]
    fn messages_need_no_newline_and_may_share_a_read() {
        assert_eq!(
            all(br#"{"execute":"a"}{"execute":"b"}"#),
            vec![
                Input::Value(json!({"execute": "a"})),
                Input::Value(json!({"execute": "b"}))
            ]
        );
    }

    #[test]
    fn a_message_split_over_many_reads() {
        let mut s = JsonStream::new();
        let text = br#"{"execute": "query-status", "id": {"a": [1, "}"]}}"#;
        for chunk in text.chunks(1) {
            assert!(!s.has_input());
            s.feed(chunk);
        }
        assert_eq!(
            s.next_input(),
            Some(Input::Value(
                json!({"execute": "query-status", "id": {"a": [1, "}"]}})
            ))
        );
        assert_eq!(s.next_input(), None);
    }

    #[test]
    fn single_quoted_strings_are_accepted() {
        assert_eq!(
            all(br#"{'execute':'query-status', 'id': 'it\'s "x"'}"#),
            vec![Input::Value(
                json!({"execute": "query-status", "id": "it's \"x\""})
            )]
        );
        assert_eq!(
            all(br#"{"id": "a\'b"}"#),
            vec![Input::Value(json!({"id": "a'b"}))]
        );
    }

    #[test]
    fn scalars_end_where_their_token_ends() {
        assert_eq!(all(b"\"abc\""), vec![Input::Value(json!("abc"))]);
        // A number needs the next byte to know it ended.
        assert_eq!(all(b"42"), vec![]);
        assert_eq!(all(b"42 "), vec![Input::Value(json!(42))]);
        assert_eq!(
            all(b"true{}"),
            vec![Input::Value(json!(true)), Input::Value(json!({}))]
        );
    }

    #[test]
    fn syntax_errors_use_qemu_texts_and_recover() {
        assert_eq!(
            all(br#"{"execute": }{"execute":"x"}"#),
            vec![
                err("JSON parse error, expecting value"),
                Input::Value(json!({"execute": "x"}))
            ]
        );
        assert_eq!(all(b"}"), vec![err("JSON parse error, expecting value")]);
        assert_eq!(all(b"]"), vec![err("JSON parse error, expecting value")]);
        assert_eq!(all(b","), vec![err("JSON parse error, expecting value")]);
        assert_eq!(
            all(br#"{"a" 1}"#),
            vec![err("JSON parse error, missing : in object pair")]
        );
        assert_eq!(
            all(br#"{"a": 1 "b": 2}"#),
            vec![err("JSON parse error, expected separator in dict")]
        );
        assert_eq!(
            all(br#"[1 2]"#),
            vec![err("JSON parse error, expected separator in list")]
        );
        assert_eq!(
            all(br#"{1: 2}"#),
            vec![err("JSON parse error, key is not a string in object")]
        );
        assert_eq!(
            all(br#"{"a": foo}"#),
            vec![err("JSON parse error, invalid keyword 'foo'")]
        );
        assert_eq!(
            all(br#"{"a": "\q"}"#),
            vec![err("JSON parse error, invalid escape sequence in string")]
        );
        assert_eq!(
            all(br#"{"a": "\u12"}"#),
            vec![err(
                "JSON parse error, invalid hex escape sequence in string"
            )]
        );
    }

    #[test]
    fn lexical_errors_and_control_character_reset() {
        // A byte no token starts with: reported, then input up to the next
        // structural character is skipped.
        assert_eq!(
            all(b"@ junk {\"execute\":\"x\"}"),
            vec![
                err("JSON parse error, stray '@'"),
                Input::Value(json!({"execute": "x"}))
            ]
        );
        // A half-sent message is dropped by a control character.
        assert_eq!(
            all(b"{\"execute\": \"qu\x04{\"execute\":\"x\"}"),
            vec![
                err("JSON parse error, stray '\"qu\u{4}'"),
                Input::Value(json!({"execute": "x"}))
            ]
        );
        assert_eq!(
            all(b"\xff"),
            vec![err("JSON parse error, stray '\u{fffd}'")]
        );
        // In recovery, a control byte is itself reported again.
        assert_eq!(
            all(b"@\x01"),
            vec![
                err("JSON parse error, stray '@'"),
                err("JSON parse error, stray '\u{1}'")
            ]
        );
    }

    #[test]
    fn invalid_utf8_in_a_string() {
        assert_eq!(
            all(b"{\"a\": \"\xc3\x28\"}"),
            vec![err("JSON parse error, invalid UTF-8 sequence in string")]
        );
        assert_eq!(
            all("{\"a\": \"é\"}".as_bytes()),
            vec![Input::Value(json!({"a": "é"}))]
        );
    }

    #[test]
    fn limits() {
        let mut deep = vec![b'['; 1100];
        deep.extend(vec![b']'; 1100]);
        deep.extend_from_slice(b"{}");
        assert_eq!(
            all(&deep),
            vec![
                err("JSON nesting depth limit exceeded"),
                Input::Value(json!({}))
            ]
        );
        let mut big = b"{\"a\": \"".to_vec();
        big.extend(vec![b'x'; MAX_MESSAGE + 10]);
        big.extend_from_slice(b"\"}{}");
        assert_eq!(
            all(&big),
            vec![
                err("JSON token size limit exceeded"),
                Input::Value(json!({}))
            ]
        );
        // serde_json's own recursion limit (128) is reported as QEMU's.
        let mut d = vec![b'['; 200];
        d.extend(vec![b']'; 200]);
        assert_eq!(all(&d), vec![err("JSON nesting depth limit exceeded")]);
    }
}

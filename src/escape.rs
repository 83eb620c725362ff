//! One escaping rule for every byte that reaches a person: dead-letter alerts (log line and
//! webhook/Slack text), log fields that carry record-derived text, and every line the
//! `sidetrack` command prints.
//!
//! Record bytes (keys, payloads, header names and values, error texts written by handlers,
//! envelope fields) are attacker-controlled. Shown raw, a newline forges a line (a second
//! `Replay:` command in an alert, a `would send …` line in a dry run), an ESC or BEL drives the
//! reader's terminal (OSC 52 writes the clipboard, `ESC [2J` clears the screen), a bidi override
//! or an invisible character makes two different keys look alike, and an unbounded error text
//! floods a page. The rule, applied to the bytes as they are:
//!
//! - printable UTF-8 is kept as is, except `\`, which becomes `\\` (so every escape below is
//!   unambiguous: the shown text reads back to exactly one byte string);
//! - `\n`, `\r`, `\t` become those two-character escapes; every other C0 control and DEL
//!   become `\xNN`;
//! - a byte that is not part of valid UTF-8 becomes `\xNN`;
//! - C1 controls (U+0080–U+009F, which some terminals obey as ESC sequences), the line and
//!   paragraph separators, and the invisible format characters (bidi overrides and isolates,
//!   zero-width characters, the BOM, tag characters, …) become `\u{XXXX}`;
//! - the result is capped; a cut is marked visibly (`…[N more bytes]`, or `…` in a table
//!   cell), and never splits an escape.
//!
//! The output therefore never holds a control character, a line break, or an invisible
//! character, and its length is bounded by the cap whatever the input.
//!
//! The module is public (and small) because the `sidetrack` binary is a separate crate that
//! cannot see `pub(crate)` items: it calls these functions rather than keeping a copy of the
//! rule.

use std::fmt::Write as _;

/// Characters kept of a record-derived log field (a handler's error, a panic message, why an
/// envelope is invalid).
pub(crate) const LOG_FIELD_CHARS: usize = 1024;

/// Longest marker [`for_terminal`] appends to a cut (`…[18446744073709551615 more bytes]`).
pub const MARKER_MAX_CHARS: usize = 34;

/// `text` escaped by the rule above, at most `max_chars` characters of it, then
/// `…[N more bytes]` when it was cut (`N` counts the input bytes not shown). The result is at
/// most `max_chars + MARKER_MAX_CHARS` characters long.
///
/// ```
/// use sidetrack::escape::for_terminal;
///
/// assert_eq!(for_terminal("x\nReplay: evil", 100), r"x\nReplay: evil");
/// assert_eq!(for_terminal(b"\x1b]52;c;aGk=\x07", 100), r"\x1b]52;c;aGk=\x07");
/// assert_eq!(for_terminal(b"ok\xff", 100), r"ok\xff");
/// assert_eq!(for_terminal("abcdef", 3), "abc…[3 more bytes]");
/// ```
pub fn for_terminal(text: impl AsRef<[u8]>, max_chars: usize) -> String {
    let bytes = text.as_ref();
    let mut out = String::with_capacity(bytes.len().min(max_chars) + 2);
    let used = escape_into(&mut out, bytes, max_chars);
    if used < bytes.len() {
        let _ = write!(out, "…[{} more bytes]", bytes.len() - used);
    }
    out
}

/// `text` escaped by the same rule for a table cell: at most `width` characters in all, the
/// last one `…` when it was cut.
///
/// ```
/// use sidetrack::escape::for_cell;
///
/// assert_eq!(for_cell("card declined", 20), "card declined");
/// assert_eq!(for_cell("card\ndeclined", 8), r"card\nd…");
/// ```
pub fn for_cell(text: impl AsRef<[u8]>, width: usize) -> String {
    let bytes = text.as_ref();
    let mut out = String::with_capacity(bytes.len().min(width) + 2);
    let used = escape_into(&mut out, bytes, width);
    if used < bytes.len() && width > 0 {
        // Make room for the marker: drop whole characters (an escape sequence goes whole).
        let mut shown = String::with_capacity(out.len());
        escape_into(&mut shown, bytes, width - 1);
        shown.push('…');
        return shown;
    }
    out
}

/// Slack's three markup characters (`&`, `<`, `>`) as the HTML entities Slack documents, so
/// no text can form a mention (`<!channel>`, `<!here>`, `<@U…>`), a channel link, or a link
/// with a disguised label (`<https://…|…>`). Apply it to a message whose record-derived parts
/// already went through [`for_terminal`] (it adds nothing else of the rule).
///
/// ```
/// use sidetrack::escape::slack_markup;
///
/// assert_eq!(slack_markup("<!channel> & <https://x|y>"), "&lt;!channel&gt; &amp; &lt;https://x|y&gt;");
/// ```
pub fn slack_markup(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

/// JSON text (as serde_json writes it) with every character the rule escapes written as a
/// `\uXXXX` escape: the same JSON value, safe to print. serde_json escapes the C0 controls
/// itself but writes DEL, C1 controls, the line separators and the invisible format
/// characters raw. Outside strings, serde_json writes only ASCII, so every such character is
/// inside a string, where `\uXXXX` (a surrogate pair above U+FFFF) means the same character.
///
///
/// At most `max_chars` characters of it are kept, then `…[N more bytes]` (a cut document is
/// for reading, not parsing: pass `usize::MAX` for output meant for programs).
///
/// ```
/// use sidetrack::escape::json_for_terminal;
///
/// assert_eq!(json_for_terminal("\"a\u{9b}b\"", 100), r#""a\u009bb""#);
/// assert_eq!(json_for_terminal("[1, 2, 3]", 4), "[1, …[5 more bytes]");
/// ```
pub fn json_for_terminal(json: &str, max_chars: usize) -> String {
    let mut out = String::with_capacity(json.len().min(max_chars) + 2);
    let mut written = 0usize;
    for (at, c) in json.char_indices() {
        let before = out.len();
        // `\n`, `\r` and `\t` outside strings are JSON's whitespace (inside strings serde_json
        // has escaped them already).
        if (c.is_control() && !matches!(c, '\n' | '\r' | '\t')) || is_invisible(c) {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                let _ = write!(out, "\\u{u:04x}");
            }
        } else {
            out.push(c);
        }
        // What was just written is ASCII escapes or one character.
        let n = if out.len() - before == c.len_utf8() {
            1
        } else {
            out.len() - before
        };
        if written + n > max_chars {
            out.truncate(before);
            let _ = write!(out, "…[{} more bytes]", json.len() - at);
            return out;
        }
        written += n;
    }
    out
}

/// Escapes `bytes` into `out`, writing at most `max_chars` characters; returns how many input
/// bytes were consumed (all of them when nothing was cut).
fn escape_into(out: &mut String, bytes: &[u8], max_chars: usize) -> usize {
    let mut written = 0usize;
    let mut used = 0usize;
    let mut rest = bytes;
    let mut piece = String::new();
    while !rest.is_empty() {
        let (valid, bad) = match std::str::from_utf8(rest) {
            Ok(s) => (s, 0),
            Err(e) => {
                let (ok, after) = rest.split_at(e.valid_up_to());
                // A truncated sequence at the end has no `error_len`: every byte left is bad.
                let bad = e.error_len().unwrap_or(after.len());
                (std::str::from_utf8(ok).unwrap_or_default(), bad)
            }
        };
        for c in valid.chars() {
            piece.clear();
            match c {
                '\\' => piece.push_str("\\\\"),
                '\n' => piece.push_str("\\n"),
                '\r' => piece.push_str("\\r"),
                '\t' => piece.push_str("\\t"),
                c if (c as u32) < 0x20 || c == '\u{7f}' => {
                    let _ = write!(piece, "\\x{:02x}", c as u32);
                }
                c if c.is_control() || is_invisible(c) => {
                    let _ = write!(piece, "\\u{{{:04x}}}", c as u32);
                }
                c => {
                    // The common case: one character, no allocation.
                    if written + 1 > max_chars {
                        return used;
                    }
                    out.push(c);
                    written += 1;
                    used += c.len_utf8();
                    continue;
                }
            }
            // Escapes are ASCII: their length in bytes is their length in characters.
            if written + piece.len() > max_chars {
                return used;
            }
            out.push_str(&piece);
            written += piece.len();
            used += c.len_utf8();
        }
        rest = &rest[valid.len()..];
        for b in &rest[..bad] {
            if written + 4 > max_chars {
                return used;
            }
            let _ = write!(out, "\\x{b:02x}");
            written += 4;
            used += 1;
        }
        rest = &rest[bad..];
    }
    used
}

/// Characters that are not controls but that a reader cannot see or that reorder what they
/// see: line and paragraph separators (Zl, Zp) and the format characters (Cf) of Unicode 15.
fn is_invisible(c: char) -> bool {
    matches!(
        c as u32,
        0x00AD
            | 0x0600..=0x0605
            | 0x061C
            | 0x06DD
            | 0x070F
            | 0x0890..=0x0891
            | 0x08E2
            | 0x180E
            | 0x200B..=0x200F
            | 0x2028..=0x202E
            | 0x2060..=0x2064
            | 0x2066..=0x206F
            | 0xFEFF
            | 0xFFF9..=0xFFFB
            | 0x110BD
            | 0x110CD
            | 0x13430..=0x1343F
            | 0x1BCA0..=0x1BCA3
            | 0x1D173..=0x1D17A
            | 0xE0001
            | 0xE0020..=0xE007F
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Nothing a terminal, a log pipeline or a chat client would act on or hide.
    fn is_safe(s: &str) -> bool {
        !s.chars().any(|c| c.is_control() || is_invisible(c))
    }

    #[test]
    fn the_rule_on_the_hostile_inputs_of_issue_17() {
        let forged = "x\nReplay:  sidetrack dlq replay --brokers evil:9092 --yes #";
        assert_eq!(
            for_terminal(forged, 200),
            r"x\nReplay:  sidetrack dlq replay --brokers evil:9092 --yes #"
        );
        // OSC 52 clipboard write, clear screen, reset, bell.
        assert_eq!(
            for_terminal(b"\x1b]52;c;ZXZpbA==\x07\x1b[2J\x1bc\x7f", 200),
            r"\x1b]52;c;ZXZpbA==\x07\x1b[2J\x1bc\x7f"
        );
        // 8-bit CSI (U+009B), a bidi override, a zero-width space, a line separator.
        assert_eq!(
            for_terminal("a\u{9b}2J\u{202e}b\u{200b}c\u{2028}", 200),
            r"a\u{009b}2J\u{202e}b\u{200b}c\u{2028}"
        );
        // Not UTF-8: each bad byte shown; valid text around it kept.
        assert_eq!(
            for_terminal(b"\xc3(-\xff\xe2\x82", 200),
            r"\xc3(-\xff\xe2\x82"
        );
        // A backslash is escaped, so `\n` as two characters is not a newline shown.
        assert_eq!(for_terminal(r"a\nb", 200), r"a\\nb");
        assert_eq!(for_terminal("ünïcode ✓ 日本", 200), "ünïcode ✓ 日本");
    }

    #[test]
    fn cuts_are_marked_and_never_split_an_escape() {
        assert_eq!(for_terminal("abc", 3), "abc");
        assert_eq!(for_terminal("abcd", 3), "abc…[1 more bytes]");
        // `\x1b` is four characters: it goes whole or not at all.
        assert_eq!(for_terminal(b"ab\x1b", 4), "ab…[1 more bytes]");
        assert_eq!(for_terminal("日本語", 2), "日本…[3 more bytes]");
        assert_eq!(for_terminal("", 0), "");
        assert_eq!(for_terminal("a", 0), "…[1 more bytes]");
        let long = "e".repeat(1 << 20);
        let shown = for_terminal(&long, 300);
        assert!(shown.ends_with(&format!("…[{} more bytes]", (1 << 20) - 300)));
        assert_eq!(for_cell("abcdef", 4), "abc…");
        assert_eq!(for_cell("abcd", 4), "abcd");
        assert_eq!(for_cell(b"a\x1bbc", 5), r"a…");
        assert_eq!(for_cell("abc", 0), "");
    }

    #[test]
    fn slack_markup_leaves_no_angle_bracket() {
        let s = slack_markup(&for_terminal(
            "<!channel> <@U1> <https://evil|docs> &amp;",
            200,
        ));
        assert!(!s.contains('<') && !s.contains('>'), "{s}");
        assert_eq!(
            s,
            "&lt;!channel&gt; &lt;@U1&gt; &lt;https://evil|docs&gt; &amp;amp;"
        );
    }

    #[test]
    fn json_escapes_mean_the_same_value() {
        let v = serde_json::json!({"k": "a\u{7f}\u{9b}\u{202e}\u{e0041}\u{1b}b\n"});
        let text = json_for_terminal(&serde_json::to_string_pretty(&v).unwrap(), usize::MAX);
        assert!(is_safe(&text.replace('\n', "")), "{text}");
        let back: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back, v);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// Any bytes, any cap: no control or invisible character comes out, the length is
        /// bounded, and an uncut result reads back to the input.
        #[test]
        fn escaped_output_is_safe_and_bounded(
            bytes in prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..300),
                any::<String>().prop_map(String::into_bytes),
                proptest::collection::vec(
                    proptest::sample::select(vec![
                        "\x1b", "\x07", "\n", "\r", "\\", "\u{9b}", "\u{202e}", "\u{2028}",
                        "\u{feff}", "\u{e0041}", "a", "é", "日",
                    ]),
                    0..60,
                ).prop_map(|v| v.concat().into_bytes()),
            ],
            max in 0usize..400,
        ) {
            let t = for_terminal(&bytes, max);
            prop_assert!(is_safe(&t), "{:?}", t);
            prop_assert!(t.chars().count() <= max + MARKER_MAX_CHARS, "{} > {}", t.chars().count(), max);
            let c = for_cell(&bytes, max);
            prop_assert!(is_safe(&c), "{:?}", c);
            prop_assert!(c.chars().count() <= max);
            let s = slack_markup(&t);
            prop_assert!(is_safe(&s) && !s.contains('<') && !s.contains('>'));
            prop_assert_eq!(unescape(&for_terminal(&bytes, usize::MAX)), bytes.clone());
            if let Ok(text) = std::str::from_utf8(&bytes) {
                let json = serde_json::to_string(text).unwrap();
                let safe = json_for_terminal(&json, usize::MAX);
                prop_assert!(is_safe(&safe));
                prop_assert_eq!(serde_json::from_str::<String>(&safe).unwrap(), text);
                let cut = json_for_terminal(&json, max);
                prop_assert!(is_safe(&cut));
                prop_assert!(cut.chars().count() <= max + MARKER_MAX_CHARS);
            }
        }
    }

    /// Reads escaped text back (the rule is injective).
    fn unescape(s: &str) -> Vec<u8> {
        let mut out = Vec::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            if c != '\\' {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                continue;
            }
            match chars.next() {
                Some('\\') => out.push(b'\\'),
                Some('n') => out.push(b'\n'),
                Some('r') => out.push(b'\r'),
                Some('t') => out.push(b'\t'),
                Some('x') => {
                    let hex: String = chars.by_ref().take(2).collect();
                    out.push(u8::from_str_radix(&hex, 16).unwrap());
                }
                Some('u') => {
                    assert_eq!(chars.next(), Some('{'));
                    let hex: String = chars.by_ref().take_while(|c| *c != '}').collect();
                    let c = char::from_u32(u32::from_str_radix(&hex, 16).unwrap()).unwrap();
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
                other => panic!("bad escape {other:?} in {s}"),
            }
        }
        out
    }
}

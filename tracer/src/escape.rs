//! Escaping of strings that come from the target (its command line, paths, symbol names, Python
//! names) for the medium they are written to. The target controls those bytes: a process started
//! with `exec -a $'\e]0;...\a'` or a library exporting a symbol with escape sequences must not
//! reach the operator's terminal as control sequences, nor make an SVG ill-formed XML.
//!
//! Printable text, non-ASCII letters included, passes unchanged; every control character (C0,
//! DEL, C1) and the Unicode bidirectional overrides (which reorder what a terminal shows) become
//! a visible `\x1b` or `\u{202e}`, so the operator sees that they were there.

use std::borrow::Cow;

/// Whether `c` must not reach a terminal or a text file as is.
fn is_unsafe(c: char) -> bool {
    c.is_control() // C0, DEL and C1
        || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

fn escape_char(out: &mut String, c: char) {
    use std::fmt::Write;
    if (c as u32) < 0x80 {
        let _ = write!(out, "\\x{:02x}", c as u32);
    } else {
        let _ = write!(out, "\\u{{{:x}}}", c as u32);
    }
}

/// `s` with every character `needs` picks as a visible escape; borrowed when there is none.
fn escaped_where(s: &str, needs: impl Fn(char) -> bool) -> Cow<'_, str> {
    if !s.chars().any(&needs) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if needs(c) {
            escape_char(&mut out, c);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// `s` for a terminal or a text file, on one line: control characters (newlines and tabs
/// included) and bidirectional overrides become visible escapes.
pub fn for_terminal(s: &str) -> Cow<'_, str> {
    escaped_where(s, is_unsafe)
}

/// `s` as XML or HTML character data or attribute value: markup characters become entities, and
/// what XML 1.0 forbids or a terminal would act on (control characters, non-characters,
/// bidirectional overrides) becomes a visible escape.
pub fn for_xml(s: &str) -> Cow<'_, str> {
    let needs = |c: char| {
        is_unsafe(c) || matches!(c, '&' | '<' | '>' | '"' | '\'' | '\u{fffe}' | '\u{ffff}')
    };
    if !s.chars().any(needs) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if needs(c) => escape_char(&mut out, c),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// `s` with only the characters a terminal or XML would act on made visible, markup characters
/// kept: for text that a later stage escapes as markup itself (inferno's SVG writer escapes
/// `&<>"`, not control characters).
pub fn visible(s: &str) -> Cow<'_, str> {
    escaped_where(s, |c| is_unsafe(c) || matches!(c, '\u{fffe}' | '\u{ffff}'))
}

/// JSON text (as serde_json writes it) with the characters a terminal acts on that serde_json
/// leaves raw, DEL, C1 and the bidirectional overrides, written as `\uXXXX` escapes: the same
/// JSON value, safe to `cat`. serde_json already escapes C0 in strings (the C0 left, line breaks
/// and indentation, is the layout). Outside strings JSON text holds none of the others, so every
/// occurrence is inside a string.
pub fn for_json(json: String) -> String {
    let needs = |c: char| is_unsafe(c) && c >= '\u{7f}';
    if !json.chars().any(needs) {
        return json;
    }
    use std::fmt::Write;
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if needs(c) {
            // All of them are in the Basic Multilingual Plane: one escape each.
            let _ = write!(out, "\\u{:04x}", c as u32);
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_text_is_borrowed_unchanged() {
        for s in ["python3 -m vllm --port 8000", "café ∑ 日本", "a<b>&\"'"] {
            assert!(matches!(for_terminal(s), Cow::Borrowed(t) if t == s));
            assert!(matches!(visible(s), Cow::Borrowed(t) if t == s));
        }
        assert!(matches!(for_xml("café ∑"), Cow::Borrowed("café ∑")));
    }

    #[test]
    fn terminal_sequences_become_visible() {
        let title = "\u{1b}]0;pwned\u{7}server\r\n\t\u{7f}\u{9b}31m";
        assert_eq!(
            for_terminal(title),
            "\\x1b]0;pwned\\x07server\\x0d\\x0a\\x09\\x7f\\u{9b}31m"
        );
        assert_eq!(for_terminal("abc\u{202e}gpj.exe"), "abc\\u{202e}gpj.exe");
    }

    #[test]
    fn xml_gets_entities_and_no_forbidden_characters() {
        let s = "f<T>(a&b) \"q\" 'x' \u{1b}[2J\u{0}\u{fffe}";
        let x = for_xml(s);
        assert_eq!(
            x,
            "f&lt;T&gt;(a&amp;b) &quot;q&quot; &#39;x&#39; \\x1b[2J\\x00\\u{fffe}"
        );
        assert!(!x.chars().any(|c| c.is_control()));
    }

    #[test]
    fn json_gets_unicode_escapes_for_what_serde_leaves_raw() {
        let value = vec!["a\u{7f}b\u{9b}31m\u{202e}c\u{1b}\n"];
        let json = for_json(serde_json::to_string_pretty(&value).unwrap());
        assert_eq!(json, "[\n  \"a\\u007fb\\u009b31m\\u202ec\\u001b\\n\"\n]");
        let back: Vec<String> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, value);
        let plain = serde_json::to_string_pretty(&["café"]).unwrap();
        assert_eq!(for_json(plain.clone()), plain);
    }

    #[test]
    fn visible_keeps_markup_for_a_later_escaper() {
        assert_eq!(visible("a<b>\u{1b}c"), "a<b>\\x1bc");
    }
}

//! open_clip's text cleaning before CLIP's BPE (`open_clip.tokenizer._clean_lower`):
//!
//! ```text
//! basic_clean(t)      = html.unescape(html.unescape(ftfy.fix_text(t))).strip()
//! whitespace_clean(t) = " ".join(t.split())
//! clean(t)            = whitespace_clean(basic_clean(t)).lower()
//! ```
//!
//! No Rust crate reproduces ftfy or Python's `html.unescape`, so both are ported here:
//! `html.unescape` exactly (the WHATWG entity table from `htmlize`, the longest-prefix rule for
//! entities without `;`, and CPython's tables for invalid numeric references), and every
//! `ftfy.fix_text` step of ftfy 6.3 with its default settings except one: the repair of
//! mojibake (`fix_encoding`, text decoded with the wrong codec such as `Ã©` for `é`), whose
//! heuristics are not reproduced. Text without mojibake is cleaned exactly as open_clip does.

use unicode_normalization::UnicodeNormalization;

/// Cleans a caption the way open_clip does before tokenizing it with CLIP's vocabulary (see
/// the module docs): ftfy's fixes, HTML entities decoded twice, whitespace runs collapsed to
/// one space, trimmed, lower-cased.
///
/// ```
/// use clipcid_models::clip_text_clean;
/// assert_eq!(clip_text_clean("  Fish &amp;amp; Chips\n\tＣＡＦＥ  "), "fish & chips cafe");
/// assert_eq!(clip_text_clean("\u{FB01}ne \u{201C}quotes\u{201D}"), "fine \"quotes\"");
/// ```
pub fn clip_text_clean(text: &str) -> String {
    let fixed = ftfy_fix_text(text);
    let unescaped = html_unescape(&html_unescape(&fixed));
    let words: Vec<&str> = unescaped
        .split(py_isspace)
        .filter(|w| !w.is_empty())
        .collect();
    words.join(" ").to_lowercase()
}

/// Python's `str.isspace` (Rust's `char::is_whitespace` lacks U+001C..U+001F).
fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// CPython's `html._invalid_charrefs`: numeric references replaced by another character.
fn invalid_charref(n: u32) -> Option<char> {
    const CP1252: [char; 32] = [
        '\u{20ac}', '\u{81}', '\u{201a}', '\u{192}', '\u{201e}', '\u{2026}', '\u{2020}',
        '\u{2021}', '\u{2c6}', '\u{2030}', '\u{160}', '\u{2039}', '\u{152}', '\u{8d}', '\u{17d}',
        '\u{8f}', '\u{90}', '\u{2018}', '\u{2019}', '\u{201c}', '\u{201d}', '\u{2022}', '\u{2013}',
        '\u{2014}', '\u{2dc}', '\u{2122}', '\u{161}', '\u{203a}', '\u{153}', '\u{9d}', '\u{17e}',
        '\u{178}',
    ];
    match n {
        0 => Some('\u{fffd}'),
        0x0d => Some('\r'),
        0x80..=0x9f => Some(CP1252[(n - 0x80) as usize]),
        _ => None,
    }
}

/// CPython's `html._invalid_codepoints`: numeric references that decode to nothing.
fn invalid_codepoint(n: u32) -> bool {
    matches!(n, 0x1..=0x8 | 0xb | 0xe..=0x1f | 0x7f..=0x9f | 0xfdd0..=0xfdef)
        || (n & 0xfffe) == 0xfffe
}

/// The expansion of a named entity, `name` without the `&` (with its `;` if any).
fn entity(name: &str) -> Option<&'static str> {
    let key = format!("&{name}");
    htmlize::ENTITIES
        .get(key.as_bytes())
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// Python's `html.unescape`: `&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)`
/// replaced by `_replace_charref`.
pub(crate) fn html_unescape(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let after = &rest[amp + 1..];
        match charref(after) {
            Some((len, replacement)) => {
                out.push_str(&replacement);
                rest = &after[len..];
            }
            None => {
                out.push('&');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Matches one character reference at the start of `s` (just after `&`): its length in bytes
/// and replacement.
fn charref(s: &str) -> Option<(usize, String)> {
    if let Some(num) = s.strip_prefix('#') {
        let (hex, digits) = match num.strip_prefix(['x', 'X']) {
            Some(h) => (true, h),
            None => (false, num),
        };
        let n_digits = digits
            .bytes()
            .take_while(|b| {
                if hex {
                    b.is_ascii_hexdigit()
                } else {
                    b.is_ascii_digit()
                }
            })
            .count();
        if n_digits == 0 {
            return None;
        }
        let semi = usize::from(digits[n_digits..].starts_with(';'));
        let len = 1 + usize::from(hex) + n_digits + semi;
        // Too many digits for u32 is above U+10FFFF, as Python's unbounded int would be.
        let n =
            u32::from_str_radix(&digits[..n_digits], if hex { 16 } else { 10 }).unwrap_or(u32::MAX);
        let rep = if let Some(c) = invalid_charref(n) {
            c.to_string()
        } else if (0xd800..=0xdfff).contains(&n) || n > 0x10ffff {
            "\u{fffd}".to_string()
        } else if invalid_codepoint(n) {
            String::new()
        } else {
            char::from_u32(n).map(String::from).unwrap_or_default()
        };
        return Some((len, rep));
    }
    // [^\t\n\f <&#;]{1,32};?
    let mut end = 0;
    for (count, (i, c)) in s.char_indices().enumerate() {
        if count == 32 || matches!(c, '\t' | '\n' | '\x0c' | ' ' | '<' | '&' | '#' | ';') {
            break;
        }
        end = i + c.len_utf8();
    }
    if end == 0 {
        return None;
    }
    if s[end..].starts_with(';') {
        end += 1;
    }
    let name = &s[..end];
    if let Some(v) = entity(name) {
        return Some((end, v.to_string()));
    }
    // The longest prefix (of at least 2 characters) that is an entity, the rest kept.
    let bounds: Vec<usize> = name.char_indices().map(|(i, _)| i).skip(2).collect();
    for &x in bounds.iter().rev() {
        if let Some(v) = entity(&name[..x]) {
            return Some((end, format!("{v}{}", &name[x..])));
        }
    }
    Some((end, format!("&{name}")))
}

/// `ftfy.fix_text` with default settings, minus mojibake repair: line by line, each line's
/// fixes repeated until nothing changes.
fn ftfy_fix_text(text: &str) -> String {
    let mut unescape = true;
    let mut out = String::with_capacity(text.len());
    for segment in text.split_inclusive('\n') {
        // ftfy's `unescape_html="auto"`: off from the first line holding a `<` on.
        if segment.contains('<') {
            unescape = false;
        }
        let mut s = segment.to_string();
        loop {
            let before = s.clone();
            if unescape {
                s = ftfy_unescape_html(&s);
            }
            s = s.chars().map(c1_control).collect();
            s = s
                .chars()
                .fold(String::with_capacity(s.len()), |mut acc, c| {
                    match ligature(c) {
                        Some(l) => acc.push_str(l),
                        None => acc.push(c),
                    }
                    acc
                });
            s = fix_width(&s);
            s = s.chars().map(uncurl).collect();
            s = s
                .replace("\r\n", "\n")
                .replace(['\r', '\u{2028}', '\u{2029}', '\u{85}'], "\n");
            s = remove_terminal_escapes(&s);
            s.retain(|c| !is_control(c));
            s = s.nfc().collect();
            if s == before {
                break;
            }
        }
        out.push_str(&s);
    }
    out
}

/// ftfy's `unescape_html`: `&#?[0-9A-Za-z]{1,24};` through its entity table (the HTML5
/// entities with `;`, plus upper-cased names of lower-case ones that Python's `html.unescape`
/// leaves alone, decoding to the upper-cased character); numeric ones through `html.unescape`.
fn ftfy_unescape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let after = &rest[amp..];
        let body = after[1..].strip_prefix('#').unwrap_or(&after[1..]);
        let hash = after.len() - 1 - body.len();
        let n = body.bytes().take_while(u8::is_ascii_alphanumeric).count();
        if (1..=24).contains(&n) && body[n..].starts_with(';') {
            let whole = &after[..1 + hash + n + 1];
            let rep = if hash == 1 {
                let u = html_unescape(whole);
                if u.contains(';') {
                    whole.to_string()
                } else {
                    u
                }
            } else if let Some(v) = entity(&whole[1..]) {
                v.to_string()
            } else {
                upper_entity(whole).unwrap_or_else(|| whole.to_string())
            };
            out.push_str(&rep);
            rest = &after[whole.len()..];
        } else {
            out.push('&');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    out
}

/// ftfy's upper-case entity names: `&NTILDE;` is `Ñ` because `&ntilde;` is `ñ` and Python's
/// `html.unescape` leaves `&NTILDE;` unchanged.
fn upper_entity(whole: &str) -> Option<String> {
    let lower = whole.to_ascii_lowercase();
    if lower == whole || lower.to_uppercase() != whole {
        return None;
    }
    let v = entity(&lower[1..])?;
    (html_unescape(whole) == whole).then(|| v.to_uppercase())
}

/// ftfy's `fix_c1_controls`: C1 controls read as Windows-1252 (the sloppy codec keeps the
/// five undefined bytes as themselves).
fn c1_control(c: char) -> char {
    match u32::from(c) {
        n @ 0x80..=0x9f => invalid_charref(n).unwrap_or(c),
        _ => c,
    }
}

/// ftfy's `fix_latin_ligatures` table.
fn ligature(c: char) -> Option<&'static str> {
    Some(match c {
        'Ĳ' => "IJ",
        'ĳ' => "ij",
        'ŉ' => "ʼn",
        'Ǳ' => "DZ",
        'ǲ' => "Dz",
        'ǳ' => "dz",
        'Ǆ' => "DŽ",
        'ǅ' => "Dž",
        'ǆ' => "dž",
        'Ǉ' => "LJ",
        'ǈ' => "Lj",
        'ǉ' => "lj",
        'Ǌ' => "NJ",
        'ǋ' => "Nj",
        'ǌ' => "nj",
        'ﬀ' => "ff",
        'ﬁ' => "fi",
        'ﬂ' => "fl",
        'ﬃ' => "ffi",
        'ﬄ' => "ffl",
        'ﬅ' => "ſt",
        'ﬆ' => "st",
        _ => return None,
    })
}

/// ftfy's `fix_character_width`: U+3000 to a space, U+FF01..U+FFEF to their NFKC forms.
fn fix_width(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match u32::from(c) {
            0x3000 => out.push(' '),
            0xff01..=0xffef => out.extend(std::iter::once(c).nfkc()),
            _ => out.push(c),
        }
    }
    out
}

/// ftfy's `uncurl_quotes`.
fn uncurl(c: char) -> char {
    match c {
        '\u{2bc}' | '\u{2018}'..='\u{201b}' => '\'',
        '\u{201c}'..='\u{201f}' => '"',
        _ => c,
    }
}

/// ftfy's `remove_terminal_escapes`: `\x1b\[[\d;]*[a-zA-Z]` removed (`\d` taken as ASCII
/// digits; Python's also matches other scripts' digits inside a terminal escape).
fn remove_terminal_escapes(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("\u{1b}[") {
        out.push_str(&rest[..i]);
        let body = &rest[i + 2..];
        let params = body
            .bytes()
            .take_while(|b| b.is_ascii_digit() || *b == b';')
            .count();
        match body.as_bytes().get(params) {
            Some(b) if b.is_ascii_alphabetic() => rest = &body[params + 1..],
            _ => {
                out.push_str("\u{1b}[");
                rest = body;
            }
        }
    }
    out.push_str(rest);
    out
}

/// ftfy's `remove_control_chars` table.
fn is_control(c: char) -> bool {
    matches!(u32::from(c), 0x00..=0x08 | 0x0b | 0x0e..=0x1f | 0x7f | 0x206a..=0x206f | 0xfeff | 0xfff9..=0xfffc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_unescape_follows_python() {
        // Expected values from CPython 3.11's html.unescape.
        let cases = [
            ("&amp;", "&"),
            ("&amp", "&"),
            ("&ampx", "&x"),
            ("&notit;", "¬it;"),
            ("&#39;", "'"),
            ("&#x27", "'"),
            ("&#0;", "\u{fffd}"),
            ("&#128;", "€"),
            ("&#1;", ""),
            ("&#99999999999;", "\u{fffd}"),
            ("&nosuch;", "&nosuch;"),
            ("a & b", "a & b"),
            ("&&amp;", "&&"),
            ("&#;", "&#;"),
        ];
        for (input, want) in cases {
            assert_eq!(html_unescape(input), want, "{input}");
        }
    }

    #[test]
    fn ftfy_steps() {
        assert_eq!(ftfy_fix_text("&NTILDE;"), "Ñ");
        assert_eq!(ftfy_fix_text("a&lt;b <tag>"), "a&lt;b <tag>");
        assert_eq!(ftfy_fix_text("\u{1b}[31mred\u{1b}[0m"), "red");
        assert_eq!(ftfy_fix_text("e\u{301}"), "é");
        assert_eq!(ftfy_fix_text("a\r\nb\u{2028}c"), "a\nb\nc");
        assert_eq!(ftfy_fix_text("\u{93}hi\u{94}"), "\"hi\"");
    }
}

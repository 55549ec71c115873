//! Python's text forms of chat-template values, which leak into rendered prompts:
//! - `{{ value }}` prints `str(value)` (`None`, `True`, `['a', 1]`, `{'k': 'v'}`, `1e-05`): [`py_str`],
//!   with [`py_repr`] inside lists and dicts;
//! - the `tojson` filter is `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
//!   sort_keys=False)`: [`json_dumps`];
//! - `strftime_now(format)`: [`strftime_utc`].

use std::fmt::Write as _;

use minijinja::value::{Value, ValueKind};

/// Python's `repr(float)`: shortest round-trip digits, exponent form below 1e-4 and from 1e16.
pub fn py_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf".into() } else { "-inf".into() };
    }
    // Rust's Debug uses the same shortest digits and the same switch points; only the exponent
    // spelling differs ("1e-5" vs Python's "1e-05", "1e16" vs "1e+16").
    let s = format!("{f:?}");
    match s.split_once('e') {
        None => s,
        Some((mantissa, exp)) => {
            let (sign, digits) = match exp.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', exp),
            };
            let mantissa = mantissa.strip_suffix(".0").unwrap_or(mantissa);
            format!("{mantissa}e{sign}{digits:0>2}")
        }
    }
}

/// Whether Python's `str.isprintable()` is false for `c` (approximation without Unicode tables:
/// control, format, separator and private-use characters that commonly appear).
fn py_nonprintable(c: char) -> bool {
    let u = c as u32;
    c.is_control()
        || matches!(u, 0xA0 | 0xAD | 0x1680 | 0x2000..=0x200F | 0x2028..=0x202F | 0x205F..=0x2064 | 0x3000)
        || matches!(u, 0xFEFF | 0xFFF9..=0xFFFB | 0xE000..=0xF8FF | 0xD800..=0xDFFF)
}

/// Python's `repr(str)`.
pub fn py_str_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if py_nonprintable(c) => {
                let u = c as u32;
                let _ = match u {
                    0..=0xFF => write!(out, "\\x{u:02x}"),
                    0x100..=0xFFFF => write!(out, "\\u{u:04x}"),
                    _ => write!(out, "\\U{u:08x}"),
                };
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

fn number_text(v: &Value, json: bool) -> String {
    if v.is_integer() {
        return v.to_string();
    }
    let f = f64::try_from(v.clone()).unwrap_or(f64::NAN);
    if json && !f.is_finite() {
        return if f.is_nan() {
            "NaN".into()
        } else if f > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    py_float_repr(f)
}

fn map_pairs(v: &Value) -> Vec<(Value, Value)> {
    match v.try_iter() {
        Ok(keys) => keys
            .map(|k| {
                let item = v.get_item(&k).unwrap_or_default();
                (k, item)
            })
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Python's `repr()` of a template value (used inside lists and dicts).
pub fn py_repr(v: &Value) -> String {
    match v.kind() {
        ValueKind::String => py_str_repr(v.as_str().unwrap_or_default()),
        _ => py_str(v),
    }
}

/// Python's `str()` of a template value: what `{{ value }}` prints in Jinja2.
pub fn py_str(v: &Value) -> String {
    match v.kind() {
        ValueKind::Undefined => String::new(),
        ValueKind::None => "None".into(),
        ValueKind::Bool => {
            if v.is_true() {
                "True".into()
            } else {
                "False".into()
            }
        }
        ValueKind::Number => number_text(v, false),
        ValueKind::String => v.as_str().unwrap_or_default().to_string(),
        ValueKind::Seq | ValueKind::Iterable => match v.try_iter() {
            Ok(items) => format!("[{}]", items.map(|x| py_repr(&x)).collect::<Vec<_>>().join(", ")),
            Err(_) => v.to_string(),
        },
        ValueKind::Map if !v.is_kwargs() => {
            let inner: Vec<String> =
                map_pairs(v).iter().map(|(k, x)| format!("{}: {}", py_repr(k), py_repr(x))).collect();
            format!("{{{}}}", inner.join(", "))
        }
        _ => v.to_string(),
    }
}

/// Options of Python's `json.dumps` that HF's `tojson` filter exposes.
#[derive(Debug, Clone, Default)]
pub struct JsonOptions {
    /// Escape every non-ASCII character as `\uXXXX` (HF default: false).
    pub ensure_ascii: bool,
    /// Indentation string (`None`: single line).
    pub indent: Option<String>,
    /// `(item_separator, key_separator)`; defaults depend on `indent` like in Python.
    pub separators: Option<(String, String)>,
    /// Sort dict keys.
    pub sort_keys: bool,
}

fn json_escape(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !(' '..='~').contains(&c)) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn json_key(k: &Value) -> Result<String, String> {
    match k.kind() {
        ValueKind::String => Ok(k.as_str().unwrap_or_default().to_string()),
        ValueKind::None => Ok("null".into()),
        ValueKind::Bool => Ok(if k.is_true() { "true" } else { "false" }.into()),
        ValueKind::Number => Ok(number_text(k, true)),
        _ => Err(format!("keys must be str, int, float, bool or None, not {}", k.kind())),
    }
}

/// Longest `tojson` output: 10 MB of JSON is millions of tokens, more than any prompt holds.
const MAX_JSON_LEN: usize = 10_000_000;

fn dump_into(v: &Value, o: &JsonOptions, depth: usize, out: &mut String) -> Result<(), String> {
    if depth > 200 {
        return Err("value is nested too deeply".into());
    }
    let (item_sep, key_sep) = match &o.separators {
        Some((a, b)) => (a.as_str(), b.as_str()),
        None if o.indent.is_some() => (",", ": "),
        None => (", ", ": "),
    };
    let newline = |out: &mut String, level: usize| {
        if let Some(ind) = &o.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(ind);
            }
        }
    };
    match v.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&number_text(v, true)),
        ValueKind::String => json_escape(v.as_str().unwrap_or_default(), o.ensure_ascii, out),
        ValueKind::Seq | ValueKind::Iterable => {
            // Iterated, not collected: a template can make lazy sequences of 2^63 items (`[x] * n`).
            let mut items = v.try_iter().map_err(|e| e.to_string())?.peekable();
            if items.peek().is_none() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                dump_into(&item, o, depth + 1, out)?;
                if out.len() > MAX_JSON_LEN {
                    return Err(format!("the JSON text is longer than {MAX_JSON_LEN} bytes"));
                }
            }
            newline(out, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let mut pairs: Vec<(String, Value)> =
                map_pairs(v).into_iter().map(|(k, x)| Ok((json_key(&k)?, x))).collect::<Result<_, String>>()?;
            if o.sort_keys {
                pairs.sort_by(|a, b| a.0.cmp(&b.0));
            }
            if pairs.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, (k, x)) in pairs.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                json_escape(k, o.ensure_ascii, out);
                out.push_str(key_sep);
                dump_into(x, o, depth + 1, out)?;
                if out.len() > MAX_JSON_LEN {
                    return Err(format!("the JSON text is longer than {MAX_JSON_LEN} bytes"));
                }
            }
            newline(out, depth);
            out.push('}');
        }
        kind => return Err(format!("Object of type {kind} is not JSON serializable")),
    }
    Ok(())
}

/// Python's `json.dumps(value, ...)` over a template value. Errors name the unserialisable kind.
pub fn json_dumps(v: &Value, options: &JsonOptions) -> Result<String, String> {
    let mut out = String::new();
    dump_into(v, options, 0, &mut out)?;
    Ok(out)
}

const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// `datetime.now().strftime(format)` for the common directives, in UTC (`secs` since the Unix epoch).
/// Supported: `%Y %y %m %-m %d %-d %e %B %b %h %A %a %H %-H %I %M %S %p %j %F %T %%`; others are copied.
pub fn strftime_utc(format: &str, secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (hour, minute, second) = (rem / 3600, (rem / 60) % 60, rem % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_march = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_march + 2) / 153;
    let day = doy_march - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cum[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };
    let m = (month - 1) as usize;
    let mut out = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let no_pad = chars.peek() == Some(&'-');
        if no_pad {
            chars.next();
        }
        let Some(d) = chars.next() else {
            out.push('%');
            break;
        };
        let num = |n: i64, w: usize| if no_pad { n.to_string() } else { format!("{n:0w$}") };
        let piece = match d {
            'Y' => year.to_string(),
            'y' => num(year.rem_euclid(100), 2),
            'm' => num(month, 2),
            'd' => num(day, 2),
            'e' => format!("{day:>2}"),
            'B' => MONTHS[m].to_string(),
            'b' | 'h' => MONTHS[m][..3].to_string(),
            'A' => DAYS[weekday].to_string(),
            'a' => DAYS[weekday][..3].to_string(),
            'H' => num(hour, 2),
            'I' => num(hour12, 2),
            'M' => num(minute, 2),
            'S' => num(second, 2),
            'p' => if hour < 12 { "AM" } else { "PM" }.to_string(),
            'j' => num(yday, 3),
            'F' => format!("{year}-{month:02}-{day:02}"),
            'T' => format!("{hour:02}:{minute:02}:{second:02}"),
            '%' => "%".to_string(),
            other => format!("%{}{other}", if no_pad { "-" } else { "" }),
        };
        out.push_str(&piece);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::chat_template_value::TemplateValue;

    #[test]
    fn float_repr_matches_python() {
        assert_eq!(py_float_repr(1.0), "1.0");
        assert_eq!(py_float_repr(0.5), "0.5");
        assert_eq!(py_float_repr(1e-5), "1e-05");
        assert_eq!(py_float_repr(1.5e-7), "1.5e-07");
        assert_eq!(py_float_repr(1e16), "1e+16");
        assert_eq!(py_float_repr(1.2345e20), "1.2345e+20");
        assert_eq!(py_float_repr(1e15), "1000000000000000.0");
        assert_eq!(py_float_repr(0.0001), "0.0001");
        assert_eq!(py_float_repr(-2.5), "-2.5");
    }

    #[test]
    fn str_repr_matches_python() {
        assert_eq!(py_str_repr("a"), "'a'");
        assert_eq!(py_str_repr("it's"), "\"it's\"");
        assert_eq!(py_str_repr("it's \"x\""), "'it\\'s \"x\"'");
        assert_eq!(py_str_repr("a\nb\\\t\u{1}\u{a0}é"), "'a\\nb\\\\\\t\\x01\\xa0é'");
    }

    #[test]
    fn ordered_parse_and_dumps() {
        let v = TemplateValue::from_json_str(r#"{"b": 1, "a": [1.0, "é\n", null, true], "c": {}}"#).unwrap();
        let val = v.to_value();
        assert_eq!(
            json_dumps(&val, &JsonOptions::default()).unwrap(),
            r#"{"b": 1, "a": [1.0, "é\n", null, true], "c": {}}"#
        );
        let o = JsonOptions { ensure_ascii: true, sort_keys: true, ..Default::default() };
        assert_eq!(json_dumps(&val, &o).unwrap(), r#"{"a": [1.0, "\u00e9\n", null, true], "b": 1, "c": {}}"#);
        let o = JsonOptions { indent: Some("  ".into()), ..Default::default() };
        assert_eq!(
            json_dumps(&val, &o).unwrap(),
            "{\n  \"b\": 1,\n  \"a\": [\n    1.0,\n    \"é\\n\",\n    null,\n    true\n  ],\n  \"c\": {}\n}"
        );
        assert_eq!(py_str(&val), "{'b': 1, 'a': [1.0, 'é\\n', None, True], 'c': {}}");
        let emoji = Value::from("🚀");
        let o = JsonOptions { ensure_ascii: true, ..Default::default() };
        assert_eq!(json_dumps(&emoji, &o).unwrap(), "\"\\ud83d\\ude80\"");
    }

    #[test]
    fn strftime_known_dates() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let t = 1_709_211_909;
        assert_eq!(strftime_utc("%Y-%m-%d %H:%M:%S", t), "2024-02-29 13:05:09");
        assert_eq!(
            strftime_utc("%d %B %Y, %A %a %b %-d %I%p %j %%", t),
            "29 February 2024, Thursday Thu Feb 29 01PM 060 %"
        );
        assert_eq!(strftime_utc("%F %T %q", 0), "1970-01-01 00:00:00 %q");
    }
}

//! A streaming parser for the Prometheus text exposition format (version 0.0.4).
//!
//! The fetcher reads a handful of families out of pages that hold hundreds of series, 20
//! times a second per pod, so this parser borrows from the page instead of building a
//! tree: it yields one [`Sample`] per series line, with the label block kept as a slice and
//! decoded on demand. It follows the format's grammar — `#` comment, `HELP` and `TYPE`
//! lines; `name{label="value",...} value [timestamp]`; `\\`, `\"` and `\n` escapes in
//! label values; `NaN`, `+Inf`, `-Inf` — and reports the first malformed line with its
//! line number.

use std::borrow::Cow;

/// A malformed line in a metrics page; the page is rejected as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct InvalidExposition {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// One series line: metric name, its label block, value and optional timestamp.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample<'a> {
    /// Metric name, e.g. `vllm:num_requests_waiting`.
    pub name: &'a str,
    labels: &'a str,
    /// Sample value.
    pub value: f64,
    /// Optional timestamp in milliseconds.
    pub timestamp_ms: Option<i64>,
}

impl<'a> Sample<'a> {
    /// Iterates the sample's labels as (name, unescaped value).
    pub fn labels(&self) -> LabelIter<'a> {
        LabelIter { rest: self.labels }
    }

    /// The value of one label, unescaped.
    pub fn label(&self, name: &str) -> Option<Cow<'a, str>> {
        self.labels().find(|(k, _)| *k == name).map(|(_, v)| v)
    }
}

/// Iterator over an already-validated label block.
#[derive(Debug, Clone)]
pub struct LabelIter<'a> {
    rest: &'a str,
}

impl<'a> Iterator for LabelIter<'a> {
    type Item = (&'a str, Cow<'a, str>);

    fn next(&mut self) -> Option<Self::Item> {
        // The block was validated by `parse_labels`, so the shapes below always hold.
        let s = self.rest.trim_start_matches([' ', ',']);
        if s.is_empty() {
            return None;
        }
        let eq = s.find('=')?;
        let name = s[..eq].trim();
        let after = s[eq + 1..].trim_start();
        let body = after.strip_prefix('"')?;
        let end = find_closing_quote(body)?;
        let raw = &body[..end];
        self.rest = &body[end + 1..];
        Some((name, unescape(raw)))
    }
}

/// Parses a whole page, calling `on_sample` for every series line in order.
pub fn parse<'a>(
    page: &'a str,
    mut on_sample: impl FnMut(Sample<'a>),
) -> Result<(), InvalidExposition> {
    // Byte-wise throughout: every delimiter of the format is ASCII, so slicing at them
    // keeps UTF-8 boundaries, and this runs 2000 times a second at 100 pods.
    for (i, raw) in page.split('\n').enumerate() {
        let line = raw.trim_ascii();
        if line.is_empty() || line.as_bytes()[0] == b'#' {
            continue;
        }
        let sample = parse_line(line).map_err(|reason| InvalidExposition {
            line: i + 1,
            reason,
        })?;
        on_sample(sample);
    }
    Ok(())
}

fn parse_line(line: &str) -> Result<Sample<'_>, &'static str> {
    // One pass finds the name's end and validates it.
    let bytes = line.as_bytes();
    let name_end = bytes
        .iter()
        .position(|&b| CLASS[usize::from(b)] & METRIC_NAME == 0)
        .ok_or("a sample line needs a value")?;
    if !matches!(bytes[name_end], b'{' | b' ' | b'\t') || name_end == 0 || bytes[0].is_ascii_digit()
    {
        return Err("invalid metric name");
    }
    let name = &line[..name_end];
    let mut rest = line[name_end..].trim_ascii_start();
    let mut labels = "";
    if let Some(after_brace) = rest.strip_prefix('{') {
        let close = parse_labels(after_brace)?;
        labels = &after_brace[..close];
        rest = &after_brace[close + 1..];
    }
    let mut fields = rest.split_ascii_whitespace();
    let value = parse_value(fields.next().ok_or("a sample line needs a value")?)?;
    let timestamp_ms = match fields.next() {
        Some(ts) => Some(ts.parse::<i64>().map_err(|_| "invalid timestamp")?),
        None => None,
    };
    if fields.next().is_some() {
        return Err("unexpected text after the timestamp");
    }
    Ok(Sample {
        name,
        labels,
        value,
        timestamp_ms,
    })
}

/// [`CLASS`] bit: the byte may appear in a metric name (`[a-zA-Z0-9_:]`).
const METRIC_NAME: u8 = 1;
/// [`CLASS`] bit: the byte may appear in a label name (`[a-zA-Z0-9_]`).
const LABEL_NAME: u8 = 2;

/// Character classes by byte: one table load per byte in the scanning loops.
static CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        if c.is_ascii_alphanumeric() || c == b'_' {
            t[b] = METRIC_NAME | LABEL_NAME;
        } else if c == b':' {
            t[b] = METRIC_NAME;
        }
        b += 1;
    }
    t
};

/// Validates `name="value",...}` and returns the index of the closing brace.
fn parse_labels(s: &str) -> Result<usize, &'static str> {
    let bytes = s.as_bytes();
    let mut i = 0;
    loop {
        while i < bytes.len() && (bytes[i] == b' ' || bytes[i] == b',') {
            i += 1;
        }
        if i >= bytes.len() {
            return Err("unterminated label set");
        }
        if bytes[i] == b'}' {
            return Ok(i);
        }
        let start = i;
        while i < bytes.len() && CLASS[usize::from(bytes[i])] & LABEL_NAME != 0 {
            i += 1;
        }
        if i == start || bytes[start].is_ascii_digit() {
            return Err("invalid label name");
        }
        while i < bytes.len() && bytes[i] == b' ' {
            i += 1;
        }
        if i >= bytes.len() || bytes[i] != b'=' {
            return Err("expected '=' after a label name");
        }
        i += 1;
        while i < bytes.len() && bytes[i] == b' ' {
            i += 1;
        }
        if i >= bytes.len() || bytes[i] != b'"' {
            return Err("label value must be quoted");
        }
        i += 1;
        let end = find_closing_quote(&s[i..]).ok_or("unterminated label value")?;
        i += end + 1;
        while i < bytes.len() && bytes[i] == b' ' {
            i += 1;
        }
        if i < bytes.len() && bytes[i] != b',' && bytes[i] != b'}' {
            return Err("expected ',' or '}' after a label value");
        }
    }
}

fn find_closing_quote(s: &str) -> Option<usize> {
    let bytes = s.as_bytes();
    let mut i = 0;
    while let Some(j) = memchr::memchr2(b'"', b'\\', &bytes[i..]) {
        if bytes[i + j] == b'"' {
            return Some(i + j);
        }
        i += j + 2; // an escape: skip the escaped byte
        if i >= bytes.len() {
            return None;
        }
    }
    None
}

fn unescape(raw: &str) -> Cow<'_, str> {
    if !raw.contains('\\') {
        return Cow::Borrowed(raw);
    }
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    Cow::Owned(out)
}

fn parse_value(s: &str) -> Result<f64, &'static str> {
    match s {
        "NaN" => Ok(f64::NAN),
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        _ => s.parse::<f64>().map_err(|_| "invalid sample value"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Owned = (String, Vec<(String, String)>, f64, Option<i64>);

    fn all(page: &str) -> Vec<Owned> {
        let mut out = Vec::new();
        parse(page, |s| {
            out.push((
                s.name.to_owned(),
                s.labels()
                    .map(|(k, v)| (k.to_owned(), v.into_owned()))
                    .collect(),
                s.value,
                s.timestamp_ms,
            ))
        })
        .unwrap();
        out
    }

    #[test]
    fn parses_samples_labels_comments_and_timestamps() {
        let page = "# HELP vllm:num_requests_waiting Number of requests waiting.\n\
                    # TYPE vllm:num_requests_waiting gauge\n\
                    vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 3.0\n\
                    \n\
                    plain_metric 1.5e3 1700000000000\n\
                    spaced { a = \"x\" , b=\"y\" } -2\n\
                    trailing_comma{a=\"1\",} 7\n";
        let got = all(page);
        assert_eq!(got.len(), 4);
        assert_eq!(got[0].0, "vllm:num_requests_waiting");
        assert_eq!(
            got[0].1,
            vec![
                ("engine".into(), "0".into()),
                ("model_name".into(), "m".into())
            ]
        );
        assert_eq!(got[0].2, 3.0);
        assert_eq!(got[1].2, 1500.0);
        assert_eq!(got[1].3, Some(1_700_000_000_000));
        assert_eq!(
            got[2].1,
            vec![("a".into(), "x".into()), ("b".into(), "y".into())]
        );
        assert_eq!(got[2].2, -2.0);
        assert_eq!(got[3].1, vec![("a".into(), "1".into())]);
    }

    #[test]
    fn unescapes_label_values_and_handles_braces_inside_quotes() {
        let page = r#"m{path="a\"b\\c\nd",other="x}y,z"} 1"#;
        let got = all(page);
        assert_eq!(got[0].1[0].1, "a\"b\\c\nd");
        assert_eq!(got[0].1[1].1, "x}y,z");
    }

    #[test]
    fn special_values() {
        let got = all("a NaN\nb +Inf\nc -Inf\n");
        assert!(got[0].2.is_nan());
        assert_eq!(got[1].2, f64::INFINITY);
        assert_eq!(got[2].2, f64::NEG_INFINITY);
    }

    #[test]
    fn rejects_malformed_lines_with_their_number() {
        for (page, line) in [
            ("ok 1\nbad{a=\"1\" 2\n", 2),
            ("ok 1\n\nnovalue\n", 3),
            ("m{a=unquoted} 1", 1),
            ("m 1 2 3", 1),
            ("m abc", 1),
            ("9metric 1", 1),
            ("m{=\"x\"} 1", 1),
            ("ok 1\nbad-name 1\n", 2),
            ("m{a-b=\"x\"} 1", 1),
            ("m{a=\"x\\", 1),
            ("m{a=\"x\\\"} 1", 1),
            ("{a=\"x\"} 1", 1),
        ] {
            let err = parse(page, |_| {}).unwrap_err();
            assert_eq!(err.line, line, "{page:?}: {err}");
        }
    }
}

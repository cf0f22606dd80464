//! Best-effort YAML locations for errors found after parsing (serde values carry no spans).
//!
//! Works on block-style and flow-style YAML by searching the text for the key/value that
//! identifies the item, inside the relevant top-level section.

use super::error::Location;

/// Lines of a top-level section (`plugins:`), as (0-based line index, text).
fn section<'a>(yaml: &'a str, key: &str) -> Vec<(usize, &'a str)> {
    let mut out = Vec::new();
    let mut inside = false;
    let prefix = format!("{key}:");
    for (i, line) in yaml.lines().enumerate() {
        let top_level = !line.starts_with([' ', '\t', '-', '#']) && !line.trim().is_empty();
        if top_level {
            inside = line.starts_with(&prefix);
        }
        if inside {
            out.push((i, line));
        }
    }
    out
}

fn value_at(line: &str, key: &str, value: &str) -> Option<usize> {
    let pat = format!("{key}:");
    let mut from = 0;
    while let Some(pos) = line[from..].find(&pat) {
        let start = from + pos;
        let before_ok = start == 0 || !line.as_bytes()[start - 1].is_ascii_alphanumeric();
        let rest = line[start + pat.len()..].trim_start();
        let rest = rest.trim_start_matches(['"', '\'']);
        if before_ok && rest.starts_with(value) {
            let after = rest[value.len()..].chars().next();
            if after.is_none_or(|c| matches!(c, '"' | '\'' | ',' | '}' | ' ' | '#')) {
                return Some(start);
            }
        }
        from = start + pat.len();
    }
    None
}

/// The `occurrence`-th (0-based) `key: value` inside top-level `section`.
pub fn find_value(
    yaml: &str,
    section_key: &str,
    key: &str,
    value: &str,
    occurrence: usize,
) -> Option<Location> {
    section(yaml, section_key)
        .into_iter()
        .filter_map(|(i, line)| value_at(line, key, value).map(|c| (i, c)))
        .nth(occurrence)
        .map(|(i, c)| Location {
            line: i + 1,
            column: c + 1,
        })
}

/// The first line at or after `from` (within `section_key`) that holds `field:`; falls back
/// to `from` itself.
pub fn find_field_after(yaml: &str, section_key: &str, from: Location, field: &str) -> Location {
    let last = field
        .rsplit(['.', ']', '['])
        .find(|s| !s.is_empty() && s.parse::<usize>().is_err());
    let Some(last) = last else { return from };
    let pat = format!("{last}:");
    for (i, line) in section(yaml, section_key) {
        if i + 1 < from.line {
            continue;
        }
        // Stop at the next list item of the same or a shallower level.
        if i + 1 > from.line {
            let indent = line.len() - line.trim_start().len();
            if line.trim_start().starts_with("- ") && indent < from.column.saturating_sub(1).max(1)
            {
                break;
            }
        }
        if let Some(c) = line.find(&pat) {
            return Location {
                line: i + 1,
                column: c + 1,
            };
        }
    }
    from
}

/// Location of a top-level key.
pub fn top_level(yaml: &str, key: &str) -> Option<Location> {
    let pat = format!("{key}:");
    yaml.lines()
        .position(|l| l.starts_with(&pat))
        .map(|i| Location {
            line: i + 1,
            column: 1,
        })
}

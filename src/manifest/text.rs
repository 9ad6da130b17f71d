//! Where a value sits in the manifest text, for problems serde cannot locate.
//!
//! serde_yaml gives no positions for values that parsed fine, so validation finds them in the
//! text. Every search starts at a line (the fleet's, found once per fleet in file order) through
//! an index of line starts, so locating is linear in the text, not in text × fleets.

/// The manifest text with the byte offset of each line's start.
pub(super) struct Text<'a> {
    text: &'a str,
    starts: Vec<usize>,
}

impl<'a> Text<'a> {
    pub(super) fn new(text: &'a str) -> Text<'a> {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Text { text, starts }
    }

    /// The lines from `line` (1-based; 0 counts as 1) on, with their numbers.
    pub(super) fn lines_from(&self, line: usize) -> impl Iterator<Item = (usize, &'a str)> + 'a {
        let line = line.max(1);
        let start = self.starts.get(line - 1).copied().unwrap_or(self.text.len());
        let text: &'a str = self.text;
        text[start..].lines().enumerate().map(move |(i, l)| (line + i, l))
    }
}

/// Whether `key:` starts at `pos` of `line` as a whole word.
fn key_at(line: &str, pos: usize) -> bool {
    line[..pos].chars().next_back().is_none_or(|c| !c.is_alphanumeric() && c != '_')
}

/// Whether `rest` (what follows a `key:`) starts with exactly `value`, quoted or not: the value
/// is a whole token, so `web` does not match `web-2`.
fn value_is(rest: &str, value: &str) -> bool {
    let rest = rest.trim_start();
    let (rest, quote) = match rest.chars().next() {
        Some(q @ ('"' | '\'')) => (&rest[1..], Some(q)),
        _ => (rest, None),
    };
    let Some(after) = rest.strip_prefix(value) else { return false };
    match (after.chars().next(), quote) {
        (None, _) => true,
        (Some(c), Some(q)) => c == q,
        (Some(c), None) => c.is_whitespace() || matches!(c, ',' | '}' | ']' | '#'),
    }
}

/// The first line at or after `from` holding `name: <value>` (the value exactly, quoted or not).
pub(super) fn locate_name(text: &Text<'_>, value: &str, from: usize) -> Option<usize> {
    text.lines_from(from).find_map(|(n, line)| {
        line.match_indices("name:")
            .any(|(pos, _)| key_at(line, pos) && value_is(&line[pos + "name:".len()..], value))
            .then_some(n)
    })
}

/// Finds where `key: value` (or `- value` under key) sits in the text, for errors on values that
/// parsed fine but mean something wrong. Searches from `after_line` on (1-based), then, if it is
/// not there (a value shared through a YAML alias is written once, earlier), from the top.
pub(super) fn locate(text: &Text<'_>, key: &str, value: &str, after_line: usize) -> (usize, usize) {
    match locate_from(text, key, value, after_line) {
        (0, _) if after_line > 1 => locate_from(text, key, value, 1),
        found => found,
    }
}

fn locate_from(text: &Text<'_>, key: &str, value: &str, after_line: usize) -> (usize, usize) {
    let pattern = format!("{key}:");
    // First choice: the value right after `key:` (maybe quoted), so `/etc` is not found inside
    // an earlier `../../../etc`.
    for (n, line) in text.lines_from(after_line) {
        for (kpos, _) in line.match_indices(&pattern) {
            if !key_at(line, kpos) {
                continue;
            }
            if value.is_empty() {
                return (n, kpos + 1);
            }
            let after = kpos + pattern.len();
            let rest = line[after..].trim_start();
            let quoted = rest.starts_with(['"', '\'']);
            let rest = if quoted { &rest[1..] } else { rest };
            if rest.starts_with(value) {
                return (n, line.len() - rest.len() + 1);
            }
        }
    }
    for (n, line) in text.lines_from(after_line) {
        if let Some(kpos) = line.find(&pattern) {
            if let Some(vpos) = line[kpos..].find(value) {
                return (n, kpos + vpos + 1);
            }
        }
    }
    (0, 0)
}

/// Where `value` sits as an item of the list under `key:` (`key: [a, b]` or `- b` lines below
/// it), searching from `after_line` on.
pub(super) fn locate_item(
    text: &Text<'_>,
    key: &str,
    value: &str,
    after_line: usize,
) -> (usize, usize) {
    let (key_line, _) = locate(text, key, "", after_line);
    if key_line == 0 {
        return (0, 0);
    }
    text.lines_from(key_line)
        .find_map(|(n, line)| line.find(value).map(|pos| (n, pos + 1)))
        .unwrap_or((0, 0))
}

/// The first place at or after `from_line` where `value` follows a `key:` on the line, or is
/// itself a key (`value:`).
pub(super) fn locate_value(
    text: &Text<'_>,
    value: &str,
    from_line: usize,
) -> Option<(usize, usize)> {
    text.lines_from(from_line).find_map(|(n, line)| {
        line.match_indices(value).find_map(|(pos, _)| {
            let after_key = line[..pos].contains(':');
            let is_key = key_at(line, pos) && line[pos + value.len()..].starts_with(':');
            (after_key || is_key).then_some((n, pos + 1))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_from_any_line() {
        let text = Text::new("a\nb\n\nd");
        let lines: Vec<_> = text.lines_from(2).collect();
        assert_eq!(lines, [(2, "b"), (3, ""), (4, "d")]);
        assert_eq!(text.lines_from(9).count(), 0);
        assert_eq!(text.lines_from(0).next(), Some((1, "a")));
    }

    #[test]
    fn names_match_whole_values_only() {
        let text = Text::new("- name: web-2\n- { name: \"web\", x: 1 }\n- name: web # c\n");
        assert_eq!(locate_name(&text, "web", 1), Some(2));
        assert_eq!(locate_name(&text, "web", 3), Some(3));
        assert_eq!(locate_name(&text, "web-2", 1), Some(1));
        assert_eq!(locate_name(&text, "we", 1), None);
    }
}

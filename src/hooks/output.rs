//! Reading what a hook wrote: `key=value` lines in `$KILN_OUTPUT`, or the JSON of
//! `terraform output -json`.

use std::collections::BTreeMap;

/// Reads `$KILN_OUTPUT` without ever holding more than [`OUTPUT_FILE_CAP`] bytes of it: a
/// larger file is an error naming its size and the limit (outputs are small values; big data
/// belongs in a file under `$KILN_OUTPUT_DIR`, its path in `$KILN_OUTPUT`). A missing file
/// (the hook removed it) reads as empty.
///
/// [`OUTPUT_FILE_CAP`]: super::contract::OUTPUT_FILE_CAP
pub async fn read_output_file(path: &std::path::Path) -> Result<String, String> {
    let cap = super::contract::OUTPUT_FILE_CAP;
    let bytes = match read_capped(path, cap).await {
        Ok(bytes) => bytes,
        Err(Capped::Missing) => return Ok(String::new()),
        Err(Capped::TooBig(size)) => {
            return Err(format!(
                "wrote {size} bytes to $KILN_OUTPUT, more than the limit of {cap} bytes; write \
                 large data to a file in $KILN_OUTPUT_DIR and its path to $KILN_OUTPUT"
            ));
        }
        Err(Capped::Io(e)) => return Err(format!("left a $KILN_OUTPUT kiln cannot read ({e})")),
    };
    String::from_utf8(bytes).map_err(|_| "wrote $KILN_OUTPUT that is not UTF-8".to_owned())
}

/// Reads a file a hook left for kiln to parse, at most [`HOOK_FILE_CAP`] bytes: `Ok(None)` when
/// it does not exist, an error naming the limit when it is larger.
///
/// [`HOOK_FILE_CAP`]: super::contract::HOOK_FILE_CAP
pub async fn read_hook_file(path: &std::path::Path) -> Result<Option<Vec<u8>>, String> {
    let cap = super::contract::HOOK_FILE_CAP;
    match read_capped(path, cap).await {
        Ok(bytes) => Ok(Some(bytes)),
        Err(Capped::Missing) => Ok(None),
        Err(Capped::TooBig(size)) => {
            Err(format!("is {size} bytes, more than the limit of {cap} bytes kiln reads"))
        }
        Err(Capped::Io(e)) => Err(format!("cannot be read ({e})")),
    }
}

/// Why [`read_capped`] returned no bytes.
#[derive(Debug)]
pub enum Capped {
    /// The file does not exist.
    Missing,
    /// It holds more than the cap: at least this many bytes.
    TooBig(u64),
    /// Another IO error.
    Io(std::io::Error),
}

/// Reads a file a hook wrote, holding at most `cap` bytes of it in memory whatever its size
/// (or growth while it is read). For every file a hook leaves for kiln to parse.
pub async fn read_capped(path: &std::path::Path, cap: u64) -> Result<Vec<u8>, Capped> {
    use tokio::io::AsyncReadExt as _;
    let file = match tokio::fs::File::open(path).await {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Capped::Missing),
        Err(e) => return Err(Capped::Io(e)),
    };
    if let Ok(meta) = file.metadata().await {
        if meta.len() > cap {
            return Err(Capped::TooBig(meta.len()));
        }
    }
    let mut bytes = Vec::new();
    // One byte past the cap tells a file that grew since its size was read.
    file.take(cap + 1).read_to_end(&mut bytes).await.map_err(Capped::Io)?;
    if bytes.len() as u64 > cap {
        return Err(Capped::TooBig(bytes.len() as u64));
    }
    Ok(bytes)
}

/// Parses `$KILN_OUTPUT`. Two shapes are accepted:
///
/// - lines of `key=value` (the value is everything after the first `=`, kept verbatim; blank
///   lines and lines starting with `#` are skipped; a later key overrides an earlier one), with
///   GitHub Actions' multi-line form `key<<DELIM` … `DELIM`;
/// - a JSON object in the shape of `terraform output -json`, flattened by [`flatten_terraform`].
///
/// Anything else is an error describing the first bad line.
pub fn parse_outputs(text: &str) -> Result<BTreeMap<String, String>, String> {
    if text.trim_start().starts_with('{') {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| format!("wrote JSON to $KILN_OUTPUT that does not parse ({e})"))?;
        return flatten_terraform(&value).ok_or_else(|| {
            "wrote JSON to $KILN_OUTPUT that is not in the shape of `terraform output -json` \
             ({\"name\": {\"value\": ...}})"
                .to_owned()
        });
    }
    let mut outputs = BTreeMap::new();
    let mut lines = text.lines().enumerate();
    while let Some((n, line)) = lines.next() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let eq = line.find('=');
        let heredoc = line.find("<<");
        match (eq, heredoc) {
            (Some(eq), heredoc) if heredoc.is_none_or(|h| eq < h) => {
                let key = line[..eq].trim();
                check_key(key, n)?;
                outputs.insert(key.to_owned(), line[eq + 1..].to_owned());
            }
            (_, Some(h)) => {
                let key = line[..h].trim();
                check_key(key, n)?;
                let delimiter = line[h + 2..].trim();
                if delimiter.is_empty() {
                    return Err(format!("wrote `{key}<<` without a delimiter (line {})", n + 1));
                }
                let mut value: Vec<&str> = Vec::new();
                let mut closed = false;
                for (_, body) in lines.by_ref() {
                    let body = body.trim_end_matches('\r');
                    if body == delimiter {
                        closed = true;
                        break;
                    }
                    value.push(body);
                }
                if !closed {
                    return Err(format!(
                        "wrote `{key}<<{delimiter}` without a closing `{delimiter}` line (line {})",
                        n + 1
                    ));
                }
                outputs.insert(key.to_owned(), value.join("\n"));
            }
            _ => {
                return Err(format!(
                    "wrote a line without `=` to $KILN_OUTPUT (line {}): {}",
                    n + 1,
                    truncate(line, 80)
                ));
            }
        }
    }
    Ok(outputs)
}

fn check_key(key: &str, n: usize) -> Result<(), String> {
    if key.is_empty() || key.contains(char::is_whitespace) {
        return Err(format!(
            "wrote an empty or blank-containing key to $KILN_OUTPUT (line {})",
            n + 1
        ));
    }
    Ok(())
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Flattens `terraform output -json` (`{"name": {"value": V, "type": T, "sensitive": B}}`) into
/// `name=V`: strings as they are, anything else JSON-encoded. Sensitive outputs are kept out of
/// kiln's store (their value becomes `(sensitive)`). `None` if the value is not in that shape.
pub fn flatten_terraform(value: &serde_json::Value) -> Option<BTreeMap<String, String>> {
    let object = value.as_object()?;
    let mut out = BTreeMap::new();
    for (name, output) in object {
        let output = output.as_object()?;
        let value = output.get("value")?;
        let sensitive = output.get("sensitive").and_then(|s| s.as_bool()).unwrap_or(false);
        let text = if sensitive {
            "(sensitive)".to_owned()
        } else {
            match value {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            }
        };
        out.insert(name.clone(), text);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_value_lines() {
        let out =
            parse_outputs("# comment\nimage=ami-1\n\nurl=http://x/?a=b\nimage=ami-2\n").unwrap();
        assert_eq!(out["image"], "ami-2");
        assert_eq!(out["url"], "http://x/?a=b");
    }

    #[test]
    fn multiline_values() {
        let out = parse_outputs("notes<<EOF\none\ntwo\nEOF\nimage=x\n").unwrap();
        assert_eq!(out["notes"], "one\ntwo");
        assert_eq!(out["image"], "x");
        assert!(parse_outputs("notes<<EOF\none\n").is_err());
    }

    #[test]
    fn rejects_junk_with_line_number() {
        let err = parse_outputs("image=x\njunk\n").unwrap_err();
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn terraform_json_is_flattened() {
        let json = r#"{"lb_dns":{"sensitive":false,"type":"string","value":"lb.example"},
            "ports":{"sensitive":false,"type":["list","number"],"value":[80,443]},
            "token":{"sensitive":true,"type":"string","value":"s3cret"}}"#;
        let out = parse_outputs(json).unwrap();
        assert_eq!(out["lb_dns"], "lb.example");
        assert_eq!(out["ports"], "[80,443]");
        assert_eq!(out["token"], "(sensitive)");
        assert!(parse_outputs(r#"{"a": 1}"#).is_err());
    }
}

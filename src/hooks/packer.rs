//! Parsing Packer's `-machine-readable` output and manifest post-processor files.
//!
//! Machine-readable lines are `timestamp,target,type,data...`; Packer escapes commas inside a
//! datum as `%!(PACKER_COMMA)` and newlines as `\n` (packer/ui.go, `MachineReadableUi`). A
//! successful build reports each artifact as `artifact,N,<key>,<value>` lines, the id under the
//! key `id`: `us-east-1:ami-0abc` for one region, `us-east-1:ami-1%!(PACKER_COMMA)us-west-2:ami-2`
//! when the AMI was copied to several regions.

/// One artifact reported by a build.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Artifact {
    /// The build (target) that produced it, e.g. `amazon-ebs`.
    pub target: String,
    /// Its index within the build.
    pub index: u32,
    /// The builder id, e.g. `mitchellh.amazonebs`.
    pub builder_id: Option<String>,
    /// The artifact id, unescaped (`us-east-1:ami-1,us-west-2:ami-2`).
    pub id: Option<String>,
}

/// What a machine-readable stream says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuildOutput {
    /// Artifacts in the order they were reported.
    pub artifacts: Vec<Artifact>,
    /// Error messages (`target,error,...` lines), unescaped.
    pub errors: Vec<String>,
}

impl BuildOutput {
    /// The id of the last artifact that has one (the image a single-build template produced).
    pub fn image_id(&self) -> Option<&str> {
        self.artifacts.iter().rev().find_map(|a| a.id.as_deref().filter(|id| !id.is_empty()))
    }
}

/// Undoes Packer's escaping of one datum.
pub fn unescape(datum: &str) -> String {
    datum.replace("%!(PACKER_COMMA)", ",").replace("\\n", "\n").replace("\\r", "\r")
}

/// Parses a whole `-machine-readable` stream. Lines that are not machine-readable (a wrapper's
/// own echo, blank lines) are ignored.
pub fn parse(text: &str) -> BuildOutput {
    let mut out = BuildOutput::default();
    for line in text.lines() {
        let fields: Vec<&str> = line.trim_end_matches('\r').split(',').collect();
        // A machine-readable line starts with a Unix timestamp.
        if fields.len() < 3
            || fields[0].is_empty()
            || !fields[0].bytes().all(|b| b.is_ascii_digit())
        {
            continue;
        }
        let (target, kind, data) = (fields[1], fields[2], &fields[3..]);
        match kind {
            "artifact" if data.len() >= 2 => {
                let Ok(index) = data[0].parse::<u32>() else { continue };
                let value = data.get(2).map(|v| unescape(v));
                let artifact = match out
                    .artifacts
                    .iter_mut()
                    .rposition(|a| a.target == target && a.index == index)
                {
                    Some(pos) => &mut out.artifacts[pos],
                    None => {
                        out.artifacts.push(Artifact {
                            target: target.to_owned(),
                            index,
                            ..Artifact::default()
                        });
                        let last = out.artifacts.len() - 1;
                        &mut out.artifacts[last]
                    }
                };
                match data[1] {
                    "id" => artifact.id = value,
                    "builder-id" => artifact.builder_id = value,
                    _ => {}
                }
            }
            "error" if !data.is_empty() => out.errors.push(unescape(&data.join(","))),
            _ => {}
        }
    }
    out
}

/// Splits a multi-region AWS artifact id (`us-east-1:ami-1,us-west-2:ami-2`) into
/// `(region, ami)` pairs; ids of other shapes give an empty list.
pub fn regions(id: &str) -> Vec<(String, String)> {
    id.split(',')
        .filter_map(|part| {
            let (region, image) = part.split_once(':')?;
            (!region.is_empty() && !image.is_empty())
                .then(|| (region.trim().to_owned(), image.trim().to_owned()))
        })
        .collect()
}

/// `builds[-1].artifact_id` of a manifest post-processor file (`packer-manifest.json`), or a
/// description of what is wrong with it.
pub fn manifest_artifact_id(json: &[u8]) -> Result<String, String> {
    let value: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| format!("is not valid JSON ({e})"))?;
    let last = value
        .get("builds")
        .and_then(|b| b.as_array())
        .and_then(|b| b.last())
        .ok_or_else(|| "has no `builds` entries".to_owned())?;
    match last.get("artifact_id").and_then(|id| id.as_str()) {
        Some(id) if !id.is_empty() => Ok(id.to_owned()),
        _ => Err("has no `artifact_id` in its last build".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_commas_and_newlines() {
        assert_eq!(unescape("a%!(PACKER_COMMA)b\\nc"), "a,b\nc");
    }

    #[test]
    fn ignores_non_machine_readable_lines() {
        let out = parse("hello\n,,x\n123\n");
        assert!(out.artifacts.is_empty() && out.errors.is_empty());
    }
}

//! What an exec provider's scripts read: the `settings.yaml` beside them.
//!
//! A fleet's `rollout.exec.env` reaches the scripts as `KILN_PROVIDER_<NAME>`. A provider
//! directory may declare the settings its scripts read, so a misspelt or missing setting is a
//! `kiln.yaml:LINE:COL` problem from `kiln validate` and from the daemon's planning, not a
//! script failing mid-rollout:
//!
//! ```yaml
//! # hooks/provider/aws-asg/settings.yaml
//! settings:
//!   asg: { required: true, description: Auto Scaling group name }
//!   port: { default: "80", description: port the app listens on }
//! ```
//!
//! Names compare as their variables do (`target_group_arn` and `TARGET_GROUP_ARN` are one
//! setting). A provider without the file is not checked.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{ManifestError, Problem};

/// The declaration's file name, in the directory of the exec provider's scripts.
pub const SETTINGS_FILE: &str = "settings.yaml";

/// The largest `settings.yaml` read, in bytes (64 KiB).
pub const MAX_SETTINGS_BYTES: u64 = 64 * 1024;

/// The settings an exec provider's scripts read.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSettings {
    /// By name, as the scripts spell it (`asg`: read as `KILN_PROVIDER_ASG`).
    pub settings: BTreeMap<String, SettingDecl>,
}

/// One setting.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingDecl {
    /// Whether every fleet using the provider must set it.
    #[serde(default)]
    pub required: bool,
    /// What the scripts use when it is not set (documentation only).
    #[serde(default)]
    pub default: Option<String>,
    /// What it is.
    #[serde(default)]
    pub description: Option<String>,
}

/// The variable a setting reaches the scripts as: `KILN_PROVIDER_` and the name in upper case,
/// every character other than a letter or digit as `_`.
pub fn setting_env_name(name: &str) -> String {
    let name: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' })
        .collect();
    format!("KILN_PROVIDER_{name}")
}

/// Parses a `settings.yaml` (`file` names it in problems).
pub fn parse_settings(text: &str, file: &str) -> Result<ProviderSettings, ManifestError> {
    let problem = |error: serde_yaml::Error, message: String| {
        let (line, column) = error.location().map_or((0, 0), |l| (l.line(), l.column()));
        ManifestError { problems: vec![Problem { file: file.to_owned(), line, column, message }] }
    };
    if let Some((which, error)) = super::limits::check(serde_yaml::Deserializer::from_str(text)) {
        return Err(problem(error, which.to_string()));
    }
    serde_yaml::from_str::<ProviderSettings>(text).map_err(|error| {
        let message = error.to_string();
        let message = match message.find(" at line ") {
            Some(pos) => message[..pos].to_owned(),
            None => message,
        };
        problem(error, message)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declarations_parse_and_typos_are_located() {
        let text = "settings:\n  asg: { required: true, description: the group }\n  port: {}\n";
        let parsed = parse_settings(text, "p/settings.yaml").unwrap();
        assert!(parsed.settings["asg"].required);
        assert!(!parsed.settings["port"].required);

        let error = parse_settings("settings:\n  asg: { requried: true }\n", "p/settings.yaml")
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("p/settings.yaml:2:"), "{error}");
        assert!(error.contains("unknown field `requried`"), "{error}");
    }

    #[test]
    fn names_compare_as_variables() {
        assert_eq!(setting_env_name("target_group_arn"), "KILN_PROVIDER_TARGET_GROUP_ARN");
        assert_eq!(setting_env_name("TARGET-GROUP.arn"), "KILN_PROVIDER_TARGET_GROUP_ARN");
    }
}

//! Paths built from names and manifest values.
//!
//! **Invariant:** every path kiln builds from something it did not choose itself (a fleet or
//! stage name, a manifest `path:` or hook, a file a hook names in its output) is joined with
//! [`safe_join`], which refuses anything that could leave its base: an absolute path, `..`, a
//! root or prefix component. The manifest rejects such values earlier, with a line and column;
//! this is the second wall, so a future field cannot reintroduce a path escape by forgetting a
//! check. The check is lexical: what the joined path points to on disk (symlinks in an export)
//! is the business of the code reading it.

use std::path::{Component, Path, PathBuf};

/// A relative path that would leave its base.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("path `{path}` must be relative and stay inside {}", base.display())]
pub struct PathEscape {
    /// The directory it was to be joined to.
    pub base: PathBuf,
    /// The offending path, as given.
    pub path: String,
}

/// `base` joined with `relative`, refusing anything that could leave `base`: an absolute path,
/// a `..` component, a root or prefix component. `.` components and an empty path are allowed
/// (they name `base` itself or a path under it).
pub fn safe_join(base: &Path, relative: impl AsRef<Path>) -> Result<PathBuf, PathEscape> {
    let relative = relative.as_ref();
    let escape = || PathEscape { base: base.to_owned(), path: relative.display().to_string() };
    let mut joined = base.to_path_buf();
    for component in relative.components() {
        match component {
            Component::Normal(part) => joined.push(part),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(escape());
            }
        }
    }
    Ok(joined)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_join_under_the_base() {
        let base = Path::new("/data/work");
        assert_eq!(safe_join(base, "12-app").unwrap(), Path::new("/data/work/12-app"));
        assert_eq!(safe_join(base, "./hooks/bake").unwrap(), Path::new("/data/work/hooks/bake"));
        assert_eq!(safe_join(base, "infra/").unwrap(), Path::new("/data/work/infra"));
        assert_eq!(safe_join(base, "").unwrap(), base);
        assert_eq!(safe_join(base, ".").unwrap(), base);
        // A name that merely contains dots is a normal component.
        assert_eq!(safe_join(base, "a..b/...").unwrap(), Path::new("/data/work/a..b/..."));
    }

    #[test]
    fn escapes_are_refused() {
        let base = Path::new("/data/work");
        for bad in [
            "/etc",
            "/",
            "..",
            "../fleets",
            "a/../../b",
            "a/..",
            "./../x",
            "12-/../../fleets",
            "image/../../../etc",
        ] {
            let error = safe_join(base, bad).unwrap_err();
            assert_eq!(error.path, bad);
            assert!(error.to_string().contains("must be relative and stay inside /data/work"));
        }
    }
}

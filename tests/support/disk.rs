//! Test support: a small disk that can be filled and freed, for full-disk tests. A tmpfs of a
//! few MiB when this process may mount one (root in a container that allows it); otherwise
//! `None`, and tests fall back to kiln's injected store fault (`KILN_TEST_STORE_WRITE_FAULT`).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A mounted tmpfs, unmounted (lazily, so processes still inside don't block it) on drop.
pub struct SmallDisk {
    mount: PathBuf,
    filler: PathBuf,
    _base: tempfile::TempDir,
}

impl SmallDisk {
    /// Mounts a `size_mib` MiB tmpfs on a fresh temp dir, or says why it cannot.
    pub fn mount(size_mib: u32) -> Result<SmallDisk, String> {
        let base = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let mount = base.path().join("disk");
        std::fs::create_dir_all(&mount).map_err(|e| format!("mount point: {e}"))?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(&mount)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let filler = base.path().join("disk").join("filler");
        Ok(SmallDisk { mount, filler, _base: base })
    }

    /// The mounted directory.
    pub fn path(&self) -> &Path {
        &self.mount
    }

    /// Writes a filler file until the disk is full; returns how many bytes it took.
    pub fn fill(&self) -> u64 {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.filler)
            .expect("create the filler file");
        let chunk = vec![0xa5u8; 64 * 1024];
        let mut written = 0u64;
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => panic!("filling the disk: {e}"),
            }
        }
        // Smaller writes take the last partial pages.
        for size in [4096usize, 512, 1] {
            while file.write_all(&chunk[..size]).is_ok() {
                written += size as u64;
            }
        }
        let _ = file.sync_all();
        written
    }

    /// Removes the filler: space is back.
    pub fn free(&self) {
        let _ = std::fs::remove_file(&self.filler);
    }

    /// Whether the disk has no space left (a 4 KiB write fails).
    pub fn is_full(&self) -> bool {
        let probe = self.mount.join("probe");
        let full = std::fs::write(&probe, [0u8; 4096]).is_err();
        let _ = std::fs::remove_file(&probe);
        full
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}

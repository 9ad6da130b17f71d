//! Parsing Packer's `-machine-readable` output and manifest post-processor files.

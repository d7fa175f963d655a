//! cloud-init NoCloud seed images.
//!
//! cloud-init's NoCloud datasource reads `user-data`, `meta-data` and
//! (optionally) `network-config` from a filesystem labelled `cidata`. This
//! writes one as a small FAT image (with the `fatfs` crate: long file names,
//! label `CIDATA`), attached read-only through
//! [`VmConfig::cloud_init_seed`](hci_core::compute::VmConfig::cloud_init_seed)
//! (the QEMU backend gives it to the guest as a read-only virtio disk with
//! serial `cidata`).
//!
//! SSH keys go into `meta-data` as `public-keys`, which cloud-init installs
//! for the default user whatever the user-data says.

use std::io::{Cursor, Seek, SeekFrom, Write};
use std::path::Path;

use hci_core::{Error, Result};

/// The contents of a NoCloud seed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NoCloudSeed {
    /// `instance-id` (a new id makes cloud-init run its per-instance modules again).
    pub instance_id: String,
    /// `local-hostname`, if any.
    pub hostname: Option<String>,
    /// SSH public keys for the default user.
    pub ssh_authorized_keys: Vec<String>,
    /// The user-data document (`#cloud-config …`, a script, …); empty: none.
    pub user_data: String,
    /// Network configuration (cloud-init v1/v2 YAML), if any.
    pub network_config: Option<String>,
}

/// YAML double-quoted scalar (JSON strings are valid YAML).
fn quoted(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

impl NoCloudSeed {
    /// The `meta-data` document.
    pub fn meta_data(&self) -> String {
        let mut m = format!("instance-id: {}\n", quoted(&self.instance_id));
        if let Some(h) = &self.hostname {
            m.push_str(&format!("local-hostname: {}\n", quoted(h)));
        }
        if !self.ssh_authorized_keys.is_empty() {
            m.push_str("public-keys:\n");
            for k in &self.ssh_authorized_keys {
                m.push_str(&format!("  - {}\n", quoted(k.trim())));
            }
        }
        m
    }

    /// The files of the seed, in the order they are written.
    pub fn files(&self) -> Vec<(&'static str, Vec<u8>)> {
        let mut f = vec![
            ("meta-data", self.meta_data().into_bytes()),
            ("user-data", self.user_data.clone().into_bytes()),
        ];
        if let Some(n) = &self.network_config {
            f.push(("network-config", n.clone().into_bytes()));
        }
        f
    }

    /// Checks the fields that would make cloud-init misbehave.
    pub fn validate(&self) -> Result<()> {
        if self.instance_id.trim().is_empty() {
            return Err(Error::invalid(
                "cloud-init instance-id",
                "must not be empty",
            ));
        }
        if let Some(h) = &self.hostname
            && (h.is_empty() || h.len() > 253 || h.contains(char::is_whitespace))
        {
            return Err(Error::invalid(
                "cloud-init hostname",
                format!("{h:?} is not a host name"),
            ));
        }
        if self.ssh_authorized_keys.iter().any(|k| k.contains('\n')) {
            return Err(Error::invalid(
                "cloud-init SSH key",
                "one key per entry, without line breaks",
            ));
        }
        Ok(())
    }

    /// The seed as a FAT image (label `CIDATA`), in memory.
    pub fn to_vfat(&self) -> Result<Vec<u8>> {
        self.validate()?;
        let files = self.files();
        let payload: usize = files.iter().map(|(_, d)| d.len()).sum();
        // FAT12 with room to spare: 1 MiB plus twice the payload, 64 KiB aligned.
        let size = ((1 << 20) + 2 * payload).next_multiple_of(64 << 10);
        let mut img = Cursor::new(vec![0u8; size]);
        let fat_err =
            |what: &str, e: std::io::Error| Error::io(format!("{what} in the seed image"), e);
        fatfs::format_volume(
            &mut img,
            fatfs::FormatVolumeOptions::new().volume_label(*b"CIDATA     "),
        )
        .map_err(|e| fat_err("format a FAT filesystem", e))?;
        img.seek(SeekFrom::Start(0))
            .map_err(|e| fat_err("rewind", e))?;
        {
            let fs = fatfs::FileSystem::new(&mut img, fatfs::FsOptions::new())
                .map_err(|e| fat_err("open the FAT filesystem", e))?;
            for (name, data) in &files {
                let mut f = fs
                    .root_dir()
                    .create_file(name)
                    .map_err(|e| fat_err(&format!("create {name}"), e))?;
                f.truncate()
                    .map_err(|e| fat_err(&format!("truncate {name}"), e))?;
                f.write_all(data)
                    .map_err(|e| fat_err(&format!("write {name}"), e))?;
                f.flush()
                    .map_err(|e| fat_err(&format!("flush {name}"), e))?;
            }
            fs.unmount()
                .map_err(|e| fat_err("unmount the FAT filesystem", e))?;
        }
        Ok(img.into_inner())
    }

    /// Writes the seed image to `path` (replacing it atomically).
    pub fn write_vfat(&self, path: &Path) -> Result<()> {
        let img = self.to_vfat()?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, img).map_err(|e| Error::io(format!("write {}", tmp.display()), e))?;
        std::fs::rename(&tmp, path)
            .map_err(|e| Error::io(format!("rename {} to {}", tmp.display(), path.display()), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn seed() -> NoCloudSeed {
        NoCloudSeed {
            instance_id: "vm-1234".into(),
            hostname: Some("web-1".into()),
            ssh_authorized_keys: vec!["ssh-ed25519 AAAAC3Nz user@host".into()],
            user_data: "#cloud-config\npackages: [nginx]\n".into(),
            network_config: Some("version: 2\nethernets:\n  eth0:\n    dhcp4: true\n".into()),
        }
    }

    #[test]
    fn meta_data_is_yaml_with_keys() {
        let m = seed().meta_data();
        assert_eq!(
            m,
            "instance-id: \"vm-1234\"\nlocal-hostname: \"web-1\"\npublic-keys:\n  - \"ssh-ed25519 AAAAC3Nz user@host\"\n"
        );
    }

    #[test]
    fn the_image_holds_every_file_under_its_long_name_and_the_label() {
        let s = seed();
        let img = s.to_vfat().unwrap();
        let fs = fatfs::FileSystem::new(Cursor::new(img), fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label().trim_end(), "CIDATA");
        let mut names = Vec::new();
        for e in fs.root_dir().iter() {
            let e = e.unwrap();
            names.push(e.file_name());
        }
        names.sort();
        assert_eq!(names, ["meta-data", "network-config", "user-data"]);
        for (name, data) in s.files() {
            let mut got = Vec::new();
            fs.root_dir()
                .open_file(name)
                .unwrap()
                .read_to_end(&mut got)
                .unwrap();
            assert_eq!(got, data, "{name}");
        }
    }

    #[test]
    fn big_user_data_fits() {
        let mut s = seed();
        s.user_data = "#!/bin/sh\n".to_string() + &"echo hi\n".repeat(200_000);
        let img = s.to_vfat().unwrap();
        let fs = fatfs::FileSystem::new(Cursor::new(img), fatfs::FsOptions::new()).unwrap();
        let mut got = String::new();
        fs.root_dir()
            .open_file("user-data")
            .unwrap()
            .read_to_string(&mut got)
            .unwrap();
        assert_eq!(got, s.user_data);
    }

    #[test]
    fn bad_seeds_are_refused() {
        let mut s = seed();
        s.instance_id = " ".into();
        assert!(s.to_vfat().is_err());
        let mut s = seed();
        s.hostname = Some("a b".into());
        assert!(s.validate().is_err());
        let mut s = seed();
        s.ssh_authorized_keys = vec!["a\nb".into()];
        assert!(s.validate().is_err());
    }
}

//! `deckhand keygen`: a new ed25519 signing key pair, NAME.key (mode 0600) and NAME.pub.

use crate::error::ToolError;
use deckhand_protocol::SecretKey;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

/// The two files written and the key id.
#[derive(Debug)]
pub struct KeyPair {
    pub secret: PathBuf,
    pub public: PathBuf,
    pub key_id: String,
}

/// Writes `{out}.key` and `{out}.pub`. Refuses to overwrite either file.
pub fn keygen(out: &Path) -> Result<KeyPair, ToolError> {
    let name = out
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            ToolError::Usage(format!(
                "--out {}: needs a file name to write NAME.key and NAME.pub",
                out.display()
            ))
        })?;
    let secret_path = out.with_file_name(format!("{name}.key"));
    let public_path = out.with_file_name(format!("{name}.pub"));
    for p in [&secret_path, &public_path] {
        if p.exists() {
            return Err(ToolError::KeyExists {
                out: out.to_owned(),
                existing: p.clone(),
            });
        }
    }
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(ToolError::Random)?;
    let key = SecretKey::from_seed(&seed);
    seed.fill(0);

    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&secret_path)
        .map_err(ToolError::io("create", &secret_path))?;
    f.write_all(key.to_file_text().as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(ToolError::io("write", &secret_path))?;
    std::fs::write(&public_path, key.public().to_file_text())
        .map_err(ToolError::io("write", &public_path))?;
    Ok(KeyPair {
        secret: secret_path,
        public: public_path,
        key_id: key.id().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use deckhand_protocol::PublicKey;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn writes_a_private_key_and_refuses_to_overwrite_it() {
        let dir = tempfile::tempdir().unwrap();
        let pair = keygen(&dir.path().join("ops")).unwrap();
        let mode = std::fs::metadata(&pair.secret)
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let sk =
            SecretKey::from_file_text(&std::fs::read_to_string(&pair.secret).unwrap()).unwrap();
        let pk =
            PublicKey::from_file_text(&std::fs::read_to_string(&pair.public).unwrap()).unwrap();
        assert_eq!(sk.public(), &pk);
        assert_eq!(pk.id().to_string(), pair.key_id);
        let err = keygen(&dir.path().join("ops")).unwrap_err().to_string();
        assert!(err.contains("refusing to overwrite"), "{err}");
        // Two keys are never the same.
        let other = keygen(&dir.path().join("ops2")).unwrap();
        assert_ne!(other.key_id, pair.key_id);
    }
}

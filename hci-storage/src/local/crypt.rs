//! AES-XTS-256 per 4 KiB block, the block index as tweak.

use aes::Aes256;
use aes::cipher::KeyInit;
use xts_mode::{Xts128, get_tweak_default};

use hci_core::volume::EncryptionKey;
use hci_core::{Error, Result};

/// Encrypts and decrypts 4 KiB blocks of one volume.
pub(crate) struct Cipher {
    xts: Xts128<Aes256>,
}

impl std::fmt::Debug for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cipher(AES-XTS-256)")
    }
}

impl Cipher {
    /// A cipher for a 64-byte key (two AES-256 keys).
    pub(crate) fn new(key: &EncryptionKey) -> Result<Self> {
        let k = key.as_bytes();
        if k.len() != 64 {
            return Err(Error::invalid(
                "encryption key",
                format!("AES-XTS-256 needs 64 bytes, got {}", k.len()),
            ));
        }
        let c1 = Aes256::new_from_slice(&k[..32])
            .map_err(|_| Error::invalid("encryption key", "bad AES key"))?;
        let c2 = Aes256::new_from_slice(&k[32..])
            .map_err(|_| Error::invalid("encryption key", "bad AES key"))?;
        Ok(Cipher {
            xts: Xts128::new(c1, c2),
        })
    }

    /// Encrypts one 4 KiB block in place.
    pub(crate) fn encrypt(&self, block: &mut [u8], index: u64) {
        self.xts
            .encrypt_sector(block, get_tweak_default(u128::from(index)));
    }

    /// Decrypts one 4 KiB block in place.
    pub(crate) fn decrypt(&self, block: &mut [u8], index: u64) {
        self.xts
            .decrypt_sector(block, get_tweak_default(u128::from(index)));
    }

    /// A key-check value stored in metadata: a wrong key gives a different one.
    pub(crate) fn check_value(&self) -> String {
        let mut block = [0u8; 32];
        self.xts
            .encrypt_sector(&mut block, get_tweak_default(u128::MAX));
        block[..16].iter().map(|b| format!("{b:02x}")).collect()
    }
}

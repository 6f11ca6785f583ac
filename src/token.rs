//! Secrets and identifiers: resume tokens, random ids, key hashes.
//!
//! A resume token is an HMAC of the stream id and its owner under the
//! resume secret: a capability for one stream of one owner; checking it
//! needs no lookup, and a wrong token is indistinguishable from no stream.

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

#[derive(Clone)]
pub struct TokenSigner {
    secret: Vec<u8>,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSigner(<redacted>)")
    }
}

impl TokenSigner {
    pub fn new(secret: Vec<u8>) -> TokenSigner {
        TokenSigner { secret }
    }

    fn mac(&self, stream_id: &str, owner: &str) -> HmacSha256 {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = HmacSha256::new_from_slice(&self.secret)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(b"tidegate-resume-v1\n");
        mac.update(stream_id.as_bytes());
        mac.update(b"\n");
        mac.update(owner.as_bytes());
        mac
    }

    pub fn sign(&self, stream_id: &str, owner: &str) -> String {
        let tag = self.mac(stream_id, owner).finalize().into_bytes();
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&tag[..24])
    }

    /// Constant-time check of a presented token.
    pub fn verify(&self, stream_id: &str, owner: &str, token: &str) -> bool {
        let Ok(bytes) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token.trim())
        else {
            return false;
        };
        self.mac(stream_id, owner)
            .verify_truncated_left(&bytes)
            .is_ok()
            && bytes.len() == 24
    }
}

/// A fresh random identifier or secret, URL-safe.
pub fn random_string(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::Rng::fill(&mut rand::rng(), &mut buf[..]);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf)
}

/// A short hash of a secret (a client key, a request body) that can be
/// stored and compared without keeping the secret.
pub fn hash_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(bytes)[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_bind_stream_and_owner() {
        let s = TokenSigner::new(b"secret".to_vec());
        let t = s.sign("s1", "o1");
        assert!(s.verify("s1", "o1", &t));
        assert!(!s.verify("s2", "o1", &t));
        assert!(!s.verify("s1", "o2", &t));
        assert!(!TokenSigner::new(b"other".to_vec()).verify("s1", "o1", &t));
        assert!(!s.verify("s1", "o1", "garbage!"));
        assert!(!s.verify("s1", "o1", &t[..10]));
    }
}

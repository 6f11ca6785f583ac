//! Secrets and identifiers: resume tokens, random ids, key hashes.
//!
//! A resume token is an HMAC of the stream id and its owner under the
//! resume secret: a capability for one stream of one owner; checking it
//! needs no lookup, and a wrong token is indistinguishable from no stream.

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Keyed once: the HMAC's inner and outer key blocks are hashed when the
/// signer is made, and every token starts from a copy of that state (two
/// SHA-256 blocks fewer per token than keying it each time).
#[derive(Clone)]
pub struct TokenSigner {
    keyed: HmacSha256,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSigner(<redacted>)")
    }
}

impl TokenSigner {
    pub fn new(secret: Vec<u8>) -> TokenSigner {
        // HMAC accepts keys of any length, so this cannot fail.
        let keyed = HmacSha256::new_from_slice(&secret)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        TokenSigner { keyed }
    }

    fn mac(&self, stream_id: &str, owner: &str) -> HmacSha256 {
        let mut mac = self.keyed.clone();
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

    #[test]
    fn a_token_is_the_hmac_of_its_stream_and_owner_under_the_secret() {
        // Computed here from scratch, keyed per call: keying once and
        // copying the state must give the very same tokens, or a token
        // signed before an upgrade would fail after it.
        let mut mac = HmacSha256::new_from_slice(b"the secret").unwrap();
        mac.update(b"tidegate-resume-v1\nstream-7\nowner-3");
        let tag = mac.finalize().into_bytes();
        let want = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&tag[..24]);
        let s = TokenSigner::new(b"the secret".to_vec());
        assert_eq!(s.sign("stream-7", "owner-3"), want);
        assert_eq!(
            s.sign("stream-7", "owner-3"),
            want,
            "the keyed state is not used up"
        );
        assert!(s.verify("stream-7", "owner-3", &want));
    }
}

//! Twilio request signing (`X-Twilio-Signature`), as Twilio computes it (`docs/protocols.md`,
//! "Signatures").
//!
//! The fakes sign; the relay verifies. Keeping an independent implementation here means a
//! bug in the relay's verifier cannot be masked by sharing code with the signer.

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha1::Sha1;

/// The string Twilio signs: the URL as configured, then each form parameter's name
/// immediately followed by its value, sorted by name (byte order), each distinct value
/// of a repeated name once, values sorted.
pub fn signed_string(url: &str, params: &[(String, String)]) -> String {
    let mut by_name: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (name, value) in params {
        by_name.entry(name).or_default().insert(value);
    }
    let mut out = String::from(url);
    for (name, values) in by_name {
        for value in values {
            out.push_str(name);
            out.push_str(value);
        }
    }
    out
}

/// `base64(HMAC-SHA1(auth_token, signed_string(url, params)))`.
pub fn twilio_signature(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = Hmac::<Sha1>::new_from_slice(auth_token.as_bytes())
        .expect("HMAC-SHA1 accepts a key of any length");
    mac.update(signed_string(url, params).as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    const URL: &str = "https://mycompany.com/myapp.php?foo=1&bar=2";

    fn params() -> Vec<(String, String)> {
        [
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+14158675309"),
            ("Digits", "1234"),
            ("From", "+14158675309"),
            ("To", "+18005551212"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
    }

    #[test]
    fn signed_string_matches_vector_1() {
        assert_eq!(
            signed_string(URL, &params()),
            "https://mycompany.com/myapp.php?foo=1&bar=2CallSidCA1234567890ABCDECaller+14158675309\
             Digits1234From+14158675309To+18005551212"
        );
    }

    #[test]
    fn form_vectors_from_twilio_sdks() {
        let p = params();
        assert_eq!(
            twilio_signature("12345", URL, &p),
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        );
        assert_eq!(
            twilio_signature(
                "12345",
                "https://mycompany.com:443/myapp.php?foo=1&bar=2",
                &p
            ),
            "kvajT1Ptam85bY51eRf/AJRuM3w="
        );
        assert_eq!(
            twilio_signature("12345", "http://mycompany.com:80/myapp.php?foo=1&bar=2", &p),
            "0ZXoZLH/DfblKGATFgpif+LLRf4="
        );
        assert_eq!(
            twilio_signature(
                "12345",
                "http://mycompany.com:1234/myapp.php?foo=1&bar=2",
                &p
            ),
            "Zmvh+3yNM1Phv2jhDCwEM3q5ebU="
        );
    }

    #[test]
    fn repeated_parameters_sign_each_distinct_value_once() {
        let p: Vec<(String, String)> = [
            ("Sid", "CA123"),
            ("SidAccount", "AC123"),
            ("Digits", "5678"),
            ("Digits", "1234"),
            ("Digits", "1234"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        assert_eq!(
            signed_string(URL, &p),
            format!("{URL}Digits1234Digits5678SidCA123SidAccountAC123")
        );
        assert_eq!(
            twilio_signature("12345", URL, &p),
            "IK+Dwps556ElfBT0I3Rgjkr1wJU="
        );
    }

    #[test]
    fn websocket_upgrade_vectors() {
        assert_eq!(
            twilio_signature(
                "12345",
                "wss://example.com/api/twilio/media-stream/call_123",
                &[]
            ),
            "XAPq86PGALYnAMolKwWYvJ8G1BM="
        );
        assert_eq!(
            twilio_signature(
                "12345",
                "wss://example.com:443/api/twilio/media-stream/call_123",
                &[]
            ),
            "AI0ra75JB8ahjGxbprGjL+MSFYs="
        );
    }

    #[test]
    fn a_different_token_gives_a_different_signature() {
        assert_ne!(
            twilio_signature("12345", URL, &params()),
            twilio_signature("12346", URL, &params())
        );
    }
}

//! Twilio request signatures (`X-Twilio-Signature`), `docs/protocols.md`, "Signatures".
//!
//! The signed string is the public URL Twilio requested (scheme, host, optional port, path
//! and query exactly as configured) followed by every form parameter, sorted by name, as
//! `name` + `value` (each distinct value once, values sorted). The signature is
//! base64(HMAC-SHA1(auth token, signed string)). Twilio is inconsistent about the port, so
//! the URL is also tried without its port and with the default port added.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha1::Sha1;

use crate::config::Secret;

type HmacSha1 = Hmac<Sha1>;

/// Builds the string Twilio signs: `url` then the sorted parameters.
pub fn signed_string(url: &str, params: &[(String, String)]) -> String {
    let mut sorted: Vec<(&str, &str)> = params
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    sorted.sort_unstable();
    sorted.dedup();
    let extra: usize = sorted.iter().map(|(k, v)| k.len() + v.len()).sum();
    let mut out = String::with_capacity(url.len() + extra);
    out.push_str(url);
    for (k, v) in sorted {
        out.push_str(k);
        out.push_str(v);
    }
    out
}

/// The base64 signature Twilio would send for `url` and `params`.
pub fn compute(token: &Secret, url: &str, params: &[(String, String)]) -> String {
    let mut mac =
        HmacSha1::new_from_slice(token.expose().as_bytes()).expect("HMAC accepts keys of any size");
    mac.update(signed_string(url, params).as_bytes());
    STANDARD.encode(mac.finalize().into_bytes())
}

/// URL variants Twilio may have signed: as given, without the port, with the default port.
pub fn url_variants(url: &str) -> Vec<String> {
    let mut out = vec![url.to_owned()];
    let Some((scheme, rest)) = url.split_once("://") else {
        return out;
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    // A userinfo part never appears in Twilio URLs; treat the last ':' as the port separator
    // unless it sits inside an IPv6 literal.
    let host_port_split = authority
        .rfind(':')
        .filter(|&i| !authority[i..].contains(']'));
    match host_port_split {
        Some(i) => out.push(format!("{scheme}://{}{tail}", &authority[..i])),
        None => {
            let ports: &[&str] = match scheme {
                "https" => &["443"],
                "wss" => &["443", "80"],
                _ => &["80"],
            };
            for port in ports {
                out.push(format!("{scheme}://{authority}:{port}{tail}"));
            }
        }
    }
    out
}

/// Checks `signature` (the header value) for `url` and `params`, in constant time per
/// candidate, accepting the port variants.
pub fn validate(token: &Secret, url: &str, params: &[(String, String)], signature: &str) -> bool {
    let Ok(expected) = STANDARD.decode(signature.trim()) else {
        return false;
    };
    if expected.len() != 20 {
        return false;
    }
    let base =
        HmacSha1::new_from_slice(token.expose().as_bytes()).expect("HMAC accepts keys of any size");
    let mut ok = false;
    for candidate in url_variants(url) {
        let mut mac = base.clone();
        mac.update(signed_string(&candidate, params).as_bytes());
        // No early return: every variant costs the same whatever matched.
        ok |= mac.verify_slice(&expected).is_ok();
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> Secret {
        Secret::new("12345")
    }

    fn params() -> Vec<(String, String)> {
        [
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+14158675309"),
            ("Digits", "1234"),
            ("From", "+14158675309"),
            ("To", "+18005551212"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    const URL: &str = "https://mycompany.com/myapp.php?foo=1&bar=2";

    #[test]
    fn vector_1_signed_string_and_signature() {
        // Params in a different order than sorted, to prove sorting.
        let mut p = params();
        p.reverse();
        assert_eq!(
            signed_string(URL, &p),
            "https://mycompany.com/myapp.php?foo=1&bar=2CallSidCA1234567890ABCDECaller+14158675309Digits1234From+14158675309To+18005551212"
        );
        assert_eq!(compute(&token(), URL, &p), "RSOYDt4T1cUTdK1PDd93/VVr8B8=");
        assert!(validate(&token(), URL, &p, "RSOYDt4T1cUTdK1PDd93/VVr8B8="));
    }

    #[test]
    fn vectors_2_to_4_ports() {
        let p = params();
        assert_eq!(
            compute(
                &token(),
                "https://mycompany.com:443/myapp.php?foo=1&bar=2",
                &p
            ),
            "kvajT1Ptam85bY51eRf/AJRuM3w="
        );
        assert_eq!(
            compute(
                &token(),
                "http://mycompany.com:80/myapp.php?foo=1&bar=2",
                &p
            ),
            "0ZXoZLH/DfblKGATFgpif+LLRf4="
        );
        assert_eq!(
            compute(
                &token(),
                "http://mycompany.com:1234/myapp.php?foo=1&bar=2",
                &p
            ),
            "Zmvh+3yNM1Phv2jhDCwEM3q5ebU="
        );
    }

    #[test]
    fn port_variants_are_accepted_both_ways() {
        let p = params();
        // Signed without port (vector 1), presented with :443 and with :1234.
        for url in [
            URL,
            "https://mycompany.com:443/myapp.php?foo=1&bar=2",
            "https://mycompany.com:1234/myapp.php?foo=1&bar=2",
        ] {
            assert!(
                validate(&token(), url, &p, "RSOYDt4T1cUTdK1PDd93/VVr8B8="),
                "{url}"
            );
        }
        // Signed with :443 (vector 2), presented without port.
        assert!(validate(&token(), URL, &p, "kvajT1Ptam85bY51eRf/AJRuM3w="));
    }

    #[test]
    fn vector_5_repeated_params() {
        let p: Vec<(String, String)> = [
            ("Sid", "CA123"),
            ("SidAccount", "AC123"),
            ("Digits", "5678"),
            ("Digits", "1234"),
            ("Digits", "1234"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(
            signed_string(URL, &p),
            format!("{URL}Digits1234Digits5678SidCA123SidAccountAC123")
        );
        assert_eq!(compute(&token(), URL, &p), "IK+Dwps556ElfBT0I3Rgjkr1wJU=");
    }

    #[test]
    fn vectors_7_8_10_url_only() {
        let body_hash = "0a1ff7634d9ab3b95db5c9a2dfe9416e41502b283a80c7cf19632632f96e6620";
        assert_eq!(
            compute(&token(), &format!("{URL}&bodySHA256={body_hash}"), &[]),
            "a9nBmqA0ju/hNViExpshrM61xv4="
        );
        assert_eq!(
            compute(
                &token(),
                &format!("https://mycompany.com/myapp.php?bodySHA256={body_hash}"),
                &[]
            ),
            "y77kIzt2vzLz71DgmJGsen2scGs="
        );
        let empty_hash = "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";
        // Vector 10 was signed with :443; the SDK accepts it for the port-less URL.
        assert!(validate(
            &token(),
            &format!("{URL}&bodySHA256={empty_hash}"),
            &[],
            "Ldidvp12m26NI7eqEvxnEpkd9Hc="
        ));
    }

    #[test]
    fn websocket_vectors() {
        let url = "wss://example.com/api/twilio/media-stream/call_123";
        assert_eq!(compute(&token(), url, &[]), "XAPq86PGALYnAMolKwWYvJ8G1BM=");
        assert!(validate(&token(), url, &[], "XAPq86PGALYnAMolKwWYvJ8G1BM="));
        assert!(validate(&token(), url, &[], "AI0ra75JB8ahjGxbprGjL+MSFYs="));
    }

    #[test]
    fn wrong_missing_or_mismatched_signatures_fail() {
        let p = params();
        assert!(!validate(&token(), URL, &p, "RSOYDt4T1cUTdK1PDd93/VVr8B8"));
        assert!(!validate(&token(), URL, &p, ""));
        assert!(!validate(&token(), URL, &p, "not base64!"));
        assert!(!validate(&token(), URL, &p, "kvajT1Ptam85bY51eRf/AJRuM3x="));
        assert!(!validate(
            &Secret::new("other"),
            URL,
            &p,
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        ));
        let sig = compute(&token(), "https://x.com/a?test=param", &[]);
        assert!(!validate(
            &token(),
            "https://x.com/a?test=param2",
            &[],
            &sig
        ));
        let mut tampered = p.clone();
        tampered[2].1 = "9999".to_owned();
        assert!(!validate(
            &token(),
            URL,
            &tampered,
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        ));
    }
}

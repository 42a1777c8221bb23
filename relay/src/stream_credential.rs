//! Stream credentials: proof that a Media Stream was opened by the Twilio call the relay
//! answered, not by whoever holds a copy of an upgrade request.
//!
//! Twilio signs a stream upgrade over its URL only, so `X-Twilio-Signature` is the same
//! for every connection to a path and works as a bearer token that never expires. Every
//! TwiML answer that opens a stream therefore carries a fresh credential as
//! `<Parameter name="credential">`; Twilio hands it back in the `start` message's
//! `customParameters`, where the relay checks it before it attaches the call or dials
//! the model. Control consumes it atomically (any relay's second use is refused);
//! standalone streams are consumed in [`UsedCredentials`], per relay.
//!
//! Wire form (`docs/protocols.md`, "Stream credentials"): base64url without padding of
//! `version (1) | segment (1) | expires_at_ms (8, big-endian) | nonce (16) | mac (32)`,
//! where `mac` = HMAC-SHA256(key, the 26 bytes before it ‖ call id [‖ 0x00 ‖ predecessor]).
//! The call id is not carried (it is the stream's path), only bound: a credential minted
//! for one call fails its MAC on any other. A resumed stream's credential is also bound to
//! the stream it follows (the credential id control named in its Resume answer), carried
//! beside it as `<Parameter name="takesOver">`: control lets that stream attach only in
//! place of the call's current stream, so a credential from a replayed action request of
//! an earlier stream opens nothing (docs/resilience.md, "The rule"). Call ids never hold a
//! 0x00 byte, so the two MAC inputs cannot be confused.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use tokio::sync::{mpsc, oneshot};

use crate::call_id::CallId;
use crate::config::Config;

type HmacSha256 = Hmac<Sha256>;

/// Name of the `<Parameter>` (and `customParameters` key) carrying the credential.
pub const PARAMETER: &str = "credential";
/// Name of the `<Parameter>` carrying the id of the stream a resumed stream follows.
pub const TAKES_OVER_PARAMETER: &str = "takesOver";
/// Domain separation for a key derived from the Twilio auth token.
const DERIVATION_LABEL: &[u8] = b"callbridge stream credential v1";
/// Shortest `RELAY_STREAM_SECRET` accepted (bytes).
pub const MIN_SECRET_LEN: usize = 32;

const VERSION: u8 = 1;
const NONCE_LEN: usize = 16;
const MAC_LEN: usize = 32;
/// version + segment + expiry + nonce: what the MAC covers besides the call id.
const HEADER_LEN: usize = 1 + 1 + 8 + NONCE_LEN;
const RAW_LEN: usize = HEADER_LEN + MAC_LEN;
/// Longest text accepted before decoding (the encoding of [`RAW_LEN`] bytes is 78).
const MAX_TEXT_LEN: usize = 128;
/// A credential id: the nonce in lowercase hex.
const ID_LEN: usize = 2 * NONCE_LEN;

/// Which TwiML answer minted a credential: the first stream of a control-backed call
/// (voice webhook), a later one (`/after` answering Resume: a drain hand-off), or a
/// standalone stream. Part of the MAC, so a standalone credential opens no stored call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    /// Minted by the voice webhook.
    First,
    /// Minted by `/after` when control answers Resume.
    Resume,
    /// Minted for `/media-stream-simple`.
    Standalone,
}

impl Segment {
    fn byte(self) -> u8 {
        match self {
            Self::First => 1,
            Self::Resume => 2,
            Self::Standalone => 3,
        }
    }

    fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::First),
            2 => Some(Self::Resume),
            3 => Some(Self::Standalone),
            _ => None,
        }
    }
}

/// Why a credential was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// `start` carried no credential.
    #[error("no stream credential in start")]
    Missing,
    /// Not a credential of this relay fleet, or not for this call or route (bad encoding,
    /// length, version or MAC).
    #[error("stream credential invalid")]
    Invalid,
    /// Past its expiry.
    #[error("stream credential expired")]
    Expired,
}

/// A credential that passed its checks: what is left is to consume it once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The nonce as 32 lowercase hex digits: the credential's id for single use.
    pub id: String,
    /// When it expires (ms since the Unix epoch); a record of its use may go then.
    pub expires_at_ms: i64,
    /// Which answer minted it.
    pub segment: Segment,
    /// For a resumed stream: the id of the stream it follows (bound by the MAC).
    pub takes_over: Option<String>,
}

/// A freshly minted credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Minted {
    /// The `<Parameter name="credential">` value.
    pub text: String,
    /// Its id (what [`Verified::id`] will say), for the action URL.
    pub id: String,
}

/// Whether `s` has the form of a credential id (32 lowercase hex digits).
pub fn is_id(s: &str) -> bool {
    s.len() == ID_LEN && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn hex_id(nonce: &[u8]) -> String {
    nonce.iter().map(|b| format!("{b:02x}")).collect()
}

/// The key every relay of a deployment shares. `Debug` prints no key material.
#[derive(Clone)]
pub struct StreamKey([u8; 32]);

impl std::fmt::Debug for StreamKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StreamKey([redacted])")
    }
}

impl StreamKey {
    /// From `RELAY_STREAM_SECRET` (at least [`MIN_SECRET_LEN`] bytes; checked by the
    /// config). Hashed, so any length becomes a 32-byte key.
    pub fn from_secret(secret: &[u8]) -> Self {
        Self::derive(secret, b"callbridge stream secret v1")
    }

    /// Derived from the Twilio auth token with domain separation, so the key is not the
    /// token itself (nor usable as a Twilio signature key).
    pub fn from_auth_token(token: &[u8]) -> Self {
        Self::derive(token, DERIVATION_LABEL)
    }

    /// A random key for this process only (insecure local runs without any secret):
    /// credentials then hold on this relay only.
    pub fn random() -> Self {
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        Self(key)
    }

    fn derive(secret: &[u8], label: &[u8]) -> Self {
        let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any size");
        mac.update(label);
        Self(mac.finalize().into_bytes().into())
    }

    fn mac(&self, header: &[u8], call_id: Option<&CallId>, after: Option<&str>) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes keys of any size");
        mac.update(header);
        mac.update(call_id.map_or("", CallId::as_str).as_bytes());
        if let Some(after) = after {
            mac.update(&[0]);
            mac.update(after.as_bytes());
        }
        mac
    }

    /// A fresh credential for `call_id` (None: standalone) and `segment`, valid for `ttl`
    /// from `now_ms`.
    pub fn mint(
        &self,
        call_id: Option<&CallId>,
        segment: Segment,
        now_ms: i64,
        ttl: Duration,
    ) -> String {
        self.mint_after(call_id, segment, None, now_ms, ttl).text
    }

    /// Like [`Self::mint`], for a stream that follows stream `after` (a resumed stream;
    /// `None` for any other), with the new credential's id.
    pub fn mint_after(
        &self,
        call_id: Option<&CallId>,
        segment: Segment,
        after: Option<&str>,
        now_ms: i64,
        ttl: Duration,
    ) -> Minted {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        Minted {
            text: self.mint_with_nonce(call_id, segment, after, now_ms, ttl, nonce),
            id: hex_id(&nonce),
        }
    }

    fn mint_with_nonce(
        &self,
        call_id: Option<&CallId>,
        segment: Segment,
        after: Option<&str>,
        now_ms: i64,
        ttl: Duration,
        nonce: [u8; NONCE_LEN],
    ) -> String {
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let expires = now_ms.saturating_add(ttl_ms);
        let mut raw = [0u8; RAW_LEN];
        raw[0] = VERSION;
        raw[1] = segment.byte();
        raw[2..10].copy_from_slice(&expires.to_be_bytes());
        raw[10..HEADER_LEN].copy_from_slice(&nonce);
        let tag = self
            .mac(&raw[..HEADER_LEN], call_id, after)
            .finalize()
            .into_bytes();
        raw[HEADER_LEN..].copy_from_slice(&tag);
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// Checks `text` for the stream of `call_id` (None: the standalone route) at `now_ms`:
    /// the MAC first (compared in constant time), then the route, then the expiry.
    pub fn verify(
        &self,
        text: Option<&str>,
        call_id: Option<&CallId>,
        now_ms: i64,
    ) -> Result<Verified, CredentialError> {
        self.verify_after(text, call_id, None, now_ms)
    }

    /// Like [`Self::verify`], for a stream whose `start` also names the stream it follows
    /// (`takesOver`); only a resumed stream's credential can be bound to one.
    pub fn verify_after(
        &self,
        text: Option<&str>,
        call_id: Option<&CallId>,
        after: Option<&str>,
        now_ms: i64,
    ) -> Result<Verified, CredentialError> {
        let text = text
            .filter(|t| !t.is_empty())
            .ok_or(CredentialError::Missing)?;
        if text.len() > MAX_TEXT_LEN || after.is_some_and(|a| !is_id(a)) {
            return Err(CredentialError::Invalid);
        }
        let raw = URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|_| CredentialError::Invalid)?;
        if raw.len() != RAW_LEN || raw[0] != VERSION {
            return Err(CredentialError::Invalid);
        }
        let (header, tag) = raw.split_at(HEADER_LEN);
        self.mac(header, call_id, after)
            .verify_slice(tag)
            .map_err(|_| CredentialError::Invalid)?;
        let segment = Segment::from_byte(header[1]).ok_or(CredentialError::Invalid)?;
        if after.is_some() && segment != Segment::Resume {
            return Err(CredentialError::Invalid);
        }
        // A standalone credential on a call's path, or the reverse. (The MAC already
        // binds the call id; this keeps a standalone credential, minted with no call id,
        // off a stored call's route whatever the id.)
        if (segment == Segment::Standalone) != call_id.is_none() {
            return Err(CredentialError::Invalid);
        }
        let mut expiry = [0u8; 8];
        expiry.copy_from_slice(&header[2..10]);
        let expires_at_ms = i64::from_be_bytes(expiry);
        if now_ms > expires_at_ms {
            return Err(CredentialError::Expired);
        }
        Ok(Verified {
            id: hex_id(&header[10..HEADER_LEN]),
            expires_at_ms,
            segment,
            takes_over: after.map(str::to_owned),
        })
    }
}

/// Credentials of standalone streams already used on this relay, until they expire. The
/// set belongs to one task (the relay takes no locks); a stream asks it once, at `start`.
#[derive(Debug, Clone)]
pub struct UsedCredentials {
    tx: mpsc::Sender<Consume>,
}

/// A request to the task: (credential id, its expiry, now, the answer).
type Consume = (String, i64, i64, oneshot::Sender<bool>);

/// Requests waiting for the task (one per stream start; a burst just waits).
const CONSUME_SLOTS: usize = 64;

impl UsedCredentials {
    /// Starts the task that owns the set (needs a Tokio runtime); it ends with the last
    /// handle.
    pub fn spawn() -> Self {
        let (tx, mut rx) = mpsc::channel::<Consume>(CONSUME_SLOTS);
        tokio::spawn(async move {
            let mut used: HashMap<String, i64> = HashMap::new();
            while let Some((id, expires_at_ms, now_ms, answer)) = rx.recv().await {
                // Expired records go first, so the set holds one expiry window at most.
                used.retain(|_, &mut expires| expires >= now_ms);
                let fresh = match used.entry(id) {
                    Entry::Occupied(_) => false,
                    Entry::Vacant(v) => {
                        v.insert(expires_at_ms);
                        true
                    }
                };
                let _ = answer.send(fresh);
            }
        });
        Self { tx }
    }

    /// Records `cred` as used; `false` if it was already (or the set is gone, which only
    /// happens while the relay stops: refusing is the safe answer).
    pub async fn consume(&self, cred: &Verified, now_ms: i64) -> bool {
        let (answer, rx) = oneshot::channel();
        if self
            .tx
            .send((cred.id.clone(), cred.expires_at_ms, now_ms, answer))
            .await
            .is_err()
        {
            return false;
        }
        rx.await.unwrap_or(false)
    }
}

/// What the relay needs to mint and check credentials; one per process.
#[derive(Debug)]
pub struct StreamCredentials {
    /// The shared key.
    pub key: StreamKey,
    /// How long a minted credential is valid.
    pub ttl: Duration,
    /// Standalone credentials used on this relay.
    pub used: UsedCredentials,
}

impl StreamCredentials {
    /// The key from `RELAY_STREAM_SECRET`, else derived from `TWILIO_AUTH_TOKEN`, else (only
    /// reachable with `RELAY_INSECURE_SKIP_SIGNATURE`, which the config requires then) a
    /// random key with a warning. Needs a Tokio runtime (the used-credential task).
    pub fn from_config(config: &Config) -> Self {
        let key = match (&config.stream_secret, &config.twilio_auth_token) {
            (Some(secret), _) => StreamKey::from_secret(secret.expose().as_bytes()),
            (None, Some(token)) if !token.expose().is_empty() => {
                StreamKey::from_auth_token(token.expose().as_bytes())
            }
            _ => {
                tracing::warn!(
                    "Neither RELAY_STREAM_SECRET nor TWILIO_AUTH_TOKEN is set: stream credentials use a random key of this process, so a call cannot move to another relay (insecure mode only)."
                );
                StreamKey::random()
            }
        };
        Self {
            key,
            ttl: config.stream_credential_ttl(),
            used: UsedCredentials::spawn(),
        }
    }

    /// A fresh credential for a TwiML answer.
    pub fn mint(&self, call_id: Option<&CallId>, segment: Segment) -> String {
        self.key.mint(call_id, segment, now_ms(), self.ttl)
    }

    /// A fresh credential for a TwiML answer that opens a standalone stream, with its id
    /// (the stream's name in its action URL).
    pub fn mint_standalone(&self) -> Minted {
        self.key
            .mint_after(None, Segment::Standalone, None, now_ms(), self.ttl)
    }

    /// A fresh credential for a TwiML answer that opens a stream of a stored call, with its
    /// id; `after` for a resumed stream (the stream control named).
    pub fn mint_after(&self, call_id: &CallId, segment: Segment, after: Option<&str>) -> Minted {
        self.key
            .mint_after(Some(call_id), segment, after, now_ms(), self.ttl)
    }
}

/// Milliseconds since the Unix epoch (credentials expire by the wall clock, which every
/// relay and control replica share).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: i64 = 1_700_000_000_000;
    const TTL: Duration = Duration::from_secs(60);

    fn key() -> StreamKey {
        StreamKey::from_secret(b"0123456789abcdef0123456789abcdef")
    }

    fn id(s: &str) -> CallId {
        CallId::parse(s).expect("valid")
    }

    #[test]
    fn a_minted_credential_verifies_once_for_its_call_until_it_expires() {
        let k = key();
        let c1 = id("call_1");
        let cred = k.mint(Some(&c1), Segment::First, NOW, TTL);
        assert_eq!(cred.len(), 78);
        assert!(
            cred.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        let v = k.verify(Some(&cred), Some(&c1), NOW).expect("valid");
        assert_eq!(v.expires_at_ms, NOW + 60_000);
        assert_eq!(v.segment, Segment::First);
        assert_eq!(v.id.len(), 32);
        // Up to and including its expiry, not after.
        assert!(k.verify(Some(&cred), Some(&c1), NOW + 60_000).is_ok());
        assert_eq!(
            k.verify(Some(&cred), Some(&c1), NOW + 60_001),
            Err(CredentialError::Expired)
        );
        // Another call, the standalone route, another key: not valid.
        assert_eq!(
            k.verify(Some(&cred), Some(&id("call_2")), NOW),
            Err(CredentialError::Invalid)
        );
        assert_eq!(
            k.verify(Some(&cred), None, NOW),
            Err(CredentialError::Invalid)
        );
        let other = StreamKey::from_secret(b"another secret of at least 32 bytes");
        assert_eq!(
            other.verify(Some(&cred), Some(&c1), NOW),
            Err(CredentialError::Invalid)
        );
        // Two mints differ (fresh nonce).
        let again = k.mint(Some(&c1), Segment::Resume, NOW, TTL);
        assert_ne!(again, cred);
        let v2 = k.verify(Some(&again), Some(&c1), NOW).expect("valid");
        assert_ne!(v2.id, v.id);
        assert_eq!(v2.segment, Segment::Resume);
    }

    #[test]
    fn a_resumed_stream_s_credential_holds_only_with_the_stream_it_follows() {
        let k = key();
        let c1 = id("call_1");
        let before = "0123456789abcdef0123456789abcdef";
        let minted = k.mint_after(Some(&c1), Segment::Resume, Some(before), NOW, TTL);
        let v = k
            .verify_after(Some(&minted.text), Some(&c1), Some(before), NOW)
            .expect("valid");
        assert_eq!(
            v.id, minted.id,
            "the id the action URL names is the stream's"
        );
        assert_eq!(v.takes_over.as_deref(), Some(before));
        assert_eq!(v.segment, Segment::Resume);
        // Another predecessor, none, or one on a credential minted without: invalid.
        let other = "fedcba9876543210fedcba9876543210";
        for (after, cred) in [
            (Some(other), &minted.text),
            (None, &minted.text),
            (Some("short"), &minted.text),
        ] {
            assert_eq!(
                k.verify_after(Some(cred), Some(&c1), after, NOW),
                Err(CredentialError::Invalid),
                "{after:?}"
            );
        }
        let unbound = k.mint_after(Some(&c1), Segment::Resume, None, NOW, TTL);
        assert_eq!(
            k.verify_after(Some(&unbound.text), Some(&c1), Some(before), NOW),
            Err(CredentialError::Invalid)
        );
        assert_eq!(
            k.verify(Some(&unbound.text), Some(&c1), NOW).map(|v| v.id),
            Ok(unbound.id)
        );
        // Only a resumed stream follows another: a first stream never does, even when
        // minted (by mistake) with a predecessor.
        let first = k.mint_after(Some(&c1), Segment::First, Some(before), NOW, TTL);
        assert_eq!(
            k.verify_after(Some(&first.text), Some(&c1), Some(before), NOW),
            Err(CredentialError::Invalid)
        );
    }

    #[test]
    fn missing_and_malformed_credentials_are_refused() {
        let k = key();
        let c1 = id("c1");
        assert_eq!(
            k.verify(None, Some(&c1), NOW),
            Err(CredentialError::Missing)
        );
        assert_eq!(
            k.verify(Some(""), Some(&c1), NOW),
            Err(CredentialError::Missing)
        );
        for bad in ["x", "!!!!", &"A".repeat(78), &"A".repeat(4096)] {
            assert_eq!(
                k.verify(Some(bad), Some(&c1), NOW),
                Err(CredentialError::Invalid),
                "{bad}"
            );
        }
        // Another version byte, with a correct MAC: still refused.
        let mut raw = [0u8; RAW_LEN];
        raw[0] = 2;
        raw[1] = Segment::First.byte();
        raw[2..10].copy_from_slice(&(NOW + 1000).to_be_bytes());
        let tag = k
            .mac(&raw[..HEADER_LEN], Some(&c1), None)
            .finalize()
            .into_bytes();
        raw[HEADER_LEN..].copy_from_slice(&tag);
        let text = URL_SAFE_NO_PAD.encode(raw);
        assert_eq!(
            k.verify(Some(&text), Some(&c1), NOW),
            Err(CredentialError::Invalid)
        );
    }

    #[test]
    fn standalone_credentials_are_for_the_standalone_route_only() {
        let k = key();
        let cred = k.mint(None, Segment::Standalone, NOW, TTL);
        let v = k.verify(Some(&cred), None, NOW).expect("valid");
        assert_eq!(v.segment, Segment::Standalone);
        assert_eq!(
            k.verify(Some(&cred), Some(&id("c1")), NOW),
            Err(CredentialError::Invalid)
        );
        // A call's segment minted without a call id is not a standalone credential.
        let odd = k.mint(None, Segment::First, NOW, TTL);
        assert_eq!(
            k.verify(Some(&odd), None, NOW),
            Err(CredentialError::Invalid)
        );
    }

    #[test]
    fn keys_are_derived_apart_and_never_printed() {
        let token = b"twilio-auth-token";
        let derived = StreamKey::from_auth_token(token);
        assert_ne!(derived.0.as_slice(), token.as_slice());
        assert_ne!(derived.0, StreamKey::from_secret(token).0);
        assert_ne!(StreamKey::random().0, StreamKey::random().0);
        assert_eq!(format!("{derived:?}"), "StreamKey([redacted])");
    }

    #[tokio::test]
    async fn used_credentials_are_refused_the_second_time_until_they_expire() {
        let k = key();
        let used = UsedCredentials::spawn();
        let a = k
            .verify(
                Some(&k.mint(None, Segment::Standalone, NOW, TTL)),
                None,
                NOW,
            )
            .expect("valid");
        let b = k
            .verify(
                Some(&k.mint(None, Segment::Standalone, NOW + 30_000, TTL)),
                None,
                NOW + 30_000,
            )
            .expect("valid");
        assert!(used.consume(&a, NOW).await);
        assert!(!used.consume(&a, NOW + 1).await);
        assert!(used.consume(&b, NOW + 30_000).await);
        assert!(
            !used.consume(&b, NOW + 60_001).await,
            "b lives until NOW + 90 s"
        );
        // Once `a` expired its record is gone (a replay of it fails on its expiry first).
        assert!(used.consume(&a, NOW + 60_001).await);
    }

    proptest! {
        /// Any change to any byte of a credential's text is refused (never accepted as
        /// another valid credential, never a panic).
        #[test]
        fn any_tampered_byte_is_refused(
            call in "[A-Za-z0-9_.-]{1,40}",
            pos in 0usize..78,
            replacement in any::<u8>(),
            nonce in any::<[u8; 16]>(),
        ) {
            let k = key();
            let call = id(&call);
            let cred = k.mint_with_nonce(Some(&call), Segment::First, None, NOW, TTL, nonce);
            let mut bytes = cred.clone().into_bytes();
            prop_assume!(bytes[pos] != replacement);
            bytes[pos] = replacement;
            let tampered = String::from_utf8_lossy(&bytes).into_owned();
            prop_assume!(tampered != cred);
            // The last character carries 4 bits of padding-free base64: a change there
            // may decode to the same bytes only if the decoder were lax; it is strict.
            let r = k.verify(Some(&tampered), Some(&call), NOW);
            prop_assert!(r.is_err(), "accepted {tampered:?} (from {cred:?})");
        }

        /// Arbitrary text never verifies and never panics.
        #[test]
        fn arbitrary_text_is_refused(text in ".{0,200}") {
            let r = key().verify(Some(&text), Some(&id("c1")), NOW);
            prop_assert!(r.is_err());
        }
    }
}

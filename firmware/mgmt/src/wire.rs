//! The binary protocol's messages, framing and request signatures (shared by the device's
//! [`Session`](crate::Session) and the `keelctl` client).

use crate::{FunctionSlotInfo, FunctionSpec, PushReport, Snapshot};
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What a management client sends first (the HTTP endpoint starts with `GET ` instead).
pub const MAGIC: [u8; 4] = *b"KMG1";
/// Protocol version in [`Hello`].
pub const PROTOCOL_VERSION: u16 = 1;
/// Largest frame payload either side accepts: a 2 MiB bundle plus the envelope.
pub const MAX_FRAME: usize = MAX_BUNDLE + 4096;
/// Largest bundle a push carries.
pub const MAX_BUNDLE: usize = 2 * 1024 * 1024;
/// Domain separation label in front of every signed request.
pub const DOMAIN: &[u8] = b"keel/v1/mgmt-request";
/// Length of a challenge.
pub const CHALLENGE_LEN: usize = 32;

/// A byte string, encoded as postcard bytes (length + bytes) and decoded with one copy.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Bytes(pub Vec<u8>);

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bytes({} bytes)", self.0.len())
    }
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

struct BytesVisitor;

impl<'de> serde::de::Visitor<'de> for BytesVisitor {
    type Value = Vec<u8>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a byte string")
    }
    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
        Ok(v.to_vec())
    }
    fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
        Ok(v)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
        let mut v = Vec::new();
        while let Some(b) = seq.next_element::<u8>()? {
            v.push(b);
        }
        Ok(v)
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_bytes(BytesVisitor).map(Bytes)
    }
}

/// A 64-byte Ed25519 signature (encoded as postcard bytes of exactly 64).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Sig(pub [u8; 64]);

impl fmt::Debug for Sig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sig(..)")
    }
}

impl Serialize for Sig {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Sig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = d.deserialize_bytes(BytesVisitor)?;
        let a: [u8; 64] = v
            .as_slice()
            .try_into()
            .map_err(|_| serde::de::Error::invalid_length(v.len(), &"64 bytes"))?;
        Ok(Sig(a))
    }
}

/// The device's first frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`].
    pub protocol: u16,
    /// Who the device is (`Keel 0.1.0 (git ...) on qemu-virt`).
    pub device: String,
    /// What the first request must be signed over.
    pub challenge: [u8; CHALLENGE_LEN],
}

/// What a client asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// A [`Snapshot`].
    Status,
    /// Verify, apply and persist this configuration bundle.
    Push(Bytes),
    /// Reboot once the reply has been sent.
    Reboot,
    /// Create an emulated function on a free slot (appended: an older device refuses it as
    /// malformed).
    CreateFunction(FunctionSpec),
    /// Remove the emulated function of a slot.
    RemoveFunction(u16),
}

/// One client frame: a request and its signature over [`signed_message`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRequest {
    /// The request.
    pub request: Request,
    /// Ed25519 signature by the authorized key.
    pub signature: Sig,
}

/// Why a request was not executed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The signature does not verify over the current challenge with the authorized key
    /// (replayed, stale, tampered or signed with another key).
    BadSignature,
    /// The frame is not a signed request.
    Malformed,
    /// The frame's length is zero or above [`MAX_FRAME`].
    TooLarge,
}

/// The device's answer to one request frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// The device's state.
    Status(alloc::boxed::Box<Snapshot>),
    /// The bundle was applied.
    Pushed(PushReport),
    /// The bundle was refused; the configuration in force is unchanged.
    PushRefused(String),
    /// The device reboots once this reply is sent.
    Rebooting,
    /// Nothing was executed.
    Error {
        /// What kind of failure.
        code: ErrorCode,
        /// For the operator.
        message: String,
        /// Whether the device closes the connection after this reply.
        closing: bool,
    },
    /// The function was created; the slot as it is now.
    FunctionCreated(FunctionSlotInfo),
    /// The function was removed; the slot as it is now.
    FunctionRemoved(FunctionSlotInfo),
    /// The function request was refused; nothing changed.
    FunctionRefused(String),
}

/// A response frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// What the next request must be signed over (every response carries a fresh one).
    pub challenge: [u8; CHALLENGE_LEN],
    /// The answer.
    pub reply: Reply,
}

/// Zero bytes that encode the fields appended to [`crate::Snapshot`] since protocol version 1
/// was first released, at their "nothing" (the most [`decode_response`] adds): `remotes`,
/// `qos_groups`, `qos_namespaces`, `qos_controllers` (empty lists, 1 byte each) and
/// `resources` (18 integers at 0, 1 byte each), then `cores` (an empty list, 1 byte),
/// `socket_buffer_bytes` (0, 1 byte), `function_slots` and `qos_domains` (empty lists, 1 byte
/// each), then `nic` (2 integers at 0, 1 byte each), then `drives` and `remote_queues`
/// (empty lists, 1 byte each).
pub const APPENDED_FIELDS: usize = 4 + 18 + 1 + 1 + 1 + 1 + 2 + 2;

/// Decodes a response frame's payload, also from a device older than this code: its
/// snapshot lacks the fields appended since (see [`crate::Snapshot`]), so a payload that
/// ends early is decoded again with up to [`APPENDED_FIELDS`] zero bytes added, which read
/// as those fields' "nothing" (empty lists).
pub fn decode_response(payload: &[u8]) -> Result<Response, postcard::Error> {
    let first = postcard::from_bytes::<Response>(payload);
    if !matches!(first, Err(postcard::Error::DeserializeUnexpectedEnd)) {
        return first;
    }
    let mut padded = Vec::with_capacity(payload.len() + APPENDED_FIELDS);
    padded.extend_from_slice(payload);
    padded.resize(payload.len() + APPENDED_FIELDS, 0);
    for extra in 1..=APPENDED_FIELDS {
        match postcard::from_bytes::<Response>(&padded[..payload.len() + extra]) {
            Err(postcard::Error::DeserializeUnexpectedEnd) => continue,
            other => return other,
        }
    }
    first
}

/// The bytes a request signature covers: [`DOMAIN`] ‖ challenge ‖ postcard(request).
pub fn signed_message(challenge: &[u8; CHALLENGE_LEN], request_bytes: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + CHALLENGE_LEN + request_bytes.len());
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(challenge);
    m.extend_from_slice(request_bytes);
    m
}

/// A length-prefixed frame (u32 little-endian length, then the payload).
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(4 + payload.len());
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    f.extend_from_slice(payload);
    f
}

/// Encodes a message as a frame.
pub fn encode_frame<T: Serialize>(msg: &T) -> Vec<u8> {
    // Serializing these types into a Vec cannot fail (no maps, no unknown lengths).
    frame(&postcard::to_allocvec(msg).unwrap_or_default())
}

/// Checks a frame header; returns the payload length.
pub fn frame_len(header: [u8; 4]) -> Result<usize, ErrorCode> {
    let n = u32::from_le_bytes(header) as usize;
    if n == 0 || n > MAX_FRAME {
        Err(ErrorCode::TooLarge)
    } else {
        Ok(n)
    }
}

/// Signs `request` over `challenge` with `key`; returns the whole frame to send.
pub fn sign_request(
    key: &SigningKey,
    challenge: &[u8; CHALLENGE_LEN],
    request: &Request,
) -> Vec<u8> {
    let req = postcard::to_allocvec(request).unwrap_or_default();
    let sig = key.sign(&signed_message(challenge, &req));
    let mut payload = req;
    // The signature field: postcard bytes = varint length 64 (one byte) + the 64 bytes.
    payload.push(64);
    payload.extend_from_slice(&sig.to_bytes());
    frame(&payload)
}

/// Splits and verifies a request frame's payload against `key` and `challenge` (strict
/// Ed25519 verification). The request is decoded before it is verified (postcard decoding of
/// a bounded buffer is safe) but nothing acts on it unless it verifies.
pub fn open_request(
    payload: &[u8],
    key: &[u8; 32],
    challenge: &[u8; CHALLENGE_LEN],
) -> Result<Request, (ErrorCode, &'static str)> {
    let malformed = (ErrorCode::Malformed, "malformed request frame");
    let (request, rest) = postcard::take_from_bytes::<Request>(payload).map_err(|_| malformed)?;
    let request_bytes = &payload[..payload.len() - rest.len()];
    let (sig, rest) = postcard::take_from_bytes::<Sig>(rest).map_err(|_| malformed)?;
    if !rest.is_empty() {
        return Err(malformed);
    }
    let bad = (
        ErrorCode::BadSignature,
        "signature does not verify over the current challenge with the authorized key \
         (replayed or stale request, or signed with another key)",
    );
    let vk = VerifyingKey::from_bytes(key).map_err(|_| bad)?;
    vk.verify_strict(
        &signed_message(challenge, request_bytes),
        &Signature::from_bytes(&sig.0),
    )
    .map_err(|_| bad)?;
    Ok(request)
}

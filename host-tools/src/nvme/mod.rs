//! NVMe/TCP initiator with blocking calls, built on the sans-IO
//! [`keel_nvmf_tcp::HostConnection`] and the command set of [`keel_nvme`].
//!
//! - [`conn`]: one TCP connection = one queue (ICReq/ICResp, NVMe/TCP 1.0 §3.3), driven with
//!   `poll(2)`; every wait is bounded.
//! - [`ctrl`]: a controller association: admin queue Connect (NVMe-oF 1.1 §3.3), Property
//!   Get CAP / Set CC.EN / wait CSTS.RDY (NVMe base 2.0 §3.5.2), Identify, Get Log Page
//!   (discovery log 70h, NVMe-oF 1.1 §5.3), Keep Alive from a background thread (§3.9), I/O
//!   queues on their own connections with many commands in flight, shutdown and Disconnect.
//! - [`device`]: an I/O queue and a namespace as a [`crate::blockdev::BlockDevice`] (what
//!   `read`, `write`, `verify` and `bench` run on, shared with `keelctl host`).
//! - [`pattern`]: deterministic verify patterns, PRNG, size parsing.
//! - [`cli`]: the `keelctl nvme` subcommands.

pub mod cli;
pub mod conn;
pub mod ctrl;
pub mod device;
pub mod error;
pub mod pattern;

pub use conn::Connection;
pub use ctrl::{Controller, IoKind, IoQueue, Params};
pub use error::NvmeError;

/// The NQN of the firmware's default subsystem.
pub const DEFAULT_SUBNQN: &str = "nqn.2026-11.dev.keel:default";

/// 128-bit hash of `data` (two FNV-1a lanes, finalised with SplitMix64).
fn hash128(data: &[u8]) -> [u8; 16] {
    let mut a: u64 = 0xcbf2_9ce4_8422_2325;
    let mut b: u64 = 0x8422_2325_cbf2_9ce4;
    for &x in data {
        a = (a ^ x as u64).wrapping_mul(0x0000_0100_0000_01B3);
        b = (b ^ x as u64 ^ 0x5A).wrapping_mul(0x0000_0100_0000_01B3);
    }
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&pattern::splitmix64(a).to_be_bytes());
    out[8..].copy_from_slice(&pattern::splitmix64(b ^ a.rotate_left(17)).to_be_bytes());
    out
}

/// A name-based UUID (RFC 9562 version 8) from `data`.
pub fn uuid_from(data: &[u8]) -> [u8; 16] {
    let mut u = hash128(data);
    u[6] = (u[6] & 0x0F) | 0x80;
    u[8] = (u[8] & 0x3F) | 0x80;
    u
}

/// Formats a UUID as 8-4-4-4-12 lower-case hex.
pub fn format_uuid(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// Parses 8-4-4-4-12 hex (or 32 plain hex digits).
pub fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let hex: String = s.chars().filter(|&c| c != '-').collect();
    if hex.len() != 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let mut u = [0u8; 16];
    for (i, b) in u.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(u)
}

/// The host identity used when none is given: a UUID derived from this machine's
/// `/etc/machine-id` (else its host name), stable across runs, as
/// `nqn.2014-08.org.nvmexpress:uuid:<uuid>` and the same UUID as host ID.
pub fn default_host_identity() -> (String, [u8; 16]) {
    let source = [
        "/etc/machine-id",
        "/var/lib/dbus/machine-id",
        "/etc/hostname",
    ]
    .iter()
    .find_map(|p| {
        std::fs::read_to_string(p)
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    })
    .unwrap_or_else(|| "keelctl".into());
    let u = uuid_from(format!("keelctl host {source}").as_bytes());
    (
        format!("nqn.2014-08.org.nvmexpress:uuid:{}", format_uuid(&u)),
        u,
    )
}

/// The host ID for a host NQN: its UUID if it is a UUID NQN, else a UUID derived from it.
pub fn hostid_for(hostnqn: &str) -> [u8; 16] {
    hostnqn
        .rsplit_once(":uuid:")
        .and_then(|(_, u)| parse_uuid(u))
        .unwrap_or_else(|| uuid_from(hostnqn.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_identity_is_stable_and_well_formed() {
        let (a, ida) = default_host_identity();
        let (b, idb) = default_host_identity();
        assert_eq!((a.clone(), ida), (b, idb));
        assert!(a.starts_with("nqn.2014-08.org.nvmexpress:uuid:"), "{a}");
        assert!(a.len() <= keel_nvme::NQN_MAX_LEN);
        assert_eq!(hostid_for(&a), ida);
        let u = parse_uuid(a.rsplit_once(':').unwrap().1).unwrap();
        assert_eq!(u[6] >> 4, 8, "version 8");
        assert_eq!(u[8] >> 6, 2, "RFC variant");
    }

    #[test]
    fn uuids() {
        let u = uuid_from(b"x");
        assert_eq!(parse_uuid(&format_uuid(&u)), Some(u));
        assert_ne!(uuid_from(b"x"), uuid_from(b"y"));
        assert_eq!(
            parse_uuid("00112233-4455-6677-8899-aabbccddeeff").unwrap()[15],
            0xff
        );
        assert_eq!(parse_uuid("0011"), None);
        assert_eq!(
            hostid_for("nqn.2014-08.org.nvmexpress:uuid:00112233-4455-6677-8899-aabbccddeeff")[0],
            0x00
        );
        assert_eq!(hostid_for("nqn.x"), hostid_for("nqn.x"));
    }
}

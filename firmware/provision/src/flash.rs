//! The flash layout of QEMU `virt`'s 64 MiB pflash bank 0: two firmware slots, the health
//! area and a configuration area kept as two copies (see the crate documentation for the byte
//! map).
//!
//! A configuration copy is valid when its magic, version, length and CRC32C are right. The
//! reader takes the valid copy with the highest sequence number ([`choose_config`]); the
//! writer always overwrites the *other* copy ([`next_config_write`]), so a write torn by a
//! power cut spoils at most the copy being written and the previous configuration stays.
//!
//! The health area keeps what the SMART / Health log reports across power cycles (power
//! cycles, unsafe shutdowns, power-on time; see [`HealthRecord`]) as a log of 64-byte records
//! appended in one of its two sectors: a record is programmed into erased flash, never
//! rewritten in place, and the other sector is erased only when the active one is full, so a
//! torn write loses at most the record being written.

use alloc::vec::Vec;
use keel_crc32c::Crc32c;

/// CRC32C over a copy's header bytes followed by its payload.
fn crc_of(header: &[u8], payload: &[u8]) -> u32 {
    let mut c = Crc32c::new();
    c.update(header);
    c.update(payload);
    c.finish()
}

/// Size of the flash bank.
pub const FLASH_SIZE: usize = 64 << 20;
/// Erase granule of QEMU's `cfi.pflash01` on `virt` (256 KiB sectors); every region below is
/// aligned to it.
pub const SECTOR_SIZE: usize = 256 << 10;
/// Size of one firmware slot, its header sector included.
pub const SLOT_SIZE: usize = 0x1EC_0000;
/// Largest raw image a slot holds (the slot less its header sector).
pub const SLOT_PAYLOAD_MAX: usize = SLOT_SIZE - SECTOR_SIZE;
/// Start of the health area (two sectors, after slot B).
pub const HEALTH_OFFSET: usize = 2 * SLOT_SIZE;
/// Size of the health area.
pub const HEALTH_SIZE: usize = 2 * SECTOR_SIZE;
/// Size of one health record.
pub const HEALTH_RECORD_LEN: usize = 64;
/// Magic of a health record.
pub const HEALTH_MAGIC: [u8; 4] = *b"KHLT";
/// Format version of a health record.
pub const HEALTH_VERSION: u16 = 1;
/// Start of the configuration area.
pub const CONFIG_OFFSET: usize = HEALTH_OFFSET + HEALTH_SIZE;
/// Size of one configuration copy.
pub const CONFIG_COPY_SIZE: usize = 1 << 20;
/// Bytes of a configuration copy's header.
pub const CONFIG_HEADER_LEN: usize = 32;
/// Largest payload (bundle) a configuration copy holds.
pub const CONFIG_PAYLOAD_MAX: usize = CONFIG_COPY_SIZE - CONFIG_HEADER_LEN;
/// Magic of a configuration copy.
pub const CONFIG_MAGIC: [u8; 4] = *b"KCFG";
/// Format version of a configuration copy's header.
pub const CONFIG_VERSION: u16 = 1;

const _: () = assert!(CONFIG_OFFSET + 2 * CONFIG_COPY_SIZE == FLASH_SIZE);
const _: () = assert!(SECTOR_SIZE.is_multiple_of(HEALTH_RECORD_LEN));
const _: () =
    assert!(SLOT_SIZE.is_multiple_of(SECTOR_SIZE) && CONFIG_COPY_SIZE.is_multiple_of(SECTOR_SIZE));

/// A firmware slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// Slot A: starts at flash offset 0, where the CPU starts executing on a flash boot.
    A,
    /// Slot B: the update slot.
    B,
}

impl Slot {
    /// Flash offset of the slot, which is where its raw image starts.
    pub const fn base(self) -> usize {
        match self {
            Slot::A => 0,
            Slot::B => SLOT_SIZE,
        }
    }

    /// Flash offset of the slot's image header: the slot's last sector.
    pub const fn header_offset(self) -> usize {
        self.base() + SLOT_PAYLOAD_MAX
    }

    /// The slot's name.
    pub const fn name(self) -> &'static str {
        match self {
            Slot::A => "A",
            Slot::B => "B",
        }
    }
}

/// A configuration copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigCopy {
    /// The first copy.
    A,
    /// The second copy.
    B,
}

impl ConfigCopy {
    /// Flash offset of the copy.
    pub const fn offset(self) -> usize {
        match self {
            ConfigCopy::A => CONFIG_OFFSET,
            ConfigCopy::B => CONFIG_OFFSET + CONFIG_COPY_SIZE,
        }
    }

    /// The copy's name.
    pub const fn name(self) -> &'static str {
        match self {
            ConfigCopy::A => "A",
            ConfigCopy::B => "B",
        }
    }
}

/// Why a payload cannot be stored as a configuration copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayloadTooLarge {
    /// Its length.
    pub len: usize,
}

impl core::fmt::Display for PayloadTooLarge {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "a configuration of {} bytes does not fit a {CONFIG_PAYLOAD_MAX}-byte configuration copy",
            self.len
        )
    }
}

/// Encodes a configuration copy (header and payload; the rest of the copy's region is left
/// as it is, erased flash reading 0xFF).
pub fn encode_config_copy(sequence: u64, payload: &[u8]) -> Result<Vec<u8>, PayloadTooLarge> {
    if payload.len() > CONFIG_PAYLOAD_MAX {
        return Err(PayloadTooLarge { len: payload.len() });
    }
    let mut out = Vec::with_capacity(CONFIG_HEADER_LEN + payload.len());
    out.extend_from_slice(&CONFIG_MAGIC);
    out.extend_from_slice(&CONFIG_VERSION.to_le_bytes());
    out.extend_from_slice(&(CONFIG_HEADER_LEN as u16).to_le_bytes());
    out.extend_from_slice(&sequence.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0; 8]);
    let crc = crc_of(&out, payload);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// A valid configuration copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigEntry<'a> {
    /// Its sequence number.
    pub sequence: u64,
    /// Its payload (a bundle).
    pub payload: &'a [u8],
}

/// Reads a configuration copy's region (or a prefix of it holding at least the copy):
/// `None` when erased, torn or corrupt.
pub fn parse_config_copy(region: &[u8]) -> Option<ConfigEntry<'_>> {
    let h = region.get(..CONFIG_HEADER_LEN)?;
    let u16_at = |o: usize| u16::from_le_bytes([h[o], h[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    if h[..4] != CONFIG_MAGIC
        || u16_at(4) != CONFIG_VERSION
        || usize::from(u16_at(6)) != CONFIG_HEADER_LEN
        || h[20..28] != [0; 8]
    {
        return None;
    }
    let len = u32_at(16) as usize;
    if len > CONFIG_PAYLOAD_MAX {
        return None;
    }
    let payload = region.get(CONFIG_HEADER_LEN..CONFIG_HEADER_LEN + len)?;
    let crc = crc_of(&h[..28], payload);
    if crc != u32_at(28) {
        return None;
    }
    let mut seq = [0; 8];
    seq.copy_from_slice(&h[8..16]);
    Some(ConfigEntry {
        sequence: u64::from_le_bytes(seq),
        payload,
    })
}

/// The copy in force: the valid copy with the highest sequence number (copy A on a tie, which
/// [`next_config_write`] never produces).
pub fn chosen_config<'a>(a: &'a [u8], b: &'a [u8]) -> Option<(ConfigCopy, ConfigEntry<'a>)> {
    match (parse_config_copy(a), parse_config_copy(b)) {
        (Some(ea), Some(eb)) if eb.sequence > ea.sequence => Some((ConfigCopy::B, eb)),
        (Some(ea), _) => Some((ConfigCopy::A, ea)),
        (None, Some(eb)) => Some((ConfigCopy::B, eb)),
        (None, None) => None,
    }
}

/// The payload of the configuration in force (see [`chosen_config`]), given the regions of
/// copy A and copy B.
pub fn choose_config<'a>(a: &'a [u8], b: &'a [u8]) -> Option<&'a [u8]> {
    chosen_config(a, b).map(|(_, e)| e.payload)
}

/// Where and with which sequence number the next configuration goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigWrite {
    /// The copy to overwrite: never the one in force.
    pub copy: ConfigCopy,
    /// The sequence number to write: one more than the highest valid one (1 on empty flash).
    pub sequence: u64,
}

/// Which copy the next configuration overwrites, given the regions of copy A and copy B: an
/// invalid copy if there is one, else the older; never the copy in force.
pub fn next_config_write(a: &[u8], b: &[u8]) -> ConfigWrite {
    let (ea, eb) = (parse_config_copy(a), parse_config_copy(b));
    let seq = |e: Option<ConfigEntry<'_>>| e.map(|e| e.sequence);
    let newest = seq(ea).max(seq(eb)).unwrap_or(0);
    let sequence = newest.saturating_add(1);
    let copy = match chosen_config(a, b) {
        Some((ConfigCopy::A, _)) => ConfigCopy::B,
        Some((ConfigCopy::B, _)) => ConfigCopy::A,
        None => ConfigCopy::A,
    };
    ConfigWrite { copy, sequence }
}

/// One health record (64 bytes, little endian):
///
/// | offset | size | field |
/// |---:|---:|---|
/// | 0 | 4 | magic `KHLT` |
/// | 4 | 2 | version (1) |
/// | 6 | 2 | length (64) |
/// | 8 | 8 | sequence (one more than the newest record's) |
/// | 16 | 8 | power cycles, this one included |
/// | 24 | 8 | unsafe shutdowns |
/// | 32 | 8 | powered-on seconds |
/// | 40 | 4 | state: 1 running (no clean shutdown yet), 2 shut down cleanly |
/// | 44 | 16 | reserved (0) |
/// | 60 | 4 | CRC32C of bytes 0..60 |
///
/// At boot the firmware reads the newest valid record and appends the next power cycle's
/// ([`HealthRecord::next_boot`]): a newest record still "running" means the previous power
/// cycle ended without a clean shutdown. While running it appends checkpoints of the
/// powered-on time; an orderly reboot appends a "shut down cleanly" record last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HealthRecord {
    /// Sequence number.
    pub sequence: u64,
    /// Power cycles.
    pub power_cycles: u64,
    /// Unsafe shutdowns.
    pub unsafe_shutdowns: u64,
    /// Powered-on seconds.
    pub power_on_secs: u64,
    /// The device shut down cleanly after this record.
    pub clean: bool,
}

const HEALTH_RUNNING: u32 = 1;
const HEALTH_CLEAN: u32 = 2;

impl HealthRecord {
    /// Encodes the record.
    pub fn encode(&self) -> [u8; HEALTH_RECORD_LEN] {
        let mut b = [0u8; HEALTH_RECORD_LEN];
        b[..4].copy_from_slice(&HEALTH_MAGIC);
        b[4..6].copy_from_slice(&HEALTH_VERSION.to_le_bytes());
        b[6..8].copy_from_slice(&(HEALTH_RECORD_LEN as u16).to_le_bytes());
        b[8..16].copy_from_slice(&self.sequence.to_le_bytes());
        b[16..24].copy_from_slice(&self.power_cycles.to_le_bytes());
        b[24..32].copy_from_slice(&self.unsafe_shutdowns.to_le_bytes());
        b[32..40].copy_from_slice(&self.power_on_secs.to_le_bytes());
        let state = if self.clean {
            HEALTH_CLEAN
        } else {
            HEALTH_RUNNING
        };
        b[40..44].copy_from_slice(&state.to_le_bytes());
        let crc = crc_of(&b[..60], &[]);
        b[60..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes a record; `None` for erased, torn or foreign bytes.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let b = b.get(..HEALTH_RECORD_LEN)?;
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(x)
        };
        if b[..4] != HEALTH_MAGIC
            || u16_at(4) != HEALTH_VERSION
            || usize::from(u16_at(6)) != HEALTH_RECORD_LEN
            || b[44..60] != [0; 16]
            || crc_of(&b[..60], &[]) != u32_at(60)
        {
            return None;
        }
        let clean = match u32_at(40) {
            HEALTH_RUNNING => false,
            HEALTH_CLEAN => true,
            _ => return None,
        };
        Some(Self {
            sequence: u64_at(8),
            power_cycles: u64_at(16),
            unsafe_shutdowns: u64_at(24),
            power_on_secs: u64_at(32),
            clean,
        })
    }

    /// The record that starts the next power cycle after `newest` (`None`: a device with no
    /// record yet, whose first power cycle this is).
    pub fn next_boot(newest: Option<&HealthRecord>) -> HealthRecord {
        match newest {
            None => HealthRecord {
                sequence: 1,
                power_cycles: 1,
                unsafe_shutdowns: 0,
                power_on_secs: 0,
                clean: false,
            },
            Some(r) => HealthRecord {
                sequence: r.sequence.saturating_add(1),
                power_cycles: r.power_cycles.saturating_add(1),
                unsafe_shutdowns: r.unsafe_shutdowns.saturating_add(u64::from(!r.clean)),
                power_on_secs: r.power_on_secs,
                clean: false,
            },
        }
    }

    /// The record that follows this one in the same power cycle: `power_on_secs` now,
    /// `clean` if the device is shutting down in order.
    pub fn next(&self, power_on_secs: u64, clean: bool) -> HealthRecord {
        HealthRecord {
            sequence: self.sequence.saturating_add(1),
            power_on_secs,
            clean,
            ..*self
        }
    }
}

/// The newest valid record of the health area (its `HEALTH_SIZE` bytes, or a prefix), with
/// its offset in the area.
pub fn newest_health(area: &[u8]) -> Option<(usize, HealthRecord)> {
    area.chunks_exact(HEALTH_RECORD_LEN)
        .enumerate()
        .filter_map(|(i, c)| HealthRecord::decode(c).map(|r| (i * HEALTH_RECORD_LEN, r)))
        .max_by_key(|(_, r)| r.sequence)
}

/// Where the next health record goes, as offsets in the health area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthWrite {
    /// A sector to erase first (full, or holding bytes that are neither erased nor records).
    pub erase: Option<usize>,
    /// Where to program the record.
    pub offset: usize,
}

fn erased(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0xFF)
}

/// Where the next record goes in the health area `area` (`HEALTH_SIZE` bytes): after the last
/// programmed slot of the sector holding the newest record, or at the start of the other
/// sector (erased first) when that one is full. With no valid record, sector 0 (erased first
/// unless it already is).
pub fn next_health_write(area: &[u8]) -> HealthWrite {
    let sector = |s: usize| {
        area.get(s * SECTOR_SIZE..(s + 1) * SECTOR_SIZE)
            .unwrap_or(&[])
    };
    let Some((at, _)) = newest_health(area) else {
        let first = sector(0);
        return HealthWrite {
            erase: (!erased(first) || first.len() < SECTOR_SIZE).then_some(0),
            offset: 0,
        };
    };
    let s = at / SECTOR_SIZE;
    // The last slot of the sector that is not erased (the newest record, or a torn write
    // after it): the next record goes after it.
    let last = sector(s)
        .chunks_exact(HEALTH_RECORD_LEN)
        .rposition(|c| !erased(c))
        .unwrap_or(0);
    health_write_after(s * SECTOR_SIZE + last * HEALTH_RECORD_LEN)
}

/// Where the record after one written at `offset` goes: the next slot of the same sector, or
/// the start of the other sector, erased first, when this one is full.
pub fn health_write_after(offset: usize) -> HealthWrite {
    let s = (offset / SECTOR_SIZE).min(1);
    let next = offset + HEALTH_RECORD_LEN;
    if next < (s + 1) * SECTOR_SIZE {
        return HealthWrite {
            erase: None,
            offset: next,
        };
    }
    let other = 1 - s;
    HealthWrite {
        erase: Some(other * SECTOR_SIZE),
        offset: other * SECTOR_SIZE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn region(seq: u64, payload: &[u8]) -> Vec<u8> {
        let mut r = encode_config_copy(seq, payload).unwrap();
        r.resize(4096, 0xff);
        r
    }

    #[test]
    fn layout() {
        assert_eq!(Slot::A.base(), 0);
        assert_eq!(Slot::A.header_offset(), 0x1E8_0000);
        assert_eq!(Slot::B.base(), 0x1EC_0000);
        assert_eq!(Slot::B.header_offset(), 0x3D4_0000);
        assert_eq!((HEALTH_OFFSET, HEALTH_SIZE), (0x3D8_0000, 0x8_0000));
        assert_eq!(ConfigCopy::A.offset(), 0x3E0_0000);
        assert_eq!(ConfigCopy::B.offset(), 0x3F0_0000);
    }

    const RECORDS_PER_SECTOR: usize = SECTOR_SIZE / HEALTH_RECORD_LEN;

    /// A flash area that programs like NOR: bits only go from 1 to 0 until erased.
    struct Nor(Vec<u8>);

    impl Nor {
        fn apply(&mut self, w: HealthWrite, rec: &HealthRecord) {
            if let Some(e) = w.erase {
                self.0[e..e + SECTOR_SIZE].fill(0xFF);
            }
            for (d, s) in self.0[w.offset..w.offset + HEALTH_RECORD_LEN]
                .iter_mut()
                .zip(rec.encode())
            {
                *d &= s;
            }
        }
        fn append(&mut self, rec: &HealthRecord) {
            let w = next_health_write(&self.0);
            self.apply(w, rec);
        }
    }

    #[test]
    fn health_record_bytes() {
        let r = HealthRecord {
            sequence: 3,
            power_cycles: 2,
            unsafe_shutdowns: 1,
            power_on_secs: 0x0102,
            clean: true,
        };
        let b = r.encode();
        assert_eq!(&b[..8], b"KHLT\x01\x00\x40\x00");
        assert_eq!(&b[8..16], &3u64.to_le_bytes());
        assert_eq!(&b[32..34], &[2, 1]);
        assert_eq!(&b[40..44], &[2, 0, 0, 0]);
        assert_eq!(HealthRecord::decode(&b), Some(r));
        for i in 0..HEALTH_RECORD_LEN {
            let mut bad = b;
            bad[i] ^= 0x10;
            assert_eq!(HealthRecord::decode(&bad), None, "byte {i} flipped");
        }
        assert_eq!(HealthRecord::decode(&[0xFF; 64]), None);
        assert_eq!(HealthRecord::decode(&b[..63]), None);
    }

    #[test]
    fn power_cycles_and_unsafe_shutdowns() {
        let first = HealthRecord::next_boot(None);
        assert_eq!(
            (first.power_cycles, first.unsafe_shutdowns, first.clean),
            (1, 0, false)
        );
        // A cycle that ended without its clean record: unsafe.
        let second = HealthRecord::next_boot(Some(&first.next(3600, false)));
        assert_eq!(
            (
                second.power_cycles,
                second.unsafe_shutdowns,
                second.power_on_secs
            ),
            (2, 1, 3600)
        );
        // One that shut down cleanly: not.
        let third = HealthRecord::next_boot(Some(&second.next(7200, true)));
        assert_eq!((third.power_cycles, third.unsafe_shutdowns), (3, 1));
        assert!(third.sequence > second.sequence + 1);
    }

    #[test]
    fn health_log_fills_a_sector_then_moves_to_the_other() {
        // Never-written flash reads 0x00 under QEMU without a file, 0xFF once erased.
        for fill in [0x00u8, 0xFF] {
            let mut nor = Nor(vec![fill; HEALTH_SIZE]);
            let w = next_health_write(&nor.0);
            assert_eq!(
                w,
                HealthWrite {
                    erase: (fill != 0xFF).then_some(0),
                    offset: 0
                }
            );
            let mut r = HealthRecord::next_boot(None);
            nor.append(&r);
            let mut at = 0;
            for i in 1..RECORDS_PER_SECTOR + 3 {
                r = r.next(i as u64, false);
                // The position a writer tracks itself (what the firmware does).
                let w = health_write_after(at);
                nor.apply(w, &r);
                at = w.offset;
                if i % 251 != 0 && i + 2 < RECORDS_PER_SECTOR {
                    continue;
                }
                let (found, newest) = newest_health(&nor.0).unwrap();
                assert_eq!(found, at);
                assert_eq!(newest, r);
                let expect = if i < RECORDS_PER_SECTOR {
                    i * HEALTH_RECORD_LEN
                } else {
                    SECTOR_SIZE + (i - RECORDS_PER_SECTOR) * HEALTH_RECORD_LEN
                };
                assert_eq!(at, expect, "record {i}");
                // A fresh scan agrees with it.
                assert_eq!(health_write_after(at), next_health_write(&nor.0));
            }
        }
    }

    #[test]
    fn torn_health_writes_keep_the_previous_record() {
        let mut nor = Nor(vec![0xFF; HEALTH_SIZE]);
        let a = HealthRecord::next_boot(None);
        nor.append(&a);
        let b = a.next(60, false);
        // The write of `b` is cut after `cut` bytes: `a` stays the newest, and the next
        // record goes after the torn slot, not over it.
        for cut in [1usize, 8, 32, 63] {
            let mut torn = Nor(nor.0.clone());
            let w = next_health_write(&torn.0);
            torn.0[w.offset..w.offset + cut].copy_from_slice(&b.encode()[..cut]);
            assert_eq!(newest_health(&torn.0).map(|(_, r)| r), Some(a), "cut {cut}");
            let w2 = next_health_write(&torn.0);
            assert_eq!(w2.offset, w.offset + HEALTH_RECORD_LEN);
            let c = HealthRecord::next_boot(Some(&a));
            torn.apply(w2, &c);
            let newest = newest_health(&torn.0).unwrap().1;
            assert_eq!((newest.power_cycles, newest.unsafe_shutdowns), (2, 1));
        }
    }

    #[test]
    fn empty_flash_has_no_config_and_writes_copy_a_first() {
        let erased = vec![0xff; 4096];
        assert_eq!(choose_config(&erased, &erased), None);
        assert_eq!(
            next_config_write(&erased, &erased),
            ConfigWrite {
                copy: ConfigCopy::A,
                sequence: 1
            }
        );
    }

    #[test]
    fn newest_valid_copy_wins_and_a_corrupt_one_falls_back() {
        let a = region(7, b"seven");
        let mut b = region(8, b"eight");
        assert_eq!(choose_config(&a, &b), Some(&b"eight"[..]));
        assert_eq!(next_config_write(&a, &b).copy, ConfigCopy::A);
        assert_eq!(next_config_write(&a, &b).sequence, 9);
        b[CONFIG_HEADER_LEN + 2] ^= 4;
        assert_eq!(choose_config(&a, &b), Some(&b"seven"[..]));
        assert_eq!(
            next_config_write(&a, &b),
            ConfigWrite {
                copy: ConfigCopy::B,
                sequence: 8
            }
        );
    }

    #[test]
    fn torn_write_keeps_the_previous_copy() {
        let a = region(1, &[0x5a; 1000]);
        let full = region(2, &[0xa5; 1000]);
        for cut in [0, 1, 16, 31, 32, 500, 1031] {
            let mut b = vec![0xff; 4096];
            b[..cut].copy_from_slice(&full[..cut]);
            assert_eq!(
                choose_config(&a, &b),
                Some(&[0x5a; 1000][..]),
                "cut at {cut}"
            );
        }
        assert_eq!(choose_config(&a, &full), Some(&[0xa5; 1000][..]));
    }

    #[test]
    fn oversized_payload_is_refused() {
        assert!(encode_config_copy(1, &vec![0; CONFIG_PAYLOAD_MAX + 1]).is_err());
        assert!(encode_config_copy(1, &vec![0; CONFIG_PAYLOAD_MAX]).is_ok());
    }
}

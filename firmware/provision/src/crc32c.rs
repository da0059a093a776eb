//! CRC32C (Castagnoli, reflected polynomial 0x82F63B78), table driven: the checksum of the
//! configuration copies. Configuration is read once at boot, so no hardware path.

/// The initial (and final XOR) value.
pub const INIT: u32 = 0xffff_ffff;

const TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82f6_3b78
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// Runs the register over `data` (start with [`INIT`], XOR the result with [`INIT`]).
pub fn update(mut crc: u32, data: &[u8]) -> u32 {
    for &b in data {
        crc = TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    crc
}

/// The CRC32C of `data`.
pub fn checksum(data: &[u8]) -> u32 {
    update(INIT, data) ^ INIT
}

#[cfg(test)]
mod tests {
    #[test]
    fn check_value() {
        // The catalogue's check value for CRC-32C.
        assert_eq!(super::checksum(b"123456789"), 0xe306_9283);
    }
}

//! Little-endian field access helpers that never panic.
//!
//! Readers return 0 and writers do nothing when the field does not fit in the buffer; all
//! callers in this crate use constant offsets inside fixed-size arrays, so that branch only
//! guards against programming errors, never against input.

/// Reads a `u8` at `off`.
#[inline]
pub fn u8_at(b: &[u8], off: usize) -> u8 {
    b.get(off).copied().unwrap_or(0)
}

/// Reads a little-endian `u16` at `off`.
#[inline]
pub fn u16_at(b: &[u8], off: usize) -> u16 {
    let mut a = [0u8; 2];
    if let Some(s) = b.get(off..off.saturating_add(2)) {
        a.copy_from_slice(s);
    }
    u16::from_le_bytes(a)
}

/// Reads a little-endian `u32` at `off`.
#[inline]
pub fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(off..off.saturating_add(4)) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

/// Reads a little-endian `u64` at `off`.
#[inline]
pub fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(off..off.saturating_add(8)) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

/// Reads a little-endian 128-bit counter at `off` (SMART log fields).
#[inline]
pub fn u128_at(b: &[u8], off: usize) -> u128 {
    let mut a = [0u8; 16];
    if let Some(s) = b.get(off..off.saturating_add(16)) {
        a.copy_from_slice(s);
    }
    u128::from_le_bytes(a)
}

/// Copies `N` bytes at `off` into an array.
#[inline]
pub fn array_at<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
    let mut a = [0u8; N];
    if let Some(s) = b.get(off..off.saturating_add(N)) {
        a.copy_from_slice(s);
    }
    a
}

/// Writes a `u8` at `off`.
#[inline]
pub fn put_u8(b: &mut [u8], off: usize, v: u8) {
    if let Some(x) = b.get_mut(off) {
        *x = v;
    }
}

/// Writes bytes at `off`.
#[inline]
pub fn put_bytes(b: &mut [u8], off: usize, v: &[u8]) {
    if let Some(s) = b.get_mut(off..off.saturating_add(v.len())) {
        s.copy_from_slice(v);
    }
}

/// Writes a little-endian `u16` at `off`.
#[inline]
pub fn put_u16(b: &mut [u8], off: usize, v: u16) {
    put_bytes(b, off, &v.to_le_bytes());
}

/// Writes a little-endian `u32` at `off`.
#[inline]
pub fn put_u32(b: &mut [u8], off: usize, v: u32) {
    put_bytes(b, off, &v.to_le_bytes());
}

/// Writes a little-endian `u64` at `off`.
#[inline]
pub fn put_u64(b: &mut [u8], off: usize, v: u64) {
    put_bytes(b, off, &v.to_le_bytes());
}

/// Writes a little-endian 128-bit value at `off`.
#[inline]
pub fn put_u128(b: &mut [u8], off: usize, v: u128) {
    put_bytes(b, off, &v.to_le_bytes());
}

/// Writes `s` into the `len`-byte field at `off`, truncated, padded with `pad`
/// (ASCII space for SN/MN/FR, NUL for NQNs and addresses).
#[inline]
pub fn put_str(b: &mut [u8], off: usize, len: usize, s: &str, pad: u8) {
    if let Some(field) = b.get_mut(off..off.saturating_add(len)) {
        field.fill(pad);
        let n = s.len().min(len);
        if let (Some(dst), Some(src)) = (field.get_mut(..n), s.as_bytes().get(..n)) {
            dst.copy_from_slice(src);
        }
    }
}

/// Reads the string in the `len`-byte field at `off`: up to the first NUL, trailing spaces
/// removed. Returns `None` when the bytes are not UTF-8.
#[inline]
pub fn str_at(b: &[u8], off: usize, len: usize) -> Option<&str> {
    let field = b.get(off..off.saturating_add(len))?;
    let end = field.iter().position(|&c| c == 0).unwrap_or(field.len());
    let s = core::str::from_utf8(field.get(..end)?).ok()?;
    Some(s.trim_end_matches(' '))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_is_harmless() {
        let mut b = [0u8; 4];
        assert_eq!(u32_at(&b, 1), 0);
        assert_eq!(u64_at(&b, usize::MAX), 0);
        put_u32(&mut b, 2, 0xdead_beef);
        assert_eq!(b, [0; 4]);
        put_u16(&mut b, 2, 0xbeef);
        assert_eq!(b, [0, 0, 0xef, 0xbe]);
    }

    #[test]
    fn strings() {
        let mut b = [0xffu8; 10];
        put_str(&mut b, 1, 6, "abc", b' ');
        assert_eq!(&b, b"\xffabc   \xff\xff\xff");
        assert_eq!(str_at(&b, 1, 6), Some("abc"));
        put_str(&mut b, 0, 4, "toolong", 0);
        assert_eq!(&b[..4], b"tool");
        let z = [b'x', 0, b'y'];
        assert_eq!(str_at(&z, 0, 3), Some("x"));
        assert_eq!(str_at(&[0xff, 0xfe], 0, 2), None);
    }
}

//! The buffer type the volume hands to `keel_nvmf_tcp::HostConnection`.

use alloc::vec::Vec;
use keel_storage::IoBuf;

/// Command data as the transport sees it: for I/O, the caller's own [`IoBuf`] with the byte
/// window of the command (no copy: the transport reads write data from it and writes read data
/// into it, computing the data digest in the same pass); otherwise a small owned buffer.
#[derive(Debug)]
pub(crate) enum Data {
    /// `len` bytes at `off` of a request's buffer.
    Io { buf: IoBuf, off: usize, len: usize },
    /// A Dataset Management range (16 bytes).
    Range([u8; 16]),
    /// Admin data (Connect data, Identify, log pages): allocated at association setup.
    Owned(Vec<u8>),
}

impl AsRef<[u8]> for Data {
    fn as_ref(&self) -> &[u8] {
        match self {
            // An out-of-range window reads as empty; HostConnection::submit then refuses the
            // command (its length check), so no byte outside the window is ever touched.
            Data::Io { buf, off, len } => off
                .checked_add(*len)
                .and_then(|end| buf.as_slice().get(*off..end))
                .unwrap_or(&[]),
            Data::Range(r) => r,
            Data::Owned(v) => v,
        }
    }
}

impl AsMut<[u8]> for Data {
    fn as_mut(&mut self) -> &mut [u8] {
        match self {
            Data::Io { buf, off, len } => match off.checked_add(*len) {
                Some(end) => buf.as_mut_slice().get_mut(*off..end).unwrap_or(&mut []),
                None => &mut [],
            },
            Data::Range(r) => r,
            Data::Owned(v) => v,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_window_is_a_view_of_the_buffer() {
        let mut b = IoBuf::leak_zeroed(64);
        b.as_mut_slice()
            .iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x = i as u8);
        let mut d = Data::Io {
            buf: b,
            off: 16,
            len: 8,
        };
        assert_eq!(d.as_ref(), &[16, 17, 18, 19, 20, 21, 22, 23]);
        d.as_mut()[0] = 0xFF;
        let Data::Io { buf, .. } = d else {
            unreachable!()
        };
        assert_eq!(buf.as_slice()[16], 0xFF);
        let d = Data::Io {
            buf,
            off: 60,
            len: 8,
        };
        assert!(d.as_ref().is_empty(), "out of range");
        let d = Data::Io {
            buf: IoBuf::leak_zeroed(8),
            off: usize::MAX,
            len: 2,
        };
        assert!(d.as_ref().is_empty(), "overflow");
    }
}

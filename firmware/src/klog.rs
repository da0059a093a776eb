//! The firmware's log statements: `defmt` on the target, the `log` facade on the host.
//!
//! On the target a statement becomes a defmt frame (an index into the ELF's `.defmt` table,
//! the timestamp and the arguments in binary), written to the console by `keel-hal` and
//! turned back into text on the host (`keelctl console decode`, `qemu/run`, the test
//! harness). The format strings never enter the image. On the host, where the hardware-free
//! modules run their unit tests, the same statements go to `log`.
//!
//! Format strings are the common subset of both: positional `{}`, `{:?}`, `{:#x}`, `{:02x}`
//! (defmt captures no identifiers). Integers, `bool`, `str` and `String` travel as they are;
//! anything else is wrapped in [`D`] (its `Display`) or [`Dbg`] (its `Debug`), which format on
//! the target, as `log` did. Nothing on the hot path logs.

/// A record at `$level` (a macro of both `defmt` and `log`: info, warn, error).
macro_rules! record {
    ($level:ident, $($t:tt)*) => {{
        #[cfg(target_os = "none")]
        defmt::$level!($($t)*);
        #[cfg(not(target_os = "none"))]
        log::$level!($($t)*);
    }};
}
/// An info record.
macro_rules! info {
    ($($t:tt)*) => { $crate::klog::record!(info, $($t)*) };
}
/// A warning record (not `warn`: the name of a built-in attribute).
macro_rules! warning {
    ($($t:tt)*) => { $crate::klog::record!(warn, $($t)*) };
}
/// An error record.
macro_rules! error {
    ($($t:tt)*) => { $crate::klog::record!(error, $($t)*) };
}
pub(crate) use {error, info, record, warning};

/// A log argument shown through its `Display` (formatted on the target).
pub(crate) struct D<T>(pub T);
/// A log argument shown through its `Debug` (formatted on the target).
pub(crate) struct Dbg<T>(pub T);

#[cfg(target_os = "none")]
impl<T: core::fmt::Display> defmt::Format for D<T> {
    fn format(&self, f: defmt::Formatter<'_>) {
        defmt::write!(f, "{}", defmt::Display2Format(&self.0))
    }
}
#[cfg(target_os = "none")]
impl<T: core::fmt::Debug> defmt::Format for Dbg<T> {
    fn format(&self, f: defmt::Formatter<'_>) {
        defmt::write!(f, "{}", defmt::Debug2Format(&self.0))
    }
}
impl<T: core::fmt::Display> core::fmt::Display for D<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        self.0.fmt(f)
    }
}
impl<T: core::fmt::Debug> core::fmt::Display for Dbg<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        self.0.fmt(f)
    }
}

/// A MAC address, shown as `52:54:00:12:34:56`: in log records (on the target as a defmt
/// frame of its six bytes, formatted on the host) and in `println!` lines (its `Display`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Mac(pub [u8; 6]);

impl core::fmt::Display for Mac {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let m = &self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

#[cfg(target_os = "none")]
impl defmt::Format for Mac {
    fn format(&self, f: defmt::Formatter<'_>) {
        let m = &self.0;
        defmt::write!(
            f,
            "{=u8:02x}:{=u8:02x}:{=u8:02x}:{=u8:02x}:{=u8:02x}:{=u8:02x}",
            m[0],
            m[1],
            m[2],
            m[3],
            m[4],
            m[5]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::Mac;

    #[test]
    fn a_mac_shows_as_six_colon_separated_hex_pairs() {
        let m = Mac([0x52, 0x54, 0x00, 0x0a, 0xbc, 0xff]);
        assert_eq!(alloc::format!("{m}"), "52:54:00:0a:bc:ff");
    }
}

//! Arm PrimeCell UART (PL011) driver, polled (Arm DDI 0183G, §3).

use core::fmt;
use core::ptr::NonNull;
use safe_mmio::{
    UniqueMmioPointer, field,
    fields::{ReadPure, ReadPureWrite, ReadWrite},
};

/// The PL011 register block.
#[repr(C)]
#[derive(Debug, zerocopy::FromBytes, zerocopy::Immutable, zerocopy::KnownLayout)]
pub struct Registers {
    dr: ReadWrite<u32>,
    rsr_ecr: ReadPureWrite<u32>,
    _reserved0: [u32; 4],
    fr: ReadPure<u32>,
    _reserved1: u32,
    ilpr: ReadPureWrite<u32>,
    ibrd: ReadPureWrite<u32>,
    fbrd: ReadPureWrite<u32>,
    lcr_h: ReadPureWrite<u32>,
    cr: ReadPureWrite<u32>,
    ifls: ReadPureWrite<u32>,
    imsc: ReadPureWrite<u32>,
    ris: ReadPure<u32>,
    mis: ReadPure<u32>,
    icr: ReadPureWrite<u32>,
}

const FR_TXFF: u32 = 1 << 5;
const FR_RXFE: u32 = 1 << 4;
const FR_BUSY: u32 = 1 << 3;
const CR_UARTEN: u32 = 1 << 0;
const CR_TXE: u32 = 1 << 8;
const CR_RXE: u32 = 1 << 9;
const LCR_H_WLEN8: u32 = 3 << 5;
const LCR_H_FEN: u32 = 1 << 4;

/// A polled PL011.
#[derive(Debug)]
pub struct Pl011<'a> {
    regs: UniqueMmioPointer<'a, Registers>,
}

impl<'a> Pl011<'a> {
    /// Wraps the registers.
    pub fn new(regs: UniqueMmioPointer<'a, Registers>) -> Self {
        Self { regs }
    }

    /// Wraps the registers at `base`.
    ///
    /// # Safety
    /// `base` must be the MMIO address of a PL011, mapped as device memory, and no other
    /// driver may use it while this one exists (the emergency writer excepted).
    pub unsafe fn at(base: usize) -> Option<Self> {
        let ptr = NonNull::new(base as *mut Registers)?;
        // SAFETY: the caller guarantees `base` is a mapped PL011 used by nobody else.
        Some(Self::new(unsafe { UniqueMmioPointer::new(ptr) }))
    }

    /// Enables transmit and receive, 8N1 with FIFOs; keeps the baud rate firmware set.
    pub fn init(&mut self) {
        field!(self.regs, lcr_h).write(LCR_H_WLEN8 | LCR_H_FEN);
        field!(self.regs, imsc).write(0);
        field!(self.regs, cr).write(CR_UARTEN | CR_TXE | CR_RXE);
    }

    /// Sends one byte, waiting while the FIFO is full.
    pub fn write_byte(&mut self, b: u8) {
        while field!(self.regs, fr).read() & FR_TXFF != 0 {
            core::hint::spin_loop();
        }
        field!(self.regs, dr).write(u32::from(b));
    }

    /// Receives one byte if one is waiting.
    pub fn read_byte(&mut self) -> Option<u8> {
        if field!(self.regs, fr).read() & FR_RXFE != 0 {
            None
        } else {
            Some(field!(self.regs, dr).read() as u8)
        }
    }

    /// Waits until everything sent has left the UART.
    pub fn flush(&mut self) {
        while field!(self.regs, fr).read() & FR_BUSY != 0 {
            core::hint::spin_loop();
        }
    }
}

impl fmt::Write for Pl011<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                self.write_byte(b'\r');
            }
            self.write_byte(b);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::FromZeros;

    #[test]
    fn writes_bytes_to_the_data_register_and_translates_newlines() {
        let mut regs = Registers::new_zeroed();
        let mut uart = Pl011::new(UniqueMmioPointer::from(&mut regs));
        uart.init();
        fmt::Write::write_str(&mut uart, "\n").unwrap();
        // The last byte written to DR is the '\n' after the '\r'.
        assert_eq!(regs.dr.0, u32::from(b'\n'));
        assert_eq!(regs.cr.0, CR_UARTEN | CR_TXE | CR_RXE);
        assert_eq!(regs.lcr_h.0, LCR_H_WLEN8 | LCR_H_FEN);
    }

    #[test]
    fn reads_nothing_when_the_receive_fifo_is_empty() {
        let mut regs = Registers::new_zeroed();
        regs.fr.0 = FR_RXFE;
        let mut uart = Pl011::new(UniqueMmioPointer::from(&mut regs));
        assert_eq!(uart.read_byte(), None);
    }
}

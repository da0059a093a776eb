//! Exception handling: every exception the firmware takes is fatal and produces a crash report
//! on the console (class, ESR, ELR, FAR, registers, frame-pointer backtrace), then the firmware
//! ends through [`power::fatal`](super::power::fatal) with exit code [`EXIT_EXCEPTION`].
//!
//! Ref: Arm ARM D1.10 (exception entry), D19.2.39 (ESR_EL1 and its exception classes).

use super::{ImageLayout, power};
use crate::console::Emergency;
use core::fmt::Write;

/// Exit code after an exception (QEMU's exit status in test builds).
pub const EXIT_EXCEPTION: u32 = 3;

/// Registers saved by `vectors.S`, in this order.
#[repr(C)]
#[derive(Debug)]
pub struct ExceptionFrame {
    /// x0 to x30.
    pub x: [u64; 31],
    /// ELR_EL1: where the exception was taken.
    pub elr: u64,
    /// SPSR_EL1.
    pub spsr: u64,
    /// ESR_EL1: why.
    pub esr: u64,
    /// FAR_EL1: the faulting address, for aborts.
    pub far: u64,
    /// SP_EL0: the firmware's stack pointer.
    pub sp_el0: u64,
}

const KIND_NAMES: [&str; 4] = ["synchronous", "IRQ", "FIQ", "SError"];
const ORIGINS: [&str; 4] = [
    "current EL, SP_EL0",
    "current EL, SP_ELx",
    "lower EL, AArch64",
    "lower EL, AArch32",
];

/// The name of an ESR exception class.
pub fn class_name(ec: u64) -> &'static str {
    match ec {
        0x00 => "unknown reason",
        0x01 => "WFI/WFE trapped",
        0x07 => "SVE/SIMD/FP access trapped",
        0x0e => "illegal execution state",
        0x15 => "SVC",
        0x16 => "HVC",
        0x17 => "SMC",
        0x18 => "system register access trapped",
        0x20 => "instruction abort from a lower EL",
        0x21 => "instruction abort",
        0x22 => "PC alignment fault",
        0x24 => "data abort from a lower EL",
        0x25 => "data abort",
        0x26 => "SP alignment fault",
        0x2c => "floating-point exception",
        0x2f => "SError",
        0x30 | 0x31 => "breakpoint",
        0x32 | 0x33 => "software step",
        0x34 | 0x35 => "watchpoint",
        0x3c => "BRK instruction",
        _ => "other",
    }
}

/// The fault status of an abort's ISS (DFSC/IFSC), named.
fn fault_status(iss: u64) -> &'static str {
    match iss & 0x3f {
        0b000000..=0b000011 => "address size fault",
        0b000100..=0b000111 => "translation fault",
        0b001000..=0b001011 => "access flag fault",
        0b001100..=0b001111 => "permission fault",
        0b010000 => "synchronous external abort",
        0b100001 => "alignment fault",
        _ => "other fault",
    }
}

fn in_range(addr: u64, range: (usize, usize)) -> bool {
    addr >= range.0 as u64 && addr.saturating_add(16) <= range.1 as u64
}

/// Walks frame records (x29 chain) while they stay inside this core's stacks.
fn backtrace(w: &mut Emergency, pc: u64, mut fp: u64, stacks: [(usize, usize); 2]) {
    let _ = writeln!(
        w,
        "backtrace (frame pointers; resolve with addr2line -e <ELF>):"
    );
    let _ = writeln!(w, "  #pc {pc:#018x}");
    for depth in 0..32 {
        if fp == 0 || !fp.is_multiple_of(16) || !stacks.iter().any(|s| in_range(fp, *s)) {
            break;
        }
        // SAFETY: `fp` is 16-byte aligned and the 16-byte record lies inside a mapped stack.
        let (next, lr) = unsafe {
            let rec = fp as *const u64;
            (rec.read_volatile(), rec.add(1).read_volatile())
        };
        if lr == 0 {
            break;
        }
        let _ = writeln!(w, "  #{depth:<2} {:#018x}", lr.wrapping_sub(4));
        fp = next;
    }
}

/// Called by `vectors.S`.
#[unsafe(no_mangle)]
extern "C" fn keel_exception(frame: &ExceptionFrame, kind: u64) {
    let mut w = Emergency::get();
    let ec = (frame.esr >> 26) & 0x3f;
    let iss = frame.esr & 0x1ff_ffff;
    let _ = writeln!(w, "\n*** keel: CPU exception ***");
    let core = super::percpu::info();
    if let Some(c) = core {
        let _ = writeln!(w, "core: {} (MPIDR {:#x})", c.index, c.mpidr);
    }
    let _ = writeln!(
        w,
        "kind: {} from {}",
        KIND_NAMES[(kind & 3) as usize],
        ORIGINS[((kind >> 2) & 3) as usize]
    );
    let _ = writeln!(w, "class: {:#04x} ({})", ec, class_name(ec));
    let _ = writeln!(w, "ESR: {:#018x}  ISS: {:#09x}", frame.esr, iss);
    if matches!(ec, 0x20 | 0x21 | 0x24 | 0x25) {
        let write = ec >= 0x24 && iss & (1 << 6) != 0;
        let _ = writeln!(
            w,
            "fault: {} on {}",
            fault_status(iss),
            if ec >= 0x24 {
                if write { "write" } else { "read" }
            } else {
                "fetch"
            }
        );
    }
    let _ = writeln!(w, "ELR: {:#018x}  FAR: {:#018x}", frame.elr, frame.far);
    let _ = writeln!(
        w,
        "SPSR: {:#018x}  SP_EL0: {:#018x}",
        frame.spsr, frame.sp_el0
    );
    for (i, pair) in frame.x.chunks(2).enumerate() {
        match pair {
            [a, b] => {
                let _ = writeln!(
                    w,
                    "x{:<2} {:#018x}  x{:<2} {:#018x}",
                    i * 2,
                    a,
                    i * 2 + 1,
                    b
                );
            }
            [a] => {
                let _ = writeln!(w, "x{:<2} {:#018x}", i * 2, a);
            }
            _ => {}
        }
    }
    let stacks = match core {
        Some(c) => [c.stack, c.exc_stack],
        None => {
            let layout = ImageLayout::get();
            [layout.stack, layout.exc_stack]
        }
    };
    backtrace(&mut w, frame.elr, frame.x[29], stacks);
    let _ = writeln!(w, "*** end of crash report ***");
    power::fatal(EXIT_EXCEPTION);
}

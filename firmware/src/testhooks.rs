//! Test builds only: `keel.test=<action>` on the kernel command line (`/chosen/bootargs`)
//! makes the firmware do something a test wants to observe once it is ready.
//!
//! - `exit`: power off cleanly (QEMU exits 0);
//! - `fault`: read an unmapped address (a data abort and its crash report, exit 3);
//! - `panic`: panic (exit 2);
//! - `overflow`: unbounded recursion into the stack guard page (crash report, exit 3).

use crate::platform::Platform;
use keel_hal::{arch::power, println};

/// Runs the action the boot arguments ask for, if any.
pub fn after_ready(platform: &Platform) {
    let action = platform
        .dt
        .bootargs
        .split_whitespace()
        .find_map(|a| a.strip_prefix("keel.test="));
    match action {
        Some("exit") => {
            println!("keel: test exit");
            power::semihosting_exit(0)
        }
        Some("fault") => {
            println!("keel: test fault");
            let p = 0xdead_0000_0000usize as *const u64;
            // SAFETY: deliberately reads an unmapped address to raise a data abort; the
            // exception handler reports it and stops the firmware.
            let v = unsafe { p.read_volatile() };
            println!("unreachable: read {v}");
        }
        Some("panic") => panic!("deliberate test panic"),
        Some("overflow") => {
            println!("keel: test stack overflow");
            println!("unreachable: {}", recurse(1));
        }
        Some(other) => println!("keel: unknown test action {other:?}"),
        None => {}
    }
}

#[inline(never)]
#[allow(unconditional_recursion, reason = "the point: overflow the stack")]
fn recurse(n: u64) -> u64 {
    let buf = core::hint::black_box([n; 64]);
    recurse(buf[3] + 1) + buf[7]
}

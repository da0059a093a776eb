//! The poll loop: one pass polls every service and runs each ready request to completion.
//! No interrupts, no locks and no allocation on the data path.

use crate::platform::Platform;
use keel_hal::{arch::timer, println};

/// A service the poll loop drives.
pub trait Service {
    /// Does whatever is ready at `now_ns`; returns whether it did any work.
    fn poll(&mut self, now_ns: u64) -> bool;
}

/// Prints `keel: ready` and polls services forever.
pub fn run(platform: Platform) -> ! {
    let mut services: alloc::vec::Vec<alloc::boxed::Box<dyn Service>> = alloc::vec::Vec::new();
    let ready_ns = timer::now_ns();
    println!(
        "keel: ready in {}.{:03} ms (reset to poll loop; {} service(s))",
        ready_ns / 1_000_000,
        (ready_ns / 1_000) % 1_000,
        services.len()
    );
    #[cfg(feature = "test-build")]
    crate::testhooks::after_ready(&platform);
    let _ = &platform;
    loop {
        let now = timer::now_ns();
        let mut busy = false;
        for s in services.iter_mut() {
            busy |= s.poll(now);
        }
        if !busy {
            core::hint::spin_loop();
        }
    }
}

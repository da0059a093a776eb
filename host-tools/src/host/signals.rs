//! SIGINT and SIGTERM as a stop flag, so that long-running subcommands (`nbd`, `ublk`) shut
//! the controller down cleanly instead of dying with commands in flight.

use anyhow::Result;
use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Async-signal-safe: one atomic store.
    STOP.store(true, Ordering::SeqCst);
}

/// Installs the handlers; the flag turns true at the first SIGINT or SIGTERM.
pub fn stop_on_sigint_sigterm() -> Result<&'static AtomicBool> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: `on_signal` only stores to an atomic, which is async-signal-safe; the
        // sigaction structure is fully initialised (zeroed, then the handler and an empty
        // mask).
        let r = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
    }
    Ok(&STOP)
}

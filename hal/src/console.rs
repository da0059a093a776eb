//! The console: a PL011 behind the `log` facade, with timestamps from the generic timer, and
//! an emergency writer for exception and panic handlers that takes no lock.
//!
//! Log lines look like `[    0.012345] INFO  keel: message`. The hot path must not log;
//! it records events in counters and ring buffers instead.

use crate::pl011::Pl011;
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicUsize, Ordering};
use spin::Mutex;

static CONSOLE: Mutex<Option<Pl011<'static>>> = Mutex::new(None);
static EMERGENCY_BASE: AtomicUsize = AtomicUsize::new(0);

/// Timestamps for log lines, in nanoseconds since reset.
pub type Clock = fn() -> u64;

struct Logger {
    clock: spin::Once<Clock>,
}

static LOGGER: Logger = Logger {
    clock: spin::Once::new(),
};

impl log::Log for Logger {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let ns = self.clock.get().map_or(0, |c| c());
        let mut guard = CONSOLE.lock();
        if let Some(uart) = guard.as_mut() {
            let _ = writeln!(
                uart,
                "[{:5}.{:06}] {:<5} {}: {}",
                ns / 1_000_000_000,
                (ns / 1_000) % 1_000_000,
                record.level(),
                record.target(),
                record.args()
            );
        }
    }

    fn flush(&self) {}
}

/// Installs the UART at `base` as the console and the `log` backend.
///
/// # Safety
/// `base` must be the MMIO address of a PL011, mapped as device memory for the rest of the
/// firmware's life and used by nothing else.
pub unsafe fn init(base: usize, clock: Clock, level: log::LevelFilter) {
    // SAFETY: guaranteed by the caller.
    if let Some(mut uart) = unsafe { Pl011::at(base) } {
        uart.init();
        *CONSOLE.lock() = Some(uart);
        EMERGENCY_BASE.store(base, Ordering::Release);
    }
    LOGGER.clock.call_once(|| clock);
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}

/// Writes straight to the console (no timestamp, no level): for the banner and for lines
/// that tests and users match, such as `keel: ready`.
pub fn print(args: fmt::Arguments<'_>) {
    if let Some(uart) = CONSOLE.lock().as_mut() {
        let _ = uart.write_fmt(args);
    }
}

/// Prints to the console without a log prefix.
#[macro_export]
macro_rules! println {
    () => {
        $crate::console::print(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::console::print(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// A writer for exception and panic handlers: it ignores the console lock (the code that
/// holds it may be the code that crashed) and writes the UART registers directly.
#[derive(Debug)]
pub struct Emergency(Option<Pl011<'static>>);

impl Emergency {
    /// Takes the emergency writer.
    pub fn get() -> Self {
        let base = EMERGENCY_BASE.load(Ordering::Acquire);
        // SAFETY: `base` was registered by `init` as the console PL011, mapped for the whole
        // run. This aliases the console driver, which is acceptable only because the
        // firmware is about to stop: interleaved output is the worst outcome.
        Self(unsafe { Pl011::at(base) })
    }
}

impl Write for Emergency {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        match self.0.as_mut() {
            Some(uart) => uart.write_str(s),
            None => Ok(()),
        }
    }
}

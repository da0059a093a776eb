//! The console: a PL011 carrying two things on one byte stream, plus an emergency writer for
//! exception and panic handlers that takes no lock.
//!
//! - Plain text ([`print`], [`println!`](crate::println)): the banner and the lines people and
//!   tests match, such as `keel: ready`, written as they are.
//! - Log records as [defmt] frames: the firmware logs with `defmt` macros; the format strings
//!   stay in the ELF's `.defmt` table (not in the image) and only an index, the timestamp and
//!   the arguments travel. Records of the `log` facade (the portable crates) are bridged into
//!   the same frames, their message formatted on the target.
//!
//! Framing on the wire: `0xFF`, the frame in rzCOBS (defmt's encoding: never a `0x00` byte),
//! `0x00`. Text never holds `0xFF` (not a byte of UTF-8) or `0x00`, so a reader of the console
//! finds every frame without knowing the table (`keelctl console decode` and `qemu/run` decode
//! them with the image's ELF; the test harness does the same). The hot path must not log; it
//! records events in counters and ring buffers instead.

use crate::pl011::Pl011;
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use spin::Mutex;

/// The byte that opens a defmt frame on the console.
pub const FRAME_START: u8 = 0xFF;
/// The byte that ends a defmt frame on the console (rzCOBS's delimiter).
pub const FRAME_END: u8 = 0x00;

struct Console {
    uart: Option<Pl011<'static>>,
    #[cfg_attr(
        not(target_os = "none"),
        allow(dead_code, reason = "the defmt logger exists on the target only")
    )]
    encoder: defmt::Encoder,
}

static CONSOLE: Mutex<Console> = Mutex::new(Console {
    uart: None,
    encoder: defmt::Encoder::new(),
});
static EMERGENCY_BASE: AtomicUsize = AtomicUsize::new(0);
/// Set while a frame is being written: an emergency writer ends it first (see [`Emergency`]).
static IN_FRAME: AtomicBool = AtomicBool::new(false);

/// Timestamps for log records, in nanoseconds since reset.
pub type Clock = fn() -> u64;

static CLOCK: spin::Once<Clock> = spin::Once::new();

/// Microseconds since reset by the clock given to [`init`] (0 before it): the timestamp of
/// every defmt frame.
pub fn now_us() -> u64 {
    CLOCK.get().map_or(0, |c| c() / 1_000)
}

#[cfg_attr(
    not(target_os = "none"),
    allow(dead_code, reason = "the defmt logger exists on the target only")
)]
impl Console {
    fn start_frame(&mut self) {
        let Self { uart, encoder } = self;
        // The encoder's very first frame starts with a 0x00 (a delimiter for a frame a
        // previous boot left unfinished): it goes before the start byte, where a reader
        // drops it.
        encoder.start_frame(|b| put(uart, b));
        put(uart, &[FRAME_START]);
    }

    fn write_frame(&mut self, bytes: &[u8]) {
        let Self { uart, encoder } = self;
        encoder.write(bytes, |b| put(uart, b));
    }

    fn end_frame(&mut self) {
        let Self { uart, encoder } = self;
        // rzCOBS ends the frame with its 0x00 delimiter (FRAME_END).
        encoder.end_frame(|b| put(uart, b));
    }
}

#[cfg_attr(
    not(target_os = "none"),
    allow(dead_code, reason = "the defmt logger exists on the target only")
)]
fn put(uart: &mut Option<Pl011<'static>>, bytes: &[u8]) {
    if let Some(uart) = uart.as_mut() {
        for &b in bytes {
            uart.write_byte(b);
        }
    }
}

/// The `log` facade's records, bridged into defmt frames (the message is formatted here).
#[cfg(target_os = "none")]
struct LogBridge;

#[cfg(target_os = "none")]
impl log::Log for LogBridge {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let msg = defmt::Display2Format(record.args());
        match record.level() {
            log::Level::Error => defmt::error!("{}", msg),
            log::Level::Warn => defmt::warn!("{}", msg),
            log::Level::Info => defmt::info!("{}", msg),
            log::Level::Debug => defmt::debug!("{}", msg),
            log::Level::Trace => defmt::trace!("{}", msg),
        }
    }

    fn flush(&self) {}
}

#[cfg(target_os = "none")]
static LOG_BRIDGE: LogBridge = LogBridge;

/// The defmt global logger: one frame at a time on the console, under the console's lock.
#[cfg(target_os = "none")]
#[defmt::global_logger]
struct DefmtLogger;

/// The console while a frame is open (from `acquire` to `release`).
#[cfg(target_os = "none")]
static FRAME: core::sync::atomic::AtomicPtr<Console> =
    core::sync::atomic::AtomicPtr::new(core::ptr::null_mut());

#[cfg(target_os = "none")]
// SAFETY: `acquire` takes the console lock (and refuses to nest), so frames never interleave
// with each other or with plain text; `write` and `release` only run between `acquire` and
// `release`, as defmt's contract says.
unsafe impl defmt::Logger for DefmtLogger {
    fn acquire() {
        // One core, interrupts masked: a nested acquire could only come from a log statement
        // inside a defmt `Format` implementation, which would deadlock on the lock.
        assert!(
            !IN_FRAME.swap(true, Ordering::Acquire),
            "defmt: nested log record"
        );
        let console = spin::MutexGuard::leak(CONSOLE.lock());
        console.start_frame();
        FRAME.store(console, Ordering::Release);
    }

    unsafe fn flush() {
        let ptr = FRAME.load(Ordering::Acquire);
        // SAFETY: defmt calls `flush` between `acquire` and `release`, where the leaked,
        // locked console is ours alone (see `release`).
        if let Some(uart) = unsafe { ptr.as_mut() }.and_then(|c| c.uart.as_mut()) {
            uart.flush();
        }
    }

    unsafe fn release() {
        let ptr = FRAME.swap(core::ptr::null_mut(), Ordering::Acquire);
        // SAFETY: `acquire` stored the console it leaked from the locked mutex; the lock is
        // still held (defmt calls `release` once per `acquire`), so this is the only access.
        if let Some(console) = unsafe { ptr.as_mut() } {
            console.end_frame();
            // SAFETY: the guard taken in `acquire` was leaked; this ends that critical section
            // and nothing refers to the console any more.
            unsafe { CONSOLE.force_unlock() };
        }
        IN_FRAME.store(false, Ordering::Release);
    }

    unsafe fn write(bytes: &[u8]) {
        let ptr = FRAME.load(Ordering::Acquire);
        // SAFETY: as in `release`: between `acquire` and `release` the leaked, locked console
        // is ours alone.
        if let Some(console) = unsafe { ptr.as_mut() } {
            console.write_frame(bytes);
        }
    }
}

#[cfg(target_os = "none")]
defmt::timestamp!("{=u64:us}", now_us());

/// Installs the UART at `base` as the console, the defmt logger's output and the `log`
/// backend (bridged into defmt frames).
///
/// # Safety
/// `base` must be the MMIO address of a PL011, mapped as device memory for the rest of the
/// firmware's life and used by nothing else.
pub unsafe fn init(base: usize, clock: Clock, level: log::LevelFilter) {
    // SAFETY: guaranteed by the caller.
    if let Some(mut uart) = unsafe { Pl011::at(base) } {
        uart.init();
        CONSOLE.lock().uart = Some(uart);
        EMERGENCY_BASE.store(base, Ordering::Release);
    }
    CLOCK.call_once(|| clock);
    #[cfg(target_os = "none")]
    if log::set_logger(&LOG_BRIDGE).is_ok() {
        log::set_max_level(level);
    }
    #[cfg(not(target_os = "none"))]
    let _ = level;
}

/// Writes straight to the console as text (no timestamp, no level): for the banner and for
/// lines that tests and users match, such as `keel: ready`.
pub fn print(args: fmt::Arguments<'_>) {
    let _ = TextWriter(&mut CONSOLE.lock()).write_fmt(args);
}

/// Text onto the console: `\n` becomes `\r\n`.
struct TextWriter<'a>(&'a mut Console);

impl Write for TextWriter<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        match self.0.uart.as_mut() {
            Some(uart) => uart.write_str(s),
            None => Ok(()),
        }
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
/// holds it may be the code that crashed) and writes the UART registers directly. If the
/// crash interrupted a defmt frame, it ends that frame first, so a decoder sees the report as
/// text.
#[derive(Debug)]
pub struct Emergency(Option<Pl011<'static>>);

impl Emergency {
    /// Takes the emergency writer.
    pub fn get() -> Self {
        let base = EMERGENCY_BASE.load(Ordering::Acquire);
        // SAFETY: `base` was registered by `init` as the console PL011, mapped for the whole
        // run. This aliases the console driver, which is acceptable only because the
        // firmware is about to stop: interleaved output is the worst outcome.
        let mut uart = unsafe { Pl011::at(base) };
        if IN_FRAME.load(Ordering::Acquire)
            && let Some(u) = uart.as_mut()
        {
            u.write_byte(FRAME_END);
            u.write_byte(b'\n');
        }
        Self(uart)
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

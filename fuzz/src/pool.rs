//! One data buffer pool per fuzzing process, reused by every input (a transport's pool is
//! carved once too). Buffers are leaked memory by design (`IoBuf` is `&'static mut`), so a pool
//! per input would grow the process without bound; with one pool, a buffer the code under test
//! loses shows up as `available() < count()` at the end of the input that lost it.

use keel_storage::{BufPool, IoBuf};
use std::sync::Mutex;

/// Buffers in the pool.
pub const BUFFERS: usize = 64;
/// Bytes per buffer: 4 KiB << MDTS 5, the controller core's default transfer limit.
pub const BUF_SIZE: usize = 128 << 10;

/// In a `static` (never dropped), so the leaked memory stays reachable for LeakSanitizer.
static POOL: Mutex<Option<BufPool>> = Mutex::new(None);

fn with<T>(f: impl FnOnce(&mut BufPool) -> T) -> T {
    let mut p = POOL.lock().unwrap_or_else(|e| e.into_inner());
    f(p.get_or_insert_with(|| {
        BufPool::from_heap(BUFFERS, BUF_SIZE, 0x1_0000_0000).expect("fuzz buffer pool")
    }))
}

/// A buffer whose first `len` bytes (at most [`BUF_SIZE`]) repeat `fill` (zeroes when empty),
/// or `None` when every buffer is out.
pub fn get(len: usize, fill: &[u8]) -> Option<IoBuf> {
    let mut b = with(|p| p.get())?;
    let n = b.set_len(len);
    let dst = b.as_mut_slice();
    if fill.is_empty() {
        dst.fill(0);
    } else {
        for chunk in dst[..n].chunks_mut(fill.len()) {
            chunk.copy_from_slice(&fill[..chunk.len()]);
        }
    }
    Some(b)
}

/// Returns a buffer; panics when it is not one of the pool's (the code under test made up or
/// swapped a buffer).
pub fn put(b: IoBuf) {
    if with(|p| p.put(b)).is_err() {
        panic!("a buffer that is not the pool's came back");
    }
}

/// Buffers currently in the pool.
pub fn available() -> usize {
    with(|p| p.available())
}

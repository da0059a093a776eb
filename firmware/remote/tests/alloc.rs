//! The hot path allocates nothing: once connected and warmed up, thousands of requests go
//! through the volume (submit, poll, completion) without one heap allocation by the volume or
//! its transport connections. A counting global allocator is armed only while the volume's own
//! code runs (the in-memory network and the targets, which stand in for smoltcp and the remote,
//! run disarmed).

mod common;
use common::*;
use keel_remote::{Net, PathAddr, SockState};
use keel_storage::{BlockBackend, BlockOp};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Counting;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: defers to the system allocator; only counts (thread-local cells, no allocation).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if ARMED.with(|a| a.get()) {
            COUNT.with(|c| c.set(c.get() + 1));
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        if ARMED.with(|a| a.get()) {
            COUNT.with(|c| c.set(c.get() + 1));
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static A: Counting = Counting;

fn armed<T>(on: bool, f: impl FnOnce() -> T) -> T {
    let before = ARMED.with(|a| a.replace(on));
    let r = f();
    ARMED.with(|a| a.set(before));
    r
}

/// The network with the counter disarmed inside it.
struct Disarmed<'a>(&'a mut SimNet);

impl Net for Disarmed<'_> {
    type Sock = Sock;
    fn connect(&mut self, a: PathAddr, now: u64) -> Option<Sock> {
        armed(false, || self.0.connect(a, now))
    }
    fn state(&mut self, s: Sock) -> SockState {
        armed(false, || self.0.state(s))
    }
    fn recv(&mut self, s: Sock, f: &mut dyn FnMut(&[u8]) -> usize) -> usize {
        let net = &mut *self.0;
        armed(false, || net.recv(s, &mut |b| armed(true, || f(b))))
    }
    fn send(&mut self, s: Sock, f: &mut dyn FnMut(&mut [u8]) -> usize) -> usize {
        let net = &mut *self.0;
        armed(false, || net.send(s, &mut |b| armed(true, || f(b))))
    }
    fn close(&mut self, s: Sock, now: u64) {
        armed(false, || self.0.close(s, now))
    }
}

#[test]
fn no_allocation_per_request() {
    let disk = Disk::new(512, 4096);
    let mut net = SimNet::new(41);
    net.add(Server::new(
        vec![addr(1), addr(2)],
        &disk,
        ServerCfg::default(),
    ));
    let mut cfg = test_config(vec![addr(1), addr(2)]);
    cfg.kato_ms = 600_000;
    let mut rig = Rig::new(net, cfg);
    rig.connect();
    let mut be = rig.be.take().unwrap();
    let mut bufs: Vec<_> = (0..32).map(|_| buf(8 * 512)).collect();
    let mut done = Vec::with_capacity(64);
    let mut tag = 0u64;
    let mut phase = |rig: &mut Rig, be: &mut keel_remote::RemoteBackend<Sock>, n: u64| {
        let mut completed = 0;
        while completed < n {
            while let Some(b) = bufs.pop() {
                tag += 1;
                let op = if tag.is_multiple_of(3) {
                    BlockOp::Read
                } else {
                    BlockOp::Write {
                        fua: tag.is_multiple_of(5),
                    }
                };
                let r = req(tag, op, (tag * 8) % 4000, 8, Some(b));
                armed(true, || be.submit(r)).unwrap();
            }
            rig.now += MS / 4;
            rig.net.step(rig.now);
            let now = rig.now;
            let mut n = Disarmed(&mut rig.net);
            armed(true, || rig.vol.poll(now, &mut n));
            armed(true, || be.poll(&mut |c| done.push(c)));
            for c in done.drain(..) {
                assert_eq!(c.result, Ok(()));
                bufs.push(c.buf.unwrap());
                completed += 1;
            }
        }
    };
    // Warm up (queues and connections reach their steady state), then count.
    phase(&mut rig, &mut be, 500);
    COUNT.with(|c| c.set(0));
    phase(&mut rig, &mut be, 3000);
    let n = COUNT.with(|c| c.get());
    assert_eq!(n, 0, "{n} allocations on the I/O path");
    // The counter works: the volume allocates when it sets up an association.
    rig.net.reset(addr(1));
    while rig.vol.snapshot().unwrap().paths[0].counters.connects < 2 {
        phase(&mut rig, &mut be, 100);
    }
    assert!(COUNT.with(|c| c.get()) > 0);
}

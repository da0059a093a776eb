//! Test builds: `keel.test=netmq` proves virtio-net multiqueue on every core, before (and
//! instead of) the services: the NIC comes up with one receive/transmit queue pair per core
//! (`keel_hal::virtio_net::multiqueue`), core `k` gets pair `k` and drives it alone through
//! the `smoltcp::phy::Device` interface, answering
//!
//! - ARP requests for the address in `keel.ip=` (so a host can reach it), and
//! - UDP datagrams to port 7 with the datagram itself (addresses and ports swapped), its
//!   first payload byte replaced by the ASCII digit of the answering core.
//!
//! A host on a multi-queue tap (`qemu/run --smp N --net tap`) sends from many UDP ports: the
//! kernel's tun spreads the flows over the queues, and the digit in each answer names the
//! core, hence the queue pair, that served the flow. Both directions stay on one pair per
//! flow. The loops never return; the test stops QEMU.

use crate::klog::Mac;
use crate::platform::Platform;
use alloc::boxed::Box;
use core::sync::atomic::{AtomicUsize, Ordering};
use keel_hal::arch::smp::{self, CoreContext};
use keel_hal::arch::timer;
use keel_hal::println;
use keel_hal::virtio_net::{self, QueuePair};
use smoltcp::phy::{Device, RxToken, TxToken};
use smoltcp::time::Instant;

/// The UDP echo port.
const ECHO_PORT: u16 = 7;
/// How long an idle core sleeps before it looks at its queue again.
const IDLE_SLEEP_NS: u64 = 500_000;

/// Brings the NIC up with one pair per core and serves forever (or returns if it cannot).
pub fn run(platform: &mut Platform) {
    let ip = platform
        .dt
        .bootargs
        .split_whitespace()
        .find_map(|a| a.strip_prefix("keel.ip="))
        .and_then(|s| s.split('/').next())
        .and_then(parse_ipv4);
    let Some(ip) = ip else {
        println!("netmq: keel.ip=A.B.C.D/N is needed");
        return;
    };
    let (Some(host), Some(f)) = (
        platform.dt.pcie.as_ref(),
        platform
            .pci
            .iter()
            .find(|f| f.vendor == 0x1af4 && f.device == 0x1041 && f.class.0 == 0x02),
    ) else {
        println!("netmq: no virtio-net function");
        return;
    };
    let cores = platform.cores;
    // SAFETY: the ECAM region is mapped as device memory; the virtio-net function's BARs were
    // assigned by enumeration and lie in the mapped windows; nothing else drives it (the
    // services never start in this test).
    let nic = unsafe {
        virtio_net::multiqueue(
            host.ecam.base as usize,
            f.bdf.bus,
            f.bdf.dev,
            f.bdf.func,
            cores.len() as u16,
        )
    };
    let (control, pairs) = match nic {
        Ok(v) => v,
        Err(e) => {
            println!("netmq: {e}");
            return;
        }
    };
    let mac = control.mac();
    println!(
        "netmq: {} queue pair(s) in use, {} offered by the device, MAC {}, checksum offload: transmit {}, receive {}, TCP segmentation offload {}, receive segmentation offload {}",
        control.pairs(),
        control.max_pairs(),
        Mac(mac),
        control.offloads().tx_csum,
        control.offloads().rx_csum,
        control.offloads().tso4,
        control.offloads().rx_tso4
    );
    let timer_intid = platform.dt.timer_intid;
    let mut pairs = pairs.into_iter();
    let Some(pair0) = pairs.next() else { return };
    let mut serving = 1;
    for (info, pair) in cores[1..].iter().zip(pairs) {
        let gic = platform
            .gic
            .as_ref()
            .and_then(|g| g.cpu_interface(info.mpidr));
        let main = Box::new(move |ctx: CoreContext| {
            let CoreContext { info, mut gic, .. } = ctx;
            let sleeps = match (gic.as_mut(), timer_intid) {
                (Some(g), Some(t)) => g.enable_wakeup(t).is_ok(),
                _ => false,
            };
            serve(info.index, pair, ip, mac, sleeps, 0)
        });
        match smp::start(info, gic, main) {
            Ok(_) => serving += 1,
            Err(e) => println!("netmq: core {}: not started: {e}", info.index),
        }
    }
    let sleeps = match (platform.gic.as_mut(), timer_intid) {
        (Some(g), Some(t)) => g.enable_wakeup(t, true).is_ok(),
        _ => false,
    };
    // The control part stays here, unused: it keeps the device's transport alive.
    let _control = control;
    serve(0, pair0, ip, mac, sleeps, serving)
}

/// Cores that have said which queue pair they serve.
static SERVING: AtomicUsize = AtomicUsize::new(0);
/// How long core 0 waits for the other cores' lines before it says it is ready anyway.
const READY_WAIT_NS: u64 = 5_000_000_000;

fn parse_ipv4(s: &str) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    let mut parts = s.split('.');
    for b in &mut out {
        *b = parts.next()?.parse().ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// One core's loop over its own queue pair. Core 0 says `netmq: ready` once the `serving`
/// cores started (itself included) have each said which pair they serve.
fn serve(
    core: usize,
    mut pair: QueuePair,
    ip: [u8; 4],
    mac: [u8; 6],
    sleeps: bool,
    serving: usize,
) -> ! {
    println!("netmq: core {core} serves queue pair {}", pair.index());
    SERVING.fetch_add(1, Ordering::AcqRel);
    if core == 0 {
        let deadline = timer::now_ns().saturating_add(READY_WAIT_NS);
        while SERVING.load(Ordering::Acquire) < serving && timer::now_ns() < deadline {
            core::hint::spin_loop();
        }
        println!("netmq: ready");
    }
    let digit = b'0' + (core % 10) as u8;
    let now = Instant::from_micros(0);
    loop {
        let mut busy = false;
        while let Some((rx, tx)) = pair.receive(now) {
            busy = true;
            rx.consume(|frame| {
                if let Some(len) = answer_len(frame, ip) {
                    tx.consume(len, |out| answer(frame, out, mac, digit));
                }
            });
        }
        pair.flush_tx();
        if !busy && sleeps {
            timer::arm_wakeup(timer::counter().saturating_add(timer::ns_to_ticks(IDLE_SLEEP_NS)));
            timer::wait_for_interrupt();
            timer::disarm_wakeup();
        }
    }
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

const ETH: usize = 14;
const ARP_LEN: usize = 28;

/// The length of the answer to `frame`, if it gets one: an ARP request for `ip` (RFC 826),
/// or a UDP datagram to `ip`:7 in an IPv4 packet without fragments.
fn answer_len(frame: &[u8], ip: [u8; 4]) -> Option<usize> {
    match be16(frame, 12)? {
        0x0806 => {
            let arp = frame.get(ETH..ETH + ARP_LEN)?;
            let request = be16(arp, 0)? == 1 && be16(arp, 2)? == 0x0800 && be16(arp, 6)? == 1;
            (request && arp[24..28] == ip).then_some(ETH + ARP_LEN)
        }
        0x0800 => {
            let ipv4 = frame.get(ETH..)?;
            let ihl = usize::from(*ipv4.first()? & 0x0f) * 4;
            let total = usize::from(be16(ipv4, 2)?);
            let unfragmented = be16(ipv4, 6)? & 0x3fff == 0;
            let udp = *ipv4.get(9)? == 17;
            let to_us = ipv4.get(16..20)? == ip;
            if ihl < 20 || total < ihl + 8 || total > ipv4.len() || !(unfragmented && udp && to_us)
            {
                return None;
            }
            (be16(ipv4, ihl + 2)? == ECHO_PORT).then_some(ETH + total)
        }
        _ => None,
    }
}

/// Writes the answer to `frame` (checked by [`answer_len`]) into `out`.
fn answer(frame: &[u8], out: &mut [u8], mac: [u8; 6], digit: u8) {
    out.copy_from_slice(&frame[..out.len()]);
    out[0..6].copy_from_slice(&frame[6..12]);
    out[6..12].copy_from_slice(&mac);
    if be16(frame, 12) == Some(0x0806) {
        let (req, arp) = (&frame[ETH..], &mut out[ETH..ETH + ARP_LEN]);
        arp[6..8].copy_from_slice(&2u16.to_be_bytes()); // reply
        arp[8..14].copy_from_slice(&mac); // sender: us
        arp[14..18].copy_from_slice(&req[24..28]);
        arp[18..24].copy_from_slice(&req[8..14]); // target: the requester
        arp[24..28].copy_from_slice(&req[14..18]);
        return;
    }
    let ihl = usize::from(frame[ETH] & 0x0f) * 4;
    let ipv4 = &mut out[ETH..];
    // Swapping the addresses leaves the header checksum valid (a ones' complement sum).
    ipv4[12..16].copy_from_slice(&frame[ETH + 16..ETH + 20]);
    ipv4[16..20].copy_from_slice(&frame[ETH + 12..ETH + 16]);
    let udp = &mut ipv4[ihl..];
    udp[0..2].copy_from_slice(&frame[ETH + ihl + 2..ETH + ihl + 4]);
    udp[2..4].copy_from_slice(&frame[ETH + ihl..ETH + ihl + 2]);
    udp[6..8].fill(0); // no UDP checksum (allowed over IPv4, RFC 768)
    if let Some(b) = udp.get_mut(8) {
        *b = digit;
    }
}

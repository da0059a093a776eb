//! The poll loop: one pass polls the NIC and every service and runs each ready request to
//! completion. No interrupts, no locks and no allocation on the data path.

use crate::config::DevConfig;
use crate::cores::Links;
use crate::fnq::Hub;
use crate::hw::Nic;
use crate::klog;
use crate::mgmt::MgmtService;
use crate::net::{Addressing, NetStack};
use crate::percore::Holder;
use crate::plan::{Plan, Source};
use crate::platform::{Platform, ivshmem_windows, shared_memory_bars};
use crate::provisioned::PROVISION_PUBKEY;
use crate::qemu::QemuNic;
use crate::qemu::{Qemu, load_identity};
use crate::services::{RamSharing, Services, WindowPort};
use alloc::{format, vec::Vec};
use keel_hal::arch::percpu;
use keel_hal::virtio_net::{self, QueuePair};
use keel_hal::{
    arch::timer,
    ivshmem::{IvshmemRegisters, IvshmemWindow},
    println,
    virtio_net::VirtioNet,
};

/// NVMe/TCP port (NVMe/TCP transport spec 1.0 §7.4.4, IANA).
pub const NVMF_PORT: u16 = 4420;
/// NVMe discovery port.
pub const DISCOVERY_PORT: u16 = 8009;

/// How long boot waits for a DHCP lease before declaring itself ready anyway.
const DHCP_WAIT_NS: u64 = 3_000_000_000;
/// How long core 0 waits, before `keel: ready`, for the other cores to bring up their
/// NVMe/TCP planes.
const PLANES_WAIT_NS: u64 = 5_000_000_000;

/// The network stack of core 0, and the queue pairs of the other cores when they serve
/// NVMe/TCP too: with `cores` > 1, a static address (the other cores have no DHCP client)
/// and a device that offers multiqueue, the NIC comes up with a pair per core.
fn bring_up_net(
    platform: &Platform,
    addressing: Addressing,
    cores: usize,
) -> (Option<NetStack<Qemu>>, Vec<QueuePair>) {
    let Some(host) = platform.dt.pcie.as_ref() else {
        return (None, Vec::new());
    };
    let Some(f) = platform.pci.iter().find(|f| {
        f.vendor == 0x1af4 && (f.device == 0x1041 || f.device == 0x1000) && f.class.0 == 0x02
    }) else {
        return (None, Vec::new());
    };
    if cores > 1 && f.device == 0x1041 && matches!(addressing, Addressing::Static(..)) {
        // SAFETY: as below.
        let nic = unsafe {
            virtio_net::multiqueue(
                host.ecam.base as usize,
                f.bdf.bus,
                f.bdf.dev,
                f.bdf.func,
                cores as u16,
            )
        };
        match nic {
            Ok((control, mut pairs)) if pairs.len() > 1 => {
                let off = control.offloads();
                klog::info!(
                    "net: virtio-net at {} MAC {}, checksum offload: transmit {}, receive {}, TCP segmentation offload {}, receive segmentation offload {}; {} queue pairs: NVMe/TCP on cores 0..{}",
                    klog::D(&f.bdf),
                    klog::Mac(control.mac()),
                    off.tx_csum,
                    off.rx_csum,
                    off.tso4,
                    off.rx_tso4,
                    pairs.len(),
                    pairs.len() - 1
                );
                let pair0 = pairs.remove(0);
                let nic = QemuNic::Pair {
                    mac: control.mac(),
                    pair: pair0,
                    control: Some(alloc::boxed::Box::new(control)),
                };
                let net = NetStack::new(nic, addressing, timer::now_ns(), timer::counter());
                return (Some(net), pairs);
            }
            Ok(_) => {
                klog::info!("net: the NIC offers one queue pair: NVMe/TCP on core 0 only");
            }
            Err(e) => {
                klog::error!("net: {}; serving nothing over the network", klog::D(&e));
                return (None, Vec::new());
            }
        }
    }
    (
        bring_up_one(host.ecam.base as usize, f, addressing),
        Vec::new(),
    )
}

fn bring_up_one(
    ecam_base: usize,
    f: &keel_hal::pcie::Function,
    addressing: Addressing,
) -> Option<NetStack<Qemu>> {
    // SAFETY: the ECAM region is mapped as device memory; the virtio-net function's BARs were
    // assigned by enumeration and lie in the mapped windows; nothing else drives it.
    let nic = unsafe { VirtioNet::new(ecam_base, f.bdf.bus, f.bdf.dev, f.bdf.func) };
    match nic {
        Ok(nic) => {
            let off = nic.offloads();
            klog::info!(
                "net: virtio-net at {} MAC {}, checksum offload: transmit {}, receive {}, TCP segmentation offload {}, receive segmentation offload {}",
                klog::D(&f.bdf),
                klog::Mac(nic.mac()),
                off.tx_csum,
                off.rx_csum,
                off.tso4,
                off.rx_tso4
            );
            Some(NetStack::new(
                QemuNic::Single(nic),
                addressing,
                timer::now_ns(),
                timer::counter(),
            ))
        }
        Err(e) => {
            klog::error!("net: {}; serving nothing over the network", klog::D(&e));
            None
        }
    }
}

/// Brings the services up, prints `keel: ready` and polls forever.
pub fn run(mut platform: Platform, cores: usize) -> ! {
    let features = keel_hal::arch::cpu::Features::read();
    keel_nvmf_tcp::crc32c::set_hardware(features.crc32);
    if !features.crc32 {
        klog::warning!("cpu: no CRC32 instructions: NVMe/TCP digests use the table-driven CRC32C");
    }
    // The configuration: the newest flash copy that verifies, else the boot arguments.
    let mut identity = load_identity(&platform);
    let provisioned = identity.load_config();
    if provisioned.is_none() {
        klog::info!("config: no provisioned configuration; using boot arguments");
    }
    let addressing = match &provisioned {
        Some((cfg, _)) => crate::plan::addressing(&cfg.device.network),
        None => Addressing::from_bootargs(platform.dt.bootargs.as_str()),
    };
    let (mut net, pairs) = bring_up_net(&platform, addressing, cores);
    let mac = net.as_ref().map_or([0; 6], |n| n.device.mac());
    // Core queue pairs on each drive: one per other core serving NVMe/TCP (`percore`), then,
    // when there can be emulated functions, one per other core serving their pairs (`fnq`).
    let tcp_queues = pairs.len();
    let fn_queues = if cores > 1 && shared_memory_bars(&platform.pci).count() > 0 {
        cores - 1
    } else {
        0
    };
    let drives = crate::drives::bring_up(&platform, (tcp_queues + fn_queues) as u16);
    let plan = match provisioned {
        Some((cfg, source)) => Plan::from_bundle(&cfg, source, mac, PROVISION_PUBKEY),
        None => {
            let cfg = DevConfig::from_bootargs(platform.dt.bootargs.as_str(), mac);
            let drive_namespaces: alloc::vec::Vec<(usize, u32)> = drives
                .iter()
                .enumerate()
                .flat_map(|(d, drive)| drive.namespaces.iter().map(move |n| (d, n.nsid)))
                .collect();
            let windows = shared_memory_bars(&platform.pci).count();
            Plan::from_dev(
                &cfg,
                &drive_namespaces,
                windows,
                addressing,
                PROVISION_PUBKEY,
            )
        }
    };
    let windows = ivshmem_windows(&platform.pci)
        .map(|(bar, regs)| WindowPort {
            base: bar.base,
            size: bar.size,
            // SAFETY: BAR2 of an ivshmem function, mapped as normal memory by the platform's
            // final page table, used by nothing else.
            ep: unsafe { IvshmemWindow::new(bar.base as usize, bar.size as usize) }
                .map(|mut w| {
                    let regs = regs.and_then(|r| {
                        // SAFETY: BAR0 of the same ivshmem-doorbell function, inside a host
                        // bridge window the final page table maps as device memory, driven
                        // by nothing else.
                        unsafe { IvshmemRegisters::new(r.base as usize, r.size as usize) }
                    });
                    if let Some(r) = regs {
                        klog::info!(
                            "ivshmem: window at {:#x} has a doorbell (ivshmem-doorbell, peer {})",
                            bar.base,
                            r.iv_position()
                        );
                        w.attach_doorbell(r);
                    }
                    w
                })
                .map_err(|e| format!("{e}")),
        })
        .collect::<Vec<_>>();
    let mut services = Services::build_with(
        plan,
        drives,
        windows,
        net.is_some(),
        identity,
        // Other cores serve NVMe/TCP I/O queues (a queue pair each) and emulated functions'
        // I/O queue pairs (`crate::fnq`) over the same RAM; without a queue pair each, only
        // the functions'.
        if !pairs.is_empty() {
            RamSharing::All
        } else if cores > 1 {
            RamSharing::Functions
        } else {
            RamSharing::None
        },
    );
    if cores > 1 {
        // Core 0's target takes its part of each capped drive domain with the other cores'.
        services.cross_core = Some(crate::shares::CrossCore::new(
            crate::shares::demand_row(0, false),
            &crate::cores::DEMANDS,
            crate::cores::running_mask,
        ));
    }
    let mut mgmt: Option<MgmtService> = None;
    if let Some(net) = net.as_mut() {
        let plan = services.plan();
        for s in plan.subsystems.iter().filter(|s| {
            plan.source != Source::BootArgs || !s.nqn.starts_with("nqn.2026-11.dev.keel:fn")
        }) {
            klog::info!("nvmf: subsystem {} serial {}", s.nqn, s.serial);
            match s.allowed_hosts.len() {
                0 if plan.source == Source::BootArgs => {
                    klog::info!("nvmf: any host may connect (development configuration)")
                }
                0 => klog::info!("nvmf: any host may connect to {}", s.nqn),
                n => klog::info!(
                    "nvmf: {} allowed host(s): {}",
                    n,
                    klog::Dbg(&s.allowed_hosts)
                ),
            }
        }
        net.listen(NVMF_PORT);
        net.listen(DISCOVERY_PORT);
        mgmt = Some(MgmtService::start(services.plan().mgmt_port, net));
        let start = timer::now_ns();
        while net.address().is_none() && timer::now_ns() - start < DHCP_WAIT_NS {
            net.poll(timer::now_ns());
        }
    }
    let mut holder = percpu::with_local::<Links, _>(|links| {
        Holder::start(links, pairs, mac, addressing, &mut services)
    })
    .flatten();
    // Every core's stack has this address: each takes its outgoing connections' local
    // ports from its own share of the ephemeral range (`percore::client_ports`).
    if holder.is_some()
        && let Some(n) = net.as_mut()
    {
        crate::percore::share_ports_on_core0(n, percpu::cores().len());
    }
    // The emulated functions' I/O queue pairs on every core (`crate::fnq`).
    let mut hub =
        percpu::with_local::<Links, _>(|links| Hub::start(links, &mut services, tcp_queues))
            .flatten();
    let mut no_inbox = Vec::new();
    // `keel: ready` means every core listens: a connection the NIC steers to a core whose
    // plane is not up yet would be refused.
    if let Some(h) = holder.as_ref() {
        let up = crate::cores::wait_for_planes(h.served(), PLANES_WAIT_NS);
        if up != h.served() {
            klog::warning!(
                "percore: core mask {} of {} serves NVMe/TCP; frames the NIC steers to the others go unanswered",
                up,
                h.served()
            );
        }
    }
    let ready_ns = timer::now_ns();
    let addr = net.as_ref().and_then(NetStack::address);
    let functions = match services.functions() {
        0 => alloc::string::String::new(),
        n => alloc::format!("; {n} emulated NVMe function(s)"),
    };
    match (&net, addr) {
        (Some(_), Some(a)) => println!(
            "keel: ready in {}.{:03} ms (reset to poll loop); nvme/tcp {}:{} discovery {}:{}{}",
            ready_ns / 1_000_000,
            (ready_ns / 1_000) % 1_000,
            a.address(),
            NVMF_PORT,
            a.address(),
            DISCOVERY_PORT,
            functions
        ),
        _ => println!(
            "keel: ready in {}.{:03} ms (reset to poll loop); no network address{}{}",
            ready_ns / 1_000_000,
            (ready_ns / 1_000) % 1_000,
            if net.is_some() {
                " yet (DHCP pending)"
            } else {
                " (no NIC)"
            },
            functions
        ),
    }
    #[cfg(feature = "test-build")]
    crate::testhooks::after_ready(&platform);
    let sleeps = net
        .as_mut()
        .is_some_and(|n| enable_wakeups(&mut platform, n));
    let mut last_busy = timer::now_ns();
    let counters = crate::cores::own_counters();
    // With other cores serving NVMe/TCP, their messages ring core 0's doorbell while it
    // sleeps (`cores::BootWake`); without the doorbell they would wait for the timer.
    let others = holder.is_some() || hub.is_some();
    let doorbell = others && sleeps && crate::cores::BOOT_WAKE.enabled();
    let max_sleep = if others && !doorbell {
        // Forwarded commands from the other cores arrive on the rings, which then raise no
        // interrupt here: they wait at most this.
        HOLDER_SLEEP_NS
    } else {
        MAX_SLEEP_NS
    };
    let wakes = &crate::cores::WAKES[0];
    loop {
        let now = timer::now_ns();
        // The other cores' messages first, then the network and the windows: what a core
        // reported (an error for a controller's log, an Abort's verdict) before its frames
        // left is in place before a host's next admin command is read. It also stamps the
        // changes a push staged (`crate::replica`) with the time they leave, not with the
        // start of a pass that may have spent a second applying the push (a large RAM
        // namespace zeroed), which must not count against the other cores' acks.
        let mut busy = false;
        if let Some(h) = holder.as_mut() {
            let inbox = hub.as_mut().map_or(&mut no_inbox, |h| &mut h.inbox);
            busy |= percpu::with_local::<Links, _>(|links| {
                h.poll(now, links, &mut services, net.as_mut(), inbox)
            })
            .unwrap_or(false);
        }
        if let Some(h) = hub.as_mut() {
            let own_rx = holder.is_none();
            busy |= percpu::with_local::<Links, _>(|links| h.poll(links, &mut services, own_rx))
                .unwrap_or(false);
        }
        busy |= pass(now, net.as_mut(), &mut services, mgmt.as_mut());
        if let Some(s) = services.nvmf.as_ref() {
            crate::cores::NVMF[0].publish(s.accepted, s.commands);
        }
        if let Some(n) = net.as_ref() {
            crate::cores::NIC[0].publish(n.device.counters());
        }
        counters.pass(busy);
        if busy {
            last_busy = now;
            continue;
        }
        let mgmt_idle = mgmt.as_ref().is_none_or(MgmtService::may_sleep);
        let holder_idle = holder.as_ref().is_none_or(Holder::may_sleep)
            && hub.as_ref().is_none_or(Hub::may_sleep);
        if !sleeps
            || !services.may_sleep()
            || !mgmt_idle
            || !holder_idle
            || now - last_busy < IDLE_SPIN_NS
        {
            core::hint::spin_loop();
            continue;
        }
        // Idle: clear the NIC's interrupt, look once more (a frame may have arrived before
        // the clear), then sleep until a frame arrives or the next timer is due.
        let Some(n) = net.as_mut() else { continue };
        if n.device.ack_wakeup() && holder.is_some() {
            // The shared interrupt was raised while this core was busy: it may have been a
            // frame on another core's pair, which would otherwise wait for that core's
            // timer. Ring them now.
            percpu::with_local::<Links, _>(|links| Holder::wake_all(links));
        }
        if doorbell {
            // Doorbells (SGIs) stay pending until acknowledged; the NIC's interrupt status
            // was acknowledged just above, so its line is down unless a frame came since
            // (then it is pending again and the WFI below returns at once).
            if let Some(g) = platform.gic.as_mut() {
                g.take_doorbells();
            }
            // "Sleeping", full barrier, then the rings once more (`cores::BootWake`).
            crate::cores::BOOT_WAKE.going_to_sleep();
            if rings_waiting() {
                crate::cores::BOOT_WAKE.awake();
                last_busy = now;
                continue;
            }
        }
        if pass(now, net.as_mut(), &mut services, mgmt.as_mut()) {
            if doorbell {
                crate::cores::BOOT_WAKE.awake();
            }
            last_busy = now;
            continue;
        }
        let delay_ns = net
            .as_mut()
            .and_then(|n| n.poll_delay(now))
            .map_or(max_sleep, |d| d.total_micros().saturating_mul(1_000))
            .min(max_sleep)
            .min(
                services
                    .next_deadline()
                    .map_or(u64::MAX, |d| d.saturating_sub(now)),
            )
            .min(services.qos_wakeup_in(now).unwrap_or(max_sleep));
        counters.slept();
        let deadline = timer::counter().saturating_add(timer::ns_to_ticks(delay_ns));
        timer::arm_wakeup(deadline);
        timer::wait_for_interrupt();
        if holder.is_some() {
            // The NIC's interrupt (shared by every pair) may have been for another core:
            // ring them first, before anything else here delays them.
            percpu::with_local::<Links, _>(|links| Holder::wake_all(links));
        }
        timer::disarm_wakeup();
        if doorbell {
            let rung = crate::cores::BOOT_WAKE.awake();
            // Its timer, not a doorbell, ended a sleep with messages waiting: a lost
            // wake-up the bounded sleep rescued (a message pushed just as the timer fired
            // counts too: an upper bound).
            if !rung && timer::counter() >= deadline && rings_waiting() {
                wakes.rescued();
            }
        }
    }
}

/// Whether a message from another core waits on one of core 0's rings.
fn rings_waiting() -> bool {
    percpu::with_local::<Links, _>(|links| links.0.iter_mut().any(|l| !l.rx.is_empty()))
        .unwrap_or(false)
}

/// How long the loop keeps spinning after its last piece of work before it may sleep.
const IDLE_SPIN_NS: u64 = 200_000;
/// The longest sleep (timers inside the services, such as keep-alive, need no finer grain).
const MAX_SLEEP_NS: u64 = 5_000_000;
/// The longest sleep while other cores serve NVMe/TCP (see [`crate::percore`]).
const HOLDER_SLEEP_NS: u64 = 1_000_000;

/// One pass over the NIC and the services; returns whether anything happened. What came in
/// is handled before anything is sent: the responses of the whole pass leave together, the
/// ACKs of the commands riding on them (no separate ACK frame, no send per response).
fn pass(
    now: u64,
    mut net: Option<&mut NetStack<Qemu>>,
    services: &mut Services<Qemu>,
    mgmt: Option<&mut MgmtService>,
) -> bool {
    let mut busy = false;
    if let Some(n) = net.as_deref_mut() {
        busy |= n.poll_ingress(now);
        if !services.serves_tcp() {
            for a in n.take_accepted().collect::<alloc::vec::Vec<_>>() {
                n.release(a.handle, false, now);
            }
        }
    }
    if let (Some(m), Some(n)) = (mgmt, net.as_deref_mut()) {
        busy |= m.poll(now, n, services);
    }
    busy |= services.poll(now, net.as_deref_mut());
    if let Some(n) = net {
        busy |= n.poll_egress(now);
    }
    busy
}

/// Makes the NIC's interrupt and the timer's wake the core from WFI (interrupts stay masked:
/// nothing is taken). Returns false, and the loop busy-polls, if any part is missing.
fn enable_wakeups(platform: &mut Platform, net: &mut NetStack<Qemu>) -> bool {
    let nic_intid = platform
        .pci
        .iter()
        .find(|f| f.class.0 == 0x02 && f.vendor == 0x1af4)
        .and_then(|f| {
            platform
                .dt
                .pcie
                .as_ref()?
                .intx_intid(f.bdf.bus, f.bdf.dev, f.bdf.func, f.irq_pin)
        });
    let (Some(gic), Some(timer_intid), Some(nic_intid)) =
        (platform.gic.as_mut(), platform.dt.timer_intid, nic_intid)
    else {
        klog::warning!("poll: no interrupt routing for wake-ups; the poll loop never sleeps");
        return false;
    };
    if gic.enable_wakeup(timer_intid, true).is_err() || gic.enable_wakeup(nic_intid, true).is_err()
    {
        klog::warning!("poll: could not enable wake-up interrupts; the poll loop never sleeps");
        return false;
    }
    net.device.enable_wakeups();
    true
}

//! The storage services: one controller core ([`Target`]) holding every subsystem and
//! namespace, and the transports in front of it: NVMe/TCP and the emulated PCIe functions.
//! Local NVMe drives are backends behind it.
//!
//! Subsystems and namespaces (development configuration, [`DevConfig`]):
//! - the NVMe/TCP subsystem (`keel.nqn`): namespaces from `keel.ns=` if given; otherwise one
//!   per `keel.ram=` size; otherwise one per local drive namespace (whole); otherwise one
//!   RAM namespace of 256 MiB. `keel.xts=NSID:KEY` encrypts one of them with AES-XTS;
//! - one subsystem per emulated function (`nqn.2026-11.dev.keel:fnN`), with one RAM namespace
//!   of `keel.fn.ram` MiB: a function never reaches another's data.
//!
//! Every pass of the poll loop: the transports take new commands to the core, the drives ring
//! their doorbells and reap completions, the core delivers completions (routed by queue to the
//! emulated function that owns it, the rest to NVMe/TCP), and NVMe/TCP flushes its sockets.

use crate::config::{DevConfig, KeyArg, NsSpec};
use crate::drives::{self, LocalDrive};
use crate::net::NetStack;
use crate::nvmf::NvmfService;
use crate::platform::{Platform, shared_memory_bars};
use alloc::{boxed::Box, format, string::String, vec::Vec};
use keel_controller::{Instant, Limits, NamespaceConfig, SubsystemConfig, Target, TargetConfig};
use keel_crypto::{EncryptedBackend, XtsKey};
use keel_hal::{arch::cpu, ivshmem::IvshmemWindow};
use keel_nvme_pcie::{FunctionConfig, FunctionState, PcieFunction};
use keel_storage::{BlockBackend, BufPool, RamBackend, SharedBackend, SliceBackend};

/// Requests one namespace's backend holds at most between polls.
const BACKEND_DEPTH: usize = 4096;
/// Data buffers of each emulated function (128 KiB each: MDTS).
const FUNCTION_BUFFERS: usize = 64;
const FUNCTION_BUFFER_SIZE: usize = 128 * 1024;

/// An emulated NVMe function: its endpoint and the controller emulation.
struct Emulated {
    ep: IvshmemWindow,
    f: PcieFunction,
}

/// Everything behind the poll loop's network and endpoint polling.
pub struct Services {
    target: Target,
    nvmf: Option<NvmfService>,
    functions: Vec<Emulated>,
    drives: Vec<LocalDrive>,
}

impl core::fmt::Debug for Services {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Services")
            .field("functions", &self.functions.len())
            .field("drives", &self.drives.len())
            .finish_non_exhaustive()
    }
}

/// A zeroed, page-aligned region for data buffers that devices reach by DMA (the heap is
/// identity-mapped: the address is also the DMA address). Lives for the rest of the run.
pub fn dma_region(len: usize) -> &'static mut [u8] {
    const PAGE: usize = 4096;
    let raw = alloc::vec![0u8; len + PAGE].leak();
    let skip = raw.as_ptr().align_offset(PAGE).min(PAGE);
    &mut raw[skip..skip + len]
}

fn ram(bytes: u64, block_size: u32) -> Option<Box<dyn BlockBackend>> {
    match RamBackend::new(block_size, bytes / u64::from(block_size), BACKEND_DEPTH) {
        Ok(r) => Some(Box::new(r)),
        Err(e) => {
            log::error!("storage: RAM namespace of {} MiB: {e}", bytes >> 20);
            None
        }
    }
}

/// Builds the NVMe/TCP subsystem's backends from the configuration and the drives.
fn tcp_backends(
    cfg: &DevConfig,
    drives: &mut [LocalDrive],
) -> Vec<(String, Box<dyn BlockBackend>)> {
    let specs: Vec<NsSpec> = match (&cfg.namespaces, &cfg.ram) {
        (Some(specs), _) => specs.clone(),
        (None, Some(sizes)) => sizes.iter().map(|&b| NsSpec::Ram(b)).collect(),
        (None, None) => {
            let from_drives: Vec<NsSpec> = drives
                .iter()
                .enumerate()
                .flat_map(|(d, drive)| {
                    drive.namespaces.iter().map(move |n| NsSpec::Drive {
                        drive: d,
                        nsid: n.nsid,
                        slice: None,
                    })
                })
                .collect();
            if from_drives.is_empty() {
                alloc::vec![NsSpec::Ram(256 << 20)]
            } else {
                from_drives
            }
        }
    };
    // Drive namespaces used by several specs (slices) are shared; the rest are used whole.
    let uses = |d: usize, n: u32| {
        specs
            .iter()
            .filter(|s| matches!(s, NsSpec::Drive { drive, nsid, .. } if *drive == d && *nsid == n))
            .count()
    };
    let mut shared: Vec<((usize, u32), SharedBackend<keel_hal::nvme::NvmeBackend>)> = Vec::new();
    let mut out = Vec::new();
    for spec in &specs {
        let backend: Option<Box<dyn BlockBackend>> = match *spec {
            NsSpec::Ram(bytes) => ram(bytes, cfg.block_size),
            NsSpec::Drive { drive, nsid, slice } => {
                let many = uses(drive, nsid) > 1 || slice.is_some();
                let Some(d) = drives.get_mut(drive) else {
                    log::error!("storage: no drive {drive} for namespace spec {spec}");
                    continue;
                };
                if !many {
                    match d.namespaces.iter().position(|n| n.nsid == nsid) {
                        Some(i) => Some(d.namespaces.swap_remove(i).boxed()),
                        None => {
                            log::error!(
                                "storage: drive {drive} has no namespace {nsid} (or it is already used)"
                            );
                            None
                        }
                    }
                } else {
                    if !shared.iter().any(|(k, _)| *k == (drive, nsid)) {
                        match d.namespaces.iter().position(|n| n.nsid == nsid) {
                            Some(i) => {
                                let ns = d.namespaces.swap_remove(i);
                                shared.push((
                                    (drive, nsid),
                                    SharedBackend::new(ns.backend, BACKEND_DEPTH),
                                ));
                            }
                            None => {
                                log::error!("storage: drive {drive} has no namespace {nsid}");
                                continue;
                            }
                        }
                    }
                    let Some((_, sb)) = shared.iter().find(|(k, _)| *k == (drive, nsid)) else {
                        continue;
                    };
                    let Ok(handle) = sb.handle() else {
                        log::error!("storage: drive {drive} namespace {nsid}: too many slices");
                        continue;
                    };
                    let g = handle.geometry();
                    let (start, blocks) = match slice {
                        Some((off, len)) => (
                            off / u64::from(g.block_size),
                            len.map_or(
                                g.blocks.saturating_sub(off / u64::from(g.block_size)),
                                |l| l / u64::from(g.block_size),
                            ),
                        ),
                        None => (0, g.blocks),
                    };
                    match SliceBackend::new(handle, start, blocks) {
                        Ok(s) => Some(Box::new(s) as Box<dyn BlockBackend>),
                        Err(e) => {
                            log::error!("storage: {spec}: {e}");
                            None
                        }
                    }
                }
            }
        };
        if let Some(b) = backend {
            out.push((format!("{spec}"), b));
        }
    }
    out
}

/// Wraps `backend` in AES-XTS when `key` is given; `what` names the namespace in messages.
fn encrypt(
    what: &str,
    key: Option<&KeyArg>,
    backend: Box<dyn BlockBackend>,
) -> Option<Box<dyn BlockBackend>> {
    let Some(k) = key else {
        return Some(backend);
    };
    let features = cpu::Features::read();
    if !(features.aes && features.pmull) {
        log::error!(
            "crypto: {what} is configured encrypted but this CPU has no AES/PMULL \
             instructions (ID_AA64ISAR0_EL1.AES < 2): the namespace is not served"
        );
        return None;
    }
    match XtsKey::from_hex(&k.hex) {
        Ok(key) => {
            log::info!(
                "crypto: {what} encrypted with {} (key from boot arguments)",
                key.cipher().name()
            );
            Some(Box::new(EncryptedBackend::new(
                backend,
                &key,
                BACKEND_DEPTH,
            )))
        }
        Err(e) => {
            log::error!("crypto: {what}: {e}: the namespace is not served");
            None
        }
    }
}

impl Services {
    /// Builds the target, the transports and the drives.
    pub fn build(platform: &mut Platform, cfg: &DevConfig, network: bool) -> Services {
        let mut drives = drives::bring_up(platform);
        let mut subsystems = Vec::new();

        let mut namespaces = Vec::new();
        for (i, (what, backend)) in tcp_backends(cfg, &mut drives).into_iter().enumerate() {
            let nsid = i as u32 + 1;
            let encrypted = cfg.key_for(nsid).is_some();
            let Some(backend) = encrypt(&format!("namespace {nsid}"), cfg.key_for(nsid), backend)
            else {
                continue;
            };
            let g = backend.geometry();
            log::info!(
                "nvmf: namespace {nsid} = {what}: {} MiB, {}-byte blocks{}",
                (g.blocks * u64::from(g.block_size)) >> 20,
                g.block_size,
                if encrypted { ", encrypted" } else { "" }
            );
            namespaces.push(NamespaceConfig {
                nsid,
                backend,
                nguid: cfg.nguid(0, nsid),
                uuid: [0; 16],
                eui64: [0; 8],
            });
        }
        subsystems.push(SubsystemConfig {
            nqn: cfg.nqn.clone(),
            serial: cfg.serial.clone(),
            model: String::from("Keel NVMe/TCP target"),
            allowed_hosts: cfg.allowed_hosts.clone(),
            namespaces,
        });

        // Emulated functions: one per ivshmem window.
        let windows: Vec<_> = shared_memory_bars(&platform.pci).collect();
        let mut fn_nqns = Vec::new();
        for (i, _) in windows.iter().enumerate() {
            let nqn = format!("nqn.2026-11.dev.keel:fn{i}");
            let key = cfg.function_keys.iter().find(|k| k.nsid == i as u32);
            let backend = ram(cfg.function_ram, 512)
                .and_then(|b| encrypt(&format!("function {i} namespace 1"), key, b));
            let ns = backend.map(|backend| NamespaceConfig {
                nsid: 1,
                backend,
                nguid: cfg.nguid(i as u16 + 1, 1),
                uuid: [0; 16],
                eui64: [0; 8],
            });
            subsystems.push(SubsystemConfig {
                nqn: nqn.clone(),
                serial: format!("{}F{i}", cfg.serial),
                model: String::from("Keel emulated NVMe"),
                allowed_hosts: Vec::new(),
                namespaces: ns.into_iter().collect(),
            });
            fn_nqns.push(nqn);
        }

        let limits = Limits {
            max_queue_depth: 256,
            max_controllers: 16 + windows.len(),
            max_queues: 16 * 9 + 16 + windows.len() * 10,
            ..Limits::default()
        };
        let mut target = match Target::new(TargetConfig {
            subsystems,
            limits,
            ..Default::default()
        }) {
            Ok(t) => t,
            Err(e) => {
                log::error!("core: configuration refused: {e}; serving an empty target");
                Target::new(TargetConfig::default()).expect("the empty configuration is valid")
            }
        };

        let mut functions = Vec::new();
        for (i, (bar, nqn)) in windows.iter().zip(fn_nqns).enumerate() {
            // SAFETY: BAR2 of an ivshmem-plain function, mapped as normal memory by the
            // platform's final page table, used by nothing else.
            let ep = match unsafe { IvshmemWindow::new(bar.base as usize, bar.size as usize) } {
                Ok(ep) => ep,
                Err(e) => {
                    log::error!("pcie-fn{i}: {e}");
                    continue;
                }
            };
            let region = dma_region(FUNCTION_BUFFERS * FUNCTION_BUFFER_SIZE);
            let dma = region.as_ptr() as u64;
            let f = BufPool::new(region, dma, FUNCTION_BUFFER_SIZE)
                .map_err(|e| log::error!("pcie-fn{i}: buffers: {e}"))
                .ok()
                .and_then(|pool| {
                    PcieFunction::new(FunctionConfig::new(&nqn), pool)
                        .map_err(|e| log::error!("pcie-fn{i}: {e:?}"))
                        .ok()
                });
            if let Some(mut f) = f {
                let mut ep = ep;
                // Registers first (the function's first poll writes CAP and VS), then the
                // header a host waits for.
                ep.clear();
                f.poll(
                    Instant::from_nanos(keel_hal::arch::timer::now_ns()),
                    &mut target,
                    &mut ep,
                );
                ep.publish(i as u16);
                log::info!(
                    "pcie-fn{i}: emulated NVMe function on window {:#x}+{} MiB, subsystem {nqn}, {} MiB RAM namespace",
                    bar.base,
                    bar.size >> 20,
                    cfg.function_ram >> 20
                );
                functions.push(Emulated { ep, f });
            }
        }

        let nvmf = if network {
            NvmfService::new(cfg.advertise.clone())
                .map_err(|e| log::error!("nvmf: buffers: {e}"))
                .ok()
        } else {
            None
        };
        Services {
            target,
            nvmf,
            functions,
            drives,
        }
    }

    /// Whether the NVMe/TCP service runs.
    pub fn serves_tcp(&self) -> bool {
        self.nvmf.is_some()
    }

    /// Number of emulated functions.
    pub fn functions(&self) -> usize {
        self.functions.len()
    }

    /// One pass; returns whether anything happened.
    pub fn poll(&mut self, now_ns: u64, net: Option<&mut NetStack>) -> bool {
        let now = Instant::from_nanos(now_ns);
        let mut busy = false;
        let Self {
            target,
            nvmf,
            functions,
            drives,
        } = self;
        for e in functions.iter_mut() {
            busy |= e.f.poll(now, target, &mut e.ep);
        }
        let mut net = net;
        if let (Some(s), Some(n)) = (nvmf.as_mut(), net.as_deref_mut()) {
            busy |= s.poll(now_ns, n, target);
        }
        for d in drives.iter() {
            busy |= d.poll(now_ns);
        }
        busy |= target.poll(now, &mut |ev| {
            let mut ev = Some(ev);
            for e in functions.iter_mut() {
                match ev.take() {
                    Some(x) => ev = e.f.handle_event(x, &mut e.ep),
                    None => break,
                }
            }
            if let (Some(x), Some(s)) = (ev, nvmf.as_mut()) {
                s.on_event(x);
            }
        }) > 0;
        if let (Some(s), Some(n)) = (nvmf.as_mut(), net) {
            s.flush(n);
        }
        busy
    }

    /// Whether the core may sleep: no emulated function is live (their host writes doorbells
    /// in memory, which raises no interrupt) and no drive has commands outstanding (drive
    /// completions raise no interrupt either).
    pub fn may_sleep(&self) -> bool {
        self.functions
            .iter()
            .all(|e| e.f.state() == FunctionState::Disabled)
            && self.drives.iter().all(|d| d.outstanding() == 0)
    }
}

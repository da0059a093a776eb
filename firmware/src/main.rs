//! The Keel firmware image: a `no_std` unikernel for the Arm cores of a DPU.
//!
//! Boot (in `keel-hal`) → platform from the device tree ([`platform`]) → the other cores,
//! each with its own poll loop ([`cores`]) → services → core 0's poll loop ([`poll`]). Built for `aarch64-unknown-none`; on any other target this crate
//! is an empty program that says how to build it.
#![cfg_attr(target_os = "none", no_std, no_main)]
#![cfg_attr(
    test,
    allow(
        dead_code,
        reason = "the poll loop, built for the target only, uses what the host tests leave unused"
    )
)]

#[cfg(any(test, target_os = "none"))]
mod klog;

// The services: hardware-free, generic over `hw::Hw`; built for the host too, where their
// unit tests run (`cargo test -p keel-firmware`).
#[cfg(any(test, target_os = "none"))]
mod challenge;
#[cfg(any(test, target_os = "none"))]
mod config;
#[cfg(any(test, target_os = "none"))]
mod device;
#[cfg(any(test, target_os = "none"))]
mod health;
#[cfg(any(test, target_os = "none"))]
mod hw;
#[cfg(any(test, target_os = "none"))]
mod mgmt;
#[cfg(any(test, target_os = "none"))]
mod net;
#[cfg(any(test, target_os = "none"))]
mod nvmf;
#[cfg(any(test, target_os = "none"))]
mod plan;
#[cfg(any(test, target_os = "none"))]
mod provisioned;
#[cfg(any(test, target_os = "none"))]
mod remote;
#[cfg(any(test, target_os = "none"))]
mod replica;
#[cfg(any(test, target_os = "none"))]
mod services;
#[cfg(any(test, target_os = "none"))]
mod sharedram;
#[cfg(any(test, target_os = "none"))]
mod shares;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_percore;

// The board: keel-hal's drivers, boot, the poll loops.
#[cfg(target_os = "none")]
mod cores;
#[cfg(target_os = "none")]
mod drives;
#[cfg(target_os = "none")]
mod fatal;
#[cfg(target_os = "none")]
mod fnq;
#[cfg(all(target_os = "none", feature = "test-build"))]
mod netmq;
#[cfg(target_os = "none")]
mod percore;
#[cfg(target_os = "none")]
mod platform;
#[cfg(target_os = "none")]
mod poll;
#[cfg(target_os = "none")]
mod qemu;
#[cfg(all(target_os = "none", feature = "test-build"))]
mod testhooks;

#[cfg(any(test, target_os = "none"))]
extern crate alloc;

#[cfg(target_os = "none")]
keel_hal::entry!(main);

#[cfg(target_os = "none")]
fn main(info: keel_hal::arch::boot::BootInfo) -> ! {
    let mut platform = match platform::bring_up(&info) {
        Ok(p) => p,
        Err(e) => fatal::boot_failed(e),
    };
    let cores = cores::start(&mut platform, info.entry_el);
    poll::run(platform, cores)
}

#[cfg(all(not(target_os = "none"), not(test)))]
fn main() {
    eprintln!(
        "keel-firmware is a bare-metal image: build it with \
         `cargo build --release -p keel-firmware --target aarch64-unknown-none`, \
         or boot it in QEMU with `qemu/run`."
    );
    std::process::exit(2);
}

//! The Keel firmware image: a `no_std` unikernel for the Arm cores of a DPU.
//!
//! Boot (in `keel-hal`) → platform from the device tree ([`platform`]) → the other cores,
//! each with its own poll loop ([`cores`]) → services → core 0's poll loop ([`poll`]). Built for `aarch64-unknown-none`; on any other target this crate
//! is an empty program that says how to build it.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod config;
#[cfg(target_os = "none")]
mod cores;
#[cfg(target_os = "none")]
mod device;
#[cfg(target_os = "none")]
mod drives;
#[cfg(target_os = "none")]
mod fatal;
#[cfg(target_os = "none")]
mod mgmt;
#[cfg(target_os = "none")]
mod net;
#[cfg(all(target_os = "none", feature = "test-build"))]
mod netmq;
#[cfg(target_os = "none")]
mod nvmf;
#[cfg(target_os = "none")]
mod plan;
#[cfg(target_os = "none")]
mod platform;
#[cfg(target_os = "none")]
mod poll;
#[cfg(target_os = "none")]
mod provisioned;
#[cfg(target_os = "none")]
mod services;
#[cfg(all(target_os = "none", feature = "test-build"))]
mod testhooks;

#[cfg(target_os = "none")]
extern crate alloc;

#[cfg(target_os = "none")]
keel_hal::entry!(main);

#[cfg(target_os = "none")]
fn main(info: keel_hal::arch::boot::BootInfo) -> ! {
    let mut platform = match platform::bring_up(&info) {
        Ok(p) => p,
        Err(e) => fatal::boot_failed(e),
    };
    cores::start(&mut platform, info.entry_el);
    poll::run(platform)
}

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!(
        "keel-firmware is a bare-metal image: build it with \
         `cargo build --release -p keel-firmware --target aarch64-unknown-none`, \
         or boot it in QEMU with `qemu/run`."
    );
    std::process::exit(2);
}

//! Fuzz harnesses for every input an outsider controls, one module per target. The cargo-fuzz
//! binaries in `fuzz_targets/` are one line each; the bodies live here so that they can also
//! be replayed by hand (`cargo +nightly fuzz run TARGET FILE`) and read in one place.
//!
//! | target | what an outsider controls | invariants checked besides "no panic" |
//! |---|---|---|
//! | `controller` | SQEs and data over NVMe/TCP or PCIe queues into the controller core | one response per command, CID echoed, no completion after its queue ended, every buffer comes back, no queue or controller left behind |
//! | `pcie_function` | the host side of the emulated function: register writes, doorbells, queue entries, PRP lists | no write outside host memory, function writes only CAP/VS/CSTS and clears doorbells, every command completes at most once with its CID on its queue, buffers back after reset |
//! | `provision_toml` | a device description | accepted descriptions validate, build into a bundle that opens to the same description |
//! | `provision_bundle` | a configuration bundle (raw, or a hostile body under a valid signature) | only validated descriptions with keys of the right length come out |
//! | `provision_image` | an image header (and payload) | accepted headers re-encode to the same bytes |
//! | `provision_flash` | both configuration copies and the identity block as read from flash | the chosen copy parses and is the newest valid one; the next write never targets the copy in force |
//! | `mgmt_session` | a management connection's bytes (binary protocol and HTTP) | output is well-formed frames, challenges never repeat, nothing runs without a valid signature, a reboot only after the reply is drained |
//! | `nbd_server` | an NBD client's handshake and requests (`host::nbd::proto`) | requests served are in range, aligned and what was asked; refusals carry an errno; replies echo the handle |
//!
//! The NVMe/TCP receive paths have their own fuzz crate (`firmware/nvmf-tcp/fuzz`).

pub mod controller;
pub mod mgmt;
pub mod nbd;
pub mod pcie;
pub mod pool;
pub mod provision;

/// Every target of this crate.
pub const TARGETS: [&str; 8] = [
    "controller",
    "pcie_function",
    "provision_toml",
    "provision_bundle",
    "provision_image",
    "provision_flash",
    "mgmt_session",
    "nbd_server",
];

/// Runs target `name` on `data` as its cargo-fuzz binary does (typed inputs are built with
/// `Arbitrary::arbitrary_take_rest`; bytes they cannot be built from are skipped). With
/// `show`, prints the typed input first. Returns false for an unknown target.
pub fn run(name: &str, data: &[u8], show: bool) -> bool {
    fn typed<T: for<'a> arbitrary::Arbitrary<'a> + std::fmt::Debug>(
        data: &[u8],
        show: bool,
        f: fn(T),
    ) {
        if let Ok(input) = T::arbitrary_take_rest(arbitrary::Unstructured::new(data)) {
            if show {
                eprintln!("{input:#?}");
            }
            f(input);
        }
    }
    match name {
        "controller" => typed(data, show, controller::run),
        "pcie_function" => typed(data, show, pcie::run),
        "mgmt_session" => typed(data, show, mgmt::run),
        "nbd_server" => nbd::run(data),
        "provision_toml" => provision::toml(data),
        "provision_bundle" => provision::bundle(data),
        "provision_image" => provision::image(data),
        "provision_flash" => provision::flash(data),
        _ => return false,
    }
    true
}

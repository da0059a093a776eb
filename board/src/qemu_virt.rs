//! QEMU `virt` (aarch64): RAM at 1 GiB; QEMU puts its device tree at the start of RAM when
//! it boots firmware from flash (`docs/system/arm/virt.rst`, "Hardware configuration
//! information for bare-metal programming").

use crate::Profile;

/// The `virt` machine's profile.
pub const PROFILE: Profile = Profile {
    name: "qemu-virt",
    compatible: &["linux,dummy-virt"],
    dtb_fallback: 0x4000_0000,
};

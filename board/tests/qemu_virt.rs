//! Platform discovery on device trees dumped from QEMU 7.2 (`-M virt,dumpdtb=...`).

use keel_board::{Gic, PciSpace, Platform, PlatformError, PsciMethod, Region};

#[test]
fn gicv2_machine_with_1g() {
    let p = Platform::from_fdt(include_bytes!("data/qemu-virt-gicv2.dtb")).unwrap();
    assert_eq!(
        p.memory.as_slice(),
        &[Region {
            base: 0x4000_0000,
            size: 0x4000_0000
        }]
    );
    assert_eq!(
        p.uart,
        Some(Region {
            base: 0x0900_0000,
            size: 0x1000
        })
    );
    assert_eq!(
        p.gic,
        Some(Gic::V2 {
            dist: Region {
                base: 0x0800_0000,
                size: 0x1_0000
            },
            cpu: Region {
                base: 0x0801_0000,
                size: 0x1_0000
            }
        })
    );
    assert_eq!(p.psci, Some(PsciMethod::Hvc));
    assert_eq!(p.cpus, 1);
    assert_eq!(p.timer_frequency, None);
    let pcie = p.pcie.as_ref().unwrap();
    assert_eq!(
        pcie.ecam,
        Region {
            base: 0x40_1000_0000,
            size: 0x1000_0000
        }
    );
    assert_eq!((pcie.bus_start, pcie.bus_end), (0, 255));
    let spaces: Vec<_> = pcie
        .windows
        .iter()
        .map(|w| (w.space, w.cpu_base, w.size))
        .collect();
    assert_eq!(
        spaces,
        [
            (PciSpace::Io, 0x3eff_0000, 0x1_0000),
            (PciSpace::Mem32, 0x1000_0000, 0x2eff_0000),
            (PciSpace::Mem64, 0x80_0000_0000, 0x80_0000_0000)
        ]
    );
    // INTA of the device in slot 1 is SPI 4 (QEMU swizzles INTx by slot), the timer PPI 14.
    assert_eq!(pcie.intx.len(), 16);
    assert_eq!(pcie.intx_intid(0, 1, 0, 1), Some(32 + 4));
    assert_eq!(pcie.intx_intid(0, 0, 0, 1), Some(32 + 3));
    assert_eq!(pcie.intx_intid(0, 4, 0, 2), Some(32 + 4));
    assert_eq!(p.timer_intid, Some(30));
    assert_eq!(p.flash.len(), 2);
    assert_eq!(
        p.flash[0],
        Region {
            base: 0,
            size: 0x400_0000
        }
    );
}

#[test]
fn gicv3_machine_with_el2_and_two_cores() {
    let p = Platform::from_fdt(include_bytes!("data/qemu-virt-gicv3-el2.dtb")).unwrap();
    assert_eq!(p.memory[0].size, 0x8000_0000);
    assert!(matches!(p.gic, Some(Gic::V3 { .. })));
    // With virtualization on, QEMU's PSCI is reached with SMC.
    assert_eq!(p.psci, Some(PsciMethod::Smc));
    assert_eq!(p.cpus, 2);
}

#[test]
fn rejects_garbage() {
    assert_eq!(
        Platform::from_fdt(&[0u8; 64]),
        Err(PlatformError::BadDeviceTree)
    );
    let dtb = include_bytes!("data/qemu-virt-gicv2.dtb");
    assert_eq!(keel_board::fdt_total_size(dtb), Some(dtb.len()));
    assert_eq!(keel_board::fdt_total_size(&[0u8; 8]), None);
}

//! Platform discovery on device trees dumped from QEMU 7.2 (`-M virt,dumpdtb=...`).

use keel_board::{
    CpuNode, EnableMethod, Gic, PciSpace, Platform, PlatformError, PsciMethod, Region,
};

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

fn psci_cores(mpidrs: &[u64]) -> Vec<CpuNode> {
    mpidrs
        .iter()
        .map(|&mpidr| CpuNode {
            mpidr,
            enable_method: EnableMethod::Psci,
        })
        .collect()
}

#[test]
fn cpu_nodes_of_a_four_core_gicv2_machine() {
    // qemu-system-aarch64 -M virt,dumpdtb=... -cpu max -smp 4 -m 1G (QEMU 7.2): /cpus/cpu@0..3
    // with reg = 0..3 (#address-cells = 1) and enable-method = "psci".
    let p = Platform::from_fdt(include_bytes!("data/qemu-virt-gicv2-smp4.dtb")).unwrap();
    assert_eq!(p.cpus, 4);
    assert_eq!(p.cores.as_slice(), psci_cores(&[0, 1, 2, 3]).as_slice());
    assert!(matches!(p.gic, Some(Gic::V2 { .. })));
    assert_eq!(p.psci, Some(PsciMethod::Hvc));
}

#[test]
fn cpu_nodes_of_a_four_core_gicv3_machine_at_el2() {
    // -M virt,gic-version=3,virtualization=on -smp 4: PSCI through SMC, one redistributor
    // frame per core in the GICv3 redistributor region.
    let p = Platform::from_fdt(include_bytes!("data/qemu-virt-gicv3-el2-smp4.dtb")).unwrap();
    assert_eq!(p.cpus, 4);
    assert_eq!(p.cores.as_slice(), psci_cores(&[0, 1, 2, 3]).as_slice());
    assert_eq!(p.psci, Some(PsciMethod::Smc));
    let Some(Gic::V3 { redist, .. }) = p.gic else {
        panic!("not GICv3: {:?}", p.gic)
    };
    // Four cores need four 128 KiB frames (RD_base + SGI_base).
    assert!(redist.size >= 4 * 0x2_0000, "{redist:?}");
}

#[test]
fn single_core_machines_list_their_one_cpu_node() {
    // QEMU names no enable-method for a lone core: there is nothing to start.
    let p = Platform::from_fdt(include_bytes!("data/qemu-virt-gicv2.dtb")).unwrap();
    assert_eq!(
        p.cores.as_slice(),
        &[CpuNode {
            mpidr: 0,
            enable_method: EnableMethod::Unknown
        }]
    );
    let p = Platform::from_fdt(include_bytes!("data/qemu-virt-gicv3-el2.dtb")).unwrap();
    assert_eq!(p.cores.as_slice(), psci_cores(&[0, 1]).as_slice());
}

/// A minimal flattened device tree writer (Devicetree Specification v0.4 §5): enough to build
/// the odd cpu nodes QEMU never produces.
mod fdt_writer {
    pub enum Item<'a> {
        Begin(&'a str),
        Prop(&'a str, Vec<u8>),
        End,
    }

    pub fn u32s(v: &[u32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_be_bytes()).collect()
    }

    pub fn str(s: &str) -> Vec<u8> {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        v
    }

    pub fn build(items: &[Item<'_>]) -> Vec<u8> {
        let (mut st, mut strings) = (Vec::new(), Vec::<u8>::new());
        let pad = |v: &mut Vec<u8>| v.resize(v.len().next_multiple_of(4), 0);
        for item in items {
            match item {
                Item::Begin(name) => {
                    st.extend(1u32.to_be_bytes());
                    st.extend(name.as_bytes());
                    st.push(0);
                    pad(&mut st);
                }
                Item::Prop(name, value) => {
                    let off = strings.len() as u32;
                    strings.extend(name.as_bytes());
                    strings.push(0);
                    st.extend(3u32.to_be_bytes());
                    st.extend((value.len() as u32).to_be_bytes());
                    st.extend(off.to_be_bytes());
                    st.extend(value);
                    pad(&mut st);
                }
                Item::End => st.extend(2u32.to_be_bytes()),
            }
        }
        st.extend(9u32.to_be_bytes());
        let rsvmap = 40u32;
        let off_struct = rsvmap + 16;
        let off_strings = off_struct + st.len() as u32;
        let total = off_strings + strings.len() as u32;
        let mut out = Vec::new();
        for w in [
            0xd00d_feed,
            total,
            off_struct,
            off_strings,
            rsvmap,
            17,
            16,
            0,
            strings.len() as u32,
            st.len() as u32,
        ] {
            out.extend(u32::to_be_bytes(w));
        }
        out.extend([0u8; 16]);
        out.extend(st);
        out.extend(strings);
        out
    }
}

fn tree_with_cpus(cpus: &[fdt_writer::Item<'_>]) -> Vec<u8> {
    use fdt_writer::{Item::*, str, u32s};
    let mut items = vec![
        Begin(""),
        Prop("#address-cells", u32s(&[2])),
        Prop("#size-cells", u32s(&[2])),
        Begin("memory@40000000"),
        Prop("device_type", str("memory")),
        Prop("reg", u32s(&[0, 0x4000_0000, 0, 0x4000_0000])),
        End,
    ];
    items.extend(cpus.iter().map(|i| match i {
        Begin(n) => Begin(n),
        Prop(n, v) => Prop(n, v.clone()),
        End => End,
    }));
    items.push(End);
    fdt_writer::build(&items)
}

#[test]
fn no_cpus_node_means_one_core_and_nothing_to_start() {
    let p = Platform::from_fdt(&tree_with_cpus(&[])).unwrap();
    assert_eq!(p.cpus, 1);
    assert!(p.cores.is_empty());
}

#[test]
fn odd_cpu_nodes_are_read_or_skipped_never_fatal() {
    use fdt_writer::{Item::*, str, u32s};
    let dtb = tree_with_cpus(&[
        Begin("cpus"),
        Prop("#address-cells", u32s(&[2])),
        Prop("#size-cells", u32s(&[0])),
        // Two-cell reg with Aff3 = 1, spin-table with a 64-bit release address.
        Begin("cpu@100000000"),
        Prop("device_type", str("cpu")),
        Prop("reg", u32s(&[1, 0x0000_0102])),
        Prop("enable-method", str("spin-table")),
        Prop("cpu-release-addr", u32s(&[0, 0x8000_fff8])),
        End,
        // No reg: skipped.
        Begin("cpu@1"),
        Prop("device_type", str("cpu")),
        Prop("enable-method", str("psci")),
        End,
        // Failed core: skipped.
        Begin("cpu@2"),
        Prop("device_type", str("cpu")),
        Prop("reg", u32s(&[0, 2])),
        Prop("status", str("fail")),
        End,
        // Truncated reg (one cell of two): skipped.
        Begin("cpu@3"),
        Prop("device_type", str("cpu")),
        Prop("reg", u32s(&[3])),
        End,
        // A method this firmware does not know; spin-table without a release address.
        Begin("cpu@4"),
        Prop("device_type", str("cpu")),
        Prop("reg", u32s(&[0, 4])),
        Prop("enable-method", str("brcm,bcm2836-smp")),
        End,
        Begin("cpu@5"),
        Prop("device_type", str("cpu")),
        Prop("reg", u32s(&[0, 5])),
        Prop("enable-method", str("spin-table")),
        End,
        // Not a cpu: ignored.
        Begin("cpu-map"),
        End,
        End,
    ]);
    let p = Platform::from_fdt(&dtb).unwrap();
    assert_eq!(
        p.cores.as_slice(),
        &[
            CpuNode {
                mpidr: 0x1_0000_0102,
                enable_method: EnableMethod::SpinTable {
                    release_addr: 0x8000_fff8
                }
            },
            CpuNode {
                mpidr: 4,
                enable_method: EnableMethod::Unknown
            },
            CpuNode {
                mpidr: 5,
                enable_method: EnableMethod::Unknown
            },
        ]
    );
    assert_eq!(p.cpus, 3);
}

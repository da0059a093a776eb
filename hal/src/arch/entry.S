// Keel entry point: arm64 Linux `Image` header, exception-level drop, self-relocation,
// BSS, stacks, FP/SIMD and vectors; then Rust (`keel_hal_boot`).
//
// Booting: any loader that can start an arm64 Linux kernel can start this image (QEMU
// -kernel, U-Boot booti): it passes the device tree address in x0. Executed in place from
// flash at address 0 (QEMU virt's pflash) x0 is 0 and the board supplies the device tree
// address. The image copies itself to its link address when it runs anywhere else.
//
// Ref: Documentation/arch/arm64/booting.rst (Image header), Arm ARM D1 (exception levels).

.section .text.head, "ax"
.global _start
_start:
    b       primary_entry               // code0
    .long   0                           // code1
    .quad   __text_offset               // text_offset
    .quad   __image_size                // image_size, BSS and stacks included
    .quad   0x2                         // flags: little endian, 4 KiB pages, 2 MiB aligned base
    .quad   0                           // res2
    .quad   0                           // res3
    .quad   0                           // res4
    .ascii  "ARM\x64"                   // magic
    .long   0                           // res5 (no PE/COFF header)

// Leaves EL2 for EL1 at label `target`: EL1 is AArch64, no stage 2, physical timer and
// counter accessible, FP/SIMD not trapped, GICv3 system registers usable from EL1. Uses x0
// and x1 only.
.macro drop_to_el1 target
    mov     x0, #(1 << 31)              // HCR_EL2.RW
    msr     hcr_el2, x0
    mov     x0, #3                      // CNTHCTL_EL2.EL1PCTEN | EL1PCEN
    msr     cnthctl_el2, x0
    msr     cntvoff_el2, xzr
    mov     x0, #0x33ff                 // CPTR_EL2: RES1 bits, TFP = 0
    msr     cptr_el2, x0
    msr     hstr_el2, xzr
    // With a GICv3 system register interface (ID_AA64PFR0_EL1.GIC != 0), let EL1 use it:
    // ICC_SRE_EL2.Enable | SRE.
    mrs     x0, id_aa64pfr0_el1
    ubfx    x0, x0, #24, #4
    cbz     x0, 1f
    mrs     x0, S3_4_C12_C9_5           // ICC_SRE_EL2
    mov     x1, #0x9
    orr     x0, x0, x1
    msr     S3_4_C12_C9_5, x0
    isb
1:
    mrs     x0, midr_el1
    msr     vpidr_el2, x0
    mrs     x0, mpidr_el1
    msr     vmpidr_el2, x0
    ldr     x0, =0x30d00800             // SCTLR_EL1 RES1 bits, MMU and caches off
    msr     sctlr_el1, x0
    mov     x0, #0x3c5                  // EL1h with D, A, I, F masked
    msr     spsr_el2, x0
    adr     x0, \target
    msr     elr_el2, x0
    isb
    eret
.endm

primary_entry:
    mov     x19, x0                     // device tree address (0 when started from flash)
    msr     daifset, #0xf
    mrs     x20, CurrentEL
    lsr     x20, x20, #2
    and     x20, x20, #3                // x20 = exception level at entry
    cmp     x20, #2
    b.eq    from_el2
    cmp     x20, #1
    b.eq    at_el1
    // EL3 (or EL0) entry is not supported: park the core.
1:  wfe
    b       1b

from_el2:
    drop_to_el1 at_el1

at_el1:
    // FP/SIMD on before any Rust code: CPACR_EL1.FPEN = 0b11.
    mov     x0, #(3 << 20)
    msr     cpacr_el1, x0
    isb

    // Copy the image to its link address if it runs elsewhere.
    adr     x1, _start                  // where we run
    ldr     x2, =__image_start          // where we are linked
    cmp     x1, x2
    b.eq    relocated
    ldr     x3, =__image_end
    sub     x3, x3, x2                  // bytes to copy (multiple of 8)
    cmp     x2, x1
    b.hi    copy_down
    // destination below source: copy forwards
    mov     x4, x1
    mov     x5, x2
    add     x6, x2, x3
2:  ldr     x7, [x4], #8
    str     x7, [x5], #8
    cmp     x5, x6
    b.lo    2b
    b       copied
copy_down:
    // destination above source: copy backwards so an overlap is safe
    add     x4, x1, x3
    add     x5, x2, x3
3:  ldr     x7, [x4, #-8]!
    str     x7, [x5, #-8]!
    cmp     x5, x2
    b.hi    3b
copied:
    dsb     sy
    ic      iallu
    dsb     sy
    isb
    ldr     x0, =relocated
    br      x0

relocated:
    // No per-core record yet (keel_hal::arch::percpu reads 0 as "boot core").
    msr     tpidr_el1, xzr
    // Zero BSS.
    ldr     x0, =__bss_start
    ldr     x1, =__bss_end
4:  cmp     x0, x1
    b.hs    5f
    stp     xzr, xzr, [x0], #16
    b       4b
5:
    // Exceptions run on SP_EL1, the firmware on SP_EL0 (EL1t): a stack overflow into the
    // guard page is still reported from a good stack.
    ldr     x0, =__exc_stack_top
    mov     sp, x0
    ldr     x0, =__stack_top
    msr     sp_el0, x0
    msr     spsel, #0
    ldr     x0, =keel_exception_vectors
    msr     vbar_el1, x0
    isb

    mov     x0, x19
    mov     x1, x20
    mov     x29, xzr
    mov     x30, xzr
    bl      keel_hal_boot
6:  wfe
    b       6b
.ltorg

// Secondary cores (PSCI CPU_ON): x0 = the core's boot block (keel_hal::arch::smp), MMU and
// caches off, at EL2 or EL1. Drops to EL1 like the boot core, turns the MMU on with the boot
// core's final map (MAIR/TCR/TTBR0/SCTLR from the block), takes its own stacks and per-core
// record from the block, installs the vectors and calls keel_hal_secondary(block, entry EL).
// Only registers are used until the MMU is on; the block was cleaned to the point of
// coherency by the boot core.
.balign 8
.global keel_secondary_entry
keel_secondary_entry:
    mov     x19, x0
    msr     daifset, #0xf
    mrs     x20, CurrentEL
    lsr     x20, x20, #2
    and     x20, x20, #3
    cmp     x20, #2
    b.eq    secondary_from_el2
    cmp     x20, #1
    b.eq    secondary_at_el1
7:  wfe
    b       7b
secondary_from_el2:
    drop_to_el1 secondary_at_el1
secondary_at_el1:
    mov     x0, #(3 << 20)              // CPACR_EL1.FPEN: FP/SIMD on
    msr     cpacr_el1, x0
    msr     tpidr_el1, xzr
    isb
    ldr     x1, [x19, #{bb_mair}]
    msr     mair_el1, x1
    ldr     x1, [x19, #{bb_tcr}]
    msr     tcr_el1, x1
    ldr     x1, [x19, #{bb_ttbr0}]
    msr     ttbr0_el1, x1
    isb
    tlbi    vmalle1
    dsb     nsh
    isb
    ldr     x1, [x19, #{bb_sctlr}]
    msr     sctlr_el1, x1
    isb
    ic      iallu
    dsb     nsh
    isb
    // MMU and caches on: the stacks and the per-core record are ordinary memory now.
    ldr     x1, [x19, #{bb_exc_top}]
    mov     sp, x1
    ldr     x1, [x19, #{bb_stack_top}]
    msr     sp_el0, x1
    msr     spsel, #0
    ldr     x1, [x19, #{bb_percore}]
    msr     tpidr_el1, x1
    ldr     x1, =keel_exception_vectors
    msr     vbar_el1, x1
    isb
    mov     x0, x19
    mov     x1, x20
    mov     x29, xzr
    mov     x30, xzr
    bl      keel_hal_secondary
8:  wfe
    b       8b
.ltorg

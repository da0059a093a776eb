// Exception vector table (Arm ARM D1.10.2). Every entry saves the general purpose registers
// and ELR/SPSR/ESR/FAR into an `ExceptionFrame` on SP_EL1 and calls
// `keel_exception(frame, kind)`; kind = entry index (0..16).

.macro vector kind
.balign 0x80
    sub     sp, sp, #(36 * 8)
    stp     x0, x1, [sp, #(0 * 8)]
    mov     x0, #\kind
    b       save_and_dispatch
.endm

.section .text.vectors, "ax"
.balign 0x800
.global keel_exception_vectors
keel_exception_vectors:
    vector 0   // current EL, SP_EL0: synchronous
    vector 1   //                      IRQ
    vector 2   //                      FIQ
    vector 3   //                      SError
    vector 4   // current EL, SP_ELx: synchronous
    vector 5
    vector 6
    vector 7
    vector 8   // lower EL, AArch64
    vector 9
    vector 10
    vector 11
    vector 12  // lower EL, AArch32
    vector 13
    vector 14
    vector 15

save_and_dispatch:
    // x0 = kind; the original x0/x1 are already saved.
    stp     x2, x3, [sp, #(2 * 8)]
    stp     x4, x5, [sp, #(4 * 8)]
    stp     x6, x7, [sp, #(6 * 8)]
    stp     x8, x9, [sp, #(8 * 8)]
    stp     x10, x11, [sp, #(10 * 8)]
    stp     x12, x13, [sp, #(12 * 8)]
    stp     x14, x15, [sp, #(14 * 8)]
    stp     x16, x17, [sp, #(16 * 8)]
    stp     x18, x19, [sp, #(18 * 8)]
    stp     x20, x21, [sp, #(20 * 8)]
    stp     x22, x23, [sp, #(22 * 8)]
    stp     x24, x25, [sp, #(24 * 8)]
    stp     x26, x27, [sp, #(26 * 8)]
    stp     x28, x29, [sp, #(28 * 8)]
    mrs     x1, elr_el1
    mrs     x2, spsr_el1
    stp     x30, x1, [sp, #(30 * 8)]
    mrs     x3, esr_el1
    stp     x2, x3, [sp, #(32 * 8)]
    mrs     x4, far_el1
    mrs     x5, sp_el0
    stp     x4, x5, [sp, #(34 * 8)]
    mov     x1, x0
    mov     x0, sp
    bl      keel_exception
    // A handler that returns resumes the interrupted code.
    ldp     x2, x3, [sp, #(32 * 8)]
    ldp     x30, x1, [sp, #(30 * 8)]
    msr     elr_el1, x1
    msr     spsr_el1, x2
    ldp     x0, x1, [sp, #(0 * 8)]
    ldp     x2, x3, [sp, #(2 * 8)]
    ldp     x4, x5, [sp, #(4 * 8)]
    ldp     x6, x7, [sp, #(6 * 8)]
    ldp     x8, x9, [sp, #(8 * 8)]
    ldp     x10, x11, [sp, #(10 * 8)]
    ldp     x12, x13, [sp, #(12 * 8)]
    ldp     x14, x15, [sp, #(14 * 8)]
    ldp     x16, x17, [sp, #(16 * 8)]
    ldp     x18, x19, [sp, #(18 * 8)]
    ldp     x20, x21, [sp, #(20 * 8)]
    ldp     x22, x23, [sp, #(22 * 8)]
    ldp     x24, x25, [sp, #(24 * 8)]
    ldp     x26, x27, [sp, #(26 * 8)]
    ldp     x28, x29, [sp, #(28 * 8)]
    add     sp, sp, #(36 * 8)
    eret

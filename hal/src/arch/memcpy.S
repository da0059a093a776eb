// memcpy for the firmware (AAPCS64: x0 = destination, x1 = source, x2 = length; returns x0).
//
// It replaces compiler_builtins' (a weak symbol), which moves 8 bytes per 4 instructions when
// both pointers are aligned and assembles misaligned words from shifted halves otherwise (about
// 22 instructions per 8 bytes). This one moves 64 bytes per 6 instructions with q-register
// pairs (LDP/STP), whatever the alignment, and handles lengths below 64 and the tail with
// overlapping loads and stores from both ends (at most 4 loads and 4 stores, no byte loop).
//
// Unaligned accesses are only allowed to Normal memory: with the stage 1 MMU off (early boot)
// every access is Device-nGnRnE, so then (SCTLR_EL1.M = 0) a byte loop does the copy.

// Lengths n..2n: the first n and the last n bytes (overlapping), through registers r1 and r2
// (x4, x5: the source and destination ends).
.macro copy_ends r1, r2, n
    ldr     \r1, [x1]
    ldur    \r2, [x4, #-\n]
    str     \r1, [x0]
    stur    \r2, [x5, #-\n]
    ret
.endm

    .section .text.memcpy, "ax"
    .global memcpy
    .type memcpy, %function
    .p2align 6
memcpy:
    mrs     x9, sctlr_el1
    tbz     x9, #0, .Lbytes
    mov     x3, x0
    add     x4, x1, x2              // source end
    add     x5, x0, x2              // destination end
    cmp     x2, #64
    b.lo    .Lsmall
    sub     x2, x2, #64
.Lloop64:
    ldp     q0, q1, [x1], #32
    ldp     q2, q3, [x1], #32
    stp     q0, q1, [x3], #32
    stp     q2, q3, [x3], #32
    subs    x2, x2, #64
    b.hs    .Lloop64
    // The last 0..63 bytes: the last 64 bytes of the buffers (partly copied already).
    ldp     q0, q1, [x4, #-64]
    ldp     q2, q3, [x4, #-32]
    stp     q0, q1, [x5, #-64]
    stp     q2, q3, [x5, #-32]
    ret
.Lsmall:
    cmp     x2, #16
    b.lo    .Lbelow16
    cmp     x2, #32
    b.lo    .L16to31
    // 32..63: the first 32 and the last 32 bytes.
    ldp     q0, q1, [x1]
    ldp     q2, q3, [x4, #-32]
    stp     q0, q1, [x0]
    stp     q2, q3, [x5, #-32]
    ret
.L16to31:
    copy_ends q0, q1, 16
.Lbelow16:
    cmp     x2, #8
    b.lo    .Lbelow8
    copy_ends x6, x7, 8
.Lbelow8:
    cmp     x2, #4
    b.lo    .Lbelow4
    copy_ends w6, w7, 4
.Lbelow4:
    // 1..3: the first, the middle and the last byte.
    cbz     x2, .Ldone
    lsr     x8, x2, #1
    ldrb    w6, [x1]
    ldrb    w7, [x1, x8]
    ldurb   w9, [x4, #-1]
    strb    w6, [x0]
    strb    w7, [x0, x8]
    sturb   w9, [x5, #-1]
.Ldone:
    ret
.Lbytes:
    cbz     x2, .Ldone
    mov     x3, #0
.Lbyte:
    ldrb    w6, [x1, x3]
    strb    w6, [x0, x3]
    add     x3, x3, #1
    cmp     x3, x2
    b.ne    .Lbyte
    ret
    .size memcpy, . - memcpy

// memcpy and memset for the firmware (AAPCS64: x0 = destination, x1 = source or fill byte,
// x2 = length; both return x0).
//
// They replace compiler_builtins' (weak symbols). compiler_builtins' memcpy moves 8 bytes per 4
// instructions when both pointers are aligned and assembles misaligned words from shifted
// halves otherwise (about 22 instructions per 8 bytes); its memset stores 8 bytes per 2-3
// instructions. Here, large lengths move 256 bytes per loop iteration of 10 instructions
// (memcpy: four LD1 and four ST1 of four q registers each; memset: four ST1, 6 instructions),
// whatever the alignment (LD1/ST1 of byte elements have no alignment requirement on Normal
// memory); 64..255 bytes (and the rest of a large copy) go 64 at a time, and lengths below 64
// and the last bytes use overlapping loads and stores from both ends (at most 4 loads and 4
// stores, no byte loop). Registers: v0-v7 and v16-v23, all caller-saved (AAPCS64 keeps only
// the low halves of v8-v15).
//
// Unaligned accesses are only allowed to Normal memory: with the stage 1 MMU off (early boot)
// every access is Device-nGnRnE, so then (SCTLR_EL1.M = 0) a byte loop does the work.

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
    subs    x2, x2, #256
    b.lo    .Lbelow256
.Lloop256:
    ld1     {v0.16b, v1.16b, v2.16b, v3.16b}, [x1], #64
    ld1     {v4.16b, v5.16b, v6.16b, v7.16b}, [x1], #64
    ld1     {v16.16b, v17.16b, v18.16b, v19.16b}, [x1], #64
    ld1     {v20.16b, v21.16b, v22.16b, v23.16b}, [x1], #64
    st1     {v0.16b, v1.16b, v2.16b, v3.16b}, [x3], #64
    st1     {v4.16b, v5.16b, v6.16b, v7.16b}, [x3], #64
    st1     {v16.16b, v17.16b, v18.16b, v19.16b}, [x3], #64
    st1     {v20.16b, v21.16b, v22.16b, v23.16b}, [x3], #64
    subs    x2, x2, #256
    b.hs    .Lloop256
.Lbelow256:
    // x2 + 256 bytes are left (0..255 after the loop, 64..255 without it); whole 64-byte
    // blocks while more than 64 are left, then the last 64 bytes of the buffers (partly
    // copied already).
    adds    x2, x2, #(256 - 64)
    b.ls    .Llast64
.Lloop64:
    ld1     {v0.16b, v1.16b, v2.16b, v3.16b}, [x1], #64
    st1     {v0.16b, v1.16b, v2.16b, v3.16b}, [x3], #64
    subs    x2, x2, #64
    b.hi    .Lloop64
.Llast64:
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

// memset: the byte in w1, replicated in v0-v3 (and x6); the same size classes as memcpy.
    .section .text.memset, "ax"
    .global memset
    .type memset, %function
    .p2align 6
memset:
    mrs     x9, sctlr_el1
    tbz     x9, #0, .Lset_bytes
    dup     v0.16b, w1
    add     x5, x0, x2              // destination end
    cmp     x2, #64
    b.lo    .Lset_small
    mov     v1.16b, v0.16b
    mov     v2.16b, v0.16b
    mov     v3.16b, v0.16b
    mov     x3, x0
    subs    x2, x2, #256
    b.lo    .Lset_below256
.Lset_loop256:
    st1     {v0.16b, v1.16b, v2.16b, v3.16b}, [x3], #64
    st1     {v0.16b, v1.16b, v2.16b, v3.16b}, [x3], #64
    st1     {v0.16b, v1.16b, v2.16b, v3.16b}, [x3], #64
    st1     {v0.16b, v1.16b, v2.16b, v3.16b}, [x3], #64
    subs    x2, x2, #256
    b.hs    .Lset_loop256
.Lset_below256:
    adds    x2, x2, #(256 - 64)
    b.ls    .Lset_last64
.Lset_loop64:
    st1     {v0.16b, v1.16b, v2.16b, v3.16b}, [x3], #64
    subs    x2, x2, #64
    b.hi    .Lset_loop64
.Lset_last64:
    stp     q0, q0, [x5, #-64]
    stp     q0, q0, [x5, #-32]
    ret
.Lset_small:
    cmp     x2, #16
    b.lo    .Lset_below16
    cmp     x2, #32
    b.lo    .Lset_16to31
    // 32..63: the first 32 and the last 32 bytes.
    stp     q0, q0, [x0]
    stp     q0, q0, [x5, #-32]
    ret
.Lset_16to31:
    str     q0, [x0]
    stur    q0, [x5, #-16]
    ret
.Lset_below16:
    umov    x6, v0.d[0]
    cmp     x2, #8
    b.lo    .Lset_below8
    str     x6, [x0]
    stur    x6, [x5, #-8]
    ret
.Lset_below8:
    cmp     x2, #4
    b.lo    .Lset_below4
    str     w6, [x0]
    stur    w6, [x5, #-4]
    ret
.Lset_below4:
    // 1..3: the first, the middle and the last byte.
    cbz     x2, .Lset_done
    lsr     x8, x2, #1
    strb    w6, [x0]
    strb    w6, [x0, x8]
    sturb   w6, [x5, #-1]
.Lset_done:
    ret
.Lset_bytes:
    cbz     x2, .Lset_done
    mov     x3, #0
.Lset_byte:
    strb    w1, [x0, x3]
    add     x3, x3, #1
    cmp     x3, x2
    b.ne    .Lset_byte
    ret
    .size memset, . - memset

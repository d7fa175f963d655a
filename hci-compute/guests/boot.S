/*
 * PVH entry and CPL0 prologue shared by every hci test guest.
 *
 * The VMM (or QEMU's PVH loader) enters `pvh_start32` in 32-bit protected
 * mode with paging off and %ebx pointing at the hvm_start_info. Under a
 * paravirtual KVM (kvm_pvm) every CPL0 instruction is emulated (~1 us each),
 * so this prologue is as short as possible: page tables and GDT are static
 * data, and we leave CPL0 after about twenty instructions. The guest then
 * runs `guest_main(start_info)` at CPL3 with IOPL=3 (port I/O allowed) and
 * interrupts off. `hlt` would fault at CPL3, so guests exit through a device.
 */

/* ELF note XEN_ELFNOTE_PHYS32_ENTRY (18): the 32-bit PVH entry point. */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4                 /* namesz */
    .long 8                 /* descsz */
    .long 18                /* type */
    .asciz "Xen"
    .balign 4
    .quad pvh_start32
    .balign 4

#define KERNEL_CS 0x08
#define TSS_SEL   0x28
#define USER_DS   (0x18 | 3)
#define USER_CS   (0x20 | 3)
#define RFLAGS_USER 0x3002   /* IOPL=3, reserved bit 1, IF=0 */

    .section .text.boot, "ax"
    .code32
    .globl pvh_start32
pvh_start32:
    lgdt gdt_ptr
    mov $0x20, %eax             /* CR4.PAE */
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx       /* EFER.LME */
    xor %edx, %edx
    mov $0x100, %eax
    wrmsr
    mov $0x80000011, %eax       /* CR0.PG | CR0.ET | CR0.PE */
    mov %eax, %cr0
    ljmp $KERNEL_CS, $long_mode

    .code64
long_mode:
    mov $boot_stack_top, %rsp
    mov $TSS_SEL, %ax
    ltr %ax
    pushq $USER_DS
    pushq $user_stack_top
    pushq $RFLAGS_USER
    pushq $USER_CS
    pushq $user_entry
    iretq

/* From here on everything runs at CPL3, natively. */
    .text
user_entry:
    mov %rbx, %rdi              /* hvm_start_info physical address */
    call guest_main
    call guest_reset
1:  jmp 1b

    .data
    /* Identity map of the first 4 GiB with 2 MiB user-accessible pages. */
    .balign 4096
pml4:
    .quad pdpt + 0x7
    .fill 511, 8, 0
pdpt:
    .quad pd0 + 0x7
    .quad pd1 + 0x7
    .quad pd2 + 0x7
    .quad pd3 + 0x7
    .fill 508, 8, 0
    .set page, 0
pd0:
    .rept 2048
    .quad (page << 21) | 0x87   /* present, writable, user, 2 MiB */
    .set page, page + 1
    .endr
pd1 = pd0 + 4096
pd2 = pd0 + 8192
pd3 = pd0 + 12288

    /*
     * 64-bit TSS with a full I/O permission bitmap (all ports allowed).
     * On hardware IOPL=3 already lets CPL3 use port I/O; a paravirtual KVM
     * (kvm_pvm) runs CPL3 on the real CPU with IOPL 0 and emulates the
     * faulting `in`/`out`, checking this bitmap instead.
     */
    .balign 16
    .globl tss, tss_end
tss:
    .long 0
    .quad boot_stack_top        /* rsp0 */
    .fill 88, 1, 0
    .word 104                   /* I/O map base: right after the TSS */
    .fill 8192, 1, 0            /* one bit per port, 0 = allowed */
    .byte 0xff                  /* terminator */
tss_end:

    .bss
    .balign 16
boot_stack:
    .skip 4096
boot_stack_top:
    .balign 16
user_stack:
    .skip 65536
user_stack_top:

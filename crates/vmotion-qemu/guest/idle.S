# The idle guest: a Multiboot v1 image (a flat binary using the a.out kludge: header flag
# bit 16 says the address fields are valid, so no ELF is needed). QEMU's `-kernel`
# loader puts it at 0x100000 and enters it in 32-bit protected mode, paging off, flat
# segments, interrupts disabled (Multiboot spec, section 3.2).
#
# It sets the word at 0x100020 to 1 (the "started" mark the host polls for), then halts
# for ever with interrupts disabled: after that its memory never changes.
#
# Rebuild the bytes in src/guest.rs (GNU binutils):
#   as --32 -o idle.o idle.S && objcopy -O binary -j .text idle.o idle.bin
    .intel_syntax noprefix
    .code32
    .text
    .set LOAD, 0x100000
    .set MAGIC, 0x1BADB002
    .set FLAGS, 0x00010000              # bit 16: the address fields below are valid
header:
    .long MAGIC
    .long FLAGS
    .long -(MAGIC + FLAGS)              # checksum: the three words sum to 0
    .long LOAD                          # header_addr: the header is the image's first byte
    .long LOAD                          # load_addr
    .long LOAD + (end - header)         # load_end_addr
    .long 0                             # bss_end_addr: no bss
    .long LOAD + (start - header)       # entry_addr
started:
    .long 0                             # 0x20: set to 1 on entry
start:
    cli
    mov dword ptr [LOAD + (started - header)], 1
1:
    hlt
    jmp 1b
end:

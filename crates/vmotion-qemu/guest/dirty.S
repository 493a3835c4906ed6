# The dirty guest: a Multiboot v1 image like idle.S (flat binary, a.out kludge, loaded at
# 0x100000, entered in 32-bit protected mode with paging off) that keeps rewriting a
# region of its memory at a set pace.
#
# Parameter block (patched by src/guest.rs; addresses are guest-physical):
#   0x100020 started      set to 1 on entry
#   0x100024 progress     pages written so far (the last counter value stored)
#   0x100028 region start first byte of the region (4 KiB aligned)
#   0x10002C region pages pages in the region (at least 1)
#   0x100030 rate         credit per PIT tick, in 2^-32 pages; 0 = unpaced
#   0x100034 cap          the most pages of credit it may hold
#   0x100038 (scratch)    the credit's fraction, in 2^-32 pages
#
# It walks the region page after page, wrapping at its end, and stores an incrementing
# counter (1, 2, ...) into the first word of each page: one 32-bit store dirties the page.
# Unpaced, it does nothing else. Paced, it reprograms PIT channel 0 (mode 2, divisor 0:
# the counter runs down by one at 1,193,182 Hz and wraps every 65,536 ticks), latches and
# reads it, turns the ticks elapsed since the last read (mod 65,536) into credit
# (ticks * rate, a 64-bit sum: the high word is whole pages), caps the credit, then
# writes at most BATCH pages of it before reading the PIT again, so reads come far more
# often than the 55 ms wrap. Interrupts stay disabled throughout; nothing uses a stack.
#
# Registers: esi counter, edi next page, ebx end of region, ebp whole pages of credit,
# ecx the PIT's last count.
#
# Rebuild the bytes in src/guest.rs (GNU binutils):
#   as --32 -o dirty.o dirty.S && objcopy -O binary -j .text dirty.o dirty.bin
    .intel_syntax noprefix
    .code32
    .text
    .set LOAD, 0x100000
    .set MAGIC, 0x1BADB002
    .set FLAGS, 0x00010000              # bit 16: the address fields below are valid
    .set BATCH, 256                     # pages written between two PIT reads, at most
header:
    .long MAGIC
    .long FLAGS
    .long -(MAGIC + FLAGS)              # checksum: the three words sum to 0
    .long LOAD                          # header_addr: the header is the image's first byte
    .long LOAD                          # load_addr
    .long LOAD + (end - header)         # load_end_addr
    .long 0                             # bss_end_addr: no bss
    .long LOAD + (start - header)       # entry_addr
    .set STARTED, LOAD + 0x20
    .set PROGRESS, LOAD + 0x24
    .set REGION_START, LOAD + 0x28
    .set REGION_PAGES, LOAD + 0x2C
    .set RATE, LOAD + 0x30
    .set CAP, LOAD + 0x34
    .set FRACTION, LOAD + 0x38
    .long 0, 0, 0, 0, 0, 0, 0, 0        # 0x20..0x40: the parameter block
start:
    cli
    mov dword ptr [STARTED], 1
    xor esi, esi
    mov edi, dword ptr [REGION_START]
    mov ebx, dword ptr [REGION_PAGES]
    shl ebx, 12
    add ebx, edi
    cmp dword ptr [RATE], 0
    je unpaced

    mov al, 0x34                        # channel 0, lobyte/hibyte, mode 2, binary
    out 0x43, al
    xor eax, eax                        # divisor 0 = 65,536
    out 0x40, al
    out 0x40, al
    xor ebp, ebp
    xor ecx, ecx                        # the first read counts from 0: at most one
                                        # period of credit, which the cap bounds
paced:
    xor eax, eax
    out 0x43, al                        # latch channel 0
    in al, 0x40
    mov dl, al
    in al, 0x40
    mov dh, al
    movzx edx, dx                       # edx = count now
    mov eax, ecx
    sub eax, edx                        # elapsed = last - now (it counts down) ...
    movzx eax, ax                       # ... mod 65,536
    mov ecx, edx
    mul dword ptr [RATE]                # edx:eax = elapsed * rate
    add dword ptr [FRACTION], eax
    adc ebp, edx
    cmp ebp, dword ptr [CAP]
    jbe 1f
    mov ebp, dword ptr [CAP]
1:
    test ebp, ebp
    jz paced
    mov eax, BATCH
2:
    inc esi
    mov dword ptr [edi], esi
    mov dword ptr [PROGRESS], esi
    add edi, 4096
    cmp edi, ebx
    jb 3f
    mov edi, dword ptr [REGION_START]
3:
    dec ebp
    jz paced
    dec eax
    jnz 2b
    jmp paced

unpaced:
    inc esi
    mov dword ptr [edi], esi
    mov dword ptr [PROGRESS], esi
    add edi, 4096
    cmp edi, ebx
    jb unpaced
    mov edi, dword ptr [REGION_START]
    jmp unpaced
end:

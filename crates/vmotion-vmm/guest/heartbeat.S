# The micro-VM's built-in guest program: 32-bit protected mode, paging off, flat
# segments, loaded at 0x1000. Its parameters live in page 0 (see src/guest.rs):
#   [0x00] first data page   [0x04] data pages   [0x08] writes per heartbeat
#   [0x0C] pattern (1 = sequential, else pseudo-random)   [0x10] command (1 = checksum)
# Registers carry its state across a migration: ebx the page generator, esi the write
# counter (the heartbeat). Each write puts the counter and the generator into the first
# two words of a data page. After each batch it reports the counter on port 0x10; when
# the command word is 1 it clears it, sums the two words of every page of the data region
# it writes (acc = rotl(acc, 1) + word) and reports the sum on port 0x11. (Only those
# two words: on the nested hypervisor of these machines a guest without paging is
# emulated at about a million instructions a second, too slow to sum whole GiBs.)
#
# Rebuild the bytes in src/guest.rs (GNU binutils):
#   as --32 -o heartbeat.o heartbeat.S && objcopy -O binary -j .text heartbeat.o heartbeat.bin
    .intel_syntax noprefix
    .code32
    .text
    .globl _start
_start:
main:
    mov ecx, dword ptr [0x08]
1:
    cmp dword ptr [0x0C], 1
    je 2f
    imul ebx, ebx, 1664525
    add ebx, 1013904223
    mov eax, ebx
    shr eax, 8
    jmp 3f
2:
    inc ebx
    mov eax, ebx
3:
    xor edx, edx
    div dword ptr [0x04]
    add edx, dword ptr [0x00]
    shl edx, 12
    inc esi
    mov dword ptr [edx], esi
    mov dword ptr [edx + 4], ebx
    loop 1b
    mov eax, esi
    out 0x10, eax
    cmp dword ptr [0x10], 1
    jne main
    mov dword ptr [0x10], 0
    mov edi, dword ptr [0x00]
    shl edi, 12
    mov ecx, dword ptr [0x04]
    xor eax, eax
4:
    rol eax, 1
    add eax, dword ptr [edi]
    rol eax, 1
    add eax, dword ptr [edi + 4]
    add edi, 4096
    loop 4b
    out 0x11, eax
    jmp main

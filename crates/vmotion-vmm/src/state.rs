//! The micro-VM's device state: the vCPU's registers and special registers, and the
//! workload's pacing, in a fixed little-endian layout with a magic and version.

use kvm_bindings::{kvm_dtable, kvm_regs, kvm_segment, kvm_sregs};

use crate::VmmError;

const MAGIC: &[u8; 8] = b"VMVMCPU1";

/// Everything the destination needs to continue the guest exactly.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct VcpuState {
    pub(crate) regs: kvm_regs,
    pub(crate) sregs: kvm_sregs,
    /// The workload's writes per second (0 = unpaced), so the guest keeps its rate.
    pub(crate) rate: f64,
}

struct W(Vec<u8>);
impl W {
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn seg(&mut self, s: &kvm_segment) {
        self.u64(s.base);
        self.0.extend_from_slice(&s.limit.to_le_bytes());
        self.0.extend_from_slice(&s.selector.to_le_bytes());
        self.0.extend_from_slice(&[
            s.type_, s.present, s.dpl, s.db, s.s, s.l, s.g, s.avl, s.unusable,
        ]);
    }
    fn dt(&mut self, d: &kvm_dtable) {
        self.u64(d.base);
        self.0.extend_from_slice(&d.limit.to_le_bytes());
    }
}

struct R<'a>(&'a [u8]);
impl R<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], VmmError> {
        if self.0.len() < N {
            return Err(VmmError::DeviceState("truncated".into()));
        }
        let (a, b) = self.0.split_at(N);
        self.0 = b;
        Ok(a.try_into().expect("split at N"))
    }
    fn u64(&mut self) -> Result<u64, VmmError> {
        self.take::<8>().map(u64::from_le_bytes)
    }
    fn seg(&mut self) -> Result<kvm_segment, VmmError> {
        let base = self.u64()?;
        let limit = u32::from_le_bytes(self.take::<4>()?);
        let selector = u16::from_le_bytes(self.take::<2>()?);
        let [type_, present, dpl, db, s, l, g, avl, unusable] = self.take::<9>()?;
        Ok(kvm_segment {
            base,
            limit,
            selector,
            type_,
            present,
            dpl,
            db,
            s,
            l,
            g,
            avl,
            unusable,
            padding: 0,
        })
    }
    fn dt(&mut self) -> Result<kvm_dtable, VmmError> {
        Ok(kvm_dtable {
            base: self.u64()?,
            limit: u16::from_le_bytes(self.take::<2>()?),
            padding: [0; 3],
        })
    }
}

impl VcpuState {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut w = W(MAGIC.to_vec());
        let r = &self.regs;
        for v in [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15, r.rip, r.rflags,
        ] {
            w.u64(v);
        }
        let s = &self.sregs;
        for seg in [&s.cs, &s.ds, &s.es, &s.fs, &s.gs, &s.ss, &s.tr, &s.ldt] {
            w.seg(seg);
        }
        w.dt(&s.gdt);
        w.dt(&s.idt);
        for v in [s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer, s.apic_base] {
            w.u64(v);
        }
        for v in s.interrupt_bitmap {
            w.u64(v);
        }
        w.u64(self.rate.to_bits());
        w.0
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, VmmError> {
        let mut r = R(bytes);
        if &r.take::<8>()? != MAGIC {
            return Err(VmmError::DeviceState(
                "not a vmotion micro-VM vCPU state (bad magic or version)".into(),
            ));
        }
        let mut g = [0u64; 18];
        for v in &mut g {
            *v = r.u64()?;
        }
        let regs = kvm_regs {
            rax: g[0],
            rbx: g[1],
            rcx: g[2],
            rdx: g[3],
            rsi: g[4],
            rdi: g[5],
            rsp: g[6],
            rbp: g[7],
            r8: g[8],
            r9: g[9],
            r10: g[10],
            r11: g[11],
            r12: g[12],
            r13: g[13],
            r14: g[14],
            r15: g[15],
            rip: g[16],
            rflags: g[17],
        };
        let (cs, ds, es, fs, gs, ss, tr, ldt) = (
            r.seg()?,
            r.seg()?,
            r.seg()?,
            r.seg()?,
            r.seg()?,
            r.seg()?,
            r.seg()?,
            r.seg()?,
        );
        let (gdt, idt) = (r.dt()?, r.dt()?);
        let mut c = [0u64; 7];
        for v in &mut c {
            *v = r.u64()?;
        }
        let mut interrupt_bitmap = [0u64; 4];
        for v in &mut interrupt_bitmap {
            *v = r.u64()?;
        }
        let rate = f64::from_bits(r.u64()?);
        if !r.0.is_empty() {
            return Err(VmmError::DeviceState("trailing bytes".into()));
        }
        if !crate::valid_rate(rate) {
            return Err(VmmError::DeviceState("bad workload rate".into()));
        }
        // This VM runs one kind of guest: 32-bit, paging off, no pending interrupts.
        // Anything else came from something other than a vmotion micro-VM.
        if c[5] != 0 || c[0] & (1 << 31) != 0 || interrupt_bitmap != [0; 4] {
            return Err(VmmError::DeviceState(
                "not a 32-bit protected-mode micro-VM state (EFER, paging or a pending interrupt)"
                    .into(),
            ));
        }
        Ok(Self {
            regs,
            sregs: kvm_sregs {
                cs,
                ds,
                es,
                fs,
                gs,
                ss,
                tr,
                ldt,
                gdt,
                idt,
                cr0: c[0],
                cr2: c[1],
                cr3: c[2],
                cr4: c[3],
                cr8: c[4],
                efer: c[5],
                apic_base: c[6],
                interrupt_bitmap,
            },
            rate,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VcpuState {
        let mut s = VcpuState::default();
        s.regs.rip = 0x1042;
        s.regs.rsi = 12345;
        s.regs.rflags = 0x202;
        s.sregs.cs = crate::flat_segment(0x8, 0xb);
        s.sregs.ds = crate::flat_segment(0x10, 0x3);
        s.sregs.cr0 = 0x11;
        s.sregs.gdt.limit = 0x17;
        s.rate = 1000.0;
        s
    }

    #[test]
    fn state_round_trips() {
        let s = sample();
        assert_eq!(VcpuState::decode(&s.encode()).unwrap(), s);
    }

    #[test]
    fn every_truncation_and_extension_is_refused() {
        let bytes = sample().encode();
        for n in 0..bytes.len() {
            assert!(VcpuState::decode(&bytes[..n]).is_err(), "{n} bytes");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(VcpuState::decode(&longer).is_err());
        let mut other = bytes;
        other[7] ^= 1;
        assert!(VcpuState::decode(&other).is_err(), "another version");
    }

    #[test]
    fn states_this_vm_cannot_run_are_refused() {
        let mut paging = sample();
        paging.sregs.cr0 |= 1 << 31;
        let mut long = sample();
        long.sregs.efer = 0x500;
        let mut irq = sample();
        irq.sregs.interrupt_bitmap[1] = 1;
        let mut tiny = sample();
        tiny.rate = 1e-300;
        let mut nan = sample();
        nan.rate = f64::NAN;
        for s in [paging, long, irq, tiny, nan] {
            assert!(VcpuState::decode(&s.encode()).is_err(), "{s:?}");
        }
    }
}

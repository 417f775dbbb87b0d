// LD_PRELOAD library: the process sees an AVX2-only x86-64 CPU (no AVX-512, no VNNI of any width, no AMX).
//
// Why: ONNX Runtime's MLAS, numpy, torch and sq-onnx's kernels each pick their code path from the CPUID
// instruction; there is no switch to hold ORT's kernels to AVX2. Linux can make CPUID fault in user mode
// (arch_prctl ARCH_SET_CPUID, on CPUs with "cpuid_fault" in /proc/cpuinfo); this library turns that on
// before anything runs, and answers each faulting CPUID from the real one with the AVX-512 / VNNI / AMX
// bits cleared. Every library in the process then takes the path it takes on an AVX2-only CPU, on this
// CPU's cores (same caches, memory and clock: a reading of the kernels, not of another machine).
//
// Build: cc -O2 -shared -fPIC -o avx2_only.so avx2_only.c   Run: LD_PRELOAD=$PWD/avx2_only.so COMMAND
// Do not combine with Python's faulthandler (PYTHONFAULTHANDLER, pytest): it replaces the SIGSEGV handler.
#define _GNU_SOURCE
#include <cpuid.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define ARCH_SET_CPUID 0x1012

#define BIT(n) (1u << (n))

// CPUID leaf 7, sub-leaf 0.
static const uint32_t kLeaf7Ebx = BIT(16) | BIT(17) | BIT(21) | BIT(26) | BIT(27) | BIT(28) | BIT(30) | BIT(31);
//   AVX512F, DQ, IFMA, PF, ER, CD, BW, VL
static const uint32_t kLeaf7Ecx = BIT(1) | BIT(6) | BIT(11) | BIT(12) | BIT(14);
//   AVX512_VBMI, VBMI2, VNNI, BITALG, VPOPCNTDQ
static const uint32_t kLeaf7Edx = BIT(2) | BIT(3) | BIT(8) | BIT(22) | BIT(23) | BIT(24) | BIT(25);
//   AVX512_4VNNIW, 4FMAPS, VP2INTERSECT, AMX_BF16, AVX512_FP16, AMX_TILE, AMX_INT8
// CPUID leaf 7, sub-leaf 1.
static const uint32_t kLeaf7s1Eax = BIT(4) | BIT(5) | BIT(23);
//   AVX_VNNI, AVX512_BF16, AVX_IFMA
static const uint32_t kLeaf7s1Edx = BIT(4) | BIT(5) | BIT(19);
//   AVX_VNNI_INT8, AVX_NE_CONVERT, AVX10

static void real_cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
  syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
  __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
  syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
}

static void mask(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
  if (leaf == 7 && sub == 0) {
    r[1] &= ~kLeaf7Ebx;
    r[2] &= ~kLeaf7Ecx;
    r[3] &= ~kLeaf7Edx;
  } else if (leaf == 7 && sub == 1) {
    r[0] &= ~kLeaf7s1Eax;
    r[3] &= ~kLeaf7s1Edx;
  } else if (leaf == 0x24) {  // AVX10 converged vector ISA leaf
    r[0] = r[1] = r[2] = r[3] = 0;
  }
}

static void on_segv(int sig, siginfo_t *info, void *context) {
  ucontext_t *uc = (ucontext_t *)context;
  greg_t *g = uc->uc_mcontext.gregs;
  const unsigned char *ip = (const unsigned char *)g[REG_RIP];
  if (ip[0] != 0x0f || ip[1] != 0xa2) {  // a real fault: let it kill the process as it would have
    signal(sig, SIG_DFL);
    return;
  }
  uint32_t r[4];
  uint32_t leaf = (uint32_t)g[REG_RAX], sub = (uint32_t)g[REG_RCX];
  real_cpuid(leaf, sub, r);
  mask(leaf, sub, r);
  g[REG_RAX] = r[0];
  g[REG_RBX] = r[1];
  g[REG_RCX] = r[2];
  g[REG_RDX] = r[3];
  g[REG_RIP] += 2;
  (void)info;
}

__attribute__((constructor)) static void avx2_only_init(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_segv;
  sa.sa_flags = SA_SIGINFO;
  sigemptyset(&sa.sa_mask);
  if (sigaction(SIGSEGV, &sa, NULL) != 0 || syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0) {
    fprintf(stderr, "avx2_only: this CPU or kernel cannot make CPUID fault (no cpuid_fault): not masking\n");
    exit(3);
  }
}

// LD_PRELOAD library: the process sees an AVX2-only x86-64 CPU (no AVX-512, no VNNI of any width, no AMX).
//
// Why: ONNX Runtime's MLAS, numpy, torch and sq-onnx's kernels each pick their code path from the CPUID
// instruction; there is no switch to hold ORT's kernels to AVX2. Linux can make CPUID fault in user mode
// (arch_prctl ARCH_SET_CPUID, on CPUs with "cpuid_fault" in /proc/cpuinfo); this library turns that on
// before anything runs, and answers each faulting CPUID from the real one with the AVX-512 / VNNI / AMX
// bits cleared. Every library in the process then takes the path it takes on an AVX2-only CPU, on this
// CPU's cores (same caches, memory and clock: a reading of the kernels, not of another machine).
//
// Programs that install a SIGSEGV handler of their own (Python's faulthandler, pytest, GCC's cc1) keep it: this
// library's sigaction / signal keep its own handler installed and pass every fault that is not a CPUID to theirs.
//
// Build: cc -O2 -shared -fPIC -o avx2_only.so avx2_only.c -ldl   Run: LD_PRELOAD=$PWD/avx2_only.so COMMAND
#define _GNU_SOURCE
#include <cpuid.h>
#include <dlfcn.h>
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

typedef int (*sigaction_fn)(int, const struct sigaction *, struct sigaction *);
static sigaction_fn real_sigaction_fn;
static int installed;
static struct sigaction program_segv;  // the SIGSEGV disposition the program asked for (SIG_DFL at first)

static int real_sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
  if (!real_sigaction_fn) real_sigaction_fn = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
  return real_sigaction_fn(sig, act, old);
}

// A fault that is not a CPUID goes where the program's disposition sends it; the default kills the process as
// it would have (SIG_DFL back in place, the signal raised again: pending until this handler returns).
static void pass_on(int sig, siginfo_t *info, void *context) {
  if (program_segv.sa_flags & SA_SIGINFO) {
    program_segv.sa_sigaction(sig, info, context);
  } else if (program_segv.sa_handler != SIG_DFL && program_segv.sa_handler != SIG_IGN) {
    program_segv.sa_handler(sig);
  } else {
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    installed = 0;
    real_sigaction(sig, &dfl, NULL);
    raise(sig);
  }
}

static void on_segv(int sig, siginfo_t *info, void *context) {
  ucontext_t *uc = (ucontext_t *)context;
  greg_t *g = uc->uc_mcontext.gregs;
  const unsigned char *ip = (const unsigned char *)g[REG_RIP];
  // CPUID faults arrive with si_code SI_KERNEL; <= 0: sent by kill / raise, not by an instruction
  if (info->si_code <= 0 || ip[0] != 0x0f || ip[1] != 0xa2) {
    pass_on(sig, info, context);
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
}

int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
  if (sig != SIGSEGV || !installed) return real_sigaction(sig, act, old);
  if (old) *old = program_segv;
  if (act) program_segv = *act;
  return 0;
}

sighandler_t signal(int sig, sighandler_t handler) {
  struct sigaction act, old;
  memset(&act, 0, sizeof act);
  act.sa_handler = handler;
  act.sa_flags = SA_RESTART;
  if (sigaction(sig, &act, &old) != 0) return SIG_ERR;
  return old.sa_handler;
}

__attribute__((constructor)) static void avx2_only_init(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_segv;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;  // on the program's alternate stack, if it sets one (stack overflows)
  sigemptyset(&sa.sa_mask);
  program_segv.sa_handler = SIG_DFL;
  if (real_sigaction(SIGSEGV, &sa, NULL) != 0 || syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0) {
    fprintf(stderr, "avx2_only: this CPU or kernel cannot make CPUID fault (no cpuid_fault): not masking\n");
    exit(3);
  }
  installed = 1;
}

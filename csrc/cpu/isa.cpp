// The CPU kernels' variant choice (see kr_cpu.h): what this CPU runs, checked at run time, and the variant a
// process uses, chosen once (the best this CPU runs, or KANGAROO_RT_CPU_ISA); likewise the software prefetch's
// target (KANGAROO_RT_CPU_PREFETCH).
#include <cstdlib>
#include <string>

#include "kr_cpu.h"
#include "kr_cpu_common.h"

#if KR_CPU_X86 && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif

namespace {

bool cpu_runs(int isa) {
  switch (isa) {
    case KR_CPU_ISA_PORTABLE: return true;
#if KR_CPU_X86 && (defined(__GNUC__) || defined(__clang__))
    case KR_CPU_ISA_AVX2:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case KR_CPU_ISA_AVX512:
      __builtin_cpu_init();  // the checks include the OS's support for the AVX-512 register state
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma");
    case KR_CPU_ISA_AVX512_BF16:
      return cpu_runs(KR_CPU_ISA_AVX512) && __builtin_cpu_supports("avx512bf16");
#endif
    default: return false;
  }
}

struct IsaChoice {
  int isa = KR_CPU_ISA_INVALID;
  int prefetch = KR_CPU_PREFETCH_NTA;
  std::string error;
};

// AMD family 19h (Zen 3 and Zen 4) with AVX-512, which only Zen 4 has.
bool is_zen4() {
#if KR_CPU_X86 && (defined(__GNUC__) || defined(__clang__))
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid(0, &a, &b, &c, &d) == 0) return false;
  const bool amd = b == 0x68747541u && d == 0x69746e65u && c == 0x444d4163u;  // "AuthenticAMD"
  if (!amd || __get_cpuid(1, &a, &b, &c, &d) == 0) return false;
  const unsigned base = (a >> 8) & 0xfu, family = base == 0xfu ? base + ((a >> 20) & 0xffu) : base;
  return family == 0x19u && cpu_runs(KR_CPU_ISA_AVX512);
#else
  return false;
#endif
}

// The prefetch target: the CPU's default, or KANGAROO_RT_CPU_PREFETCH; "" or why the variable is invalid.
std::string choose_prefetch(int* target) {
  *target = is_zen4() ? KR_CPU_PREFETCH_L2 : KR_CPU_PREFETCH_NTA;
  const char* env = std::getenv("KANGAROO_RT_CPU_PREFETCH");
  if (env == nullptr || *env == '\0') return "";
  const std::string wanted(env);
  for (int candidate : {KR_CPU_PREFETCH_NTA, KR_CPU_PREFETCH_L2}) {
    if (wanted == kr_cpu_prefetch_name(candidate)) {
      *target = candidate;
      return "";
    }
  }
  return "KANGAROO_RT_CPU_PREFETCH=" + wanted + " is not one of nta, l2 (unset it for this CPU's default, " +
         kr_cpu_prefetch_name(*target) + ")";
}

IsaChoice choose_isa() {
  IsaChoice choice;
  int best = KR_CPU_ISA_PORTABLE;
  for (int isa : {KR_CPU_ISA_AVX512_BF16, KR_CPU_ISA_AVX512, KR_CPU_ISA_AVX2}) {
    if (cpu_runs(isa)) {
      best = isa;
      break;
    }
  }
  const char* env = std::getenv("KANGAROO_RT_CPU_ISA");
  if (env == nullptr || *env == '\0') {
    choice.isa = best;
    return choice;
  }
  const std::string wanted(env);
  int isa = KR_CPU_ISA_INVALID;
  for (int candidate : {KR_CPU_ISA_AVX512_BF16, KR_CPU_ISA_AVX512, KR_CPU_ISA_AVX2, KR_CPU_ISA_PORTABLE})
    if (wanted == kr_cpu_isa_name(candidate)) isa = candidate;
  if (isa == KR_CPU_ISA_INVALID) {
    choice.error = "KANGAROO_RT_CPU_ISA=" + wanted + " is not one of avx512_bf16, avx512, avx2, portable (unset it for the best "
                   "variant this CPU runs, " + kr_cpu_isa_name(best) + ")";
  } else if (!cpu_runs(isa)) {
    choice.error = "KANGAROO_RT_CPU_ISA=" + wanted + " asks for a variant this CPU cannot run (the best it runs is " +
                   kr_cpu_isa_name(best) + ")";
  } else {
    choice.isa = isa;
  }
  return choice;
}

IsaChoice choose() {
  IsaChoice choice = choose_isa();
  const std::string prefetch_error = choose_prefetch(&choice.prefetch);
  if (!prefetch_error.empty() && choice.error.empty()) choice.isa = KR_CPU_ISA_INVALID, choice.error = prefetch_error;
  return choice;
}

const IsaChoice& process_isa() {
  static const IsaChoice choice = choose();  // thread-safe, once
  return choice;
}

}  // namespace

extern "C" {

int kr_cpu_isa(void) { return process_isa().isa; }

const char* kr_cpu_isa_error(void) { return process_isa().error.c_str(); }

const char* kr_cpu_isa_name(int isa) {
  switch (isa) {
    case KR_CPU_ISA_AVX512_BF16: return "avx512_bf16";
    case KR_CPU_ISA_AVX512: return "avx512";
    case KR_CPU_ISA_AVX2: return "avx2";
    case KR_CPU_ISA_PORTABLE: return "portable";
    default: return "invalid";
  }
}

int kr_cpu_isa_supported(int isa) { return cpu_runs(isa) ? 1 : 0; }

int kr_cpu_prefetch_target(void) { return process_isa().prefetch; }

const char* kr_cpu_prefetch_name(int target) {
  switch (target) {
    case KR_CPU_PREFETCH_NTA: return "nta";
    case KR_CPU_PREFETCH_L2: return "l2";
    default: return "invalid";
  }
}

}  // extern "C"

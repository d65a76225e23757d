// The CPU kernels' variant choice (see kr_cpu.h): what this CPU runs, checked at run time, and the variant a
// process uses, chosen once (the best this CPU runs, or KANGAROO_RT_CPU_ISA).
#include <cstdlib>
#include <string>

#include "kr_cpu.h"
#include "kr_cpu_common.h"

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
  std::string error;
};

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

const IsaChoice& process_isa() {
  static const IsaChoice choice = choose_isa();  // thread-safe, once
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

}  // extern "C"

// The x86 instruction set the CPU kernels are built for, picked once at load time: AVX-512, AVX2+FMA or plain (the
// build's baseline, SSE2). Loops that matter are compiled once per set (GCC target attributes) and the best one the
// CPU supports runs; T2T_CPU_ISA=avx2|plain lowers the choice (to test the fallbacks; avx512 keeps the best; another
// value is an error naming the variable).
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

#define T2T_INLINE inline __attribute__((always_inline))

#if defined(__GNUC__) && defined(__x86_64__)
#define T2T_TARGET_AVX512 __attribute__((target("avx2,fma,avx512f,avx512vl,avx512dq,avx512bw")))
#define T2T_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define T2T_HAS_TARGETS 1
#else
#define T2T_TARGET_AVX512
#define T2T_TARGET_AVX2
#endif

namespace t2t_kernels {

enum class Isa { kPlain, kAvx2, kAvx512 };

inline Isa detect_isa() {
  Isa best = Isa::kPlain;
#if defined(__GNUC__) && defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
  if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw"))
    best = Isa::kAvx512;
#endif
  if (const char* env = std::getenv("T2T_CPU_ISA"); env && *env) {
    TORCH_CHECK(std::strcmp(env, "plain") == 0 || std::strcmp(env, "avx2") == 0 || std::strcmp(env, "avx512") == 0,
                "T2T_CPU_ISA must be avx512, avx2 or plain (or unset: the best the CPU has), got '", env, "'");
    if (std::strcmp(env, "plain") == 0) best = Isa::kPlain;
    if (std::strcmp(env, "avx2") == 0 && best == Isa::kAvx512) best = Isa::kAvx2;
  }
  return best;
}

inline Isa cpu_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

// isa_variant<Kernel>(isa): Kernel::run (an always-inline static function) compiled for that instruction
// set, so its plain loops auto-vectorise to the widest vectors the CPU has.
template <typename Kernel, typename... Args>
T2T_TARGET_AVX512 void run_avx512(Args... args) {
  Kernel::run(args...);
}
template <typename Kernel, typename... Args>
T2T_TARGET_AVX2 void run_avx2(Args... args) {
  Kernel::run(args...);
}
template <typename Kernel, typename... Args>
void run_plain(Args... args) {
  Kernel::run(args...);
}
template <typename Kernel, typename... Args>
auto isa_variant_of(Isa isa, void (*)(Args...)) -> void (*)(Args...) {
  return isa == Isa::kAvx512 ? &run_avx512<Kernel, Args...>
         : isa == Isa::kAvx2 ? &run_avx2<Kernel, Args...>
                             : &run_plain<Kernel, Args...>;
}
template <typename Kernel>
auto isa_variant(Isa isa) {
  return isa_variant_of<Kernel>(isa, static_cast<decltype(&Kernel::run)>(nullptr));
}

}  // namespace t2t_kernels

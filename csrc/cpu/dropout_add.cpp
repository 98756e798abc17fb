// CPU kernel of t2t_kernels::dropout_add: out = residual + x * mask / (1 - p) in one pass (residual optional).
//
// The mask comes from a counter-based generator, Philox4x32-10 (Salmon et al., SC 2011; the generator of curand and
// of torch's CUDA dropout), keyed by the 64-bit seed: element e of x (row-major) is kept when word e % 4 of the
// generator's output for counter e / 4 is at least floor(p 2^32). The mask is thus a function of (seed, e) alone:
// backward regenerates it instead of keeping one, and the result does not depend on the number of threads.
// torch's F.dropout draws a Bernoulli tensor from its sequential generator, divides it and multiplies: on a
// (8, 3136, 64) float32 tensor (a T2T layer's dropout at B=8) it took 14 ms on a 2-core VM, most of it the draw;
// this kernel 0.7-1.6 ms. The words are generated a block (64 counters) at a time into L1, the 10 rounds vectorised
// across the counters (32x32->64-bit products), then the block's elements are written.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>

#include "isa.h"

namespace t2t_kernels {
namespace {

constexpr int64_t kCalls = 64;             // Philox calls per block: 4 words each
constexpr int64_t kBlock = 4 * kCalls;     // elements per block
constexpr int64_t kGrainBlocks = 64;       // blocks per parallel task (16K elements)

// words[4 j + w] = word w of Philox4x32-10 of the counter (first + j, 0, 0) (64-bit first + j as its two low words)
// under the key (k0, k1)
T2T_INLINE void philox_block(uint64_t first, uint32_t k0, uint32_t k1, uint32_t* words) {
  uint32_t c0[kCalls], c1[kCalls], c2[kCalls], c3[kCalls];
  for (int64_t j = 0; j < kCalls; ++j) {
    const uint64_t n = first + static_cast<uint64_t>(j);
    c0[j] = static_cast<uint32_t>(n);
    c1[j] = static_cast<uint32_t>(n >> 32);
    c2[j] = 0;
    c3[j] = 0;
  }
  for (int round = 0; round < 10; ++round) {
    for (int64_t j = 0; j < kCalls; ++j) {
      const uint64_t p0 = uint64_t{0xD2511F53u} * c0[j];
      const uint64_t p1 = uint64_t{0xCD9E8D57u} * c2[j];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[j] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[j] ^ k1;
      c1[j] = static_cast<uint32_t>(p1);
      c3[j] = static_cast<uint32_t>(p0);
      c0[j] = n0;
      c2[j] = n2;
    }
    k0 += 0x9E3779B9u;  // the Weyl key schedule
    k1 += 0xBB67AE85u;
  }
  for (int64_t j = 0; j < kCalls; ++j) {
    words[4 * j] = c0[j];
    words[4 * j + 1] = c1[j];
    words[4 * j + 2] = c2[j];
    words[4 * j + 3] = c3[j];
  }
}

// out[e] = residual[e] + x[e] * (kept ? scale : 0) (x * 0 dropped: NaN stays NaN, as in F.dropout) for e in
// [begin, end) (begin a multiple of kBlock); the product is rounded to T before the sum (torch: x * mask + residual)
template <typename T, typename acc_t>
struct DropoutAddRange {
  static T2T_INLINE void run(const T* x, const T* residual, T* out, int64_t begin, int64_t end, uint64_t seed,
                             uint32_t threshold, acc_t scale) {
    alignas(64) uint32_t words[kBlock];
    for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
      philox_block(static_cast<uint64_t>(b0) / 4, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32),
                   words);
      const int64_t n = std::min(kBlock, end - b0);
      const T* xb = x + b0;
      T* ob = out + b0;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const acc_t mask = words[i] >= threshold ? scale : acc_t(0);
        ob[i] = static_cast<T>(static_cast<acc_t>(xb[i]) * mask);
      }
      if (residual != nullptr) {
        // a second pass over the block (in L1): the product is rounded to T through memory before the sum, which
        // in one expression the compiler would contract into a fused multiply-add (the eager formula rounds twice)
        const T* rb = residual + b0;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) ob[i] = static_cast<T>(static_cast<acc_t>(rb[i]) + static_cast<acc_t>(ob[i]));
      }
    }
  }
};

at::Tensor dropout_add_cpu(const at::Tensor& x, const std::optional<at::Tensor>& residual, double p,
                            const at::Tensor& seed) {
  TORCH_CHECK(p > 0.0 && p < 1.0, "dropout_add: the kernel takes 0 < p < 1, got p=", p);
  TORCH_CHECK(seed.dim() == 0 && seed.scalar_type() == at::kLong && seed.device().is_cpu(),
              "dropout_add: seed must be a 0-dim int64 CPU tensor, got ", seed.sizes(), " ", seed.scalar_type(), " on ",
              seed.device());
  TORCH_CHECK(x.is_contiguous(), "dropout_add: x must be contiguous");
  const bool has_residual = residual.has_value() && residual->defined();
  if (has_residual) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->is_contiguous() &&
                    residual->scalar_type() == x.scalar_type(),
                "dropout_add: residual must be contiguous with x's shape and dtype, got ", residual->sizes(), " ",
                residual->scalar_type(), " for x ", x.sizes(), " ", x.scalar_type());
  }
  auto out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t numel = x.numel();
  if (numel == 0) return out;
  // kept iff word >= floor(p 2^32): P(kept) = 1 - floor(p 2^32) / 2^32, within 2^-32 of 1 - p
  const uint32_t threshold = static_cast<uint32_t>(p * 4294967296.0);
  const auto useed = static_cast<uint64_t>(seed.item<int64_t>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dropout_add_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // the scale in x's dtype, as F.dropout's mask / (1 - p) holds it
    const auto scale = static_cast<acc_t>(static_cast<scalar_t>(1.0 / (1.0 - p)));
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = has_residual ? residual->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const auto range = isa_variant<DropoutAddRange<scalar_t, acc_t>>(cpu_isa());
    const int64_t blocks = (numel + kBlock - 1) / kBlock;
    at::parallel_for(0, blocks, kGrainBlocks, [&](int64_t begin, int64_t end) {
      range(xp, rp, op, begin * kBlock, std::min(end * kBlock, numel), useed, threshold, scale);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(t2t_kernels, CPU, m) { m.impl("dropout_add", &dropout_add_cpu); }

}  // namespace t2t_kernels

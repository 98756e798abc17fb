// oneDNN's linear for float32 CPU products: torch's mkldnn::_linear_pointwise (what inductor's CPU freezing path
// calls), whose GEMMs beat MKL's (what at::linear and at::mm call) by 15-35% at the model's shapes on AMD Zen 4
// (t2t_kernels/ops/_onednn.py; on an Intel Xeon, with prepacked weights, it had shown no gain). Used by
// post_attention's wide path (with fused epilogues) and by the LayerNorm/GELU -> Linear pairs' forward product and
// input gradient (recompute.cpp). By default on every CPU but Intel's, where MKL is the faster (onednn_by_default);
// T2T_ONEDNN=1 turns both on there too, T2T_ONEDNN=0 or torch.backends.mkldnn.enabled = False turns both off.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

namespace t2t_kernels {

// the op's two overloads (x W^T + b, and + other), looked up once: absent where torch was built without oneDNN
inline const std::optional<c10::OperatorHandle>& linear_pointwise(bool binary) {
  static const std::optional<c10::OperatorHandle> plain =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  static const std::optional<c10::OperatorHandle> with_other =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", "binary"});
  return binary ? with_other : plain;
}

// Without T2T_ONEDNN: oneDNN except on Intel CPUs. On a 2-core Intel Xeon (AVX-512) MKL's GEMMs ran T2T-ViT-14's
// forward 2-6% faster (oneDNN's qkv product without bias 8-16% slower) and its train step as fast; on AMD Zen 4
// oneDNN's were 15-35% faster. The Python side (ops/_onednn.py, intel_cpu) asks the same question of /proc/cpuinfo.
inline bool onednn_by_default() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  static const bool intel = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("intel") != 0;
  }();
  return !intel;
#else
  return true;
#endif
}

// T2T_ONEDNN as t2t_kernels/_env.py's env_flag reads a switch: unset or empty, onednn_by_default();
// 0/false/off/no or 1/true/on/yes in any case, spaces around ignored; anything else an error naming it
inline bool onednn_wanted() {
  const char* env = std::getenv("T2T_ONEDNN");
  std::string value = env ? env : "";
  const auto space = [](unsigned char c) { return std::isspace(c) != 0; };
  while (!value.empty() && space(value.back())) value.pop_back();
  value.erase(value.begin(), std::find_if_not(value.begin(), value.end(), space));
  std::transform(value.begin(), value.end(), value.begin(), [](unsigned char c) { return std::tolower(c); });
  if (value.empty()) return onednn_by_default();
  if (value == "0" || value == "false" || value == "off" || value == "no") return false;
  if (value == "1" || value == "true" || value == "on" || value == "yes") return true;
  TORCH_CHECK(false, "T2T_ONEDNN must be one of 0/false/off/no (off) or 1/true/on/yes (on), or unset; got '", env,
              "'");
}

// whether x's products may go through oneDNN: float32 on the CPU, torch has it, and T2T_ONEDNN (onednn_wanted)
// and torch.backends.mkldnn.enabled allow it
inline bool onednn_enabled_for(const at::Tensor& x) {
  // (oneDNN has no primitive for an empty reduction: x's last dimension 0 takes ATen's product)
  return linear_pointwise(false) && x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() > 0 &&
         x.size(-1) > 0 && at::hasMKLDNN() &&
         at::globalContext().userEnabledMkldnn() && onednn_wanted();
}

// boxed: the op's C++ signature (string_view, Scalar lists) has changed across torch versions, its schema has not
inline at::Tensor call_linear_pointwise(bool binary, std::vector<c10::IValue> args) {
  torch::jit::Stack stack(std::make_move_iterator(args.begin()), std::make_move_iterator(args.end()));
  linear_pointwise(binary)->callBoxed(&stack);
  return stack.back().toTensor();
}

// the bias as oneDNN reads it: dense (it ignores a bias's strides: an expanded or strided one would be misread)
inline c10::IValue dense_bias(const at::Tensor& b) {
  return b.defined() ? c10::IValue(b.contiguous()) : c10::IValue();
}

// x W^T + b (b may be undefined), then epilogue "none" or "gelu" (exact, erf). W may be a transposed view.
inline at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                                const char* epilogue = "none") {
  const bool gelu = std::string(epilogue) == "gelu";
  return call_linear_pointwise(false, {x, w, dense_bias(b), std::string(epilogue),
                                       c10::List<std::optional<at::Scalar>>(), std::string(gelu ? "none" : "")});
}

// x W^T + b + other
inline at::Tensor onednn_linear_add(const at::Tensor& x, const at::Tensor& other, const at::Tensor& w,
                                    const at::Tensor& b) {
  return call_linear_pointwise(true, {x, other, w, dense_bias(b), std::string("add")});
}

}  // namespace t2t_kernels

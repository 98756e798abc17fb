// Schemas of the t2t_kernels ops. Importing t2t_kernels._C runs these registrations;
// the CPU kernels (csrc/cpu) and CUDA kernels (csrc/cuda) register implementations under them.
// Fake (meta) kernels and autograd are registered from Python (t2t_kernels/ops/<op>/__init__.py).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// A module with no methods: `import t2t_kernels._C` only loads the library and runs the static registrations.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(t2t_kernels, m) {
  // x (B, C, H, W), any strides -> (B, L, C*kh*kw) contiguous == F.unfold(x, k, padding=p, stride=s).transpose(1, 2)
  m.def("soft_split(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding) -> Tensor");
  // the fold of grad_out (B, L, C*kh*kw) back into a (B, C, H, W) computed as a gather; contiguous, or
  // channels_last memory when channels_last (the layout of the token view, so its gradient is contiguous tokens)
  m.def(
      "soft_split_backward(Tensor grad_out, SymInt[4] input_size, int[2] kernel_size, int[2] stride, "
      "int[2] padding, bool channels_last=False) -> Tensor");
  // layer_norm(soft_split(x), (C*kh*kw,), weight, bias, eps) without the raw soft split in memory: the normalised
  // tokens (B, L, C*kh*kw) in x's dtype, and the per-token mean and rstd (B, L) in fp32 (fp64 for fp64) for backward.
  // weight and bias may have another floating dtype than x (fp32 parameters under autocast).
  m.def(
      "soft_split_layer_norm(Tensor x, Tensor weight, Tensor bias, int[2] kernel_size, int[2] stride, "
      "int[2] padding, float eps) -> (Tensor, Tensor, Tensor)");
  // (grad_x, grad_weight, grad_bias); grad_x contiguous, or channels_last memory when channels_last; without x_grad
  // grad_x is not computed (an empty tensor): the image into the first T2T layer needs none
  m.def(
      "soft_split_layer_norm_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor mean, Tensor rstd, "
      "int[2] kernel_size, int[2] stride, int[2] padding, bool channels_last=False, bool x_grad=True) "
      "-> (Tensor, Tensor, Tensor)");
  // linear(layer_norm(soft_split(x)), weight, bias) (B, L, N) contiguous, forward only (CPU, float32/float64): the
  // T2T layers' norm1 -> kqv product from the image, without the split or the normalised tokens in memory
  m.def(
      "soft_split_layer_norm_linear(Tensor x, Tensor norm_weight, Tensor norm_bias, Tensor weight, Tensor? bias, "
      "int[2] kernel_size, int[2] stride, int[2] padding, float eps) -> Tensor");
  // q, k, v (..., T, E), w (m, E) -> y (..., T, E) and the fp32 state kept for backward:
  // kv_state = phi(k)^T v (..., m, E) and k_sum = sum_t phi(k) (..., m)
  m.def("performer_attention(Tensor q, Tensor k, Tensor v, Tensor w, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "performer_attention_backward(Tensor grad_y, Tensor q, Tensor k, Tensor v, Tensor w, Tensor kv_state, "
      "Tensor k_sum, float eps) -> (Tensor, Tensor, Tensor)");
  // y (M, D), skip (M, E), unit last strides -> (M, E) contiguous:
  //   x = skip + y proj_weight^T + proj_bias; x + gelu(layer_norm(x) fc1_weight^T + fc1_bias) fc2_weight^T + fc2_bias
  m.def(
      "post_attention(Tensor y, Tensor skip, Tensor proj_weight, Tensor proj_bias, Tensor norm_weight, "
      "Tensor norm_bias, Tensor fc1_weight, Tensor fc1_bias, Tensor fc2_weight, Tensor fc2_bias, float eps) -> Tensor");
  // qkv (B, N, 3*num_heads*head_dim), unit last stride -> (B, N, num_heads*head_dim) contiguous: softmax attention
  // of each head, heads merged (the backbone's attention after its qkv projection, without dropout)
  m.def("softmax_attention(Tensor qkv, int num_heads, float scale) -> Tensor");
  // its gradient: grad_out (B, N, num_heads*head_dim), qkv -> grad_qkv (B, N, 3*num_heads*head_dim) contiguous
  m.def("softmax_attention_backward(Tensor grad_out, Tensor qkv, int num_heads, float scale) -> Tensor");
  // residual + x * mask / (1 - p) (x * mask / (1 - p) without residual), the mask a function of (seed, element index):
  // Philox4x32-10 (csrc/cpu/dropout_add.cpp); x and residual contiguous, one shape and dtype, 0 < p < 1; the seed a
  // 0-dim int64 CPU tensor, so a compiled graph can draw it (torch.randint) instead of baking a Python int in
  m.def("dropout_add(Tensor x, Tensor? residual, float p, Tensor seed) -> Tensor");
  // linear(layer_norm(x)) and linear(gelu(h)) (exact GELU) keeping x (h) for backward, not the Linear's input:
  // autograd kernels for every device (csrc/recompute.cpp), the training path of t2t_kernels/layers/recompute.py
  m.def(
      "norm_linear(Tensor x, Tensor? norm_weight, Tensor? norm_bias, int[] normalized_shape, float eps, "
      "Tensor weight, Tensor? bias) -> Tensor");
  m.def("gelu_linear(Tensor h, Tensor weight, Tensor? bias) -> Tensor");
}

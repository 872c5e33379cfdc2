// The kforcing operator library: every schema lives here, in one namespace, so a CPU-only build and a CUDA
// build define the same ops. Kernels register themselves from csrc/cpu/*.cpp and csrc/cuda/*.cu (the latter
// compiled only in CUDA builds); fake kernels and autograd are registered from Python (kforcing_ops/*.py).
//
// Conventions: tensors are (batch, seq, heads, head_dim) as in flash-attention; optional Python scalars that
// may also be per-row tensors come as a `Tensor?` plus a `float` used when the tensor is None; mutated
// arguments are declared `Tensor(a!)` and never returned.

#include <torch/library.h>

#include "kforcing_build_info.h"

#ifdef KFORCING_PYTHON_MODULE
#include <Python.h>

// Importing kforcing_ops._C loads this library, which runs the registrations below. The module itself is
// empty: the ops are reached through torch.ops.kforcing.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "kforcing kernels; use torch.ops.kforcing", -1,
                               nullptr};
  return PyModule_Create(&module);
}
#endif

namespace {
std::string build_info() { return KFORCING_BUILD_INFO_JSON; }
}  // namespace

TORCH_LIBRARY(kforcing, m) {
  m.def("build_info() -> str", &build_info);

  // `order`: the order the CDF walks the support, "vocab" or "descending" (kforcing/sampling.h).
  m.def(
      "inverse_cdf_sample(Tensor logits, Tensor u, Tensor? temperatures, float temperature, int top_k, "
      "float top_p, str order=\"vocab\") -> Tensor");

  m.def(
      "window_attention(Tensor q, Tensor k, Tensor v, int num_windows, int window_size, float scale) "
      "-> (Tensor out, Tensor lse)");
  m.def(
      "window_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "int num_windows, int window_size, float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  m.def(
      "window_attention_decode(Tensor q, Tensor k_new, Tensor v_new, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor cache_seqlens, int n_commit, float scale) -> Tensor");

  // y = x @ weight^T + bias for the few rows of a decode step; inference only (kforcing/linear.h).
  m.def("decode_linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");

  // `code`: u's features, "sinusoid", "dyadic" or "binary" (kforcing/embedding.h).
  m.def(
      "noise_embedding(Tensor u, Tensor? tau, float tau_value, Tensor weight, Tensor? bias, "
      "str code=\"sinusoid\") -> Tensor");
  m.def(
      "noise_embedding_backward(Tensor grad_out, Tensor u, Tensor? tau, float tau_value, int num_freqs, "
      "bool with_bias, str code=\"sinusoid\") -> (Tensor grad_weight, Tensor? grad_bias)");
  m.def(
      "noise_conditioned_embedding(Tensor token_ids, Tensor token_table, Tensor u, Tensor? tau, float tau_value, "
      "Tensor weight, Tensor? bias, str code=\"sinusoid\") -> Tensor");
  m.def(
      "noise_conditioned_embedding_backward(Tensor grad_out, Tensor token_ids, int vocab, Tensor u, Tensor? tau, "
      "float tau_value, int num_freqs, bool with_bias, str code=\"sinusoid\") "
      "-> (Tensor grad_table, Tensor grad_weight, Tensor? grad_bias)");
}

// Schemas of the msa:: operators and the Python module that loads them.
//
// Kernels register themselves per device in their own translation units
// (mscmat_cpu.cpp, cuda/mscmat_cuda.cu); fake (meta) kernels and autograd are
// registered from Python (msa/ops/_registration.py).

#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(msa, m) {
  // scores[i, j] = sum_h sum_l softmax_l(scale * <q[i,h], k[j,l,h]>) * <u[i,h], v[j,l,h]>
  // with the softmax over the words l where word_mask[j, l] is true (None: all words).
  m.def("mscmat_scores(Tensor q, Tensor u, Tensor k, Tensor v, Tensor? word_mask, float scale) -> Tensor");
  // Computes only the gradients flagged in needs_grad (q, u, k, v) and returns empty tensors for the others.
  m.def(
      "mscmat_scores_backward(Tensor grad_scores, Tensor q, Tensor u, Tensor k, Tensor v, Tensor? word_mask, "
      "float scale, bool[4] needs_grad) -> (Tensor, Tensor, Tensor, Tensor)");
  // The forward used when gradients will be needed (CPU kernel only): with keep_softmax it also returns the
  // softmax p and logit_grads = p * (r - o) * scale (r the readouts, o the head's output) as [H, Nt, L, Ni]
  // tensors in the compute dtype (float32, or float64), so that the backward's dS and dR are g times them
  // instead of being recomputed; without, two empty tensors. Its backward honours needs_grad likewise.
  m.def(
      "mscmat_scores_for_grad(Tensor q, Tensor u, Tensor k, Tensor v, Tensor? word_mask, float scale, "
      "bool keep_softmax) -> (Tensor, Tensor, Tensor)");
  m.def(
      "mscmat_scores_for_grad_backward(Tensor grad_scores, Tensor q, Tensor u, Tensor k, Tensor v, "
      "Tensor? word_mask, Tensor probs, Tensor logit_grads, float scale, bool[4] needs_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

// An empty module: importing msa._C runs the static registrations above.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "Compiled kernels of msa, reached through torch.ops.msa.",
      -1,
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}

// The schemas of the kernel ops, in one place. phi_kernels._C defines them in the torch.library
// namespace phi_kernels (csrc/ops.cpp: CPU and CUDA kernels); phi_kernels._simt defines the
// same schemas in phi_kernels_emu (csrc/simt/emu_ops.cpp: the CUDA kernels on CPU tensors in
// the SIMT emulator). The ops write into `out` tensors the Python side allocates, so they never
// allocate on their own; the public API, argument validation with readable errors, fake
// (meta) functions and autograd live in phi_kernels/<op>.py.
#pragma once
#include <torch/library.h>

namespace phi {

inline void define_kernel_ops(torch::Library& m) {
  // Rotary embedding (csrc/rotary). out may be x itself (in-place).
  m.def(
      "rotary_kernel(Tensor x, Tensor cos, Tensor sin, Tensor? seqlen_offsets, int seqlen_offset, "
      "Tensor? cu_seqlens, int max_seqlen, bool interleaved, bool conjugate, Tensor(a!) out) -> ()");

  // Adam / AdamW over lists of tensors sharing dtype and device (csrc/adam). amsgrad when
  // max_exp_avg_sqs is non-empty; fp32 master weights when masters is non-empty. lr and step
  // are one-element float32 tensors (device tensors keep a CUDA step free of host syncs);
  // grads are divided by grad_scale; found_inf > 0 skips the whole update.
  m.def(
      "adam_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] masters, Tensor lr, Tensor step, float beta1, float beta2, "
      "float eps, float weight_decay, bool adam_w_mode, bool bias_correction, bool maximize, "
      "Tensor? grad_scale, Tensor? found_inf) -> ()");

  // Flash attention (csrc/flash_attn). q/k/v dense (batch, seqlen, heads, d) or packed
  // (total, heads, d) with cu_seqlens; window (left, right) with -1 unbounded, causal is
  // right = 0; softcap 0 = off; dropout kept iff the hash of (seed, batch*heads+head, row, col)
  // clears dropout_p; seqused_k (int32 (batch,)): sequence b uses only its first seqused_k[b]
  // keys, masks aligned to them (a KV cache filled to different lengths). out/lse (fp32,
  // (batch, heads, seqlen_q) or (heads, total_q)) are written.
  m.def(
      "flash_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
      "Tensor? seqused_k, int max_seqlen_q, int max_seqlen_k, float softmax_scale, int window_left, "
      "int window_right, float softcap, float dropout_p, int seed, Tensor(a!) out, Tensor(b!) lse) -> ()");
  // Its backward from the forward's out and lse: writes dq, dk, dv.
  m.def(
      "flash_attn_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? cu_seqlens_q, "
      "Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float softmax_scale, int window_left, "
      "int window_right, float softcap, float dropout_p, int seed, Tensor(a!) dq, Tensor(b!) dk, "
      "Tensor(c!) dv) -> ()");
}

}  // namespace phi

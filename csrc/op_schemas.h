// The schemas of the kernel ops, in one place. phi_kernels._C defines them in the torch.library
// namespace phi_kernels (csrc/ops.cpp: CPU and CUDA kernels); phi_kernels._simt defines the
// same schemas in phi_kernels_emu (csrc/simt/emu_ops.cpp: the CUDA kernels on CPU tensors in
// the SIMT emulator). The public API, argument validation with readable errors, fake (meta)
// functions and autograd live in phi_kernels/<op>.py.
//
// Names: every op here is an out-variant named `<op>_out`: it writes into tensors the caller
// passes (out buffers the Python side allocates, or Adam's parameters and state) and returns
// nothing, so it never allocates on its own. The functional torch.library custom ops of
// phi_kernels/<op>.py (phi_kernels::flash_attn_forward, flash_attn_backward, rotary, rotary_)
// carry the bare names: they allocate their outputs and call these.
//
// Options: an op's options are one schema fragment below (PHI_FLASH_ATTN_OPTIONS,
// PHI_ROTARY_OPTIONS), in the field order of its Python bundle (FlashAttnArgs in
// phi_kernels/flash_attn.py, RotaryArgs in phi_kernels/rotary.py; tests/test_op_args.py checks
// that they agree). The ops are boxed kernels whose one params builder reads the options by
// name (common/op_args.h), so adding an option touches the fragment, the bundle, the params
// struct and its builder, and the kernels.
#pragma once
#include <torch/library.h>

// Flash attention: q/k/v dense (batch, seqlen, heads, d) or packed (total, heads, d) with
// cu_seqlens; window (left, right) with -1 unbounded, causal is right = 0; softcap 0 = off;
// dropout kept iff the hash of (seed, batch*heads+head, row, col) clears dropout_p; seqused_k
// (int32 (batch,), forward only): sequence b uses only its first seqused_k[b] keys, masks
// aligned to them (a KV cache filled to different lengths).
#define PHI_FLASH_ATTN_OPTIONS                                                                          \
  "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, Tensor? seqused_k, int max_seqlen_q, int max_seqlen_k, " \
  "float softmax_scale, int window_left, int window_right, float softcap, float dropout_p, int seed"

// Rotary embedding: positions from seqlen_offsets (int32 (batch,)) or seqlen_offset; packed
// layout with cu_seqlens; conjugate rotates by -theta (the backward).
#define PHI_ROTARY_OPTIONS \
  "Tensor? seqlen_offsets, int seqlen_offset, Tensor? cu_seqlens, int max_seqlen, bool interleaved, bool conjugate"

namespace phi {

inline void define_kernel_ops(torch::Library& m) {
  // Rotary embedding (csrc/rotary). out may be x itself (in-place).
  m.def("rotary_out(Tensor x, Tensor cos, Tensor sin, " PHI_ROTARY_OPTIONS ", Tensor(a!) out) -> ()");

  // Adam / AdamW over lists of tensors sharing dtype and device (csrc/adam). amsgrad when
  // max_exp_avg_sqs is non-empty; fp32 master weights when masters is non-empty. lr and step
  // are one-element float32 tensors (device tensors keep a CUDA step free of host syncs);
  // grads are divided by grad_scale; found_inf > 0 skips the whole update.
  m.def(
      "adam_step_out(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] masters, Tensor lr, Tensor step, float beta1, float beta2, "
      "float eps, float weight_decay, bool adam_w_mode, bool bias_correction, bool maximize, "
      "Tensor? grad_scale, Tensor? found_inf) -> ()");

  // Linear for a few rows (csrc/linear; CPU only): out (..., out_features) = x W^T + bias for x
  // (..., in_features), weight (out_features, in_features) contiguous, bias (out_features,) or None.
  m.def("linear_out(Tensor x, Tensor weight, Tensor? bias, Tensor(a!) out) -> ()");

  // Flash attention (csrc/flash_attn): writes out and lse (fp32, (batch, heads, seqlen_q) or
  // (heads, total_q)).
  m.def("flash_attn_forward_out(Tensor q, Tensor k, Tensor v, " PHI_FLASH_ATTN_OPTIONS
        ", Tensor(a!) out, Tensor(b!) lse) -> ()");
  // Its backward from the forward's out and lse: writes dq, dk, dv (seqused_k must be None).
  m.def("flash_attn_backward_out(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        PHI_FLASH_ATTN_OPTIONS ", Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv) -> ()");
}

}  // namespace phi

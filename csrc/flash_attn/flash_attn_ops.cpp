// Tensor glue of phi_kernels::flash_attn_fwd / flash_attn_bwd (schemas in csrc/ops.cpp):
// checks what the kernels rely on (the Python API, phi_kernels/flash_attn.py, has already given
// friendlier errors), fills Flash_params and launches the CPU or CUDA kernels.
#include <torch/library.h>

#include "common/bind_utils.h"
#include "flash_attn/flash_launch.h"

#ifdef PHI_WITH_CUDA
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#endif

namespace phi {
namespace {

// (batch, row, head) element strides of a dense (b, s, h, d) or packed (total, h, d) tensor.
void strides_of(const at::Tensor& t, bool varlen, int64_t& batch, int64_t& row, int64_t& head) {
  batch = varlen ? 0 : t.stride(0);
  row = t.stride(varlen ? 0 : 1);
  head = t.stride(-2);
}

void check_like(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(t.sizes() == like.sizes(), name, " must have the shape of ", like_name, " ", like.sizes(), ", got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must have ", like_name, "'s dtype ",
              like.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device(), ", got ", t.device());
  TORCH_CHECK(t.stride(-1) == 1, name, " must be contiguous in head_dim (last dim)");
}

Flash_params make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k,
                         int64_t max_q, int64_t max_k, double scale, int64_t window_left, int64_t window_right,
                         double softcap, double dropout_p, int64_t seed, const at::Tensor& out,
                         const at::Tensor& lse) {
  const bool varlen = cu_q.has_value();
  TORCH_CHECK(cu_k.has_value() == varlen, "cu_seqlens_q and cu_seqlens_k must be given together");
  const int64_t nd = varlen ? 3 : 4;
  TORCH_CHECK(q.dim() == nd && k.dim() == nd, "q and k must be ", nd, "-D, got ", q.dim(), "-D and ", k.dim(), "-D");
  check_like(v, "v", k, "k");
  check_like(out, "out", q, "q");
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "k must have q's dtype");
  PHI_CHECK_DEVICE(k, q);
  TORCH_CHECK(q.stride(-1) == 1 && k.stride(-1) == 1, "q and k must be contiguous in head_dim");
  TORCH_CHECK(k.size(-1) == q.size(-1), "k's head_dim must equal q's");
  const int64_t heads = q.size(-2), kv_heads = k.size(-2);
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "heads (", heads, ") must be a multiple of kv_heads (", kv_heads, ")");
  TORCH_CHECK(window_left >= -1 && window_right >= -1, "window sizes must be >= -1");
  TORCH_CHECK(dropout_p >= 0 && dropout_p < 1, "dropout_p must be in [0, 1)");
  TORCH_CHECK(softcap >= 0 && scale > 0, "softcap must be >= 0 and softmax_scale > 0");

  Flash_params p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.dtype = to_phi_dtype(q, "q");
  p.heads = int(heads);
  p.kv_heads = int(kv_heads);
  p.head_dim = int(q.size(-1));
  strides_of(q, varlen, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  strides_of(k, varlen, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  strides_of(v, varlen, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  strides_of(out, varlen, p.out_batch_stride, p.out_row_stride, p.out_head_stride);
  if (varlen) {
    for (const at::Tensor* cu : {&*cu_q, &*cu_k}) {
      TORCH_CHECK(cu->scalar_type() == at::kInt && cu->dim() == 1 && cu->is_contiguous() && cu->numel() >= 2,
                  "cu_seqlens must be contiguous int32 tensors of shape (batch + 1,)");
      PHI_CHECK_DEVICE((*cu), q);
    }
    TORCH_CHECK(cu_q->numel() == cu_k->numel(), "cu_seqlens_q and cu_seqlens_k must have the same length");
    TORCH_CHECK(max_q >= 0 && max_k >= 0, "max_seqlen_q and max_seqlen_k must be >= 0");
    p.cu_seqlens_q = cu_q->data_ptr<int32_t>();
    p.cu_seqlens_k = cu_k->data_ptr<int32_t>();
    p.batch = int(cu_q->numel() - 1);
    p.seqlen_q = int(max_q);
    p.seqlen_k = int(max_k);
    p.total_q = int(q.size(0));
    PHI_CHECK_SHAPE(lse, heads, q.size(0));
  } else {
    TORCH_CHECK(k.size(0) == q.size(0), "q and k must have the same batch size");
    p.batch = int(q.size(0));
    p.seqlen_q = int(q.size(1));
    p.seqlen_k = int(k.size(1));
    p.total_q = p.batch * p.seqlen_q;
    PHI_CHECK_SHAPE(lse, q.size(0), heads, q.size(1));
  }
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous(), "lse must be a contiguous float32 tensor");
  PHI_CHECK_DEVICE(lse, q);
  p.lse = lse.data_ptr<float>();
  p.scale = float(scale);
  p.softcap = float(softcap);
  p.window_left = int(window_left);
  p.window_right = int(window_right);
  p.dropout = flash::Dropout::make(uint64_t(seed), dropout_p);
  return p;
}

void add_backward(Flash_params& p, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv) {
  const bool varlen = p.is_varlen();
  check_like(dout, "dout", q, "q");
  check_like(dq, "dq", q, "q");
  check_like(dk, "dk", k, "k");
  check_like(dv, "dv", k, "k");
  p.dout = dout.data_ptr();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  strides_of(dout, varlen, p.dout_batch_stride, p.dout_row_stride, p.dout_head_stride);
  strides_of(dq, varlen, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride);
  strides_of(dk, varlen, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride);
  strides_of(dv, varlen, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride);
}

// The CPU kernels size their buffers by max_seqlen and index rows through cu_seqlens, so a
// bad cu_seqlens must not reach them (cheap to check on the host).
void check_cu_seqlens_cpu(const Flash_params& p, int64_t total_k) {
  if (!p.is_varlen()) return;
  const int32_t* cq = p.cu_seqlens_q;
  const int32_t* ck = p.cu_seqlens_k;
  TORCH_CHECK(cq[0] == 0 && ck[0] == 0, "cu_seqlens must start at 0");
  for (int b = 0; b < p.batch; ++b) {
    const int64_t lq = int64_t(cq[b + 1]) - cq[b], lk = int64_t(ck[b + 1]) - ck[b];
    TORCH_CHECK(lq >= 0 && lq <= p.seqlen_q, "cu_seqlens_q must be non-decreasing with lengths <= max_seqlen_q (",
                p.seqlen_q, "), sequence ", b, " has ", lq);
    TORCH_CHECK(lk >= 0 && lk <= p.seqlen_k, "cu_seqlens_k must be non-decreasing with lengths <= max_seqlen_k (",
                p.seqlen_k, "), sequence ", b, " has ", lk);
  }
  TORCH_CHECK(cq[p.batch] == p.total_q && ck[p.batch] == total_k,
              "cu_seqlens must end at the packed lengths of q and k");
}

void flash_attn_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k, int64_t max_q,
                        int64_t max_k, double scale, int64_t window_left, int64_t window_right, double softcap,
                        double dropout_p, int64_t seed, const at::Tensor& out, const at::Tensor& lse) {
  Flash_params p = make_params(q, k, v, cu_q, cu_k, max_q, max_k, scale, window_left, window_right, softcap,
                               dropout_p, seed, out, lse);
  check_cu_seqlens_cpu(p, k.size(0));
  flash_fwd_cpu(p);
}

void flash_attn_bwd_cpu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& cu_q,
                        const std::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k, double scale,
                        int64_t window_left, int64_t window_right, double softcap, double dropout_p, int64_t seed,
                        const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv) {
  Flash_params p = make_params(q, k, v, cu_q, cu_k, max_q, max_k, scale, window_left, window_right, softcap,
                               dropout_p, seed, out, lse);
  add_backward(p, dout, q, k, dq, dk, dv);
  check_cu_seqlens_cpu(p, k.size(0));
  flash_bwd_cpu(p);
}

}  // namespace

TORCH_LIBRARY_IMPL(phi_kernels, CPU, m) {
  m.impl("flash_attn_fwd", &flash_attn_fwd_cpu);
  m.impl("flash_attn_bwd", &flash_attn_bwd_cpu);
}

}  // namespace phi

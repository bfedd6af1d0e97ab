// Tensor glue of phi_kernels::flash_attn_fwd / flash_attn_bwd (schemas in csrc/ops.cpp):
// checks what the kernels rely on (the Python API, phi_kernels/flash_attn.py, has already given
// friendlier errors), fills Flash_params and launches the CPU or CUDA kernels.
#include <torch/library.h>

#include <ATen/ATen.h>

#include "common/bind_utils.h"
#include "flash_attn/flash_launch.h"
#include "flash_attn/flash_plan.h"

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

// seqused_k (forward only): int32 (batch,), sequence b attends to its first seqused_k[b] keys.
void add_seqused_k(Flash_params& p, const std::optional<at::Tensor>& seqused_k, const at::Tensor& q) {
  if (!seqused_k.has_value()) return;
  const at::Tensor& s = *seqused_k;
  TORCH_CHECK(s.scalar_type() == at::kInt && s.dim() == 1 && s.is_contiguous() && s.numel() == p.batch,
              "seqused_k must be a contiguous int32 tensor of shape (batch,) = (", p.batch, ",), got ",
              s.scalar_type(), s.sizes());
  PHI_CHECK_DEVICE(s, q);
  p.seqused_k = s.data_ptr<int32_t>();
}

// On the CPU the kernels index keys through seqused_k directly: its values must fit (the CUDA
// path relies on phi_kernels.flash_attn_with_kvcache's checks instead of a device sync).
void check_seqused_k_cpu(const Flash_params& p) {
  if (p.seqused_k == nullptr) return;
  for (int b = 0; b < p.batch; ++b) {
    const int64_t avail = p.is_varlen() ? int64_t(p.cu_seqlens_k[b + 1]) - p.cu_seqlens_k[b] : p.seqlen_k;
    TORCH_CHECK(p.seqused_k[b] >= 0 && p.seqused_k[b] <= avail, "seqused_k[", b, "] = ", p.seqused_k[b],
                " must be in [0, ", avail, "] (the keys sequence ", b, " has)");
  }
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
                        const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k,
                        const std::optional<at::Tensor>& seqused_k, int64_t max_q,
                        int64_t max_k, double scale, int64_t window_left, int64_t window_right, double softcap,
                        double dropout_p, int64_t seed, const at::Tensor& out, const at::Tensor& lse) {
  Flash_params p = make_params(q, k, v, cu_q, cu_k, max_q, max_k, scale, window_left, window_right, softcap,
                               dropout_p, seed, out, lse);
  check_cu_seqlens_cpu(p, k.size(0));
  add_seqused_k(p, seqused_k, q);
  check_seqused_k_cpu(p);
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

// ----------------------------------------------------------------------------- CUDA host side
//
// Everything up to the kernel launch is plain C++ over Flash_params (flash_plan.h), so the
// CPU tests run it through flash_attn_cuda_plan below.

void check_cuda_supported(const Flash_params& p, std::initializer_list<std::pair<const char*, const at::Tensor*>> ts) {
  const std::string why = flash::cuda_unsupported(p);
  TORCH_CHECK(why.empty(), "flash attention (cuda backend) does not support ", why);
  for (const auto& [name, t] : ts) {  // cp.async moves 16-byte chunks: rows must be 16-byte aligned
    const bool aligned = reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0 &&
                         t->stride(-2) % 8 == 0 && t->stride(-3) % 8 == 0 && (t->dim() < 4 || t->stride(0) % 8 == 0);
    TORCH_CHECK(aligned, "flash attention (cuda backend): ", name,
                " must have 16-byte aligned rows (data pointer and strides multiples of 8 elements), got strides ",
                t->strides());
  }
}

// (head_dim, grid x, y, z, threads, shared memory bytes) the CUDA kernels would launch with.
std::vector<int64_t> flash_attn_cuda_plan(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k,
                                          int64_t max_q, int64_t max_k, const at::Tensor& out, const at::Tensor& lse,
                                          bool backward) {
  const Flash_params p = make_params(q, k, v, cu_q, cu_k, max_q, max_k, 1.0, -1, -1, 0.0, 0.0, 0, out, lse);
  check_cuda_supported(p, {{"q", &q}, {"k", &k}, {"v", &v}});
  const flash::Launch_plan plan = backward ? flash::plan_bwd(p) : flash::plan_fwd(p);
  return {plan.head_dim, plan.grid_x, plan.grid_y, plan.grid_z, plan.threads, plan.smem_bytes};
}

#ifdef PHI_WITH_CUDA
template <bool kBackward>
void dispatch_cuda(const Flash_params& p, void* stream) {
  const bool fp16 = p.dtype == DType::kFloat16;
  if (p.head_dim == 64) {
    if constexpr (kBackward) fp16 ? flash::run_flash_bwd<DType::kFloat16, 64>(p, stream) : flash::run_flash_bwd<DType::kBFloat16, 64>(p, stream);
    else fp16 ? flash::run_flash_fwd<DType::kFloat16, 64>(p, stream) : flash::run_flash_fwd<DType::kBFloat16, 64>(p, stream);
  } else {
    if constexpr (kBackward) fp16 ? flash::run_flash_bwd<DType::kFloat16, 128>(p, stream) : flash::run_flash_bwd<DType::kBFloat16, 128>(p, stream);
    else fp16 ? flash::run_flash_fwd<DType::kFloat16, 128>(p, stream) : flash::run_flash_fwd<DType::kBFloat16, 128>(p, stream);
  }
}

void flash_attn_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const std::optional<at::Tensor>& cu_q, const std::optional<at::Tensor>& cu_k,
                         const std::optional<at::Tensor>& seqused_k, int64_t max_q,
                         int64_t max_k, double scale, int64_t window_left, int64_t window_right, double softcap,
                         double dropout_p, int64_t seed, const at::Tensor& out, const at::Tensor& lse) {
  Flash_params p = make_params(q, k, v, cu_q, cu_k, max_q, max_k, scale, window_left, window_right, softcap,
                               dropout_p, seed, out, lse);
  check_cuda_supported(p, {{"q", &q}, {"k", &k}, {"v", &v}, {"out", &out}});
  add_seqused_k(p, seqused_k, q);
  if (p.batch == 0 || p.seqlen_q == 0 || p.heads == 0) return;
  c10::cuda::CUDAGuard guard(q.device());
  dispatch_cuda<false>(p, c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void flash_attn_bwd_cuda(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& cu_q,
                         const std::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k, double scale,
                         int64_t window_left, int64_t window_right, double softcap, double dropout_p, int64_t seed,
                         const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv) {
  Flash_params p = make_params(q, k, v, cu_q, cu_k, max_q, max_k, scale, window_left, window_right, softcap,
                               dropout_p, seed, out, lse);
  check_cuda_supported(p, {{"q", &q}, {"k", &k}, {"v", &v}, {"dout", &dout}});
  if (p.batch == 0 || p.heads == 0 || p.seqlen_k == 0) return;
  if (p.seqlen_q == 0) {
    dk.zero_();
    dv.zero_();
    return;
  }
  c10::cuda::CUDAGuard guard(q.device());
  const bool varlen = p.is_varlen();
  // D = rowsum(dO * O) in lse's layout, and the fp32 dq accumulator the kernel adds into.
  at::Tensor d_rows = (dout.to(at::kFloat) * out.to(at::kFloat)).sum(-1);
  d_rows = (varlen ? d_rows.t() : d_rows.transpose(1, 2)).contiguous();
  at::Tensor dq_accum = at::zeros(q.sizes(), q.options().dtype(at::kFloat));
  // GQA: the kernel writes each query head's dK, dV; the group sum happens here in fp32.
  const int64_t group = p.heads / p.kv_heads;
  at::Tensor dk_heads = dk, dv_heads = dv;
  if (group > 1) {
    std::vector<int64_t> shape(k.sizes().begin(), k.sizes().end());
    shape[shape.size() - 2] = p.heads;
    dk_heads = at::empty(shape, k.options());
    dv_heads = at::empty(shape, k.options());
  }
  add_backward(p, dout, q, k, dq, dk_heads, dv_heads);
  p.dq_accum = dq_accum.data_ptr<float>();
  p.d_rows = d_rows.data_ptr<float>();
  dispatch_cuda<true>(p, c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  dq.copy_(dq_accum);
  if (group > 1) {
    auto grouped = [&](const at::Tensor& t) {
      std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
      shape.back() = t.size(-1);
      shape[shape.size() - 2] = group;
      shape.insert(shape.end() - 2, p.kv_heads);
      return t.view(shape).to(at::kFloat).sum(-2);
    };
    dk.copy_(grouped(dk_heads));
    dv.copy_(grouped(dv_heads));
  }
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(phi_kernels, CPU, m) {
  m.impl("flash_attn_fwd", &flash_attn_fwd_cpu);
  m.impl("flash_attn_bwd", &flash_attn_bwd_cpu);
}

#ifdef PHI_WITH_CUDA
TORCH_LIBRARY_IMPL(phi_kernels, CUDA, m) {
  m.impl("flash_attn_fwd", &flash_attn_fwd_cuda);
  m.impl("flash_attn_bwd", &flash_attn_bwd_cuda);
}
#endif

TORCH_LIBRARY_IMPL(phi_kernels, CompositeExplicitAutograd, m) { m.impl("flash_attn_cuda_plan", &flash_attn_cuda_plan); }

}  // namespace phi

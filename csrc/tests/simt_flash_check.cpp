// Runs the CUDA flash attention kernels (fp16, head_dim 64, dense layout) in the SIMT emulator
// without torch, against an fp64 reference computed here, and prints what happened. The
// mutation tests (tests/test_simt_mutations.py) compile this program against deliberately
// broken copies of the kernels and require every mutant to be caught: an emulator error (exit
// code 2) or a wrong result (exit code 1). Exit code 0: the results are right.
//
//   g++ -std=c++20 -O1 -fopenmp -DPHI_SIMT -Icsrc -I<cuda>/include csrc/simt/runtime.cpp \
//       csrc/tests/simt_flash_check.cpp -o simt_flash_check && ./simt_flash_check
// Options: --seqlen N (default 80), --causal 0|1 (1), --backward 0|1 (1), --seed S (0).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "flash_attn/flash_launch_cuda.cuh"

namespace {

using phi::Flash_params;

uint16_t to_half(float f) {
  __half h = __float2half_rn(f);
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}
float from_half(uint16_t u) {
  __half h;
  std::memcpy(&h, &u, 2);
  return __half2float(h);
}

struct Tensor16 {
  std::vector<uint16_t> bits;
  explicit Tensor16(size_t n) : bits(n) {}
  float at(size_t i) const { return from_half(bits[i]); }
};

}  // namespace

int main(int argc, char** argv) {
  int seqlen = 80, causal = 1, backward = 1, seed = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    const int v = std::atoi(argv[i + 1]);
    if (k == "--seqlen") seqlen = v;
    else if (k == "--causal") causal = v;
    else if (k == "--backward") backward = v;
    else if (k == "--seed") seed = v;
  }
  const int B = 1, S = seqlen, H = 2, D = 64;
  const size_t n = size_t(B) * S * H * D;
  std::mt19937 rng(1234 + seed);
  std::normal_distribution<float> normal;
  Tensor16 q(n), k(n), v(n), out(n), dout(n), dq(n), dk(n), dv(n);
  for (auto* t : {&q, &k, &v, &dout}) {
    for (auto& x : t->bits) x = to_half(normal(rng));
  }
  std::vector<float> lse(size_t(B) * H * S), d_rows(size_t(B) * H * S), dq_accum(n, 0.f);

  Flash_params p{};
  p.q = q.bits.data();
  p.k = k.bits.data();
  p.v = v.bits.data();
  p.out = out.bits.data();
  p.lse = lse.data();
  const int64_t bs = int64_t(S) * H * D, rs = int64_t(H) * D, hs = D;
  p.q_batch_stride = p.k_batch_stride = p.v_batch_stride = p.out_batch_stride = bs;
  p.q_row_stride = p.k_row_stride = p.v_row_stride = p.out_row_stride = rs;
  p.q_head_stride = p.k_head_stride = p.v_head_stride = p.out_head_stride = hs;
  p.dout_batch_stride = p.dq_batch_stride = p.dk_batch_stride = p.dv_batch_stride = bs;
  p.dout_row_stride = p.dq_row_stride = p.dk_row_stride = p.dv_row_stride = rs;
  p.dout_head_stride = p.dq_head_stride = p.dk_head_stride = p.dv_head_stride = hs;
  p.batch = B;
  p.heads = p.kv_heads = H;
  p.head_dim = D;
  p.seqlen_q = p.seqlen_k = S;
  p.total_q = B * S;
  p.scale = 1.f / std::sqrt(float(D));
  p.window_left = -1;
  p.window_right = causal ? 0 : -1;
  p.dtype = phi::DType::kFloat16;

  // fp64 reference: out, lse, and the gradients for dout.
  std::vector<double> ref_out(n), ref_dq(n, 0.0), ref_dk(n, 0.0), ref_dv(n, 0.0);
  for (int h = 0; h < H; ++h) {
    std::vector<double> P(size_t(S) * S, 0.0);
    for (int i = 0; i < S; ++i) {
      double mx = -INFINITY;
      for (int j = 0; j < S; ++j) {
        if (causal && j > i) continue;
        double s = 0;
        for (int d = 0; d < D; ++d) s += double(q.at((i * H + h) * D + d)) * k.at((j * H + h) * D + d);
        P[size_t(i) * S + j] = s * p.scale;
        mx = std::max(mx, s * p.scale);
      }
      double sum = 0;
      for (int j = 0; j < S; ++j) {
        double& x = P[size_t(i) * S + j];
        x = (causal && j > i) ? 0.0 : std::exp(x - mx);
        sum += x;
      }
      for (int j = 0; j < S; ++j) P[size_t(i) * S + j] /= sum;
      for (int d = 0; d < D; ++d) {
        double o = 0;
        for (int j = 0; j < S; ++j) o += P[size_t(i) * S + j] * v.at((j * H + h) * D + d);
        ref_out[(i * H + h) * D + d] = o;
      }
    }
    for (int i = 0; i < S; ++i) {
      double drow = 0;
      for (int d = 0; d < D; ++d) drow += double(dout.at((i * H + h) * D + d)) * ref_out[(i * H + h) * D + d];
      for (int j = 0; j < S; ++j) {
        const double pij = P[size_t(i) * S + j];
        double dp = 0;
        for (int d = 0; d < D; ++d) {
          dp += double(dout.at((i * H + h) * D + d)) * v.at((j * H + h) * D + d);
          ref_dv[(j * H + h) * D + d] += pij * dout.at((i * H + h) * D + d);
        }
        const double ds = pij * (dp - drow) * p.scale;
        for (int d = 0; d < D; ++d) {
          ref_dq[(i * H + h) * D + d] += ds * k.at((j * H + h) * D + d);
          ref_dk[(j * H + h) * D + d] += ds * q.at((i * H + h) * D + d);
        }
      }
    }
  }

  auto max_err = [&](const Tensor16& t, const std::vector<double>& ref) {
    double e = 0;
    for (size_t i = 0; i < n; ++i) e = std::max(e, std::abs(double(t.at(i)) - ref[i]));
    return std::isnan(e) ? INFINITY : e;
  };

  phi::simt::Memory_scope scope;
  phi::simt::register_region(q.bits.data(), n * 2, "q");
  phi::simt::register_region(k.bits.data(), n * 2, "k");
  phi::simt::register_region(v.bits.data(), n * 2, "v");
  phi::simt::register_region(out.bits.data(), n * 2, "out");
  phi::simt::register_region(lse.data(), lse.size() * 4, "lse");
  try {
    phi::flash::run_flash_fwd<phi::DType::kFloat16, 64>(p, nullptr);
  } catch (const std::exception& e) {
    std::printf("emulator error (forward): %s\n", e.what());
    return 2;
  }
  const double e_out = max_err(out, ref_out);
  std::printf("forward: max |out - ref| = %.3g\n", e_out);
  if (!(e_out < 1e-2)) return 1;
  if (!backward) return 0;

  for (int i = 0; i < S; ++i) {
    for (int h = 0; h < H; ++h) {
      double s = 0;
      for (int d = 0; d < D; ++d) s += double(dout.at((i * H + h) * D + d)) * out.at((i * H + h) * D + d);
      d_rows[size_t(h) * S + i] = float(s);
    }
  }
  p.dout = dout.bits.data();
  p.dq = dq.bits.data();
  p.dk = dk.bits.data();
  p.dv = dv.bits.data();
  p.dq_accum = dq_accum.data();
  p.d_rows = d_rows.data();
  for (auto [ptr, name] : {std::pair<void*, const char*>{dout.bits.data(), "dout"}, {dk.bits.data(), "dk"},
                           {dv.bits.data(), "dv"}}) {
    phi::simt::register_region(ptr, n * 2, name);
  }
  phi::simt::register_region(dq_accum.data(), n * 4, "dq_accum");
  phi::simt::register_region(d_rows.data(), d_rows.size() * 4, "d_rows");
  try {
    phi::flash::run_flash_bwd<phi::DType::kFloat16, 64>(p, nullptr);
  } catch (const std::exception& e) {
    std::printf("emulator error (backward): %s\n", e.what());
    return 2;
  }
  for (size_t i = 0; i < n; ++i) dq.bits[i] = to_half(dq_accum[i]);
  const double e_dq = max_err(dq, ref_dq), e_dk = max_err(dk, ref_dk), e_dv = max_err(dv, ref_dv);
  std::printf("backward: max error dq %.3g, dk %.3g, dv %.3g\n", e_dq, e_dk, e_dv);
  return (e_dq < 2e-2 && e_dk < 2e-2 && e_dv < 2e-2) ? 0 : 1;
}

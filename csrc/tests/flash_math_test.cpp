// Host test of the flash attention math the CUDA and CPU kernels share
// (csrc/flash_attn/flash_math.h): the range and tile helpers the kernels use to skip and to
// mask tiles agree with the per-element visibility rule for every window and shape here;
// the online softmax over tiles equals a two-pass softmax in double; dropout keeps ~1 - p.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "flash_attn/flash_math.h"
#include "tests/host_test.h"

using phi::flash::Mask;

namespace {

// Visibility written from the definition, independently of Mask.
bool visible_def(int i, int j, int sq, int sk, int left, int right) {
  const long d = long(i) + sk - sq;
  return j >= 0 && j < sk && (left < 0 || j >= d - left) && (right < 0 || j <= d + right);
}

void test_ranges_match_visibility() {
  const int sizes[] = {1, 3, 17, 64, 100};
  const int windows[] = {-1, 0, 1, 5, 40};
  for (int sq : sizes) for (int sk : sizes) for (int left : windows) for (int right : windows) {
    const Mask m{sq, sk, left, right};
    for (int i = 0; i < sq; ++i) for (int j = 0; j < sk; ++j) {
      HOST_CHECK(m.visible(i, j) == visible_def(i, j, sq, sk, left, right), "visible sq=%d sk=%d (%d,%d) i=%d j=%d",
                 sq, sk, left, right, i, j);
    }
    for (int tile : {1, 16, 64}) {
      for (int r0 = 0; r0 < sq; r0 += tile) {
        const int r1 = std::min(r0 + tile, sq);
        int kb, ke;
        m.key_range(r0, r1, &kb, &ke);
        for (int j = 0; j < sk; ++j) {  // every visible key of the rows is in the range
          bool any = false;
          for (int i = r0; i < r1; ++i) any |= visible_def(i, j, sq, sk, left, right);
          if (any) HOST_CHECK(j >= kb && j < ke, "key_range misses j=%d rows [%d,%d) sq=%d sk=%d (%d,%d)", j, r0, r1, sq, sk, left, right);
        }
        if (tile == 1 && kb < ke) {  // for one row the range is exact
          for (int j = kb; j < ke; ++j) HOST_CHECK(visible_def(r0, j, sq, sk, left, right), "key_range not exact");
        }
        for (int c0 = 0; c0 < sk; c0 += tile) {
          const int c1 = std::min(c0 + tile, sk);
          bool all = true;
          for (int i = r0; i < r1; ++i) for (int j = c0; j < c1; ++j) all &= visible_def(i, j, sq, sk, left, right);
          // tile_all_visible may be conservative (false when all are visible) but never wrong.
          if (m.tile_all_visible(r0, r1, c0, c1)) HOST_CHECK(all, "tile_all_visible wrong [%d,%d)x[%d,%d)", r0, r1, c0, c1);
          else if (left < 0 && right < 0) HOST_CHECK(!all, "full attention tile reported masked");
        }
      }
      for (int c0 = 0; c0 < sk; c0 += tile) {
        const int c1 = std::min(c0 + tile, sk);
        int rb, re;
        m.row_range(c0, c1, &rb, &re);
        for (int i = 0; i < sq; ++i) {
          bool any = false;
          for (int j = c0; j < c1; ++j) any |= visible_def(i, j, sq, sk, left, right);
          if (any) HOST_CHECK(i >= rb && i < re, "row_range misses i=%d cols [%d,%d)", i, c0, c1);
        }
      }
    }
  }
}

void test_online_softmax_matches_two_pass() {
  std::mt19937 rng(0);
  std::normal_distribution<float> normal(0.f, 4.f);
  for (int n : {1, 5, 64, 300}) for (int tile : {1, 16, 64}) {
    std::vector<float> s(n);
    for (float& x : s) x = normal(rng);
    if (n > 3) s[1] = -INFINITY;  // a masked score
    double mx = -INFINITY, sum = 0;
    for (float x : s) mx = std::max(mx, double(x));
    for (float x : s) sum += std::exp(double(x) - mx);
    const double lse = mx + std::log(sum);
    // Output of a 1-D "value" v_j = j: sum_j p_j * j.
    double out_ref = 0;
    for (int j = 0; j < n; ++j) out_ref += std::exp(double(s[j]) - lse) * j;

    phi::flash::OnlineSoftmax st;
    float acc = 0.f;
    for (int t0 = 0; t0 < n; t0 += tile) {
      const int t1 = std::min(t0 + tile, n);
      float tmax = -INFINITY;
      for (int j = t0; j < t1; ++j) tmax = std::max(tmax, s[j] * phi::flash::kLog2e);
      acc *= st.rescale(tmax);
      for (int j = t0; j < t1; ++j) {
        const float p = st.prob(s[j] * phi::flash::kLog2e);
        st.sum += p;
        acc += p * j;
      }
    }
    HOST_CHECK(std::abs(st.lse() - lse) < 1e-5 * std::max(1.0, std::abs(lse)), "lse %f vs %f (n=%d)", st.lse(), lse, n);
    HOST_CHECK(std::abs(acc * st.inv_sum() - out_ref) < 1e-4 * std::max(1.0, out_ref), "out %f vs %f", acc * st.inv_sum(), out_ref);
    for (int j = 0; j < n; ++j) {  // the backward's probabilities from the LSE
      const double p = std::exp(double(s[j]) - lse);
      HOST_CHECK(std::abs(phi::flash::prob_from_lse(s[j], st.lse()) - p) < 1e-6, "prob_from_lse j=%d", j);
    }
  }
  phi::flash::OnlineSoftmax empty;  // a row that saw no key: output 0, lse +inf, probability 0
  empty.rescale(-INFINITY);
  HOST_CHECK(empty.inv_sum() == 0.f && std::isinf(empty.lse()) && empty.lse() > 0, "empty row");
  HOST_CHECK(phi::flash::prob_from_lse(3.f, empty.lse()) == 0.f, "prob of an empty row");
}

void test_softcap_and_grad() {
  for (float cap : {0.f, 5.f, 30.f}) for (float s : {-50.f, -1.f, 0.f, 0.5f, 7.f}) {
    const float c = phi::flash::apply_softcap(s, cap);
    const double expect = cap > 0 ? cap * std::tanh(double(s) / cap) : s;
    HOST_CHECK(std::abs(c - expect) < 1e-5 * std::max(1.0, std::abs(expect)), "softcap");
    const double h = 1e-3;  // central difference in double
    const double num = cap > 0 ? (cap * std::tanh((s + h) / cap) - cap * std::tanh((s - h) / cap)) / (2 * h) : 1.0;
    HOST_CHECK(std::abs(phi::flash::softcap_grad(c, cap) - num) < 1e-4, "softcap_grad cap=%f s=%f", cap, s);
  }
}

void test_dropout_keep_rate() {
  for (double p : {0.0, 0.1, 0.5}) {
    const auto d = phi::flash::Dropout::make(1234, p);
    HOST_CHECK(d.enabled() == (p > 0), "enabled");
    long kept = 0, total = 0;
    for (uint32_t row = 0; row < 200; ++row) {
      const uint32_t h = d.row_hash(7, row);
      for (uint32_t col = 0; col < 500; ++col, ++total) kept += d.keep(h, col);
    }
    const double rate = double(kept) / total;
    HOST_CHECK(std::abs(rate - (1 - p)) < 0.01, "keep rate %f for p=%f", rate, p);
  }
  // Values of the reference's hash, phi_kernels/reference/flash_attn.py::_mix32(12345) and
  // _mix32(0xDEADBEEF): the kernels and the oracle must draw the same masks.
  HOST_CHECK(phi::flash::mix32(12345u) == 2435775735u, "mix32(12345) = %u", phi::flash::mix32(12345u));
  HOST_CHECK(phi::flash::mix32(0xDEADBEEFu) == 3861431939u, "mix32(0xDEADBEEF) = %u", phi::flash::mix32(0xDEADBEEFu));
}

}  // namespace

int main() {
  test_ranges_match_visibility();
  test_online_softmax_matches_two_pass();
  test_softcap_and_grad();
  test_dropout_keep_rate();
  if (phi_test::failures()) {
    std::fprintf(stderr, "%d failure(s)\n", phi_test::failures());
    return 1;
  }
  std::printf("flash_math_test: all checks passed\n");
  return 0;
}

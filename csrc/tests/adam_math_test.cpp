// Host test of the Adam math the CUDA and CPU kernels share (csrc/adam/adam.h) and of the
// host side of multi-tensor apply (csrc/adam/multi_tensor_apply.cuh): every chunk of every
// tensor is handed to exactly one block, across table refills, including a tensor above 2^31
// elements (only its size is used here).
#include <cmath>
#include <cstdint>
#include <map>
#include <utility>
#include <vector>

#include "adam/adam.h"
#include "adam/multi_tensor_apply.cuh"
#include "tests/host_test.h"

namespace {

// torch.optim.AdamW / Adam in double, written independently of adam.h.
void adam_double(double& p, double g, double& m, double& v, double& vmax, int step, double lr, double b1, double b2,
                 double eps, double wd, bool adamw, bool amsgrad, bool maximize, double scale) {
  g /= scale;
  if (maximize) g = -g;
  if (adamw) p *= 1 - lr * wd; else g += wd * p;
  m = b1 * m + (1 - b1) * g;
  v = b2 * v + (1 - b2) * g * g;
  if (amsgrad) vmax = std::max(vmax, v);
  const double bc1 = 1 - std::pow(b1, step), bc2 = 1 - std::pow(b2, step);
  p -= lr / bc1 * (amsgrad ? (m / (std::sqrt(vmax) / std::sqrt(bc2) + eps)) : (m / (std::sqrt(v) / std::sqrt(bc2) + eps)));
}

void test_update_matches_double() {
  for (int variant = 0; variant < 16; ++variant) {
    const bool adamw = variant & 1, amsgrad = variant & 2, maximize = variant & 4, scaled = variant & 8;
    float p = 0.7f, m = 0.f, v = 0.f, vmax = 0.f;
    double pd = 0.7, md = 0, vd = 0, vmaxd = 0;
    uint32_t state = 7u + variant;
    for (int step = 1; step <= 200; ++step) {
      state = state * 1664525u + 1013904223u;
      const double g = (double(state >> 8) / double(1 << 24) - 0.5) * (scaled ? 512.0 : 1.0);
      phi::Adam_hparams h{};
      h.lr = 1e-2f; h.beta1 = 0.9f; h.beta2 = 0.98f; h.eps = 1e-7f; h.weight_decay = 0.1f;
      h.step = float(step); h.inv_grad_scale = scaled ? 1.f / 256.f : 1.f;
      h.adam_w_mode = adamw; h.bias_correction = true; h.amsgrad = amsgrad; h.maximize = maximize;
      amsgrad ? phi::adam_update<true>(p, float(g), m, v, vmax, h, phi::adam_coeffs(h))
              : phi::adam_update<false>(p, float(g), m, v, vmax, h, phi::adam_coeffs(h));
      adam_double(pd, g, md, vd, vmaxd, step, 1e-2, double(0.9f), double(0.98f), double(1e-7f), double(0.1f), adamw,
                  amsgrad, maximize, scaled ? 256.0 : 1.0);
    }
    HOST_CHECK(std::fabs(p - pd) < 1e-5 * std::max(1.0, std::fabs(pd)), "variant %d: %.9g vs %.9g", variant, p, pd);
  }
}

void test_bias_correction_off_and_coeffs() {
  phi::Adam_hparams h{};
  h.lr = 0.1f; h.beta1 = 0.5f; h.beta2 = 0.75f; h.eps = 0.f; h.step = 1.f; h.inv_grad_scale = 1.f;
  h.bias_correction = false; h.adam_w_mode = true;
  float p = 2.f, m = 0.f, v = 0.f, vmax = 0.f;
  phi::adam_update<false>(p, 4.f, m, v, vmax, h, phi::adam_coeffs(h));
  // m = 2, v = 4, p = 2 - 0.1 * 2 / 2
  HOST_CHECK(std::fabs(p - 1.9f) < 1e-7f && m == 2.f && v == 4.f, "p=%g m=%g v=%g", p, m, v);
  h.bias_correction = true;
  h.step = 100000.f;
  h.beta2 = 0.999f;
  const phi::Adam_coeffs c = phi::adam_coeffs(h);
  HOST_CHECK(std::fabs(c.bc2_sqrt - std::sqrt(1 - std::pow(0.999, 100000.0))) < 1e-7, "bc2 at step 1e5");
}

void check_coverage(const std::vector<int64_t>& numels) {
  std::vector<void*> fake(numels.size());
  for (size_t i = 0; i < numels.size(); ++i) fake[i] = reinterpret_cast<void*>(0x1000 * (i + 1));
  void* const* lists[phi::kMtaLists] = {fake.data(), fake.data(), nullptr, nullptr, nullptr, nullptr};
  std::map<std::pair<void*, int64_t>, int> seen;  // (tensor address, chunk) -> times
  int launches = 0;
  phi::multi_tensor_apply(int(numels.size()), lists, numels.data(), [&](const phi::Mta_table& t, int n_blocks) {
    ++launches;
    HOST_CHECK(n_blocks > 0 && n_blocks <= phi::kMtaMaxBlocks, "n_blocks %d", n_blocks);
    for (int b = 0; b < n_blocks; ++b) {
      const int ti = t.block_tensor[b];
      HOST_CHECK(ti < phi::kMtaMaxTensors, "tensor slot %d", ti);
      HOST_CHECK(int64_t(t.block_chunk[b]) * phi::kMtaChunk < t.numels[ti], "chunk past the end");
      HOST_CHECK(t.addrs[0][ti] == t.addrs[1][ti], "lists disagree");
      ++seen[{t.addrs[0][ti], t.block_chunk[b]}];
    }
  });
  int64_t expected = 0;
  for (size_t i = 0; i < numels.size(); ++i) {
    const int64_t chunks = (numels[i] + phi::kMtaChunk - 1) / phi::kMtaChunk;
    expected += chunks;
    for (int64_t c = 0; c < chunks; ++c)
      HOST_CHECK((seen[{fake[i], c}] == 1), "tensor %zu chunk %lld seen %d times", i, (long long)c, seen[{fake[i], c}]);
  }
  HOST_CHECK(int64_t(seen.size()) == expected, "blocks %zu, chunks %lld", seen.size(), (long long)expected);
}

void test_multi_tensor_apply_coverage() {
  check_coverage({1});
  check_coverage({0, 5, 0});
  check_coverage(std::vector<int64_t>(100, 7));                     // tensor table refills
  check_coverage({phi::kMtaChunk * 700 + 3, 11, phi::kMtaChunk});  // block table refills mid-tensor
  std::vector<int64_t> mixed;
  for (int i = 0; i < 60; ++i) mixed.push_back((i % 5 == 0) ? phi::kMtaChunk * 37 + i : i * 1000 + 1);
  check_coverage(mixed);
}

void test_multi_tensor_apply_64bit() {
  // A 3e9-element tensor: chunk indices fit in 32 bits, element offsets need 64.
  const int64_t big = 3'000'000'000LL;
  std::vector<int64_t> numels = {big};
  void* addr = reinterpret_cast<void*>(0x1000);
  void* const one[1] = {addr};
  void* const* lists[phi::kMtaLists] = {one, one, nullptr, nullptr, nullptr, nullptr};
  int64_t blocks = 0, max_chunk = -1;
  phi::multi_tensor_apply(1, lists, numels.data(), [&](const phi::Mta_table& t, int n) {
    blocks += n;
    for (int b = 0; b < n; ++b) max_chunk = std::max<int64_t>(max_chunk, t.block_chunk[b]);
  });
  const int64_t chunks = (big + phi::kMtaChunk - 1) / phi::kMtaChunk;
  HOST_CHECK(blocks == chunks && max_chunk == chunks - 1, "blocks %lld of %lld", (long long)blocks, (long long)chunks);
  HOST_CHECK(max_chunk * phi::kMtaChunk > (int64_t(1) << 31), "the last chunk starts past 2^31");
}

}  // namespace

int main() {
  test_update_matches_double();
  test_bias_correction_off_and_coeffs();
  test_multi_tensor_apply_coverage();
  test_multi_tensor_apply_64bit();
  std::printf("adam_math_test: %d failure(s)\n", phi_test::failures());
  return phi_test::failures() == 0 ? 0 : 1;
}

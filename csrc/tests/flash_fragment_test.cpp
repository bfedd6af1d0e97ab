// Host test of the tensor-core data layout of the CUDA flash attention kernels
// (csrc/flash_attn/fragment_layout.h): the ldmatrix address functions, the shared-memory
// swizzle and the accumulator layout, run against an emulation of ldmatrix.x4 (.trans) and
// mma.m16n8k16 written from the PTX ISA's fragment tables. The emulated warp GEMM below
// follows warp_gemm_ss / warp_gemm_rs / acc_to_a of mma_sm80.cuh step for step; the products
// it forms must equal plain matrix products for every operand layout the kernels use.
#include <array>
#include <cmath>
#include <cstdint>
#include <random>
#include <set>
#include <vector>

#include "flash_attn/fragment_layout.h"
#include "tests/host_test.h"

using namespace phi::flash;

namespace {

using Reg = float[2];  // one 32-bit register = two 16-bit elements (kept as floats here)

struct Warp4 {  // four registers per lane
  float r[32][4][2];
};

// ldmatrix.x4: lane L supplies the address of row L % 8 of matrix L / 8 (8 consecutive
// elements). Without .trans, lane t receives row t / 4, elements 2 (t % 4) and 2 (t % 4) + 1
// of each matrix; with .trans, elements (2 (t % 4), t / 4) and (2 (t % 4) + 1, t / 4).
Warp4 ldmatrix_x4(const std::vector<float>& smem, const int (&addr)[32], bool trans) {
  Warp4 out{};
  for (int m = 0; m < 4; ++m) {
    float mat[8][8];
    for (int row = 0; row < 8; ++row)
      for (int c = 0; c < 8; ++c) mat[row][c] = smem[addr[8 * m + row] + c];
    for (int t = 0; t < 32; ++t) {
      for (int j = 0; j < 2; ++j) {
        out.r[t][m][j] = trans ? mat[2 * (t % 4) + j][t / 4] : mat[t / 4][2 * (t % 4) + j];
      }
    }
  }
  return out;
}

// mma.m16n8k16 (row.col): fragments per the PTX ISA, g = lane / 4, q = lane % 4.
// A: a0 = A[g][2q..], a1 = A[g+8][2q..], a2 = A[g][2q+8..], a3 = A[g+8][2q+8..]
// B: b0 = B[2q..][g], b1 = B[2q+8..][g];  C: c0,c1 = C[g][2q..], c2,c3 = C[g+8][2q..]
void mma_16816(float (&c)[32][4], const float (&a)[32][4][2], const float (&b)[32][2][2]) {
  float A[16][16], B[16][8];
  for (int t = 0; t < 32; ++t) {
    const int g = t / 4, q = t % 4;
    for (int j = 0; j < 2; ++j) {
      A[g][2 * q + j] = a[t][0][j];
      A[g + 8][2 * q + j] = a[t][1][j];
      A[g][2 * q + 8 + j] = a[t][2][j];
      A[g + 8][2 * q + 8 + j] = a[t][3][j];
      B[2 * q + j][g] = b[t][0][j];
      B[2 * q + 8 + j][g] = b[t][1][j];
    }
  }
  for (int t = 0; t < 32; ++t) {
    const int g = t / 4, q = t % 4;
    for (int e = 0; e < 4; ++e) {
      const int row = g + (e >> 1) * 8, col = 2 * q + (e & 1);
      float s = 0;
      for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
      c[t][e] += s;
    }
  }
}

template <int kPitch>
void store(std::vector<float>& smem, int rows, const std::vector<float>& dense) {
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < kPitch; ++c) smem[Swizzled<kPitch>::offset(r, c)] = dense[r * kPitch + c];
}

// Mirrors warp_gemm_ss: acc[nt] (16 x 8 tiles) += A (16 rows from a_row0, depth k) x B.
template <int kAPitch, int kBPitch>
void emu_gemm_ss(std::vector<std::vector<std::array<float, 4>>>& acc, int n_tiles, int depth, bool a_trans,
                 bool b_trans, const std::vector<float>& sA, int a_row0, const std::vector<float>& sB, int b_col0) {
  for (int k0 = 0; k0 < depth; k0 += 16) {
    int aaddr[32];
    for (int lane = 0; lane < 32; ++lane) {
      const RowCol p = a_trans ? ldm_a_trans(lane, a_row0, k0) : ldm_a(lane, a_row0, k0);
      aaddr[lane] = Swizzled<kAPitch>::offset(p.row, p.col);
    }
    const Warp4 a = ldmatrix_x4(sA, aaddr, a_trans);
    for (int nt = 0; nt < n_tiles; nt += 2) {
      int baddr[32];
      for (int lane = 0; lane < 32; ++lane) {
        const RowCol p = b_trans ? ldm_b_trans(lane, k0, b_col0 + nt * 8) : ldm_b(lane, k0, b_col0 + nt * 8);
        baddr[lane] = Swizzled<kBPitch>::offset(p.row, p.col);
      }
      const Warp4 b = ldmatrix_x4(sB, baddr, b_trans);
      for (int half = 0; half < 2; ++half) {
        float bb[32][2][2], c[32][4];
        for (int t = 0; t < 32; ++t) {
          for (int j = 0; j < 2; ++j) {
            bb[t][0][j] = b.r[t][2 * half][j];
            bb[t][1][j] = b.r[t][2 * half + 1][j];
          }
          for (int e = 0; e < 4; ++e) c[t][e] = acc[nt + half][t][e];
        }
        mma_16816(c, a.r, bb);
        for (int t = 0; t < 32; ++t)
          for (int e = 0; e < 4; ++e) acc[nt + half][t][e] = c[t][e];
      }
    }
  }
}

using Acc = std::vector<std::vector<std::array<float, 4>>>;
Acc zeros(int n_tiles) { return Acc(n_tiles, std::vector<std::array<float, 4>>(32, {0, 0, 0, 0})); }

// The dense 16 x (8 n_tiles) matrix an accumulator holds, read back through acc_row / acc_col.
std::vector<float> dense_of(const Acc& acc) {
  const int n = int(acc.size()) * 8;
  std::vector<float> out(16 * n, NAN);
  for (size_t nt = 0; nt < acc.size(); ++nt)
    for (int t = 0; t < 32; ++t)
      for (int e = 0; e < 4; ++e) out[acc_row(t, e) * n + nt * 8 + acc_col(t, e)] = acc[nt][t][e];
  return out;
}

std::vector<float> random_ints(int n, std::mt19937& rng) {  // small integers: exact float products
  std::uniform_int_distribution<int> d(-3, 3);
  std::vector<float> v(n);
  for (float& x : v) x = float(d(rng));
  return v;
}

// C (16 x n) = op(A) x op(B) for the four layouts the kernels use, against a plain product.
template <int kAPitch, int kBPitch>
void check_gemm(bool a_trans, bool b_trans, int depth, int n, int a_row0, int b_col0, std::mt19937& rng) {
  const int a_rows = a_trans ? depth : 64, b_rows = b_trans ? depth : 64 + b_col0;
  std::vector<float> A = random_ints(a_rows * kAPitch, rng), B = random_ints(std::max(b_rows, 16) * kBPitch, rng);
  std::vector<float> sA(A.size()), sB(B.size());
  store<kAPitch>(sA, a_rows, A);
  store<kBPitch>(sB, int(B.size()) / kBPitch, B);
  Acc acc = zeros(n / 8);
  emu_gemm_ss<kAPitch, kBPitch>(acc, n / 8, depth, a_trans, b_trans, sA, a_row0, sB, b_col0);
  const std::vector<float> got = dense_of(acc);
  int bad = 0;
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < n; ++j) {
      float ref = 0;
      for (int k = 0; k < depth; ++k) {
        const float a = a_trans ? A[k * kAPitch + a_row0 + i] : A[(a_row0 + i) * kAPitch + k];
        const float b = b_trans ? B[k * kBPitch + b_col0 + j] : B[(b_col0 + j) * kBPitch + k];
        ref += a * b;
      }
      bad += got[i * n + j] != ref;
    }
  }
  HOST_CHECK(bad == 0, "gemm a_trans=%d b_trans=%d pitches %d/%d depth %d: %d wrong elements", a_trans, b_trans,
             kAPitch, kBPitch, depth, bad);
}

// acc_to_a: the accumulators of S = Q K^T, repacked as A fragments, multiply V like S would.
void check_acc_to_a(std::mt19937& rng) {
  constexpr int kN = 64, kD = 64;
  std::vector<float> S = random_ints(16 * kN, rng), V = random_ints(kN * kD, rng), sV(V.size());
  store<kD>(sV, kN, V);
  // Build the accumulator fragments of S through acc_row / acc_col ...
  float acc_s[kN / 8][32][4];
  for (int nt = 0; nt < kN / 8; ++nt)
    for (int t = 0; t < 32; ++t)
      for (int e = 0; e < 4; ++e) acc_s[nt][t][e] = S[acc_row(t, e) * kN + nt * 8 + acc_col(t, e)];
  // ... repack them exactly as acc_to_a does, and run warp_gemm_rs's loop.
  Acc acc = zeros(kD / 8);
  for (int k = 0; k < kN / 16; ++k) {
    float a[32][4][2];
    for (int t = 0; t < 32; ++t) {
      for (int j = 0; j < 2; ++j) {
        a[t][0][j] = acc_s[2 * k][t][j];
        a[t][1][j] = acc_s[2 * k][t][2 + j];
        a[t][2][j] = acc_s[2 * k + 1][t][j];
        a[t][3][j] = acc_s[2 * k + 1][t][2 + j];
      }
    }
    for (int nt = 0; nt < kD / 8; nt += 2) {
      int baddr[32];
      for (int lane = 0; lane < 32; ++lane) {
        const RowCol p = ldm_b_trans(lane, 16 * k, nt * 8);
        baddr[lane] = Swizzled<kD>::offset(p.row, p.col);
      }
      const Warp4 b = ldmatrix_x4(sV, baddr, true);
      for (int half = 0; half < 2; ++half) {
        float bb[32][2][2], c[32][4];
        for (int t = 0; t < 32; ++t) {
          for (int j = 0; j < 2; ++j) {
            bb[t][0][j] = b.r[t][2 * half][j];
            bb[t][1][j] = b.r[t][2 * half + 1][j];
          }
          for (int e = 0; e < 4; ++e) c[t][e] = acc[nt + half][t][e];
        }
        mma_16816(c, a, bb);
        for (int t = 0; t < 32; ++t)
          for (int e = 0; e < 4; ++e) acc[nt + half][t][e] = c[t][e];
      }
    }
  }
  const std::vector<float> got = dense_of(acc);
  int bad = 0;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < kD; ++j) {
      float ref = 0;
      for (int k = 0; k < kN; ++k) ref += S[i * kN + k] * V[k * kD + j];
      bad += got[i * kD + j] != ref;
    }
  HOST_CHECK(bad == 0, "acc_to_a + P V: %d wrong elements", bad);
}

// Every ldmatrix phase (8 lanes, one 16-byte row each) must touch 8 distinct 16-byte bank
// groups of the 128-byte bank window: conflict-free shared-memory reads.
template <int kPitch>
void check_conflict_free() {
  for (int variant = 0; variant < 4; ++variant) {
    for (int r0 = 0; r0 < 64; r0 += 16) {
      for (int c0 = 0; c0 < kPitch; c0 += 16) {
        for (int phase = 0; phase < 4; ++phase) {
          std::set<int> groups;
          for (int lane = 8 * phase; lane < 8 * phase + 8; ++lane) {
            const RowCol p = variant == 0 ? ldm_a(lane, r0, c0)
                           : variant == 1 ? ldm_a_trans(lane, c0 % 64, r0)
                           : variant == 2 ? ldm_b(lane, c0, r0)
                                          : ldm_b_trans(lane, r0, c0);
            if (p.col >= kPitch) continue;
            groups.insert((Swizzled<kPitch>::offset(p.row, p.col) * 2 / 16) % 8);
          }
          HOST_CHECK(groups.size() == 8, "bank conflict: pitch %d variant %d phase %d (%zu groups)", kPitch, variant,
                     phase, groups.size());
        }
      }
    }
  }
}

template <int kPitch>
void check_swizzle_is_permutation() {
  std::vector<int> seen(64 * kPitch, 0);
  for (int r = 0; r < 64; ++r)
    for (int c = 0; c < kPitch; ++c) ++seen[Swizzled<kPitch>::offset(r, c)];
  int bad = 0;
  for (int s : seen) bad += s != 1;
  HOST_CHECK(bad == 0, "swizzle pitch %d is not a permutation", kPitch);
  for (int r = 0; r < 64; ++r)  // chunks stay whole: 8 consecutive columns, 8 consecutive slots
    for (int c = 0; c < kPitch; c += 8)
      HOST_CHECK(Swizzled<kPitch>::offset(r, c + 7) == Swizzled<kPitch>::offset(r, c) + 7, "chunk split");
}

}  // namespace

int main() {
  std::mt19937 rng(0);
  // S = Q K^T (A [m][k], B [n][k]) as in the forward (d 64 / 128, 128- and 64-key tiles) and
  // the backward's two halves; dV += P^T dO / dK += dS^T Q (both transposed); dQ = dS K.
  check_gemm<64, 64>(false, false, 64, 128 / 2, 16, 0, rng);
  check_gemm<128, 128>(false, false, 128, 64, 48, 0, rng);
  check_gemm<64, 64>(false, false, 64, 32, 32, 32, rng);
  check_gemm<64, 64>(true, true, 64, 32, 16, 32, rng);
  check_gemm<64, 128>(true, true, 64, 64, 48, 64, rng);
  check_gemm<64, 128>(false, true, 64, 64, 0, 0, rng);
  check_gemm<64, 64>(false, true, 64, 32, 32, 32, rng);
  check_acc_to_a(rng);
  check_conflict_free<64>();
  check_conflict_free<128>();
  check_swizzle_is_permutation<64>();
  check_swizzle_is_permutation<128>();
  if (phi_test::failures()) {
    std::fprintf(stderr, "%d failure(s)\n", phi_test::failures());
    return 1;
  }
  std::printf("flash_fragment_test: all checks passed\n");
  return 0;
}

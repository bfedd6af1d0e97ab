// Flash attention, CPU kernels: a few query rows at a time (a decoding step, or the tail of a
// sequence): attend_rows, and decoding with the heads in register lanes (decode_rows,
// decode_task, merge_parts). Not a standalone header: flash_attn_cpu.cpp includes it inside its
// anonymous namespace, after the tile path's helpers it uses (thread_scratch, split_partials,
// keep_lanes, Query_block), so each per-ISA build (csrc/cpu_isa) gets its own copy; it is in a
// file of its own only to keep flash_attn_cpu.cpp readable.
#pragma once

// --------------------------------------------------------------- a few rows (decoding)
//
// A block of at most kDirectRows query rows (a decoding step, or the tail of a sequence) is
// computed row by row: all of a row's scores at once (exact two-pass softmax), reading K and
// V in place. The tile path would pad the rows to kMicroCols columns of S^T: 32x the work for
// one row. A decoding step gives each thread all heads of a sequence, or an equal share of
// them when there are fewer sequences than threads: in a (batch, seqlen, heads, d) cache the
// heads of a key are side by side, and reading them together streams the cache; one head
// alone reads 256 bytes of every 8 KiB (phi-1.5), which measured 10x slower once the cache
// outgrows L2 (the prefetchers stop at page boundaries, and the 8 KiB stride uses a fraction
// of the cache sets).

// q . k over d elements (q zero-padded to a whole register).
template <typename T>
inline float row_dot(const float* q, const T* k, int d) {
  VecN acc0{}, acc1{};
  int c = 0;
  for (; c + 2 * kVecFloats <= d; c += 2 * kVecFloats) {
    acc0 += load_vec(q + c) * load_as_float(k + c);
    acc1 += load_vec(q + c + kVecFloats) * load_as_float(k + c + kVecFloats);
  }
  float tail = 0.f;
  for (; c < d; ++c) tail += q[c] * to_float(k[c]);
  return lane_sum(acc0 + acc1) + tail;
}

// o[c] += pj * v[c] for c < d.
template <typename T>
inline void add_scaled_row(float pj, const T* v, int d, float* o) {
  int c = 0;
  for (; c + kVecFloats <= d; c += kVecFloats) store_vec(o + c, load_vec(o + c) + pj * load_as_float(v + c));
  for (; c < d; ++c) o[c] += pj * to_float(v[c]);
}

// A decoding step over fewer sequences than threads splits each sequence's keys into `parts`
// ranges (flash-decoding), every task streaming whole key rows of all heads; each part leaves
// its (max, sum, unnormalized output) per (head, row) in `partials`, merged by merge_parts.
struct Key_split {
  int part = 0, parts = 1, d = 0;
  float* partials = nullptr;  // (batch, parts, heads, kDirectRows) records of 2 + d floats

  void keys(int seqlen_k, int* begin, int* end) const {
    const int size = (seqlen_k + parts - 1) / parts;
    *begin = std::min(part * size, seqlen_k);
    *end = std::min(*begin + size, seqlen_k);
  }
  float* at(const Flash_params& p, int b, int h, int row, int of_part = -1) const {
    const size_t index = ((size_t(b) * parts + (of_part < 0 ? part : of_part)) * p.heads + h) * kDirectRows + row;
    return partials + index * (2 + d);
  }
};
constexpr int kMinPartKeys = 256;  // keys per part at least: below, the merge costs more than it saves

// Query rows [r0, r0 + rows) of heads [h0, h0 + nh) of sequence b (nh <= the scratch's row_heads),
// over the keys of split's part.
template <typename T>
void attend_rows(const Flash_params& p, int b, int h0, int nh, int r0, int rows, const Flash_seq& seq, int dp,
                 const Fwd_scratch& w, const Key_split& split = {}) {
  const int d = p.head_dim, pitch = round_up(seq.seqlen_k, kVecFloats);
  int part_begin, part_end;
  split.keys(seq.seqlen_k, &part_begin, &part_end);
  const flash::Mask mask = seq.mask(p);
  auto k_row = [&](int h, int j) {
    return static_cast<const T*>(p.k) + seq.k_offset(p, b, p.kv_head(h), j, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  };
  auto v_row = [&](int h, int j) {
    return static_cast<const T*>(p.v) + seq.k_offset(p, b, p.kv_head(h), j, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  };
  for (int row = r0; row < r0 + rows; ++row) {
    int jb, je;
    mask.key_range(row, row + 1, &jb, &je);
    jb = std::max(jb, part_begin);
    je = std::min(je, part_end);
    const int n = std::max(je - jb, 0), n_padded = round_up(n, kVecFloats);
    for (int u = 0; u < nh; ++u) {
      const T* qs = static_cast<const T*>(p.q) + seq.q_offset(p, b, h0 + u, row, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
      float* q = w.row_q + u * dp;
      for (int c = 0; c < d; ++c) q[c] = to_float(qs[c]);
      std::fill(q + d, q + dp, 0.f);
      std::fill(w.row_o + u * dp, w.row_o + (u + 1) * dp, 0.f);
    }
    // Scores in log2 units, key by key with the heads side by side (the cache's layout).
    for (int j = 0; j < n; ++j) {
      for (int u = 0; u < nh; ++u) {
        const float dot = row_dot(w.row_q + u * dp, k_row(h0 + u, jb + j), d);
        w.row_s[u * pitch + j] = flash::apply_softcap(dot * p.scale, p.softcap) * flash::kLog2e;
      }
    }
    for (int u = 0; u < nh; ++u) {  // flash_math.h's OnlineSoftmax over the whole row at once
      float* s = w.row_s + u * pitch;
      std::fill(s + n, s + n_padded, -flash::kInf);
      VecN vmax = splat(-flash::kInf);
      for (int j = 0; j < n_padded; j += kVecFloats) {
        const VecN x = load_vec(s + j);
        vmax = x > vmax ? x : vmax;  // a NaN score does not move the max
      }
      float max = -flash::kInf;
      for (int l = 0; l < kVecFloats; ++l) max = vmax[l] > max ? vmax[l] : max;
      VecN vsum{};
      for (int j = 0; j < n_padded; j += kVecFloats) {
        const VecN x = load_vec(s + j);
        const VecN prob = x == -flash::kInf ? VecN{} : exp2_nonpositive(x - max);
        vsum += prob;
        store_vec(s + j, prob);
      }
      w.row_max[u] = max;
      w.row_sum[u] = lane_sum(vsum);
      if (p.dropout.enabled()) {  // the sum above is of the undropped probabilities
        const uint32_t hash = p.dropout.row_hash(uint32_t(b * p.heads + h0 + u), uint32_t(row));
        for (int j = 0; j < n; ++j) s[j] = p.dropout.keep(hash, uint32_t(jb + j)) ? s[j] * p.dropout.scale : 0.f;
      }
    }
    for (int j = 0; j < n; ++j) {
      for (int u = 0; u < nh; ++u) add_scaled_row(w.row_s[u * pitch + j], v_row(h0 + u, jb + j), d, w.row_o + u * dp);
    }
    if (split.partials != nullptr) {  // this part's (max, sum, unnormalized output), merged later
      for (int u = 0; u < nh; ++u) {
        float* out = split.at(p, b, h0 + u, row);
        out[0] = w.row_max[u];
        out[1] = w.row_sum[u];
        std::copy(w.row_o + u * dp, w.row_o + u * dp + d, out + 2);
      }
      continue;
    }
    for (int u = 0; u < nh; ++u) {  // a row that sees no key: output 0, LSE +inf
      const flash::OnlineSoftmax stats = n > 0 ? flash::OnlineSoftmax{w.row_max[u], w.row_sum[u]} : flash::OnlineSoftmax{};
      const float inv = stats.inv_sum();
      T* dst = static_cast<T*>(p.out) + seq.q_offset(p, b, h0 + u, row, p.out_batch_stride, p.out_row_stride, p.out_head_stride);
      for (int c = 0; c < d; ++c) dst[c] = from_float<T>(w.row_o[u * dp + c] * inv);
      p.lse[seq.lse_index(p, b, h0 + u, row)] = stats.lse();
    }
  }
}

// --------------------------------------------------------------- decoding: heads in lanes
//
// A decoding step (seqlen_q <= kDirectRows) streams the cache key row by key row, as
// attend_rows does, but keeps the task's heads in the lanes of a register: the scores of key j
// are one row s[j][head], so the softmax's max, exp2 and sums are whole-register operations,
// and the kVecFloats dot products of a key's heads end in one transposing reduction
// (reduce_lanes: kVecFloats - 1 shuffle-and-add steps for kVecFloats dots) instead of a
// horizontal sum, a scalar store and a kv-head division each. The output accumulates
// kDecodeKeys keys per pass, so each head's output row is loaded and stored once per
// kDecodeKeys keys, and the pass reads kDecodeKeys rows of V at once (more misses in flight:
// one row at a time streamed at a fraction of the bandwidth once the cache left L2).
//
// Heads is kD > 0 for the common layout, compiled per head_dim: no GQA, each key row's heads
// side by side (head stride = head_dim = kD) and whole registers of heads; then every head's
// q and k sit at compile-time offsets from one pointer. (With offsets read from a table, GCC
// kept them in vector registers and on the stack, and the scores cost 3x the multiply-adds.)
// kD = 0 is any layout: offsets from a table, and lanes past the task's heads hold a zero
// query whose pointers repeat the first head's (every load in bounds; never written out).

constexpr int kDecodeKeys = 4;  // keys per pass over the outputs

// Lane l of fold_pair's result reads lanes fold_lane(B, l) and fold_lane(B, l) + B of the pair
// (x, y): every block of 2B lanes (one head's partial sums) is halved to B lanes, x's blocks
// filling the low half of the result and y's the high half, so heads stay in order.
constexpr int fold_lane(int B, int l) {
  const int from_y = l >= kVecFloats / 2 ? 1 : 0;
  const int m = l - from_y * (kVecFloats / 2);
  return from_y * kVecFloats + m / B * 2 * B + m % B;
}

template <int B, int... L>
inline VecN fold_pair(VecN x, VecN y, std::integer_sequence<int, L...>) {
  return __builtin_shufflevector(x, y, fold_lane(B, L)...) + __builtin_shufflevector(x, y, (fold_lane(B, L) + B)...);
}

// Lane i of the result: the sum of the lanes of a[i], for the 2B registers a[0 .. 2B) (used as
// scratch). Called with B = kVecFloats / 2.
template <int B>
inline VecN reduce_lanes(VecN* a) {
  for (int i = 0; i < B; ++i) a[i] = fold_pair<B>(a[2 * i], a[2 * i + 1], std::make_integer_sequence<int, kVecFloats>{});
  if constexpr (B == 1) {
    return a[0];
  } else {
    return reduce_lanes<B / 2>(a);
  }
}

// The first `count` (< kVecFloats) values at p as fp32, zeros after them (a head_dim tail).
template <typename T>
inline VecN load_partial(const T* p, int count) {
  VecN v{};
  for (int i = 0; i < count; ++i) v[i] = to_float(p[i]);
  return v;
}

// A decoding task's working set: its heads' query rows, outputs and softmax statistics, and
// one row of scores per key of its part.
struct Decode_scratch {
  float* q;            // lanes x dp: the query row of each head (fp32, zero-padded; zero past the heads)
  float* o;            // lanes x dp: the unnormalized outputs
  float* s;            // seqlen_k x lanes: scores in log2 units, then probabilities
  float* max;          // lanes each: per head, over the row's keys
  float* sum;
  int64_t* k_offset;   // lanes each (kD = 0): a head's K / V elements from the start of a key row
  int64_t* v_offset;

  Decode_scratch(Carver&& c, int dp, int seqlen_k, int lanes)
      : q(c.take(size_t(lanes) * dp)), o(c.take(size_t(lanes) * dp)), s(c.take(size_t(lanes) * std::max(seqlen_k, 1))),
        max(c.take(lanes)), sum(c.take(lanes)), k_offset(reinterpret_cast<int64_t*>(c.take(2 * lanes))),
        v_offset(reinterpret_cast<int64_t*>(c.take(2 * lanes))), floats(c.used()) {}
  size_t floats;
};

// Element offset of head u of a task from its key row pointer: u * kD, or the table's.
template <int kD>
inline int64_t head_offset(const int64_t* table, int u) {
  if constexpr (kD > 0) {
    return int64_t(u) * kD;
  } else {
    return table[u];
  }
}

// The scores q_u . k_u of one key for kVecFloats heads u (query rows at q, dp apart; keys at
// krow + head_offset(u)), one head per lane.
template <int kD, typename T>
inline VecN head_dots(const float* q, int dp, const T* krow, const int64_t* table, int d) {
  if constexpr (kD > 0) {
    d = kD;
    dp = kD;
  }
  // Head by head, each head's d elements in order: the key row is read front to back (a strided
  // order, a register of every head in turn, left the prefetchers behind once the cache
  // outgrew L3: kv2048 1.5x slower).
  VecN acc[kVecFloats];
  for (int u = 0; u < kVecFloats; ++u) {
    const T* k = krow + head_offset<kD>(table, u);
    VecN a{};
    int c = 0;
    for (; c + kVecFloats <= d; c += kVecFloats) a += load_vec(q + u * dp + c) * load_as_float(k + c);
    if (c < d) a += load_vec(q + u * dp + c) * load_partial(k + c, d - c);  // head_dim not a whole register
    acc[u] = a;
  }
  return reduce_lanes<kVecFloats / 2>(acc);
}

// o[c] += sum over i < K of pr[i] * vr[i][c], for c < d (K = kDecodeKeys, or 1 for the tail).
template <int kD, int K, typename T>
inline void add_scaled_rows(const float* pr, const T* const* vr, int d, float* o) {
  if constexpr (kD > 0) d = kD;
  int c = 0;
  for (; c + kVecFloats <= d; c += kVecFloats) {
    VecN acc = load_vec(o + c);
    for (int i = 0; i < K; ++i) acc += pr[i] * load_as_float(vr[i] + c);
    store_vec(o + c, acc);
  }
  if (c < d) {
    VecN acc = load_vec(o + c);
    for (int i = 0; i < K; ++i) acc += pr[i] * load_partial(vr[i] + c, d - c);
    store_vec(o + c, acc);  // o is dp wide: the lanes past d stay 0
  }
}

// Heads [h0, h0 + nh) of sequence b, every query row (seqlen_q <= kDirectRows), over the keys
// of split's part: the results of attend_rows (flash_math.h's rules, exact two-pass softmax).
template <typename T, int kD>
void decode_rows(const Flash_params& p, int b, int h0, int nh, const Flash_seq& seq, int dp, const Decode_scratch& w,
                 const Key_split& split) {
  constexpr int W = kVecFloats;
  const int d = kD > 0 ? kD : p.head_dim, lanes = round_up(nh, W);
  if constexpr (kD > 0) dp = kD;
  const flash::Mask mask = seq.mask(p);
  int part_begin, part_end;
  split.keys(seq.seqlen_k, &part_begin, &part_end);
  // Key row pointers start at the task's first head (kD > 0) or at kv head 0 (the table's origin).
  const int first_head = kD > 0 ? h0 : 0;
  const T* k0 = static_cast<const T*>(p.k) + seq.k_offset(p, b, first_head, 0, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  const T* v0 = static_cast<const T*>(p.v) + seq.k_offset(p, b, first_head, 0, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  if constexpr (kD == 0) {
    for (int u = 0; u < lanes; ++u) {  // (lanes past the heads read the first head's keys)
      const int kvh = p.kv_head(h0 + (u < nh ? u : 0));
      w.k_offset[u] = kvh * p.k_head_stride;
      w.v_offset[u] = kvh * p.v_head_stride;
    }
  }
  for (int row = 0; row < seq.seqlen_q; ++row) {
    int jb, je;
    mask.key_range(row, row + 1, &jb, &je);
    jb = std::max(jb, part_begin);
    je = std::min(je, part_end);
    const int n = std::max(je - jb, 0);
    for (int u = 0; u < lanes; ++u) {
      float* q = w.q + size_t(u) * dp;
      int c = 0;
      if (u < nh) {
        const T* qs = static_cast<const T*>(p.q) + seq.q_offset(p, b, h0 + u, row, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
        for (; c < d; ++c) q[c] = to_float(qs[c]);
      }
      std::fill(q + c, q + dp, 0.f);
    }
    std::fill(w.o, w.o + size_t(nh) * dp, 0.f);
    // Scores in log2 units, a key row at a time, and each head's max (a NaN score does not move it).
    for (int u = 0; u < lanes; u += W) store_vec(w.max + u, splat(-flash::kInf));
    for (int j = 0; j < n; ++j) {
      const T* krow = k0 + int64_t(jb + j) * p.k_row_stride;
      float* sj = w.s + size_t(j) * lanes;
      for (int u = 0; u < lanes; u += W) {
        VecN x = head_dots<kD>(w.q + size_t(u) * dp, dp, kD > 0 ? krow + int64_t(u) * kD : krow, w.k_offset + u, d);
        if (p.softcap > 0) {
          for (int l = 0; l < W; ++l) x[l] = flash::apply_softcap(x[l] * p.scale, p.softcap);
        } else {
          x = x * p.scale;
        }
        x = x * flash::kLog2e;
        store_vec(sj + u, x);
        const VecN m = load_vec(w.max + u);
        store_vec(w.max + u, x > m ? x : m);
      }
    }
    // flash_math.h's OnlineSoftmax over the whole row at once: probabilities and their sums.
    for (int u = 0; u < lanes; u += W) {
      const VecN max = load_vec(w.max + u);
      VecN sum{};
      for (int j = 0; j < n; ++j) {
        float* sj = w.s + size_t(j) * lanes + u;
        const VecN x = load_vec(sj);
        const VecN prob = x == -flash::kInf ? VecN{} : exp2_nonpositive(x - max);
        sum += prob;
        store_vec(sj, prob);
      }
      store_vec(w.sum + u, sum);
    }
    if (p.dropout.enabled()) {  // the sums above are of the undropped probabilities
      for (int u = 0; u < nh; ++u) {
        const uint32_t hash = p.dropout.row_hash(uint32_t(b * p.heads + h0 + u), uint32_t(row));
        for (int j = 0; j < n; ++j) {
          float& s = w.s[size_t(j) * lanes + u];
          s = p.dropout.keep(hash, uint32_t(jb + j)) ? s * p.dropout.scale : 0.f;
        }
      }
    }
    // O += P V, kDecodeKeys key rows per pass (their heads side by side, as the cache holds them).
    int j = 0;
    for (; j + kDecodeKeys <= n; j += kDecodeKeys) {
      const T* vrows[kDecodeKeys];
      for (int i = 0; i < kDecodeKeys; ++i) vrows[i] = v0 + int64_t(jb + j + i) * p.v_row_stride;
      const float* pj = w.s + size_t(j) * lanes;
      for (int u = 0; u < nh; ++u) {
        float pr[kDecodeKeys];
        const T* vr[kDecodeKeys];
        for (int i = 0; i < kDecodeKeys; ++i) {
          pr[i] = pj[size_t(i) * lanes + u];
          vr[i] = vrows[i] + head_offset<kD>(w.v_offset, u);
        }
        add_scaled_rows<kD, kDecodeKeys>(pr, vr, d, w.o + size_t(u) * dp);
      }
    }
    for (; j < n; ++j) {
      const T* vrow = v0 + int64_t(jb + j) * p.v_row_stride;
      for (int u = 0; u < nh; ++u) {
        const T* vr = vrow + head_offset<kD>(w.v_offset, u);
        add_scaled_rows<kD, 1>(w.s + size_t(j) * lanes + u, &vr, d, w.o + size_t(u) * dp);
      }
    }
    if (split.partials != nullptr) {  // this part's (max, sum, unnormalized output), merged later
      for (int u = 0; u < nh; ++u) {
        float* out = split.at(p, b, h0 + u, row);
        out[0] = w.max[u];
        out[1] = w.sum[u];
        std::copy(w.o + size_t(u) * dp, w.o + size_t(u) * dp + d, out + 2);
      }
      continue;
    }
    for (int u = 0; u < nh; ++u) {  // a row that sees no key: output 0, LSE +inf
      const flash::OnlineSoftmax stats = n > 0 ? flash::OnlineSoftmax{w.max[u], w.sum[u]} : flash::OnlineSoftmax{};
      const float inv = stats.inv_sum();
      T* dst = static_cast<T*>(p.out) + seq.q_offset(p, b, h0 + u, row, p.out_batch_stride, p.out_row_stride, p.out_head_stride);
      const float* o = w.o + size_t(u) * dp;
      for (int c = 0; c < d; ++c) dst[c] = from_float<T>(o[c] * inv);
      p.lse[seq.lse_index(p, b, h0 + u, row)] = stats.lse();
    }
  }
}

// decode_rows compiled for this call's head_dim when the layout allows (see above).
template <typename T>
void decode_task(const Flash_params& p, int b, int h0, int nh, const Flash_seq& seq, int dp, const Decode_scratch& w,
                 const Key_split& split) {
  const int d = p.head_dim;
  const bool side_by_side = p.kv_heads == p.heads && p.k_head_stride == d && p.v_head_stride == d && nh % kVecFloats == 0;
  if (side_by_side && d == 64) return decode_rows<T, 64>(p, b, h0, nh, seq, dp, w, split);
  if (side_by_side && d == 128) return decode_rows<T, 128>(p, b, h0, nh, seq, dp, w, split);
  decode_rows<T, 0>(p, b, h0, nh, seq, dp, w, split);
}

// out and LSE of head h's rows of sequence b from the parts' records: flash_math.h's
// OnlineSoftmax::rescale applied to whole parts (a part that saw no key has max -inf, sum 0).
template <typename T>
void merge_parts(const Flash_params& p, int b, int h, const Key_split& split) {
  const Flash_seq seq = Flash_seq::of(p, b);
  const int d = p.head_dim;
  auto factor = [](float from, float to) {
    return to == -flash::kInf ? 1.f : (from == -flash::kInf ? 0.f : exp2_nonpositive(from - to));
  };
  float o[256];  // head_dim <= 256 (checked by the Python API)
  for (int row = 0; row < seq.seqlen_q; ++row) {
    float max = -flash::kInf, sum = 0.f;
    std::fill(o, o + d, 0.f);
    for (int part = 0; part < split.parts; ++part) {
      const float* rec = split.at(p, b, h, row, part);
      const float new_max = rec[0] > max ? rec[0] : max;
      const float f_old = factor(max, new_max), f_part = factor(rec[0], new_max);
      sum = sum * f_old + rec[1] * f_part;
      for (int c = 0; c < d; ++c) o[c] = o[c] * f_old + rec[2 + c] * f_part;
      max = new_max;
    }
    const flash::OnlineSoftmax stats{max, sum};
    const float inv = stats.inv_sum();
    T* dst = static_cast<T*>(p.out) + seq.q_offset(p, b, h, row, p.out_batch_stride, p.out_row_stride, p.out_head_stride);
    for (int c = 0; c < d; ++c) dst[c] = from_float<T>(o[c] * inv);
    p.lse[seq.lse_index(p, b, h, row)] = stats.lse();
  }
}

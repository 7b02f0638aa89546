// conv3x3_winograd's input and output transforms, written once for a vector of RF_LANES fp32 channels and included
// by winograd_conv.cpp twice, inside namespace avx2 (RF_LANES 8, __m256, target AVX2 + FMA) and namespace avx512
// (RF_LANES 16, __m512, target AVX-512): each copy is compiled for its instruction set only, so the AVX2 one never
// holds an AVX-512 instruction. No include guard on purpose. Channels run in steps of RF_LANES; the last step of a
// channel count that is a multiple of 8 but not of 16 uses a lane mask (AVX-512 masked loads and stores; the AVX2
// copy has no tail: 8 divides every channel count). Needs, from the includer: RF_TARGET, RF_LANES, RF_UNROLL,
// bf16_t, Geometry, TileCursor, Shortcut, kNone/kIdentity, to_float.

#if RF_LANES == 8
using vec = __m256;
using Mask = uint32_t;  // unused: 8 divides every channel count
RF_TARGET inline vec vzero() { return _mm256_setzero_ps(); }
RF_TARGET inline vec vset1(float v) { return _mm256_set1_ps(v); }
RF_TARGET inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
RF_TARGET inline vec vsub(vec a, vec b) { return _mm256_sub_ps(a, b); }
RF_TARGET inline vec vfmadd(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }   // a b + c
RF_TARGET inline vec vfnmadd(vec a, vec b, vec c) { return _mm256_fnmadd_ps(a, b, c); } // c - a b
RF_TARGET inline vec vmax0(vec v) { return _mm256_max_ps(_mm256_setzero_ps(), v); }     // NaN stays NaN
RF_TARGET inline vec vload(const float* p, Mask) { return _mm256_loadu_ps(p); }
RF_TARGET inline vec vload(const bf16_t* p, Mask) {  // bf16 is the upper half of an fp32
  const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}
RF_TARGET inline void vstore(float* p, vec v, Mask) { _mm256_storeu_ps(p, v); }
// fp32 -> bf16 rounded to nearest even (c10::BFloat16's rounding; a NaN stays a quiet NaN)
RF_TARGET inline void vstore(bf16_t* p, vec v, Mask) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);  // 64-bit lanes 0 and 2
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
#else
using vec = __m512;
using Mask = __mmask16;
RF_TARGET inline vec vzero() { return _mm512_setzero_ps(); }
RF_TARGET inline vec vset1(float v) { return _mm512_set1_ps(v); }
RF_TARGET inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
RF_TARGET inline vec vsub(vec a, vec b) { return _mm512_sub_ps(a, b); }
RF_TARGET inline vec vfmadd(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
RF_TARGET inline vec vfnmadd(vec a, vec b, vec c) { return _mm512_fnmadd_ps(a, b, c); }
RF_TARGET inline vec vmax0(vec v) { return _mm512_max_ps(_mm512_setzero_ps(), v); }
RF_TARGET inline vec vload(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
RF_TARGET inline vec vload(const bf16_t* p, Mask m) {
  const __m512i u = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}
RF_TARGET inline void vstore(float* p, vec v, Mask m) { _mm512_mask_storeu_ps(p, m, v); }
RF_TARGET inline void vstore(bf16_t* p, vec v, Mask m) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(r));  // each value < 2^16: the truncation is exact
}
#endif

// The lanes of the channels c0 .. c0 + RF_LANES - 1 that exist among n.
inline Mask lanes(int64_t n, int64_t c0) {
  const int64_t left = n - c0;
  return static_cast<Mask>(left >= RF_LANES ? (1u << RF_LANES) - 1 : (1u << left) - 1);
}

// The 1-D transforms of F(m, 3) on RF_LANES channels at a time: input r = B^T d (Alpha values), output o = A^T m
// (M values). Applied to columns then rows they give the 2-D transforms B^T d B and A^T m A.
template <int M>
struct Transform;

template <>
struct Transform<2> {  // F(2, 3): points 0, 1, -1, inf
  static constexpr int kAlpha = 4;
  RF_TARGET static inline void input(const vec* d, vec* r) {
    r[0] = vsub(d[0], d[2]);
    r[1] = vadd(d[1], d[2]);
    r[2] = vsub(d[2], d[1]);
    r[3] = vsub(d[1], d[3]);
  }
  RF_TARGET static inline void output(const vec* m, vec* o) {
    o[0] = vadd(vadd(m[0], m[1]), m[2]);
    o[1] = vsub(vsub(m[1], m[2]), m[3]);
  }
};

template <>
struct Transform<4> {  // F(4, 3): points 0, 1, -1, 2, -2, inf
  static constexpr int kAlpha = 6;
  RF_TARGET static inline void input(const vec* d, vec* r) {
    const vec four = vset1(4.f), mfive = vset1(-5.f), two = vset1(2.f);
    const vec s12 = vadd(d[1], d[2]), s34 = vadd(d[3], d[4]);
    const vec d12 = vsub(d[1], d[2]), d43 = vsub(d[4], d[3]);
    const vec d42 = vsub(d[4], d[2]), d31 = vsub(d[3], d[1]);
    r[0] = vfmadd(four, d[0], vfmadd(mfive, d[2], d[4]));  // 4 d0 - 5 d2 + d4
    r[1] = vfnmadd(four, s12, s34);                        // (d3 + d4) - 4 (d1 + d2)
    r[2] = vfmadd(four, d12, d43);                         // (d4 - d3) + 4 (d1 - d2)
    r[3] = vfmadd(two, d31, d42);                          // (d4 - d2) + 2 (d3 - d1)
    r[4] = vfnmadd(two, d31, d42);                         // (d4 - d2) - 2 (d3 - d1)
    r[5] = vfmadd(four, d[1], vfmadd(mfive, d[3], d[5]));  // 4 d1 - 5 d3 + d5
  }
  RF_TARGET static inline void output(const vec* m, vec* o) {
    const vec two = vset1(2.f), four = vset1(4.f), eight = vset1(8.f);
    const vec a = vadd(m[1], m[2]), b = vsub(m[1], m[2]);
    const vec c = vadd(m[3], m[4]), d = vsub(m[3], m[4]);
    o[0] = vadd(vadd(m[0], a), c);          // m0 + m1 + m2 + m3 + m4
    o[1] = vfmadd(two, d, b);               // (m1 - m2) + 2 (m3 - m4)
    o[2] = vfmadd(four, c, a);              // (m1 + m2) + 4 (m3 + m4)
    o[3] = vadd(vfmadd(eight, d, b), m[5]); // (m1 - m2) + 8 (m3 - m4) + m5
  }
};

// V[p][i][:] = (B^T d B)[p] for RF_LANES channels of one tile, d[a][b] the patch's pixels (zero outside the image).
template <int M, typename VT>
RF_TARGET inline void transform_patch(const vec (&d)[Transform<M>::kAlpha][Transform<M>::kAlpha], VT* v,
                                      int64_t pos_stride, Mask mask) {
  constexpr int A = Transform<M>::kAlpha;
  vec u[A][A], col[A], r[A];
  RF_UNROLL for (int b = 0; b < A; ++b) {  // B^T d, column by column
    RF_UNROLL for (int a = 0; a < A; ++a) col[a] = d[a][b];
    Transform<M>::input(col, r);
    RF_UNROLL for (int a = 0; a < A; ++a) u[a][b] = r[a];
  }
  RF_UNROLL for (int a = 0; a < A; ++a) {  // (B^T d) B, row by row
    Transform<M>::input(u[a], r);
    RF_UNROLL for (int b = 0; b < A; ++b) vstore(v + (a * A + b) * pos_stride, r[b], mask);
  }
}

// V[p][i][:] = (B^T d B)[p] for the tiles t0 .. t0+nt-1 of a block (i = t - t0).
template <int M, typename XT, typename VT>
RF_TARGET void input_transform(const XT* x, const Geometry& g, int64_t t0, int64_t nt, VT* V) {
  constexpr int A = Transform<M>::kAlpha;
  const int64_t C = g.c, T = g.block, row = g.w * C;
  const vec zero = vzero();
  TileCursor cur(g, t0);
  for (int64_t i = 0; i < nt; ++i, cur.next(g)) {
    const int64_t ih0 = cur.th * M - 1, iw0 = cur.tw * M - 1;
    VT* v = V + i * C;
    vec d[A][A];
    if (ih0 >= 0 && ih0 + A <= g.h && iw0 >= 0 && iw0 + A <= g.w) {  // interior: no bounds checks
      const XT* p = x + ((cur.n * g.h + ih0) * g.w + iw0) * C;
      for (int64_t c0 = 0; c0 < C; c0 += RF_LANES) {
        const Mask m = lanes(C, c0);
        RF_UNROLL for (int a = 0; a < A; ++a)
          RF_UNROLL for (int b = 0; b < A; ++b) d[a][b] = vload(p + a * row + b * C + c0, m);
        transform_patch<M>(d, v + c0, T * C, m);
      }
      continue;
    }
    const XT* px[A][A];
    for (int a = 0; a < A; ++a) {
      for (int b = 0; b < A; ++b) {
        const int64_t ih = ih0 + a, iw = iw0 + b;
        px[a][b] = (ih >= 0 && ih < g.h && iw >= 0 && iw < g.w) ? x + ((cur.n * g.h + ih) * g.w + iw) * C : nullptr;
      }
    }
    for (int64_t c0 = 0; c0 < C; c0 += RF_LANES) {
      const Mask m = lanes(C, c0);
      RF_UNROLL for (int a = 0; a < A; ++a)
        RF_UNROLL for (int b = 0; b < A; ++b) d[a][b] = px[a][b] ? vload(px[a][b] + c0, m) : zero;
      transform_patch<M>(d, v + c0, T * C, m);
    }
  }
}

// The shortcut's channels k0 .. k0 + n - 1 (n = the mask's lanes) at output pixel (n, oh, ow).
// k: the output's channels; ke: the end of the channels being written.
template <int64_t Mode, typename XT>
RF_TARGET inline vec load_shortcut(const Shortcut<XT>& s, int64_t n, int64_t oh, int64_t ow, int64_t h, int64_t w,
                                   int64_t k, int64_t ke, int64_t k0, Mask m) {
  if constexpr (Mode == kIdentity) {
    return vload(s.r + ((n * h + oh) * w + ow) * k + k0, m);
  } else {  // option A: channel j of y reads channel j - pad_front of r (zero outside [0, rc))
    const XT* p = s.r + ((n * s.rh + oh * s.stride) * s.rw + ow * s.stride) * s.rc;
    const int64_t j0 = k0 - s.pad_front, count = std::min<int64_t>(RF_LANES, ke - k0);
    if (j0 >= 0 && j0 + count <= s.rc) return vload(p + j0, m);
    if (j0 + count <= 0 || j0 >= s.rc) return vzero();
    alignas(64) float tmp[RF_LANES] = {};
    for (int q = 0; q < count; ++q) tmp[q] = (j0 + q >= 0 && j0 + q < s.rc) ? to_float(p[j0 + q]) : 0.f;
    return vload(tmp, m);
  }
}

// out[tile] = relu?(A^T M A + bias + shortcut) for the tiles t0 .. t0+nt-1 of a block, output channels kb .. ke - 1
// (M holds those: ke - kb columns).
template <int M, int64_t Mode, bool Relu, typename XT>
RF_TARGET void output_transform(const float* Mt, const Geometry& g, int64_t t0, int64_t nt, int64_t kb, int64_t ke,
                                const float* bias, const Shortcut<XT>& s, XT* out) {
  constexpr int A = Transform<M>::kAlpha;
  const int64_t K = g.k, T = g.block, KC = ke - kb;
  TileCursor cur(g, t0);
  for (int64_t i = 0; i < nt; ++i, cur.next(g)) {
    const int64_t oh0 = cur.th * M, ow0 = cur.tw * M, n = cur.n;
    const int rows = static_cast<int>(std::min<int64_t>(M, g.h - oh0));
    const int cols = static_cast<int>(std::min<int64_t>(M, g.w - ow0));
    for (int64_t k0 = kb; k0 < ke; k0 += RF_LANES) {
      const Mask m = lanes(ke, k0);
      vec sa[M][A], col[A], o[M];
      RF_UNROLL for (int b = 0; b < A; ++b) {  // A^T m, column by column
        RF_UNROLL for (int a = 0; a < A; ++a) col[a] = vload(Mt + ((a * A + b) * T + i) * KC + k0 - kb, m);
        Transform<M>::output(col, o);
        RF_UNROLL for (int a = 0; a < M; ++a) sa[a][b] = o[a];
      }
      const vec bv = bias ? vload(bias + k0, m) : vzero();
      for (int a = 0; a < rows; ++a) {
        const int64_t oh = oh0 + a;
        vec y[M];  // (A^T m) A, row a
        Transform<M>::output(sa[a], y);
        for (int b = 0; b < cols; ++b) {
          const int64_t ow = ow0 + b;
          vec v = vadd(y[b], bv);
          if constexpr (Mode != kNone) v = vadd(v, load_shortcut<Mode>(s, n, oh, ow, g.h, g.w, K, ke, k0, m));
          if constexpr (Relu) v = vmax0(v);
          vstore(out + ((n * g.h + oh) * g.w + ow) * K + k0, v, m);
        }
      }
    }
  }
}

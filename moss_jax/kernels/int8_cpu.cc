// int8 x int8 -> int32 "NT" dot for XLA:CPU through the XLA FFI: y[m, n] = sum_k x[m, k] * w[n, k].
//
// Built by moss_jax/kernels/int8_cpu.py with g++ at first use. The few-row W8A8 matmuls of
// decoding (moss_jax/quant.py, "int8_dynamic") stream each weight once from memory; XLA hands
// the same dot to YNNPACK, which repacks the weight on every call (docs/performance.md).
//
// AVX512-VNNI path: vpdpbusd multiplies unsigned by signed bytes, so the activations are offset
// to x + 128 (as uint8) and 128 * sum_k w[n, k] (accumulated with the same instruction against a
// vector of ones) is subtracted at the end. Integer adds wrap, so the result is the plain sum
// modulo 2^32, as XLA's int32 dot computes it: the same bits for every input (and the true sum
// while K < 2^17). Weight rows stream with software prefetch. The portable path (no AVX512-VNNI
// at run time) is a plain loop.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kMaxMB = 8;  // activation rows per micro-kernel
// Software prefetch distance: the hardware prefetcher alone reached ~25 of ~40 GB/s on one core.
constexpr int64_t kPrefetchBytes = 4096;

void DotPortable(const int8_t* x, const int8_t* w, int32_t* y, int64_t m, int64_t n_begin, int64_t n_end,
                 int64_t n, int64_t k) {
  for (int64_t j = n_begin; j < n_end; ++j) {
    const int8_t* wj = w + j * k;
    for (int64_t i = 0; i < m; ++i) {
      const int8_t* xi = x + i * k;
      // Unsigned adds wrap (signed overflow would be undefined behaviour), giving the sum modulo
      // 2^32 as XLA's int32 dot does; each product (|p| <= 2^14) fits an int32 exactly.
      uint32_t acc = 0;
      for (int64_t t = 0; t < k; ++t) acc += uint32_t(int32_t(xi[t]) * int32_t(wj[t]));
      y[i * n + j] = int32_t(acc);  // modular conversion (guaranteed by GCC/Clang, and C++20)
    }
  }
}

#define MOSS_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

MOSS_VNNI inline __m256i Half(__m512i v) {
  return _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
}

// The 16 lanes' sum modulo 2^32 (GCC's _mm512_reduce_add_epi32 ends in a signed scalar add, whose
// overflow is undefined behaviour; the vector adds here wrap).
MOSS_VNNI inline uint32_t SumLanes(__m512i v) {
  const __m256i h = Half(v);
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return uint32_t(_mm_cvtsi128_si32(s));
}

// Sums of four 16-lane vectors as one 4-lane vector [sum(a), sum(b), sum(c), sum(d)].
MOSS_VNNI inline __m128i Reduce4(__m512i a, __m512i b, __m512i c, __m512i d) {
  __m256i ab = _mm256_hadd_epi32(Half(a), Half(b));
  __m256i cd = _mm256_hadd_epi32(Half(c), Half(d));
  __m256i abcd = _mm256_hadd_epi32(ab, cd);
  return _mm_add_epi32(_mm256_castsi256_si128(abcd), _mm256_extracti128_si256(abcd, 1));
}

// MB activation rows (offset to uint8) against NB consecutive weight rows starting at row j.
template <int MB, int NB>
MOSS_VNNI inline void MicroVnni(const uint8_t* xu, const int8_t* w, int32_t* y, int64_t j, int64_t n, int64_t k) {
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i acc[MB][NB];
  __m512i wsum[NB];
  for (int b = 0; b < NB; ++b) {
    wsum[b] = _mm512_setzero_si512();
    for (int a = 0; a < MB; ++a) acc[a][b] = _mm512_setzero_si512();
  }
  const int8_t* wj = w + j * k;
  const int64_t k64 = k & ~int64_t{63};
  const __mmask64 tail = (~0ULL) >> (64 - (k - k64 == 0 ? 64 : k - k64));
  if constexpr (MB <= 4) {
    // Few rows: row by row, so the weight is read in address order.
    for (int b = 0; b < NB; ++b) {
      const int8_t* wb = wj + b * k;
      for (int64_t t = 0; t < k64; t += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(wb + t + kPrefetchBytes), _MM_HINT_T0);
        const __m512i wv = _mm512_loadu_si512(wb + t);
        wsum[b] = _mm512_dpbusd_epi32(wsum[b], ones, wv);
        for (int a = 0; a < MB; ++a) {
          acc[a][b] = _mm512_dpbusd_epi32(acc[a][b], _mm512_loadu_si512(xu + a * k + t), wv);
        }
      }
    }
  } else {
    // More rows: the NB rows side by side, so each activation load serves NB products.
    for (int64_t t = 0; t < k64; t += 64) {
      __m512i wv[NB];
      for (int b = 0; b < NB; ++b) {
        _mm_prefetch(reinterpret_cast<const char*>(wj + b * k + t + kPrefetchBytes), _MM_HINT_T0);
        wv[b] = _mm512_loadu_si512(wj + b * k + t);
      }
      for (int a = 0; a < MB; ++a) {
        const __m512i xv = _mm512_loadu_si512(xu + a * k + t);
        for (int b = 0; b < NB; ++b) acc[a][b] = _mm512_dpbusd_epi32(acc[a][b], xv, wv[b]);
      }
      for (int b = 0; b < NB; ++b) wsum[b] = _mm512_dpbusd_epi32(wsum[b], ones, wv[b]);
    }
  }
  if (k64 < k) {  // zeros in both operands of the tail add nothing
    for (int b = 0; b < NB; ++b) {
      const __m512i wv = _mm512_maskz_loadu_epi8(tail, wj + b * k + k64);
      wsum[b] = _mm512_dpbusd_epi32(wsum[b], ones, wv);
      for (int a = 0; a < MB; ++a) {
        acc[a][b] = _mm512_dpbusd_epi32(acc[a][b], _mm512_maskz_loadu_epi8(tail, xu + a * k + k64), wv);
      }
    }
  }
  if constexpr (NB == 4 || NB == 2) {
    const __m512i z = _mm512_setzero_si512();
    const __m128i ws = NB == 4 ? Reduce4(wsum[0], wsum[1], wsum[2], wsum[3]) : Reduce4(wsum[0], wsum[1], z, z);
    const __m128i offset = _mm_slli_epi32(ws, 7);
    for (int a = 0; a < MB; ++a) {
      const __m128i r =
          NB == 4 ? Reduce4(acc[a][0], acc[a][1], acc[a][2], acc[a][3]) : Reduce4(acc[a][0], acc[a][1], z, z);
      const __m128i s = _mm_sub_epi32(r, offset);
      if constexpr (NB == 4) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(y + a * n + j), s);
      } else {
        _mm_storel_epi64(reinterpret_cast<__m128i*>(y + a * n + j), s);
      }
    }
  } else {
    for (int b = 0; b < NB; ++b) {
      // In uint32, as in DotPortable: 128 * sum(w) and the difference may wrap.
      const uint32_t offset = SumLanes(wsum[b]) * 128u;
      for (int a = 0; a < MB; ++a) y[a * n + j + b] = int32_t(SumLanes(acc[a][b]) - offset);
    }
  }
}

template <int MB>
MOSS_VNNI void RowsVnni(const uint8_t* xu, const int8_t* w, int32_t* y, int64_t n_begin, int64_t n_end, int64_t n,
                        int64_t k) {
  // Accumulators: MB x NB plus NB weight sums, within the 32 vector registers.
  constexpr int NB = MB <= 4 ? 4 : 2;
  int64_t j = n_begin;
  for (; j + NB <= n_end; j += NB) MicroVnni<MB, NB>(xu, w, y, j, n, k);
  for (; j < n_end; ++j) MicroVnni<MB, 1>(xu, w, y, j, n, k);
}

// Output columns [n_begin, n_end) for all m rows; `xu` holds x + 128 as uint8.
MOSS_VNNI void DotVnni(const uint8_t* xu, const int8_t* w, int32_t* y, int64_t m, int64_t n_begin, int64_t n_end,
                       int64_t n, int64_t k) {
  // For m > kMaxMB a block of weight rows is read from memory once and again from L2 per
  // further block of activation rows.
  constexpr int64_t kColBlock = 64;
  for (int64_t jb = n_begin; jb < n_end; jb += kColBlock) {
    const int64_t je = std::min(n_end, jb + kColBlock);
    for (int64_t i = 0; i < m; i += kMaxMB) {
      const uint8_t* xi = xu + i * k;
      int32_t* yi = y + i * n;
      switch (std::min<int64_t>(kMaxMB, m - i)) {
        case 1: RowsVnni<1>(xi, w, yi, jb, je, n, k); break;
        case 2: RowsVnni<2>(xi, w, yi, jb, je, n, k); break;
        case 3: RowsVnni<3>(xi, w, yi, jb, je, n, k); break;
        case 4: RowsVnni<4>(xi, w, yi, jb, je, n, k); break;
        case 5: RowsVnni<5>(xi, w, yi, jb, je, n, k); break;
        case 6: RowsVnni<6>(xi, w, yi, jb, je, n, k); break;
        case 7: RowsVnni<7>(xi, w, yi, jb, je, n, k); break;
        default: RowsVnni<8>(xi, w, yi, jb, je, n, k); break;
      }
    }
  }
}

bool HasVnni() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  return has;
}

ffi::Error Int8DotNT(ffi::Buffer<ffi::S8> x, ffi::Buffer<ffi::S8> w, ffi::ResultBuffer<ffi::S32> y,
                     int64_t use_vnni) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[1]) {
    return ffi::Error::InvalidArgument("moss_int8_dot_nt: need x [M, K] and w [N, K]");
  }
  const int64_t m = xd[0], k = xd[1], n = wd[0];
  const int8_t* xp = x.typed_data();
  const int8_t* wp = w.typed_data();
  int32_t* yp = y->typed_data();
  if (!(use_vnni && HasVnni())) {
    DotPortable(xp, wp, yp, m, 0, n, n, k);
    return ffi::Error::Success();
  }
  thread_local std::vector<uint8_t> xu;
  xu.resize(m * k);
  for (int64_t t = 0; t < m * k; ++t) xu[t] = uint8_t(xp[t]) ^ 0x80;  // x + 128
  DotVnni(xu.data(), wp, yp, m, 0, n, n, k);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MossInt8DotNT, Int8DotNT,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("use_vnni"));

extern "C" int moss_int8_has_vnni() { return HasVnni() ? 1 : 0; }

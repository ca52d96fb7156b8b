// Attention over many problems at once on the CPU, each query row attending one span of key rows
// (row r at position p = r + row_shift: keys a + first .. a + last, anchored at a = p /
// rows_per_step * keys_per_step, so at p itself where both are 1; causal: none past p): a stride's
// classes (causal squares of a few hundred rows), a sliding window's band, fixed's own blocks (l
// keys anchored at the block's start) and its summary keys (a prefix of the gathered ones that grows
// by c keys every l rows), less, in a union, the keys its window and strides count (`Call::distance`,
// `Call::skip_keys`); span_kernel.py says who calls it.
//
// torch's CPU flash kernel computes such problems 32 or 64 query rows at a time, packing each
// block's keys anew, and reads a class's rows s rows apart from memory. Here each thread takes a
// problem's strip of rows (all its rows where the spans are unbounded): it packs the keys the
// strip sees (transposed) and their values once, in cache, fetches the next strip's rows while it
// computes, and computes a block of query rows at a time (Worker::ROWS) against exactly the keys
// those rows see between them, so a causal square's empty half or a band's outside costs a block's
// triangles only. Scores go through an exact softmax (a block's scores fit in a buffer) in float32,
// whatever the inputs' dtype (float32, float16 or bfloat16). The products are float32 vector
// FMAs (half precision converted as it is packed), except bfloat16's where the CPU has AMX: there
// its tiles multiply the bfloat16 keys and values as they are, exactly (each probability goes to
// the values as two bfloat16, its first 16 bits of mantissa); or, without AMX, where it has
// AVX512_BF16: bfloat16's scores are dot products of its feature pairs, as exact.
//
// Built by span_kernel.py with the host compiler (-O3 -march=native); vectors are GCC's vector
// extensions (16 floats), lowered to whatever the CPU has.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <omp.h>
#include <type_traits>
#if defined(__AVX__)
#include <immintrin.h>
#endif
// bfloat16's products on AMX's tiles where the CPU has them (and the build targets it).
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define SPAN_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#else
#define SPAN_AMX 0
#endif
// Elsewhere bfloat16's scores as dot products of bfloat16 pairs where the CPU has AVX512_BF16
// (vdpbf16ps: per lane two products, exact in float32, added to it as two FMAs would).
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define SPAN_BF16_PAIRS 1
#else
#define SPAN_BF16_PAIRS 0
#endif

namespace {

typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x16_unaligned __attribute__((vector_size(64), aligned(4)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16_unaligned __attribute__((vector_size(32), aligned(2)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));

// Keys packed at a time: their transposed keys and values (512 KB at head dims 64) stay in a core's
// L2 with the strip's rows. Rectangles of 4096 rows by 4096 keys, H = 8, D = 64, computed 0.63
// pairs per ns with the keys packed whole, 0.86 in chunks of 1024 (0.85-0.87 from 512 to 2048
// keys whole); chunks of 512 and 2048 were within 1% of 1024 at n = 16384 (strided, the band, the
// union, fixed), and 2048 4.5% slower for fixed(128, 8) at 65536.
constexpr int64_t KEY_CHUNK = 1024;
// A strip of up to this many rows (a decode step's row, a short run's few, a key/value head's query
// heads folded into rows) reads its keys and values where they lie, unpacked (`row_scores`): for
// so few rows packing the keys costs more than their products. After 16384 keys, H = 8, D = 64,
// through engine.attention, against packed blocks: 2 rows 0.76-0.79 of the time
// (sliding_window(256), fixed(128, 8)), 4 rows 0.83-0.93. Since 2026-12-07 the strip's rows share
// each key's read: through engine.attention against a row at a time (d1ccb5e), a decode step of
// H = 32 over 8 key/value heads (its 4 query heads folded into rows), D = 128, after 4096 keys:
// dense 0.65 of the time in float32, 0.71 in bfloat16 (the other paper patterns, a row a problem:
// 0.94-1.03); 4 rows after 4096 keys, H = 8, D = 64: dense 0.76-0.77, the others 0.91-1.02; 2 rows
// of dense after 16384 0.84-0.94; one row 0.99-1.03. Up to 8 rows since 2026-12-08, where a strip
// of more than 4 (LONE_ROWS / 2) sees LONE_MIN_KEYS keys (their sums 2 vectors a row at a time, in
// registers), against packed blocks, through engine.attention, H = 8, D = 64, 5 and 8 rows: dense
// in float32 after 65536 keys 0.75-0.79, after 4096 0.65-0.88; fixed(128, 8) after 65536 0.68-0.93;
// H = 32 over 8, D = 128, 2 rows of dense (8 folded) 0.74-0.85, in bfloat16 0.81-0.95; the band,
// strided and the union 0.88-1.04; but bfloat16's dense rows after 4096 keys (in cache, where its
// packed pairs need no sums across lanes) 1.06-1.10, after 65536 0.93-1.01.
constexpr int64_t LONE_ROWS = 8;
// The fewest keys a strip of more than 4 rows sees to go lone: fewer (a stride's classes of 8 rows
// at n = 4096, each over up to 8 keys: lone, 1.25 of the packed blocks' time in float32 and 1.14 in
// bfloat16) stay packed; from 32 to 512 alike.
constexpr int64_t LONE_MIN_KEYS = 128;
// Keys in groups apart (fixed's summary keys, read in place: c rows of every l, each group pages
// from the last, where the hardware's prefetcher stops) and their values are fetched this many
// rows before a lone strip scores them (`Ahead`). Against none (the AMD EPYC, 2026-12-07, one
// process, the builds taking turns), one row of fixed(128, 8), each call the next of 8 layers'
// caches as a model's decode step reads them (from memory): H = 8, D = 64, after 32768 / 65536
// keys, bfloat16 0.64-0.70 / 0.76-0.77 of the time, float32 0.76-0.77 / 0.76-0.78; H = 32 over 8,
// D = 128, bfloat16, after 32768 0.62-0.64; H = 8 over 2 0.65; union(sliding 256, fixed(128, 8))
// 0.73-0.75; after 8192 0.95-1.05.
// One layer's caches called again and again, its summary keys found in the L3 cache: 0.76-1.15
// after 32768-65536 keys in bfloat16 (the fetches' instructions), 0.53-0.57 after 131072. Prefills
// and other patterns unchanged. 32 and 64 rows ahead within 3% of each other, 16 and 128 no better.
// Tried and left out: fetching contiguous keys ahead (sliding_window(1024), one row: 1.13-1.22),
// rows a page or more apart (a stride's class: 64 rows of strided(64) after 65536 keys 0.44-0.79,
// one row 1.05-1.25). Packed strips' keys were left out too (16 rows of fixed 0.86-0.95, but the
// code it added to `strip` changed what the compiler inlines there, as row_scores says) until
// `pack` went out of line (2026-12-08): every packed key and value row fetched this many rows
// ahead, against none, through engine.attention, H = 8, D = 64, dense after 4096 / 65536 keys,
// 16 rows 0.74-0.75 / 0.74-0.87, 32 rows 0.79-0.97 / 0.84-0.89, 64 rows 0.87-0.94 / 0.91-0.93
// (float32 and bfloat16); fixed(128, 8) after 65536 keys 0.79-0.98; H = 32 over 8, D = 128, dense,
// 4 rows (16 folded) 0.77-0.88, 16 rows 0.91-0.93; prefills (n = 4096 and 16384) and the band's
// short runs 0.94-1.05, that is unchanged; 64 rows ahead alike.
constexpr int64_t FAR_AHEAD = 32;
constexpr int LANES = 16;
constexpr float LOG2E = 1.4426950408889634f;

enum Dtype { FLOAT32 = 0, FLOAT16 = 1, BFLOAT16 = 2 };

inline f32x16 splat(float x) { return f32x16{} + x; }
inline f32x16 load(const float *p) { return *(const f32x16_unaligned *)p; }
inline void store(float *p, f32x16 x) { *(f32x16_unaligned *)p = x; }

// 16 elements of a dtype as float32, and back (rounded to nearest even).
template <int D> struct Elements;
template <> struct Elements<FLOAT32> {
  typedef float type;
  static f32x16 load16(const float *p) { return load(p); }
  static void store16(float *p, f32x16 x) { store(p, x); }
};
template <> struct Elements<FLOAT16> {
  typedef uint16_t type;
  static f32x16 load16(const uint16_t *p) {
#if defined(__AVX512F__)
    __m512 x = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
    return (f32x16)x;
#else
    f32x16 x;
    for (int i = 0; i < LANES; i++) { _Float16 h; memcpy(&h, p + i, 2); x[i] = (float)h; }
    return x;
#endif
  }
  static u16x16 narrow(f32x16 x) {
#if defined(__AVX512F__)
    return (u16x16)_mm512_cvtps_ph((__m512)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
    _Float16 halves[LANES];
    for (int i = 0; i < LANES; i++) halves[i] = (_Float16)x[i];
    u16x16 bits;
    memcpy(&bits, halves, sizeof bits);
    return bits;
#endif
  }
  static void store16(uint16_t *p, f32x16 x) { *(u16x16_unaligned *)p = narrow(x); }
};
template <> struct Elements<BFLOAT16> {
  typedef uint16_t type;
  static f32x16 load16(const uint16_t *p) {
#if defined(__AVX512F__)
    return (f32x16)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
#else
    u32x16 bits = __builtin_convertvector(*(const u16x16_unaligned *)p, u32x16) << 16;
    return (f32x16)bits;
#endif
  }
  static u16x16 narrow(f32x16 x) {
#if defined(__AVX512BF16__)
    return (u16x16)_mm512_cvtneps_pbh((__m512)x);  // denormals flushed to 0
#else
    u32x16 bits = (u32x16)x;
    bits = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    bits = x != x ? u32x16{} + 0x7fc0u : bits;  // NaN stays NaN (rounding could carry it to -0)
    return __builtin_convertvector(bits, u16x16);
#endif
  }
  static void store16(uint16_t *p, f32x16 x) { *(u16x16_unaligned *)p = narrow(x); }
};

// Elements<D>::store16 as a non-temporal store, past the caches, where the CPU has one for the
// vector (p aligned to its 16 elements): written once, not read back.
template <int D> inline void stream16(typename Elements<D>::type *p, f32x16 x) {
  if constexpr (D == FLOAT32) {
#if defined(__AVX512F__)
    _mm512_stream_ps(p, (__m512)x);
#else
    store(p, x);
#endif
  } else {
#if defined(__AVX__)
    _mm256_stream_si256((__m256i *)p, (__m256i)Elements<D>::narrow(x));
#else
    Elements<D>::store16(p, x);
#endif
  }
}

// Features d .. d + 15 of a row holding `count` of them as float32, zeros past its end, and x
// written there up to it: the last few of a head dim that is not a multiple of 16 with masked
// loads and stores where the CPU has them for the vector (AVX512BW and VL for 16-bit elements),
// else through a buffer of 16. WHOLE: count is a multiple of 16, and no branch is taken (in the hot
// loops a branch cost a prefill 2-4% and a decode step of fixed(128, 8) 19%).
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define SPAN_MASKED_ROWS 1
#else
#define SPAN_MASKED_ROWS 0
#endif
template <int D> inline f32x16 read_part(const typename Elements<D>::type *p, int64_t count) {
  typename Elements<D>::type part[LANES] = {};
#if SPAN_MASKED_ROWS
  const __mmask16 lanes = (__mmask16)((1u << count) - 1);
  if constexpr (D == FLOAT32) return (f32x16)_mm512_maskz_loadu_ps(lanes, p);
  else _mm256_storeu_si256((__m256i *)part, _mm256_maskz_loadu_epi16(lanes, p));
#else
  memcpy(part, p, count * sizeof part[0]);
#endif
  return Elements<D>::load16(part);
}
template <int D> inline void write_part(typename Elements<D>::type *p, int64_t count, f32x16 x) {
#if SPAN_MASKED_ROWS
  const __mmask16 lanes = (__mmask16)((1u << count) - 1);
  if constexpr (D == FLOAT32) _mm512_mask_storeu_ps(p, lanes, (__m512)x);
  else _mm256_mask_storeu_epi16(p, lanes, (__m256i)Elements<D>::narrow(x));
#else
  typename Elements<D>::type part[LANES];
  Elements<D>::store16(part, x);
  memcpy(p, part, count * sizeof part[0]);
#endif
}
template <int D, bool WHOLE = false>
inline f32x16 read16(const typename Elements<D>::type *row, int64_t d, int64_t count) {
  return WHOLE || d + LANES <= count ? Elements<D>::load16(row + d) : read_part<D>(row + d, count - d);
}
template <int D, bool WHOLE = false>
inline void write16(typename Elements<D>::type *row, int64_t d, int64_t count, f32x16 x) {
  if (WHOLE || d + LANES <= count) Elements<D>::store16(row + d, x);
  else write_part<D>(row + d, count - d, x);
}

// 2^x for x <= 0 (a score less the row's largest), to about one float32 ulp: 2^round(x) times a
// degree-6 polynomial of the rest (|r| <= 1/2). With AVX-512 the rounding and the scaling by
// 2^round(x) are one instruction each (vrndscaleps, vscalefps); else below 2^-126 it stays 2^-126
// (nothing is lost: a row's largest term is 1).
inline f32x16 exp2_nonpositive(f32x16 x) {
#if defined(__AVX512F__)
  f32x16 n = (f32x16)_mm512_roundscale_ps((__m512)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  x = x < splat(-126.f) ? splat(-126.f) : x;
  f32x16 n = (x + 12582912.0f) - 12582912.0f;  // round to nearest
#endif
  f32x16 r = x - n;
  f32x16 p = splat(1.5461444724808513e-04f);  // 2^r interpolated at Chebyshev nodes: 1.1e-7 off at most
  p = p * r + 1.3400428177711937e-03f;
  p = p * r + 9.61805667843204e-03f;
  p = p * r + 5.550327226669895e-02f;
  p = p * r + 2.4022650922289554e-01f;
  p = p * r + 6.931472067028329e-01f;
  p = p * r + 1.0f;
#if defined(__AVX512F__)
  return (f32x16)_mm512_scalef_ps((__m512)p, (__m512)n);
#else
  i32x16 scale = (__builtin_convertvector(n, i32x16) + 127) << 23;
  return p * (f32x16)scale;
#endif
}

// The largest and the sum of a vector's lanes: halves folded onto each other.
inline f32x16 fold(f32x16 x, int half) {
  constexpr i32x16 by8 = {8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7};
  constexpr i32x16 by4 = {4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11};
  constexpr i32x16 by2 = {2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13};
  constexpr i32x16 by1 = {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14};
  return half == 8 ? __builtin_shuffle(x, by8) : half == 4 ? __builtin_shuffle(x, by4)
         : half == 2 ? __builtin_shuffle(x, by2) : __builtin_shuffle(x, by1);
}

inline float lanes_max(f32x16 x) {
  for (int half = 8; half >= 1; half /= 2) {
    f32x16 y = fold(x, half);
    x = y > x ? y : x;
  }
  return x[0];
}

inline float lanes_sum(f32x16 x) {
  for (int half = 8; half >= 1; half /= 2) x += fold(x, half);
  return x[0];
}

// Swap the off-diagonal B x B blocks of each 2B x 2B block of a 16 x 16 tile (rows in registers):
// B = 8, 4, 2, 1 in turn transposes it. SUM: each pair's two halves added into the first row
// instead (rows 0 .. 2B - 1 live): in turn they sum each row's lanes into its lane of row 0.
template <int B, bool SUM = false> inline void swap_blocks(f32x16 *m) {
  constexpr i32x16 lower = {
#define LOWER(c) (((c) & B) ? 16 + (c) - B : (c))
      LOWER(0), LOWER(1), LOWER(2), LOWER(3), LOWER(4), LOWER(5), LOWER(6), LOWER(7),
      LOWER(8), LOWER(9), LOWER(10), LOWER(11), LOWER(12), LOWER(13), LOWER(14), LOWER(15)};
#undef LOWER
  constexpr i32x16 upper = {
#define UPPER(c) (((c) & B) ? 16 + (c) : (c) + B)
      UPPER(0), UPPER(1), UPPER(2), UPPER(3), UPPER(4), UPPER(5), UPPER(6), UPPER(7),
      UPPER(8), UPPER(9), UPPER(10), UPPER(11), UPPER(12), UPPER(13), UPPER(14), UPPER(15)};
#undef UPPER
#pragma GCC unroll 16
  for (int r = 0; r < (SUM ? B : 16); r++) {
    if (r & B) continue;
    f32x16 a = m[r], b = m[r + B];
    f32x16 low = __builtin_shuffle(a, b, lower), high = __builtin_shuffle(a, b, upper);
    if constexpr (SUM) {
      m[r] = low + high;
    } else {
      m[r] = low;
      m[r + B] = high;
    }
  }
}

inline void transpose16(f32x16 *m) {
  swap_blocks<8>(m);
  swap_blocks<4>(m);
  swap_blocks<2>(m);
  swap_blocks<1>(m);
}

// Lane r: the sum of m[r]'s lanes (m overwritten): 30 shuffles and 15 additions for 16 sums. Always
// inlined: called, m lives in memory, not in registers (a lone row's keys took 1.1x the time).
__attribute__((always_inline)) inline f32x16 lane_sums(f32x16 *m) {
  swap_blocks<8, true>(m);
  swap_blocks<4, true>(m);
  swap_blocks<2, true>(m);
  swap_blocks<1, true>(m);
  return m[0];
}

#if SPAN_AMX
// Linux gives a process AMX's tile registers once it asks (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA); where it refuses, bfloat16 is computed in float32 vectors.
bool amx_permitted() {
  static const bool permitted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return permitted;
}

// Tiles 0-5 as the products use them, rows of 64 bytes (16 floats, or 32 bfloat16 in pairs): the
// block's `rows` in the scores and outputs (0, 1) and in the queries and probabilities (2, 5), 16
// in the keys and values (3, 4).
void configure_tiles(int rows) {
  struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t columns_bytes[16];
    uint8_t rows[16];
  } __attribute__((aligned(64))) config = {};
  config.palette = 1;
  for (int t = 0; t < 6; t++) {
    config.columns_bytes[t] = 64;
    config.rows[t] = t == 3 || t == 4 ? 16 : rows;
  }
  _tile_loadconfig(&config);
}
#endif

inline int64_t clamp(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : x > hi ? hi : x; }

// What a row's own work costs beside its keys' (its softmax's fixed part, its output), as keys:
// the share a thread takes (`thread_units`) counts it.
constexpr double ROW_WORK_KEYS = 16.0;

struct Call {
  const void *q, *k, *v;
  void *out;
  float *lse;
  const void *seed_out;  // a partial over other keys that the rows continue (in seed_dtype), or null
  const float *seed_lse;
  int seed_dtype;
  // Problem (i, c) for i < n, c < classes reads keys and values of problem (i / n_group,
  // c / class_group). Strides in elements: [i, c, row] (k's and v's: [i, c, row, group]).
  // Head dims: q's and k's `features` and v's `v_features` as they hold them; dim and v_dim those
  // rounded up to a multiple of 16, as the buffers hold them packed (zeros past the features).
  int64_t n, classes, n_group, class_group, q_rows, k_rows, features, v_features, first, last, strip_rows;
  int64_t dim, v_dim;
  int64_t row_shift, rows_per_step, keys_per_step, causal;
  // Key rows come in groups of key_group rows, each group at its own stride: k_stride[3] and
  // v_stride[3] (fixed's summary keys, c rows of every l, read in place; one group elsewhere).
  int64_t key_group;
  // Key t's position: t / key_group * group_span + group_first + t % key_group (t itself in one
  // group). A causal row at position p sees none past p - distance (a union's window takes the
  // nearer ones; without causality none at |p - position| < distance, on both sides), and none at
  // p - position = 0 mod any of the skip_count strides in `skips` (a union's strides count those).
  int64_t group_span, group_first, distance, skip_count;
  const int64_t *skips;
  // The keys each row attends, shared by every problem (row r's key t where mask[r * mask_stride + t]
  // is not 0: the masked plan's rule), or null: all of its span.
  const uint8_t *mask;
  int64_t mask_stride;
  bool stream_out;  // results written past the caches (`add_block`)
  int64_t q_stride[3], k_stride[4], v_stride[4], out_stride[3], lse_stride[3], seed_out_stride[3], seed_lse_stride[3];
  float scale;
  int64_t key_lo, key_hi;  // the key rows the rows may see: all, or a part (`Split`)
  // A part's rows: their largest score written as their lse and their sum of exponentials here,
  // laid out as lse (kept apart, huge scores merge exactly: their lse would lose log(sum)); else null.
  float *sums;

  int64_t anchor(int64_t row) const { return (row + row_shift) / rows_per_step * keys_per_step; }
  int64_t keys_from(int64_t row) const { return clamp(anchor(row) + first, key_lo, key_hi); }
  int64_t keys_to(int64_t row) const {  // past the last
    int64_t to = anchor(row) + last + 1;
    if (causal) {
      const int64_t through = keys_through(row + row_shift - distance);
      if (to > through) to = through;
    }
    return clamp(to, key_lo, key_hi);
  }
  // How many keys lie at positions up to y.
  int64_t keys_through(int64_t y) const {
    if (key_group >= k_rows && group_first == 0) return y + 1;  // key t at t
    const int64_t x = y - group_first;
    if (x < 0) return 0;
    const int64_t in_group = x % group_span + 1;
    return x / group_span * key_group + (in_group < key_group ? in_group : key_group);
  }
  // Whether rows skip keys inside their spans (`skip_keys`): a union's strides' or, without
  // causality, its window's.
  bool skips_keys() const { return skip_count > 0 || (!causal && distance > 0); }
  // The scores s[t - base] of keys t0 <= t < t1 that row r does not attend (`mask`) set to -inf.
  void mask_keys(float *s, int64_t base, int64_t r, int64_t t0, int64_t t1) const {
    const uint8_t *keep = mask + r * mask_stride;
    for (int64_t t = t0; t < t1; t++)
      if (!keep[t]) s[t - base] = -INFINITY;
  }
  // The scores s[t - base] of keys t0 <= t < t1 that the row at position p skips set to -inf: its
  // window's without causality (|p - position| < distance: a run in one group, a run in each of a
  // few groups otherwise); every stride-th key back from p in one group, a few of each group's
  // otherwise (`skips`).
  void skip_keys(float *s, int64_t base, int64_t p, int64_t t0, int64_t t1) const {
    if (!causal && distance > 0) {
      auto below = [](int64_t x, int64_t y) { return x >= 0 ? x / y : -((-x + y - 1) / y); };  // floor(x / y)
      const int64_t near = p - distance + 1 - group_first, past = p + distance - group_first;  // positions less first
      const int64_t end = clamp(below(past - 1, group_span), -1, (t1 - 1) / key_group);  // the last group it meets
      for (int64_t g = clamp(below(near, group_span), t0 / key_group, end + 1); g <= end; g++) {
        const int64_t u0 = clamp(near - g * group_span, 0, key_group), u1 = clamp(past - g * group_span, 0, key_group);
        for (int64_t t = clamp(g * key_group + u0, t0, t1); t < clamp(g * key_group + u1, t0, t1); t++)
          s[t - base] = -INFINITY;
      }
    }
    for (int64_t n = 0; n < skip_count; n++) {
      const int64_t stride = skips[n];
      auto after = [&](int64_t x) { return (x % stride + stride) % stride; };  // x mod stride, in [0, stride)
      if (key_group >= k_rows) {  // key t at group_first + t
        for (int64_t t = t1 - 1 - after(t1 - 1 + group_first - p); t >= t0; t -= stride) s[t - base] = -INFINITY;
        continue;
      }
      const int64_t step = group_span % stride;  // each group's first offset to skip moves back by this
      int64_t g = t0 / key_group, u0 = after(p - g * group_span - group_first);
      for (; g * key_group < t1; g++, u0 = u0 >= step ? u0 - step : u0 + stride - step)
        for (int64_t u = u0; u < key_group; u += stride) {
          const int64_t t = g * key_group + u;
          if (t >= t0 && t < t1) s[t - base] = -INFINITY;
        }
    }
  }
  int64_t strips() const { return (q_rows + strip_rows - 1) / strip_rows; }
  // Key rows j, j + 1, .. in turn: their places in their problem's k or v (`stride`: theirs,
  // k_stride or v_stride), one division for them all (not one a row: a decode step's rows).
  struct KeyRows {
    const int64_t *stride;
    int64_t group, key_group, in_group;
    int64_t next() {
      const int64_t at = group * stride[3] + in_group * stride[2];
      if (++in_group == key_group) in_group = 0, group++;
      return at;
    }
  };
  KeyRows key_rows(int64_t j, const int64_t *stride) const { return {stride, j / key_group, key_group, j % key_group}; }
  // Work item w's work over key rows lo .. hi - 1, in keys: the keys its rows see there (spans
  // change linearly or in steps over a strip, so the average of its first and last rows' stands for
  // its rows') and each row's own work beside them (ROW_WORK_KEYS).
  double work(int64_t w, int64_t lo, int64_t hi) const {
    int64_t r0 = w % strips() * strip_rows, r1 = r0 + strip_rows < q_rows ? r0 + strip_rows : q_rows;
    auto seen = [&](int64_t r) {
      const int64_t from = clamp(keys_from(r), lo, hi), to = clamp(keys_to(r), lo, hi);
      return to > from ? to - from : 0;
    };
    return (r1 - r0) * ((seen(r0) + seen(r1 - 1)) / 2.0 + ROW_WORK_KEYS);
  }
};

// How a call's keys split (`split_keys`): part p of `count` holds key rows (first + p) keys ..
// (first + p + 1) keys - 1, where the rows see any; one part: none. A part's rows write their
// outputs, largest scores and sums into `partials` ([slot][row], rows: the call's, problem after
// problem; part p in slot `slot` + p of `slots`: joined calls' parts follow each other there),
// which `merge_rows` then merges. Null partials: the call writes its rows' results itself.
struct Split {
  int64_t keys, first, count, rows, slot, slots;
  float *partials;

  int64_t key_lo(int64_t p) const { return (first + p) * keys; }
  // Part p of the call: its rows over the part's keys, continuing the seed in part 0 only, written
  // into their place in `partials` (`Call::sums`).
  Call part(const Call &call, int64_t p) const {
    Call part = call;
    part.key_lo = clamp(key_lo(p), 0, call.k_rows);
    part.key_hi = clamp(key_lo(p + 1), 0, call.k_rows);
    part.out = partials + (slot + p) * rows * call.v_features;
    part.lse = partials + slots * rows * call.v_features + (slot + p) * rows;
    part.sums = partials + slots * rows * (call.v_features + 1) + (slot + p) * rows;
    const int64_t out_strides[3] = {call.classes * call.q_rows * call.v_features, call.q_rows * call.v_features,
                                    call.v_features};
    const int64_t lse_strides[3] = {call.classes * call.q_rows, call.q_rows, 1};
    memcpy(part.out_stride, out_strides, sizeof out_strides);
    memcpy(part.lse_stride, lse_strides, sizeof lse_strides);
    part.stream_out = false;
    if (p > 0) part.seed_out = part.seed_lse = nullptr;
    return part;
  }
  // Unit u of the call's work (`thread_units`): item u / count over part u % count's keys.
  int64_t item(int64_t u) const { return u / count; }
};

// A row of `bytes` into the L2 cache (prefetcht1), to be read (WRITE 0) or written (1). Fetched
// into L1 (prefetcht0), where the next strip's rows compete with this strip's packed keys, a
// stride's classes took 1.01-1.20 of the time in float32 (the span kernel alone, H = 8, D = 64,
// n = 4096 .. 16384, strided(64) .. (512); the AMD EPYC, 2026-12-07), bfloat16 0.94-1.03.
template <int WRITE> inline void prefetch_row(const void *row, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch((const char *)row + b, WRITE, 2);
}

// Elements d .. d + 15 of the row of `count` at `offset` of an array in `dtype`, as float32
// (`read16`: a seed's, read once a row).
inline f32x16 read_as(int dtype, const void *base, int64_t offset, int64_t d, int64_t count) {
  switch (dtype) {
    case FLOAT16: return read16<FLOAT16>((const uint16_t *)base + offset, d, count);
    case BFLOAT16: return read16<BFLOAT16>((const uint16_t *)base + offset, d, count);
    default: return read16<FLOAT32>((const float *)base + offset, d, count);
  }
}

// One work item's place: its problem's q, k, v rows, its rows and the keys they see.
template <typename In> struct Item {
  const In *q, *k, *v;
  int64_t i, c, row_begin, row_end, key_begin, key_end;
};

// A call's outputs with rows apart (a stride's classes, s rows apart) are streamed past the caches
// (`add_block`) from this size on, which they outgrow (2 MB of L2 a core here). Against writing
// them through the caches, their lines fetched beforehand: float32, n = 16384, H = 8, D = 64,
// strided(64) 0.94-0.96 of the time, strided(128) 0.86-0.92, the union 0.95-0.98; bfloat16
// 0.95-0.96 (in turn, in one process). Adjacent rows (the band's, fixed's) gained nothing so
// (float32 1.01-1.04, bfloat16 0.95-1.00), and are not streamed; their calls took 1.02-1.04 of
// their time in float32 beside this code all the same, as in a build where it was never taken.
constexpr int64_t STREAM_OUT_BYTES = 1 << 22;

// AMX computes blocks of 8 query rows where a row sees at most this many keys on average (else 16):
// bfloat16, n = 16384, H = 8, D = 64, 8-row blocks' time against 16-row ones' (in turn, in one
// process): sliding_window(128) 0.92, (160) 1.10, (192) 1.11, (224) 1.11, (256) 1.11; strided(128)
// (causal squares of 128 rows: 64 keys a row on average) 0.91, strided(96) (170 rows) 0.94,
// strided(80) (204) 0.98, strided(64) (256) 0.99; the union (sliding 128, strided 128) 0.94;
// fixed(128, 8) 1.07.
constexpr int64_t AMX_SHORT_SPAN_KEYS = 128;

// TILE_ROWS: 0 for float32 vectors, else AMX with blocks of that many rows (8 or 16).
template <int IN, int OUT, int TILE_ROWS> struct Worker {
  typedef typename Elements<IN>::type In;
  typedef typename Elements<OUT>::type Out;
  static constexpr bool AMX = TILE_ROWS > 0;
  static_assert(!AMX || IN == BFLOAT16, "AMX computes bfloat16 only");
  // bfloat16's scores from its pairs of features (SPAN_BF16_PAIRS): keys_t and queries hold them
  // as they are, two to a float's 32 bits, and the products step over half as many.
  static constexpr bool PAIRS = SPAN_BF16_PAIRS && IN == BFLOAT16 && !AMX;
  // Query rows computed together: 8 x 32 scores in 16 vector registers, or an AMX tile's rows.
  static constexpr int ROWS = AMX ? TILE_ROWS : 8;
  static_assert(AMX || LONE_ROWS <= ROWS, "a lone strip's rows fit the buffers' ROWS");
  // Keys a block's products step by: AMX multiplies 32 at a time (a tile's row of bfloat16 pairs),
  // and reads packed keys 16 to a tile, so a block's keys start at a multiple of 16 from its chunk's
  // first (at most roundup(keys, 32) + 16 columns read: the width).
  static constexpr int KEY_STEP = AMX ? 32 : LANES;
  Call a;  // the call, or the part of it that the unit being computed runs over (`run`)
  int64_t width;      // keys a row of the buffers holds: a chunk's, a multiple of KEY_STEP, and 16 more
  int64_t dim_tiles;  // AMX: the head dim in tiles of 32 features (zeros past it)
  float *keys_t, *values, *scores, *queries, *block_out, *acc, *row_top, *row_sum;
  uint16_t *keys_b, *values_b, *queries_b;  // AMX: bfloat16 pairs (below)
  uint16_t *probs_high, *probs_low;  // AMX: the block's probabilities as two bfloat16 (softmax_row)

  // Buffers for items w0 .. w1 - 1 of the call.
  Worker(const Call &call, int64_t w0, int64_t w1) : a(call) {
    int64_t keys = 0;  // the most any of these strips sees in one chunk
    for (int64_t w = w0; w < w1; w++) {
      Item<In> it = item(w);
      keys = it.key_end - it.key_begin > keys ? it.key_end - it.key_begin : keys;
    }
    keys = keys < KEY_CHUNK ? keys : KEY_CHUNK;
    width = (keys + KEY_STEP - 1) / KEY_STEP * KEY_STEP + LANES;
    dim_tiles = (a.dim + 31) / 32;
    // float32 keys and values, or AMX's bfloat16 ones in as many bytes (two per float)
    size_t floats = AMX ? dim_tiles * 32 * width / 2 + width * a.v_dim / 2 + ROWS * dim_tiles * 16 + ROWS * width
                        : a.dim * width + width * a.v_dim + ROWS * a.dim;
    floats += ROWS * width + ROWS * a.v_dim + a.strip_rows * (a.v_dim + 2);
    keys_t = (float *)aligned_alloc(64, (sizeof(float) * floats + 127) / 64 * 64);
    float *next = keys_t;
    if (AMX) {
      keys_b = (uint16_t *)next, next += dim_tiles * 32 * width / 2;
      values_b = (uint16_t *)next, next += width * a.v_dim / 2;
      queries_b = (uint16_t *)next, next += ROWS * dim_tiles * 16;
      probs_high = (uint16_t *)next, next += ROWS * width / 2;
      probs_low = (uint16_t *)next, next += ROWS * width / 2;
    } else {
      next += a.dim * width;  // keys_t
      values = next, next += width * a.v_dim;
      queries = next, next += ROWS * a.dim;
    }
    scores = next, next += ROWS * width;
    block_out = next, next += ROWS * a.v_dim;
    acc = next, next += a.strip_rows * a.v_dim;
    row_top = next, next += a.strip_rows;
    row_sum = next;
  }
  ~Worker() { free(keys_t); }
  bool ok() const { return keys_t != nullptr; }

  Item<In> item(int64_t w) const {
    int64_t strips = a.strips(), p = w / strips, t = w % strips;
    Item<In> it;
    it.i = p / a.classes;
    it.c = p % a.classes;
    int64_t ki = it.i / a.n_group, kc = it.c / a.class_group;
    it.q = (const In *)a.q + it.i * a.q_stride[0] + it.c * a.q_stride[1];
    it.k = (const In *)a.k + ki * a.k_stride[0] + kc * a.k_stride[1];
    it.v = (const In *)a.v + ki * a.v_stride[0] + kc * a.v_stride[1];
    it.row_begin = t * a.strip_rows;
    it.row_end = it.row_begin + a.strip_rows < a.q_rows ? it.row_begin + a.strip_rows : a.q_rows;
    it.key_begin = a.keys_from(it.row_begin);
    it.key_end = a.keys_to(it.row_end - 1);
    if (it.key_end < it.key_begin) it.key_end = it.key_begin;
    return it;
  }

  // Units u0 .. u1 - 1 of the call (`Split::item`), each over its part of the keys where they split,
  // fetching the next item's rows ahead where they do not (a unit's part is one chunk or a few).
  void run(const Call &call, const Split &split, int64_t u0, int64_t u1) {
    const bool whole = a.features == a.dim && a.v_features == a.v_dim;
    for (int64_t u = u0; u < u1; u++) {
      int64_t next = u + 1 < u1 ? u + 1 : -1;
      if (split.partials != nullptr) a = split.part(call, u % split.count), next = -1;
      if (whole) strip<true>(item(split.item(u)), next);
      else strip<false>(item(split.item(u)), next);
    }
  }

  // Keys and values FAR_AHEAD rows past those scored, fetched as the scores reach them (`through`),
  // where keys lie in groups apart; nothing elsewhere. The products then find a chunk's values in
  // L2 (1024 keys: 256 KB at head dims 64 in float32). A member, not a local, and `through` out of
  // line: as a local, its state held registers in the lone rows' loop, and 4 bfloat16 rows of
  // strided(64) after 65536 keys, which fetch nothing, took 1.09-1.12 of the time.
  struct Ahead {
    Call::KeyRows keys, values;
    const In *k, *v;
    int64_t at, end, k_bytes, v_bytes;
    bool pending() const { return at < end; }
    __attribute__((noinline)) void through(int64_t j) {  // rows before j + FAR_AHEAD (and `end`) fetched
      for (; at < j + FAR_AHEAD && at < end; at++) {
        prefetch_row<0>(k + keys.next(), k_bytes);
        prefetch_row<0>(v + values.next(), v_bytes);
      }
    }
  } ahead = {};
  Ahead fetch_ahead(const Item<In> &it, int64_t first, int64_t end) const {
    if (a.key_group >= a.k_rows || end <= FAR_AHEAD) return {};  // one group, or none to fetch
    const int64_t j = first + FAR_AHEAD;
    return {a.key_rows(j, a.k_stride), a.key_rows(j, a.v_stride), it.k, it.v, FAR_AHEAD, end,
            a.features * (int64_t)sizeof(In), a.v_features * (int64_t)sizeof(In)};
  }

  // Keys [0, keys) from k and their values from v, packed for the block products, zeros past them
  // to the buffers' width. float32: keys transposed into keys_t (dim x width), values into `values`
  // (keys x v_dim). AMX (bfloat16 pairs, as its dot products read them): keys_b holds, per 16 keys
  // and 32 features, a tile whose row p pairs features 2p and 2p + 1 of each key; values_b's row p
  // pairs keys 2p and 2p + 1 of each value feature.
  // Not AMX: each key row and value row fetched FAR_AHEAD rows before it is packed (a transpose
  // reads a line of each of 16 rows at once, and the hardware's prefetcher fell behind: an 8-row
  // strip spent most of its time in these loads, `perf annotate`). Out of line, so that the
  // fetches' code changes nothing the compiler inlines into `strip` (`row_scores`).
  template <bool WHOLE> __attribute__((noinline)) void pack(const Item<In> &it, int64_t first, int64_t keys) {
    const In *k_rows[LANES];  // a tile's key rows (null past `keys`): tiles j0 = 0, 16, .. in turn
    Call::KeyRows key = a.key_rows(first, a.k_stride), value = a.key_rows(first, a.v_stride);
    auto tile_rows = [&](int64_t j0) {
      for (int r = 0; r < LANES; r++) k_rows[r] = j0 + r < keys ? it.k + key.next() : nullptr;
    };
    if constexpr (AMX) {
      for (int64_t j0 = 0; j0 < width; j0 += LANES) {
        tile_rows(j0);
        for (int64_t t = 0; t < dim_tiles; t++) {
          f32x16 tile[LANES];  // row r: key j0 + r's 16 feature pairs (bits, not floats)
          const int64_t d0 = 32 * t, copied = a.features - d0 < 32 ? a.features - d0 : 32;
          for (int r = 0; r < LANES; r++) {
            tile[r] = splat(0.f);
            if (k_rows[r]) memcpy(&tile[r], k_rows[r] + d0, copied * 2);
          }
          transpose16(tile);
          memcpy(keys_b + (j0 / LANES * dim_tiles + t) * 512, tile, sizeof tile);
        }
      }
      uint32_t *pairs = (uint32_t *)values_b;
      for (int64_t p = 0; p < width / 2; p++) {
        const In *value_rows[2];  // keys 2p and 2p + 1's
        for (int e = 0; e < 2 && 2 * p + e < keys; e++) value_rows[e] = it.v + value.next();
        for (int64_t d = 0; d < a.v_dim; d += LANES) {
          u32x16 both = u32x16{};  // key 2p's in the low halves, 2p + 1's in the high ones
          for (int e = 0; e < 2 && 2 * p + e < keys; e++) {
            u16x16 bits = u16x16{};
            if (d + LANES <= a.v_features) bits = *(const u16x16_unaligned *)(value_rows[e] + d);
            else memcpy(&bits, value_rows[e] + d, (a.v_features - d) * 2);
            both |= __builtin_convertvector(bits, u32x16) << (16 * e);
          }
          memcpy(pairs + p * a.v_dim + d, &both, sizeof both);
        }
      }
    } else {
      int64_t padded = (keys + LANES - 1) / LANES * LANES + LANES;
      Call::KeyRows key_ahead = a.key_rows(first + FAR_AHEAD, a.k_stride);
      int64_t fetched = FAR_AHEAD;  // key rows before this one fetched (or being packed)
      for (int64_t j0 = 0; j0 < padded; j0 += LANES) {
        for (; fetched < j0 + LANES + FAR_AHEAD && fetched < keys; fetched++)
          prefetch_row<0>(it.k + key_ahead.next(), a.features * sizeof(In));
        tile_rows(j0);
        for (int64_t d0 = 0; d0 < a.dim; d0 += LANES) {
          f32x16 tile[LANES];
          if constexpr (PAIRS) {  // keys_t's row p: features 2p and 2p + 1 of each key, as they are
            if (d0 % 32) continue;  // 16 pairs a tile
            const int64_t pairs = a.dim - d0 >= 32 ? LANES : LANES / 2;
            const int64_t copied = a.features - d0 < 2 * pairs ? a.features - d0 : 2 * pairs;
            for (int r = 0; r < LANES; r++) {
              tile[r] = splat(0.f);
              if (k_rows[r]) memcpy(&tile[r], k_rows[r] + d0, copied * 2);
            }
            transpose16(tile);
            for (int c = 0; c < pairs; c++) store(keys_t + (d0 / 2 + c) * width + j0, tile[c]);
            continue;
          }
          for (int r = 0; r < LANES; r++)
            tile[r] = k_rows[r] ? read16<IN, WHOLE>(k_rows[r], d0, a.features) : splat(0.f);
          transpose16(tile);
          for (int c = 0; c < LANES; c++) store(keys_t + (d0 + c) * width + j0, tile[c]);
        }
      }
      Call::KeyRows value_ahead = a.key_rows(first + FAR_AHEAD, a.v_stride);
      for (int64_t j = 0; j < keys; j++) {
        if (j + FAR_AHEAD < keys) prefetch_row<0>(it.v + value_ahead.next(), a.v_features * sizeof(In));
        const In *row = it.v + value.next();
        for (int64_t d = 0; d < a.v_dim; d += LANES)
          store(values + j * a.v_dim + d, read16<IN, WHOLE>(row, d, a.v_features));
      }
    }
  }

  // The block's query rows r0 .. r0 + rows - 1 (zeros past them) as the products read them: float32
  // in `queries`, or AMX's bfloat16 in queries_b (dim_tiles x 32 features a row, zeros past dim).
  template <bool WHOLE> void load_queries(const In *q, int64_t r0, int64_t rows) {
    for (int64_t r = 0; r < ROWS; r++) {
      if constexpr (AMX) {
        uint16_t *row = queries_b + r * dim_tiles * 32;
        memset(row, 0, dim_tiles * 64);
        if (r < rows) memcpy(row, q + (r0 + r) * a.q_stride[2], a.features * 2);
      } else if constexpr (PAIRS) {
        char *row = (char *)(queries + r * a.dim / 2);
        const int64_t copied = r < rows ? a.features * 2 : 0;
        memcpy(row, q + (r0 + r) * a.q_stride[2], copied);
        memset(row + copied, 0, a.dim * 2 - copied);
      } else {
        for (int64_t d = 0; d < a.dim; d += LANES)
          store(queries + r * a.dim + d,
                r < rows ? read16<IN, WHOLE>(q + (r0 + r) * a.q_stride[2], d, a.features) : splat(0.f));
      }
    }
  }

  // The rows a block of `rows` computes: a short block's (a decode step's one, a short run's few)
  // to the next of 1, 2, 4 and ROWS, not ROWS with zeros; AMX's tiles take ROWS.
  static int computed_rows(int64_t rows) { return AMX || rows > ROWS / 2 ? ROWS : rows > 2 ? 4 : (int)rows; }
  // f(std::integral_constant<int, R>{}) for R = computed (one of computed_rows'), so that the block's
  // products are compiled for each.
  template <typename F> static void for_rows(int computed, F f) {
    switch (computed) {
      case 1: return f(std::integral_constant<int, 1>{});
      case 2: return f(std::integral_constant<int, 2>{});
      case 4: return f(std::integral_constant<int, 4>{});
      default: return f(std::integral_constant<int, ROWS>{});
    }
  }

  // s + x k: float32's product, or PAIRS' two, x and k each two bfloat16 (bits).
  static f32x16 multiply_add(f32x16 s, float x, f32x16 k) {
#if SPAN_BF16_PAIRS
    if constexpr (PAIRS) return (f32x16)_mm512_dpbf16_ps((__m512)s, (__m512bh)_mm512_set1_ps(x), (__m512bh)k);
#endif
    return s + x * k;
  }

  // scores[r][j] = q_r . k_(start + j) for the block's first R rows (AMX: all ROWS), j < keys (a
  // multiple of KEY_STEP; AMX: start one of 16).
  template <int R = ROWS> void block_scores(int64_t start, int64_t keys) {
    if constexpr (AMX) {
#if SPAN_AMX
      for (int64_t j = 0; j < keys; j += 32) {
        const uint16_t *group = keys_b + (start + j) / LANES * dim_tiles * 512;
        _tile_zero(0);
        _tile_zero(1);
        for (int64_t t = 0; t < dim_tiles; t++) {
          _tile_loadd(2, queries_b + t * 32, dim_tiles * 64);
          _tile_loadd(3, group + t * 512, 64);
          _tile_loadd(4, group + (dim_tiles + t) * 512, 64);
          _tile_dpbf16ps(0, 2, 3);
          _tile_dpbf16ps(1, 2, 4);
        }
        _tile_stored(0, scores + j, width * sizeof(float));
        _tile_stored(1, scores + j + LANES, width * sizeof(float));
      }
#endif
      return;
    }
    const float *kt = keys_t + start;
    const int64_t steps = PAIRS ? a.dim / 2 : a.dim;  // keys_t's rows
    int64_t j = 0;
    for (; j + 2 * LANES <= keys; j += 2 * LANES) {
      f32x16 s0[R], s1[R];
#pragma GCC unroll 8
      for (int r = 0; r < R; r++) s0[r] = s1[r] = splat(0.f);
      for (int64_t d = 0; d < steps; d++) {
        f32x16 k0 = load(kt + d * width + j), k1 = load(kt + d * width + j + LANES);
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
          float x = queries[r * steps + d];
          s0[r] = multiply_add(s0[r], x, k0);
          s1[r] = multiply_add(s1[r], x, k1);
        }
      }
#pragma GCC unroll 8
      for (int r = 0; r < R; r++) {
        store(scores + r * width + j, s0[r]);
        store(scores + r * width + j + LANES, s1[r]);
      }
    }
    for (; j < keys; j += LANES) {
      f32x16 s0[R];
#pragma GCC unroll 8
      for (int r = 0; r < R; r++) s0[r] = splat(0.f);
      for (int64_t d = 0; d < steps; d++) {
        f32x16 k0 = load(kt + d * width + j);
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) s0[r] = multiply_add(s0[r], queries[r * steps + d], k0);
      }
#pragma GCC unroll 8
      for (int r = 0; r < R; r++) store(scores + r * width + j, s0[r]);
    }
  }

  // A row's scores times `scale` over [0, keys) as probabilities relative to the larger of the row's
  // running largest `top` (-inf before any key) and the largest in [from, to), zero
  // outside [from, to), written over s (AMX: into `high` + `low`, two bfloat16); returns that larger
  // one and writes the probabilities' sum.
  float softmax_row(float *s, uint16_t *high, uint16_t *low, int64_t from, int64_t to, int64_t keys, float top,
                    float scale, float *sum) {
    const f32x16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const f32x16 lo = splat((float)from), hi = splat((float)to);
    // Vectors of 16 within [from, to) take no mask; those wholly outside are zeros.
    const int64_t first = from / LANES * LANES, past = (to + LANES - 1) / LANES * LANES;
    f32x16 most = splat(top);
    for (int64_t j = first; j < past; j += LANES) {  // the scaled scores kept: see below
      f32x16 x = load(s + j) * scale;
      if (j < from || j + LANES > to) x = lane + (float)j >= lo && lane + (float)j < hi ? x : splat(-INFINITY);
      store(s + j, x);
      most = x > most ? x : most;
    }
    float m = lanes_max(most);
    if (m == -INFINITY) {  // no key yet, and every one here skipped (`Call::skip_keys`): none
      if constexpr (AMX) {
        memset(high, 0, keys * sizeof(uint16_t));
        memset(low, 0, keys * sizeof(uint16_t));
      } else {
        memset(s, 0, keys * sizeof(float));
      }
      *sum = 0.f;
      return m;
    }
    f32x16 total = splat(0.f);
    for (int64_t j = 0; j < keys; j += LANES) {
      f32x16 x = splat(0.f);
      if (j >= first && j < past) {
        // Scaled scores less the largest of these same rounded values, never above 0 (x * scale - m,
        // contracted to one FMA, took x * scale unrounded, up to half its ulp over m: 2^256 past
        // scores of 2^32), and only then in base 2: the row's state, its seed's lse too, stays in the
        // scores' units, where huge scores' differences are exact.
        x = exp2_nonpositive((load(s + j) - m) * LOG2E);
        if (j < from || j + LANES > to) x = lane + (float)j >= lo && lane + (float)j < hi ? x : splat(0.f);
      }
      if constexpr (AMX) {  // as two bfloat16: x's first 8 bits of mantissa, the rest rounded (to 2^-17)
        f32x16 first = (f32x16)((u32x16)x & 0xffff0000u);
        Elements<BFLOAT16>::store16(high + j, first);
        Elements<BFLOAT16>::store16(low + j, x - first);
      } else {
        store(s + j, x);
      }
      total += x;
    }
    *sum = lanes_sum(total);
    return m;
  }

  // block_out[r] = the block's probabilities [r][j] times values start + j for its first R rows
  // (AMX: all ROWS), j < keys (AMX: to a multiple of 32, zeros past keys; start even).
  template <int R = ROWS> void block_products(int64_t start, int64_t keys) {
    if constexpr (AMX) {
#if SPAN_AMX
      const uint32_t *pairs = (const uint32_t *)values_b + start / 2 * a.v_dim;
      for (int64_t d0 = 0; d0 < a.v_dim; d0 += 2 * LANES) {
        const bool both = d0 + 2 * LANES <= a.v_dim;
        _tile_zero(0);
        _tile_zero(1);
        for (int64_t j = 0; j < keys; j += 32) {
          _tile_loadd(2, probs_high + j, width * sizeof(uint16_t));
          _tile_loadd(5, probs_low + j, width * sizeof(uint16_t));
          _tile_loadd(3, pairs + j / 2 * a.v_dim + d0, a.v_dim * sizeof(uint32_t));
          _tile_dpbf16ps(0, 2, 3);
          _tile_dpbf16ps(0, 5, 3);
          if (both) {
            _tile_loadd(4, pairs + j / 2 * a.v_dim + d0 + LANES, a.v_dim * sizeof(uint32_t));
            _tile_dpbf16ps(1, 2, 4);
            _tile_dpbf16ps(1, 5, 4);
          }
        }
        _tile_stored(0, block_out + d0, a.v_dim * sizeof(float));
        if (both) _tile_stored(1, block_out + d0 + LANES, a.v_dim * sizeof(float));
      }
#endif
      return;
    }
    const float *vals = values + start * a.v_dim;
    for (int64_t d0 = 0; d0 < a.v_dim; d0 += 2 * LANES) {
      f32x16 o0[R], o1[R];
#pragma GCC unroll 8
      for (int r = 0; r < R; r++) o0[r] = o1[r] = splat(0.f);
      if (d0 + 2 * LANES <= a.v_dim) {
        for (int64_t j = 0; j < keys; j++) {
          f32x16 x0 = load(vals + j * a.v_dim + d0), x1 = load(vals + j * a.v_dim + d0 + LANES);
#pragma GCC unroll 8
          for (int r = 0; r < R; r++) {
            float w = scores[r * width + j];
            o0[r] += w * x0;
            o1[r] += w * x1;
          }
        }
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) store(block_out + r * a.v_dim + d0 + LANES, o1[r]);
      } else {
        for (int64_t j = 0; j < keys; j++) {
          f32x16 x0 = load(vals + j * a.v_dim + d0);
#pragma GCC unroll 8
          for (int r = 0; r < R; r++) o0[r] += scores[r * width + j] * x0;
        }
      }
#pragma GCC unroll 8
      for (int r = 0; r < R; r++) store(block_out + r * a.v_dim + d0, o0[r]);
    }
  }

  // Lone rows' scores (a strip of up to LONE_ROWS rows, computed together): scores[r][j] = q_(r0 + r)
  // . k_(from + j) for r < rows, j < seen, zeros on to `keys`, from k's rows where they lie, 16 keys'
  // products summed at a time (`lane_sums`), in float32 in every dtype (bfloat16's products are
  // exact in it; PAIRS: as its pairs, 32 features a step, not converted first). Each 16 keys come
  // from memory once, for every row in turn from L1. Packing them (`pack`, 4 transposes for 16
  // keys at head dims 64) cost more than so few rows' products. One row after 16384 keys, H = 8,
  // D = 64, float32, the kernel alone on one thread: 0.49 of the packed path's time (47 -> 23 us)
  // for a window of 256 keys, 0.45 for 1024, 0.71 for 16. Pairs here and `row_vectors`' sums in
  // registers (2026-12-07), one row after 4096 keys, the same shape: bfloat16 0.74 of the time
  // before, float16 0.73, float32 0.94; after 65536, bfloat16 0.90 (one thread, its memory's pace).
  // Out of line, as `row_products` is: inlined into `strip`, code added here spent the compiler's
  // inlining budget there, and the packed path's transpose16, block_scores<8> and block_products<8>
  // became calls (strided(512) at n = 4096, float32: 1.18-1.25 of the time; `Ahead`).
  template <bool WHOLE, int R>
  __attribute__((noinline)) void row_scores(const Item<In> &it, int64_t r0, int64_t rows, int64_t from, int64_t seen,
                                            int64_t keys) {
    for (int r = 0; r < R; r++) {  // row r's query at queries + r * dim (zeros past the strip's rows)
      float *query = queries + r * a.dim;
      if (r >= rows) {
        memset(query, 0, a.dim * sizeof(float));
      } else if constexpr (PAIRS) {  // the row as it is, zeros past its features to a multiple of 32
        const int64_t padded = (a.features + 31) / 32 * 32;
        memcpy(query, it.q + (r0 + r) * a.q_stride[2], a.features * 2);
        memset((uint16_t *)query + a.features, 0, (padded - a.features) * 2);
      } else {
        for (int64_t d = 0; d < a.dim; d += LANES)
          store(query + d, read16<IN, WHOLE>(it.q + (r0 + r) * a.q_stride[2], d, a.features));
      }
    }
    Call::KeyRows key = a.key_rows(from, a.k_stride);
    ahead = fetch_ahead(it, from, seen);
    for (int64_t j0 = 0; j0 < keys; j0 += LANES) {
      if (ahead.pending()) ahead.through(j0 + LANES);
      const In *k_rows[LANES];  // keys j0 .. j0 + 15 (null past `seen`); one row's found as it goes
      if constexpr (R > 1)
        for (int t = 0; t < LANES; t++) k_rows[t] = j0 + t < seen ? it.k + key.next() : nullptr;
      for (int r = 0; r < R; r++) {
        const float *query = queries + r * a.dim;
        f32x16 products[LANES];  // key j0 + t's products, lane by lane
#pragma GCC unroll 16
        for (int t = 0; t < LANES; t++) {
          products[t] = splat(0.f);
          if (j0 + t >= seen) continue;
          const In *k = R > 1 ? k_rows[t] : it.k + key.next();
#if SPAN_BF16_PAIRS
          if constexpr (PAIRS) {  // 32 features a step, as pairs (`multiply_add`)
            for (int64_t d = 0; d < a.features; d += 2 * LANES)
              products[t] = (f32x16)_mm512_dpbf16_ps((__m512)products[t], (__m512bh)load(query + d / 2),
                                                     (__m512bh)pairs32(k, d, a.features));
            continue;
          }
#endif
          for (int64_t d = 0; d < a.dim; d += LANES)
            products[t] += load(query + d) * read16<IN, WHOLE>(k, d, a.features);
        }
        store(scores + r * width + j0, lane_sums(products));
      }
    }
  }

#if SPAN_BF16_PAIRS
  // Features d .. d + 31 of a bfloat16 row as 16 pairs (bits), zeros past its `count` features (a
  // masked load: no byte past the row is read).
  static f32x16 pairs32(const uint16_t *row, int64_t d, int64_t count) {
    if (d + 2 * LANES <= count) return (f32x16)_mm512_loadu_si512(row + d);
    return (f32x16)_mm512_maskz_loadu_epi16((__mmask32)((1u << (count - d)) - 1), row + d);
  }
#endif

  // f(std::integral_constant<int, R>{}) for R = computed, a lone strip's `computed_rows` (1, 2 or
  // LONE_ROWS), so that its rows' loops are compiled for each.
  template <typename F> static void for_lone_rows(int computed, F f) {
    switch (computed) {
      case 1: return f(std::integral_constant<int, 1>{});
      case 2: return f(std::integral_constant<int, 2>{});
      case 4: return f(std::integral_constant<int, 4>{});
      default: return f(std::integral_constant<int, LONE_ROWS>{});
    }
  }

  // block_out = R lone rows' probabilities (scores[r][j]) times values from + j, j < seen, read from
  // v's rows where they lie, once for every row (`row_scores`).
  template <bool WHOLE, int R>
  __attribute__((noinline)) void row_products(const Item<In> &it, int64_t from, int64_t seen) {
    int64_t d0 = 0;
    if constexpr (R > 4) {  // 2 vectors at a time (R x 2 sums), the last one alone
      for (; d0 + 2 * LANES <= a.v_dim; d0 += 2 * LANES) row_vectors<WHOLE, R, 2>(it, from, seen, d0);
      if (d0 < a.v_dim) row_vectors<WHOLE, R, 1>(it, from, seen, d0);
      return;
    }
    for (; d0 + 4 * LANES <= a.v_dim; d0 += 4 * LANES) row_vectors<WHOLE, R, 4>(it, from, seen, d0);
    switch ((a.v_dim - d0) / LANES) {  // the last 1 to 3 vectors
      case 1: return row_vectors<WHOLE, R, 1>(it, from, seen, d0);
      case 2: return row_vectors<WHOLE, R, 2>(it, from, seen, d0);
      case 3: return row_vectors<WHOLE, R, 3>(it, from, seen, d0);
    }
  }

  // `row_products`' V vectors of R rows' outputs from feature d0, their sums in registers (R x V
  // at most 16): a count of vectors known only at run time kept them in memory, each key's
  // products a store and a load apart (one row after 4096 keys, H = 8, D = 64, bfloat16: half the
  // kernel's time).
  template <bool WHOLE, int R, int V> void row_vectors(const Item<In> &it, int64_t from, int64_t seen, int64_t d0) {
    f32x16 o[R][V] = {};
    Call::KeyRows value = a.key_rows(from, a.v_stride);
    const int64_t count = a.v_features - d0;
    for (int64_t j = 0; j < seen; j++) {
      const In *x = it.v + value.next() + d0;
#pragma GCC unroll 4
      for (int e = 0; e < V; e++) {
        const f32x16 y = read16<IN, WHOLE>(x, e * LANES, count);
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) o[r][e] += scores[r * width + j] * y;
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
      for (int e = 0; e < V; e++) store(block_out + r * a.v_dim + d0 + e * LANES, o[r][e]);
  }

  // Rows r0 .. r0 + rows - 1 of the strip written out from their running state (`at`: the first's
  // place in it): zeros and -inf where they saw no key.
  template <bool WHOLE> void finish_rows(Out *out, float *lse, int64_t r0, int64_t rows, int64_t at) {
    for (int64_t r = 0; r < rows; r++) {
      float sum = row_sum[at + r];  // acc holds nothing yet where it is 0
      for (int64_t d = 0; d < a.v_dim; d += LANES)
        write16<OUT, WHOLE>(out + (r0 + r) * a.out_stride[2], d, a.v_features,
                            sum > 0.f ? load(acc + (at + r) * a.v_dim + d) * (1.f / sum) : splat(0.f));
    }
    write_lse(lse, r0, rows, at);
  }

  // The block's products added to its rows' running outputs (scaled by `keep`), or, `finishing`,
  // written out as their results. STREAM: where the call's rows lie apart and outgrow the caches
  // (STREAM_OUT_BYTES), results aligned to their vectors are streamed, taking no read for ownership
  // and evicting nothing; else they go through the caches, their lines fetched beforehand (`strip`).
  template <bool WHOLE, bool STREAM = false>
  void add_block(Out *out, int64_t r0, int64_t rows, int64_t at0, const float *keep, bool finishing) {
    float *acc_rows = acc + at0 * a.v_dim;
    for (int64_t r = 0; r < rows; r++) {
      const float inverse = row_sum[at0 + r] > 0.f ? 1.f / row_sum[at0 + r] : 0.f;
      float *row = acc_rows + r * a.v_dim;
      Out *written = out + (r0 + r) * a.out_stride[2];
      for (int64_t d = 0; d < a.v_dim; d += LANES) {
        f32x16 x = load(block_out + r * a.v_dim + d);
        if (keep[r] != 0.f) x += load(row + d) * keep[r];
        if (!finishing) store(row + d, x);
        else if (STREAM && (WHOLE || d + LANES <= a.v_features) &&
                 ((uintptr_t)(written + d) & (LANES * sizeof(Out) - 1)) == 0)
          stream16<OUT>(written + d, x * inverse);
        else
          write16<OUT, WHOLE>(written, d, a.v_features, x * inverse);
      }
    }
  }

  void write_lse(float *lse, int64_t r0, int64_t rows, int64_t at) {
    for (int64_t r = 0; r < rows; r++) {
      float *written = lse + (r0 + r) * a.lse_stride[2];
      if (a.sums != nullptr) {  // a part's (`Split::part`)
        *written = row_top[at + r];
        a.sums[written - a.lse] = row_sum[at + r];
      } else {
        *written = row_top[at + r] == -INFINITY ? -INFINITY : row_top[at + r] + logf(row_sum[at + r]);
      }
    }
  }

  // The strip's keys go KEY_CHUNK at a time (packed in cache, then every row block that sees some
  // of them; up to LONE_ROWS rows: unpacked, a row at a time), each row keeping a running largest
  // score, sum and output (`acc`) as flash attention does. A block's rows are written out within
  // the chunk that holds their last keys, as its products come in (written all at the strip's end,
  // a stride's rows s rows apart cost 15% more).
  template <bool WHOLE> void strip(const Item<In> &it, int64_t next) {
    Out *out = (Out *)a.out + it.i * a.out_stride[0] + it.c * a.out_stride[1];
    float *lse = a.lse + it.i * a.lse_stride[0] + it.c * a.lse_stride[1];
    const int64_t strip_rows = it.row_end - it.row_begin;
    if (a.seed_lse != nullptr) {  // the seed's rows as running state: its output, a sum of 1 at its lse
      const int64_t seed_at = it.i * a.seed_out_stride[0] + it.c * a.seed_out_stride[1];
      const float *seed_lse = a.seed_lse + it.i * a.seed_lse_stride[0] + it.c * a.seed_lse_stride[1];
      for (int64_t r = 0; r < strip_rows; r++) {
        row_top[r] = seed_lse[(it.row_begin + r) * a.seed_lse_stride[2]];
        row_sum[r] = row_top[r] == -INFINITY ? 0.f : 1.f;
        for (int64_t d = 0; d < a.v_dim; d += LANES)
          store(acc + r * a.v_dim + d,
                read_as(a.seed_dtype, a.seed_out, seed_at + (it.row_begin + r) * a.seed_out_stride[2], d,
                        a.v_features));
      }
    } else {
      for (int64_t r = 0; r < strip_rows; r++) {  // acc is written before it is read (keep 0: not read)
        row_top[r] = -INFINITY;
        row_sum[r] = 0.f;
      }
    }
    Item<In> after = next >= 0 ? item(next) : it;
    const Out *after_out = (const Out *)a.out + after.i * a.out_stride[0] + after.c * a.out_stride[1];
    const int64_t blocks = (strip_rows + ROWS - 1) / ROWS;
    // The next item's keys to fetch: those this one did not read (a strip of the same problem, as the
    // band's or fixed's next strip, shares most of them), all of another problem's.
    const bool same_problem = next >= 0 && after.i == it.i && after.c == it.c;
    const int64_t fetch_from = same_problem && after.key_begin < it.key_end ? it.key_end : after.key_begin;
    const int64_t next_keys = after.key_end > fetch_from ? after.key_end - fetch_from : 0;
    const bool lone = !AMX && (strip_rows <= LONE_ROWS / 2 ||  // its keys unpacked (`row_scores`)
                               (strip_rows <= LONE_ROWS && it.key_end - it.key_begin >= LONE_MIN_KEYS));
    const int64_t block_rows = lone ? LONE_ROWS : ROWS;
    for (int64_t c0 = it.key_begin; c0 < it.key_end; c0 += KEY_CHUNK) {
      const int64_t c1 = c0 + KEY_CHUNK < it.key_end ? c0 + KEY_CHUNK : it.key_end;
      const bool last_chunk = c1 == it.key_end;
      if (!lone) pack<WHOLE>(it, c0, c1 - c0);
      for (int64_t r0 = it.row_begin; r0 < it.row_end; r0 += block_rows) {
        int64_t rows = it.row_end - r0 < block_rows ? it.row_end - r0 : block_rows;
        // The next item's rows, spread over this one's blocks and each block's rows (`fetch_q0` ..,
        // `fetch_k0` ..): its query rows, its output rows unless streamed (`add_block`), and its keys
        // and values. A block's fetch issued at once queued behind itself (no hardware prefetcher
        // follows a stride's rows, s rows apart), and outputs fetched only as written stalled the
        // stores. Against a block's fetch at its start without outputs, n = 16384, H = 8, D = 64:
        // float32 0.89-0.96 of the time (strided(64), strided(128), sliding_window(256) and (128),
        // fixed(128, 8), the union), bfloat16 0.82-0.99 but sliding_window(128) 1.07. Lone rows'
        // strips fetch nothing ahead: the hardware's prefetcher does better on their few keys (one
        // row after 16384 keys, 8 heads, the kernel alone, without / with: a window of 256 keys
        // 0.75-0.82 of the time, 1024 0.62; a class's keys 64 rows apart 0.78-0.88).
        int64_t fetch_q0 = 0, fetch_q1 = 0, fetch_k0 = 0, fetch_k1 = 0;
        if (next >= 0 && last_chunk && !lone) {
          int64_t b = (r0 - it.row_begin) / ROWS;
          fetch_k0 = fetch_from + b * next_keys / blocks, fetch_k1 = fetch_from + (b + 1) * next_keys / blocks;
          fetch_q0 = after.row_begin + b * ROWS;
          fetch_q1 = fetch_q0 + ROWS < after.row_end ? fetch_q0 + ROWS : after.row_end;
        }
        // The chunk's keys the block's rows see between them, as packed-buffer columns [start, start + seen).
        int64_t from = clamp(a.keys_from(r0), c0, c1), to = clamp(a.keys_to(r0 + rows - 1), c0, c1);
        const int64_t block_end = a.keys_to(r0 + rows - 1), at0 = r0 - it.row_begin;
        const bool finishing = block_end <= c1 && (block_end > c0 || c0 == it.key_begin);
        if (to <= from) {
          if (finishing) finish_rows<WHOLE>(out, lse, r0, rows, at0);
          continue;
        }
        if constexpr (AMX) from = c0 + (from - c0) / LANES * LANES;  // a packed tile's first key
        int64_t start = from - c0, seen = to - from, padded = (seen + KEY_STEP - 1) / KEY_STEP * KEY_STEP;
        const int computed = computed_rows(rows);
        if (lone) {
          for_lone_rows(computed,
                        [&](auto r) { row_scores<WHOLE, decltype(r)::value>(it, r0, rows, from, seen, padded); });
        } else {
          load_queries<WHOLE>(it.q, r0, rows);
          for_rows(computed, [&](auto r) { block_scores<decltype(r)::value>(start, padded); });
        }
        float keep[ROWS];  // what the running output is scaled by before this chunk adds to it (0: unread)
        for (int r = 0; r < ROWS; r++) {
          if (fetch_q1 > fetch_q0 || fetch_k1 > fetch_k0) {  // the row's share of the block's fetch
            const int64_t q = fetch_q0 + r, keys = fetch_k1 - fetch_k0;
            const int64_t k0 = fetch_k0 + r * keys / ROWS, k1 = fetch_k0 + (r + 1) * keys / ROWS;
            if (q < fetch_q1) {
              prefetch_row<0>(after.q + q * a.q_stride[2], a.features * sizeof(In));
              if (!a.stream_out) prefetch_row<1>(after_out + q * a.out_stride[2], a.v_features * sizeof(Out));
            }
            Call::KeyRows key = a.key_rows(k0, a.k_stride), value = a.key_rows(k0, a.v_stride);
            for (int64_t j = k0; j < k1; j++) {
              prefetch_row<0>(after.k + key.next(), a.features * sizeof(In));
              prefetch_row<0>(after.v + value.next(), a.v_features * sizeof(In));
            }
          }
          if (r >= computed) continue;
          float *s = scores + r * width;
          uint16_t *high = AMX ? probs_high + r * width : nullptr, *low = AMX ? probs_low + r * width : nullptr;
          int64_t at = r0 - it.row_begin + r;
          int64_t lo = r < rows ? clamp(a.keys_from(r0 + r), c0, c1) - from : 0;
          int64_t hi = r < rows ? clamp(a.keys_to(r0 + r), c0, c1) - from : 0;
          keep[r] = r < rows && row_top[at] != -INFINITY ? 1.f : 0.f;
          if (hi <= lo) {
            if (AMX) {
              memset(high, 0, padded * sizeof(uint16_t));
              memset(low, 0, padded * sizeof(uint16_t));
            } else {
              memset(s, 0, padded * sizeof(float));
            }
            continue;
          }
          if (a.skips_keys()) a.skip_keys(s, from, r0 + r + a.row_shift, from + lo, from + hi);
          if (a.mask != nullptr) a.mask_keys(s, from, r0 + r, from + lo, from + hi);
          float sum, top = softmax_row(s, high, low, lo, hi, padded, row_top[at], a.scale, &sum);
          keep[r] = row_top[at] == -INFINITY ? 0.f : row_top[at] == top ? 1.f : exp2f((row_top[at] - top) * LOG2E);
          row_top[at] = top;
          row_sum[at] = row_sum[at] * keep[r] + sum;
        }
        if (lone) for_lone_rows(computed, [&](auto r) { row_products<WHOLE, decltype(r)::value>(it, from, seen); });
        else for_rows(computed, [&](auto r) { block_products<decltype(r)::value>(start, seen); });
        if (finishing && a.stream_out) add_block<WHOLE, true>(out, r0, rows, at0, keep, true);
        else add_block<WHOLE>(out, r0, rows, at0, keep, finishing);
        if (finishing) write_lse(lse, r0, rows, at0);
      }
    }
    if (it.key_end == it.key_begin) finish_rows<WHOLE>(out, lse, it.row_begin, strip_rows, 0);  // no key: zeros, -inf
  }
};

// Units u0 .. u1 - 1 of the call computed; false where the thread's buffers could not be allocated.
template <int IN, int OUT, int TILE_ROWS>
bool run_thread(const Call &call, const Split &split, int64_t u0, int64_t u1) {
  Worker<IN, OUT, TILE_ROWS> worker(call, split.item(u0), split.item(u1 - 1) + 1);
  if (!worker.ok()) return false;
#if SPAN_AMX
  if (TILE_ROWS) configure_tiles(TILE_ROWS);
#endif
  worker.run(call, split, u0, u1);
#if defined(__AVX__)
  _mm_sfence();  // the streamed outputs (`stream16`) ordered before the call returns
#endif
#if SPAN_AMX
  if (TILE_ROWS) _tile_release();  // as torch's own AMX kernels leave a thread
#endif
  return true;
}

typedef bool (*Runner)(const Call &, const Split &, int64_t, int64_t);

template <int IN, int TILE_ROWS> Runner runner_for(int out) {
  switch (out) {
    case FLOAT32: return run_thread<IN, FLOAT32, TILE_ROWS>;
    case FLOAT16: return run_thread<IN, FLOAT16, TILE_ROWS>;
    case BFLOAT16: return run_thread<IN, BFLOAT16, TILE_ROWS>;
  }
  return nullptr;
}

// The worker for these dtypes, where a row sees row_keys keys on average.
Runner runner(int in, int out, int64_t row_keys) {
  switch (in) {
    case FLOAT32: return runner_for<FLOAT32, 0>(out);
    case FLOAT16: return runner_for<FLOAT16, 0>(out);
#if SPAN_AMX
    case BFLOAT16:
      if (!amx_permitted()) return runner_for<BFLOAT16, 0>(out);
      return row_keys <= AMX_SHORT_SPAN_KEYS ? runner_for<BFLOAT16, 8>(out) : runner_for<BFLOAT16, 16>(out);
#else
    case BFLOAT16: return runner_for<BFLOAT16, 0>(out);
#endif
  }
  return nullptr;
}

// A call splits its keys into parts where its problems have few rows for their keys (a decode
// step, a short chunk after a long context), as flash decoding does on GPUs: at every multiple of
// SPLIT_PART_KEYS keys for up to 32 rows a problem, of SPLIT_KEYS_PER_ROW keys a row for more (its
// rows rounded up to a power of two of anchor steps: a folded dense call's query heads at one
// position count as one), so that a part's results stay a small share of its work (a 256-row
// chunk splits at every 8192 keys; a prefill, whose keys are about its rows, not at all). Each item's
// part is a unit of work that threads share (`thread_units`); each row's parts then merge
// (`merge_rows`). Where the keys split follows from a problem's shape alone, never from how many
// problems a call holds nor from its threads, so a row's result is the same alone or batched and
// at any thread count (a request padded to a batch's length keeps its power-of-two bucket of
// positions; 40 positions of 3 query heads, 120 rows, and 50 padded, 150, split alike).
// Against the split before this one, which took the fewest parts that kept the threads busy (kernel
// alone, 2 threads, the AMD EPYC, 2026-12-07, medians of 21 rounds; float32 / bfloat16): a row after
// 65536 keys, one head 1.02 / 1.02, 8 heads or 3 problems 1.00-1.01 / 1.04; 4 rows of 8 problems
// after 8192 keys (D = 128) 1.00 / 1.02; 16 rows 1.00 / 1.01; a row after 1500 keys 1.16 / 1.12
// (parts of 1024 and 476 keys; 16 us). On one thread, against no split, decode rows in parts of
// 512 keys took 1.04-1.08 of the time; in parts of 1024 or 2048, 0.96-1.02.
constexpr int64_t SPLIT_PART_KEYS = 1024;
constexpr int64_t SPLIT_KEYS_PER_ROW = 32;

// The call's split (`Split`; its slots and partials `run_calls` sets): parts of `keys` keys from the
// multiple of them at or below its first row's first key to the one at or past its last row's last
// key (spans only grow with the row); one part where they fit in one.
Split split_keys(const Call &call) {
  int64_t steps = 1;
  while (steps * call.rows_per_step < call.q_rows) steps *= 2;
  const int64_t rows = steps * call.rows_per_step;
  Split split = {};
  split.keys = rows * SPLIT_KEYS_PER_ROW > SPLIT_PART_KEYS ? rows * SPLIT_KEYS_PER_ROW : SPLIT_PART_KEYS;
  const int64_t lo = call.keys_from(0), hi = call.keys_to(call.q_rows - 1);
  split.first = lo / split.keys;
  split.count = hi > lo ? (hi + split.keys - 1) / split.keys - split.first : 1;
  split.rows = call.n * call.classes * call.q_rows;
  return split;
}

// Thread t of count's run of the call's units, u0 .. u1 - 1 (`Split::item`): about a count-th of
// their work, each unit going to the thread whose share holds its work's middle.
void thread_units(const Call &call, const Split &split, int64_t units, int t, int count, int64_t *u0, int64_t *u1) {
  auto work = [&](int64_t u) {
    const int64_t p = u % split.count;
    return call.work(split.item(u), split.key_lo(p), split.key_lo(p + 1));
  };
  double total = 0.0;
  for (int64_t u = 0; u < units; u++) total += work(u);
  *u0 = *u1 = -1;
  double before = 0.0;
  for (int64_t u = 0; u < units; u++) {
    const double here = work(u);
    const int owner = (int)clamp((int64_t)((before + here / 2) * count / total), 0, count - 1);
    before += here;
    if (owner == t && *u0 < 0) *u0 = u;
    if (owner == t) *u1 = u + 1;
  }
  if (*u0 < 0) *u0 = *u1 = 0;
}

// Each row's parts (`Split`) as one result in the call's out (in OUT) and lse, as one running
// softmax would have it: part p's sum s_p at its largest score m_p, weighted w_p = s_p exp(m_p - m)
// at the largest m of them, its output by w_p / (the w_p summed), lse = m + log(the w_p summed);
// zeros and -inf where no part saw a key. The weights are computed once a row, in the tops' place.
template <int OUT> void merge_rows(const Call &call, const Split &split, int threads) {
  typedef typename Elements<OUT>::type Out;
  const int64_t features = call.v_features, rows = split.rows, parts = split.slots;
  float *tops = split.partials + parts * rows * features;
  const float *sums = tops + parts * rows;
#pragma omp parallel for num_threads(threads) if (rows * features * parts >= (1 << 16))
  for (int64_t row = 0; row < rows; row++) {
    const int64_t i = row / (call.classes * call.q_rows), c = row / call.q_rows % call.classes, r = row % call.q_rows;
    Out *out = (Out *)call.out + i * call.out_stride[0] + c * call.out_stride[1] + r * call.out_stride[2];
    float top = -INFINITY, total = 0.f;
    for (int64_t p = 0; p < parts; p++) top = tops[p * rows + row] > top ? tops[p * rows + row] : top;
    for (int64_t p = 0; p < parts; p++) {
      float &weight = tops[p * rows + row];
      weight = weight == -INFINITY ? 0.f : sums[p * rows + row] * expf(weight - top);
      total += weight;
    }
    for (int64_t p = 0; p < parts && total > 0.f; p++) tops[p * rows + row] /= total;
    for (int64_t d = 0; d < features; d += LANES) {
      f32x16 x = splat(0.f);
      for (int64_t p = 0; p < parts && total > 0.f; p++)
        if (tops[p * rows + row] != 0.f)
          x += read16<FLOAT32>(split.partials + (p * rows + row) * features, d, features) * tops[p * rows + row];
      write16<OUT>(out, d, features, x);
    }
    call.lse[i * call.lse_stride[0] + c * call.lse_stride[1] + r * call.lse_stride[2]] =
        total > 0.f ? top + logf(total) : -INFINITY;
  }
}

void merge_parts(const Call &call, int out_dtype, const Split &split, int threads) {
  switch (out_dtype) {
    case FLOAT32: return merge_rows<FLOAT32>(call, split, threads);
    case FLOAT16: return merge_rows<FLOAT16>(call, split, threads);
    case BFLOAT16: return merge_rows<BFLOAT16>(call, split, threads);
  }
}

// log(1 + t) for 0 <= t <= 1: 2 atanh(s), s = t / (2 + t) <= 1/3, its series to s^15 (the next
// term under 2e-9 of the sum).
inline f32x16 log1p_unit(f32x16 t) {
  const f32x16 s = t / (t + 2.f), s2 = s * s;
  f32x16 p = splat(1.f / 15);
  for (float odd = 13.f; odd >= 1.f; odd -= 2.f) p = p * s2 + 1.f / odd;
  return 2.f * s * p;
}

// Rows of partials a and b over disjoint keys merged into out (in OUT) and lse, as merge.py's torch
// ops define it: b weighted by w = sigmoid(lse_b - lse_a) (0 where both are -inf: a's row and -inf
// kept), out = lerp(a, b, w) in float32, lse = logaddexp(lse_a, lse_b). The weights of 16 rows of
// the last dim go through vector lanes at a time (a row in any lane, or in a short last run,
// computes alike), each row's outputs through the same vector instructions wherever it lies: a row
// merges alike whatever the tensors' sizes and threads (torch's vectorized loops compute a loop's
// tail apart, with sigmoid rounded otherwise). Row places: the multi-index over `shape` (dims
// entries) times each tensor's strides.
template <int OUT>
void merge_two(void *out, float *lse, const void *a_out, const float *a_lse, const void *b_out, const float *b_lse,
               int a_dtype, int b_dtype, int64_t dims, const int64_t *shape, const int64_t *strides, int64_t features,
               int threads) {
  typedef typename Elements<OUT>::type Out;
  const int64_t inner = dims > 0 ? shape[dims - 1] : 1;
  int64_t outer = 1, step[6];  // step: each tensor's stride along the last dim
  for (int64_t i = 0; i + 1 < dims; i++) outer *= shape[i];
  for (int t = 0; t < 6; t++) step[t] = dims > 0 ? strides[t * dims + dims - 1] : 0;
  const int64_t runs = (inner + LANES - 1) / LANES;
#pragma omp parallel for num_threads(threads) if (outer * inner * features >= (1 << 16))
  for (int64_t job = 0; job < outer * runs; job++) {
    const int64_t r0 = job % runs * LANES, count = inner - r0 < LANES ? inner - r0 : LANES;
    int64_t at[6] = {};  // out, lse, a_out, a_lse, b_out, b_lse: row r0's places
    for (int64_t i = dims - 2, rest = job / runs; i >= 0; i--) {
      const int64_t index = rest % shape[i];
      rest /= shape[i];
      for (int t = 0; t < 6; t++) at[t] += index * strides[t * dims + i];
    }
    for (int t = 0; t < 6; t++) at[t] += r0 * step[t];
    alignas(64) float la[LANES] = {}, lb[LANES] = {}, weights[LANES], merged[LANES];
    for (int64_t r = 0; r < count; r++) la[r] = a_lse[at[3] + r * step[3]], lb[r] = b_lse[at[5] + r * step[5]];
    const f32x16 x = load(la), y = load(lb), top = x > y ? x : y, low = x > y ? y : x;
    f32x16 t = exp2_nonpositive((low - top) * LOG2E);  // e^-|x - y|
    t = low == splat(-INFINITY) ? splat(0.f) : t;
    store(weights, (x < y ? splat(1.f) : t) / (1.f + t));
    store(merged, top == splat(-INFINITY) ? top : top + log1p_unit(t));
    for (int64_t r = 0; r < count; r++) {
      const float w = weights[r];
      Out *written = (Out *)out + at[0] + r * step[0];
      const int64_t a_at = at[2] + r * step[2], b_at = at[4] + r * step[4];
      for (int64_t d = 0; d < features; d += LANES) {
        const f32x16 u = read_as(a_dtype, a_out, a_at, d, features), v = read_as(b_dtype, b_out, b_at, d, features);
        write16<OUT>(written, d, features, w < 0.5f ? u + (v - u) * w : v - (v - u) * (1.f - w));
      }
      lse[at[1] + r * step[1]] = merged[r];
    }
  }
}

// A call's arguments (`span_attention`'s args) read into `call`, with its dtypes and the keys a
// row sees on average; 0, or 2 for an unknown dtype, 3 for a step out of range.
int read_call(const int64_t *args, float scale, Call *call, int *in_dtype, int *out_dtype, int64_t *row_keys) {
  *call = {(const void *)args[0], (const void *)args[1], (const void *)args[2], (void *)args[3], (float *)args[4],
           (const void *)args[5], (const float *)args[6], (int)args[10]};
  *in_dtype = (int)args[8], *out_dtype = (int)args[9];
  const uint8_t *mask = (const uint8_t *)args[7];
  const int64_t *strides = args + 11, *sizes = args + 11 + 23;
  int64_t *fields[21] = {&call->n, &call->classes, &call->n_group, &call->class_group, &call->q_rows,
                         &call->k_rows, &call->features, &call->v_features, &call->first, &call->last,
                         &call->strip_rows, &call->row_shift, &call->rows_per_step, &call->keys_per_step,
                         &call->causal, &call->key_group, &call->group_span, &call->group_first, &call->distance,
                         &call->mask_stride, &call->skip_count};
  for (int f = 0; f < 21; f++) *fields[f] = sizes[f];
  call->skips = sizes + 21;
  call->mask = mask;
  call->key_lo = 0, call->key_hi = call->k_rows;
  call->dim = (call->features + LANES - 1) / LANES * LANES;
  call->v_dim = (call->v_features + LANES - 1) / LANES * LANES;
  if (call->row_shift < 0 || call->rows_per_step < 1 || call->keys_per_step < 0 || call->key_group < 1 ||
      call->group_span < call->key_group || call->distance < 0 || call->skip_count < 0)
    return 3;
  for (int64_t n = 0; n < call->skip_count; n++)
    if (call->skips[n] < 1) return 3;
  // Spans without a first key (causal squares, fixed's summary prefixes) hold half the keys on average.
  *row_keys = call->first <= -call->k_rows ? call->k_rows / 2 : clamp(call->last - call->first + 1, 0, call->k_rows);
  if (runner(*in_dtype, *out_dtype, *row_keys) == nullptr || call->seed_dtype < FLOAT32 ||
      call->seed_dtype > BFLOAT16)
    return 2;
  if (call->strip_rows <= 0 || call->strip_rows > call->q_rows) call->strip_rows = call->q_rows;
  int64_t *targets[7] = {call->q_stride, call->k_stride, call->v_stride, call->out_stride, call->lse_stride,
                         call->seed_out_stride, call->seed_lse_stride};
  const int counts[7] = {3, 4, 4, 3, 3, 3, 3};
  for (int t = 0; t < 7; t++) {
    memcpy(targets[t], strides, counts[t] * sizeof(int64_t));
    strides += counts[t];
  }
  call->stream_out = call->out_stride[2] != call->v_features &&
                     call->n * call->classes * call->q_rows * call->v_features * (*out_dtype == FLOAT32 ? 4 : 2) >=
                         STREAM_OUT_BYTES;
  call->scale = scale;
  return 0;
}

// The most calls `span_attention_joined` computes as one.
constexpr int MOST_JOINED = 4;

// Calls 0 .. joined - 1 computed as one: each call's units shared by the threads (`thread_units`),
// one call after the other with no wait between them, each writing its rows' parts (`Split`), and
// the parts of all of them merged into call 0's out and lse; a call alone writes its rows itself
// where its keys do not split. Joined calls have the same rows (`span_attention_joined`). Each
// call's units shared apart: shared as one run, a few large units after many small ones (fixed's
// folded summary keys after its own blocks, joined in a trial) left the threads' shares 10% apart,
// 1.05-1.06 of the time of two calls (H = 32 over 8, D = 128, one row after 16384 keys). Returns 0,
// or 1 where a buffer could not be allocated.
int run_calls(const Call *calls, const int *in_dtypes, const int *out_dtypes, const int64_t *row_keys, int joined,
              int threads) {
  Split splits[MOST_JOINED];
  Runner runners[MOST_JOINED];
  int64_t units[MOST_JOINED], slots = 0, most = 0;
  for (int c = 0; c < joined; c++) {
    splits[c] = split_keys(calls[c]);
    splits[c].slot = slots;
    slots += splits[c].count;
  }
  float *partials = nullptr;
  if (slots > 1) {
    partials = (float *)malloc(sizeof(float) * slots * splits[0].rows * (calls[0].v_features + 2));
    if (partials == nullptr) return 1;
  }
  for (int c = 0; c < joined; c++) {
    splits[c].slots = slots;
    splits[c].partials = partials;
    runners[c] = runner(in_dtypes[c], partials != nullptr ? FLOAT32 : out_dtypes[c], row_keys[c]);
    units[c] = calls[c].n * calls[c].classes * calls[c].strips() * splits[c].count;
    most = units[c] > most ? units[c] : most;
  }
  threads = (int)clamp(threads, 1, most);
  int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
  for (int c = 0; c < joined; c++) {
    int64_t u0, u1;
    thread_units(calls[c], splits[c], units[c], omp_get_thread_num(), omp_get_num_threads(), &u0, &u1);
    if (u1 > u0) failed |= !runners[c](calls[c], splits[c], u0, u1);
  }
  if (partials != nullptr) {
    if (!failed) merge_parts(calls[0], out_dtypes[0], splits[0], threads);
    free(partials);
  }
  return failed ? 1 : 0;
}

}  // namespace

// Problems (i, c), i < n, c < classes: query row r (of q_rows), at position p = r + row_shift,
// attends the key rows a + first .. a + last, a = p / rows_per_step * keys_per_step, and none past
// p where causal (within 0 .. k_rows - 1; none: zeros and lse -inf), of problem (i / n_group, c /
// class_group) of k and v. Threads take strips of strip_rows rows of a problem (0: all of them).
// sizes: n, classes, n_group, class_group, q_rows, k_rows, head dims (q's and k's, v's: any), first, last, strip_rows,
// row_shift (>= 0), rows_per_step (>= 1), keys_per_step (>= 0), causal (0 or 1), key_group (>= 1:
// key rows in groups of that many, each group at its own stride), group_span (>= key_group) and
// group_first (the keys' positions: `Call`), distance (>= 0), mask_stride, skip_count, then that
// many strides (>= 1): causal rows see no key past p - distance (others none at |p - position| <
// distance), nor any at p - position = 0 mod one of them;
// mask: [q_rows, k_rows] bytes, row r's at r * mask_stride, the keys each row attends (0: not) of
// its span, shared by every problem, or null;
// seed_out, seed_lse: (out in seed_dtype, lse float32) of each row over other keys, which the rows
// continue (their merge is written), or null (a null seed_lse: none; seed_out is null where values
// have no features); they may be out and lse themselves (a strip reads its rows' seed before it
// writes them).
// strides: in elements, [i, c, row] for q, out, lse, seed_out, seed_lse, [i, c, row, group] for k
// and v, in the order q, k, v, out, lse, seed_out, seed_lse.
// args, one array (a call's few arguments converted once: a decode step's calls are microseconds):
// the addresses of q, k, v, out, lse, seed_out, seed_lse and mask (0: null), the dtypes of q (k
// and v alike), out and seed_out, the 23 strides, then the sizes.
// Returns 0, or 1 where a thread's buffers could not be allocated, 2 for an unknown dtype, 3 for a
// step out of range.
extern "C" int span_attention(const int64_t *args, float scale, int threads) {
  Call call;
  int in_dtype, out_dtype;
  int64_t row_keys;
  const int status = read_call(args, scale, &call, &in_dtype, &out_dtype, &row_keys);
  if (status) return status;
  if (call.q_rows <= 0 || call.n * call.classes <= 0) return 0;
  return run_calls(&call, &in_dtype, &out_dtype, &row_keys, 1, threads);
}

// `joined` calls (args: each one's array, as span_attention's), 2 .. MOST_JOINED, over the same rows
// and disjoint keys, computed as one: each row's result over the keys of all of them written once,
// into call 0's out and lse (out_dtype's), as one running softmax would have it (a union's decode
// row: its window's and its stride's keys, one call's host work and threads' start, no partial
// between them). The calls have the same rows: as many, each row's out and lse at the same place in
// every call, and out dtypes and v's head dims alike; none has a seed. Returns as span_attention
// does (3 also where the calls break this).
extern "C" int span_attention_joined(const int64_t *const *args, int joined, float scale, int threads) {
  if (joined < 2 || joined > MOST_JOINED) return 3;
  Call calls[MOST_JOINED];
  int in_dtypes[MOST_JOINED], out_dtypes[MOST_JOINED];
  int64_t row_keys[MOST_JOINED];
  for (int c = 0; c < joined; c++) {
    const int status = read_call(args[c], scale, &calls[c], &in_dtypes[c], &out_dtypes[c], &row_keys[c]);
    if (status) return status;
  }
  const Call &first = calls[0];
  const int64_t rows = first.n * first.classes * first.q_rows, bytes = out_dtypes[0] == FLOAT32 ? 4 : 2;
  for (int c = 0; c < joined; c++) {
    const Call &call = calls[c];
    if (call.n * call.classes * call.q_rows != rows || call.v_features != first.v_features ||
        out_dtypes[c] != out_dtypes[0] || call.seed_out != nullptr || call.seed_lse != nullptr)
      return 3;
    for (int64_t row = 0; row < rows; row++) {  // row's place in out and lse, in call c and in call 0
      auto place = [row](const Call &x, const int64_t *stride) {
        const int64_t i = row / (x.classes * x.q_rows), k = row / x.q_rows % x.classes, r = row % x.q_rows;
        return i * stride[0] + k * stride[1] + r * stride[2];
      };
      if ((const char *)call.out + place(call, call.out_stride) * bytes !=
              (const char *)first.out + place(first, first.out_stride) * bytes ||
          call.lse + place(call, call.lse_stride) != first.lse + place(first, first.lse_stride))
        return 3;
    }
  }
  if (rows <= 0) return 0;
  return run_calls(calls, in_dtypes, out_dtypes, row_keys, joined, threads);
}

// Rows of partials (a_out, a_lse) and (b_out, b_lse) over disjoint keys merged into (out, lse), which
// may be a's own (an in-place fold). shape: the lse's (dims entries, at most 6) then the outputs'
// features; strides: in elements, dims for each of out, lse, a_out, a_lse, b_out, b_lse in turn
// (the outputs' features contiguous). Returns 0, or 2 for an unknown dtype, 3 for too many dims.
extern "C" int span_merge(void *out, float *lse, const void *a_out, const float *a_lse, const void *b_out,
                          const float *b_lse, int out_dtype, int a_dtype, int b_dtype, int64_t dims,
                          const int64_t *shape, const int64_t *strides, int threads) {
  if (dims > 6) return 3;
  if (a_dtype < FLOAT32 || a_dtype > BFLOAT16 || b_dtype < FLOAT32 || b_dtype > BFLOAT16) return 2;
  const int64_t features = shape[dims];
  switch (out_dtype) {
    case FLOAT32:
      merge_two<FLOAT32>(out, lse, a_out, a_lse, b_out, b_lse, a_dtype, b_dtype, dims, shape, strides, features,
                         threads);
      return 0;
    case FLOAT16:
      merge_two<FLOAT16>(out, lse, a_out, a_lse, b_out, b_lse, a_dtype, b_dtype, dims, shape, strides, features,
                         threads);
      return 0;
    case BFLOAT16:
      merge_two<BFLOAT16>(out, lse, a_out, a_lse, b_out, b_lse, a_dtype, b_dtype, dims, shape, strides, features,
                          threads);
      return 0;
  }
  return 2;
}

// How bfloat16 inputs are multiplied here: 2 on AMX's tiles, 1 their scores as bfloat16 pairs
// (AVX512_BF16), 0 in float32 vectors (as float16 always is).
extern "C" int span_attention_bfloat16_products() {
#if SPAN_AMX
  if (amx_permitted()) return 2;
#endif
  return SPAN_BF16_PAIRS;
}

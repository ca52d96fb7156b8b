// Attention over many problems at once on the CPU, each query row attending one span of key rows
// (row r at position p = r + row_shift: keys a + first .. a + last, anchored at a = p /
// rows_per_step * keys_per_step, so at p itself where both are 1; causal: none past p): a stride's
// classes (causal squares of a few hundred rows), a sliding window's band, fixed's own blocks (l
// keys anchored at the block's start) and its summary keys (a prefix of the gathered ones that grows
// by c keys every l rows); span_kernel.py says who calls it.
//
// torch's CPU flash kernel computes such problems 32 or 64 query rows at a time, packing each
// block's keys anew, and reads a class's rows s rows apart from memory. Here each thread takes a
// problem's strip of rows (all its rows where the spans are unbounded): it packs the keys the
// strip sees (transposed) and their values once, in cache, fetches the next strip's rows while it
// computes, and computes BLOCK_ROWS query rows at a time against exactly the keys those rows see
// between them, so a causal square's empty half or a band's outside costs a block's triangles
// only. Scores go through an exact softmax (a block's scores fit in a buffer) in float32, whatever
// the inputs' dtype (float32, float16 or bfloat16, converted as they are packed).
//
// Built by span_kernel.py with the host compiler (-O3 -march=native); vectors are GCC's vector
// extensions (16 floats), lowered to whatever the CPU has.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x16_unaligned __attribute__((vector_size(64), aligned(4)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16_unaligned __attribute__((vector_size(32), aligned(2)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));

constexpr int BLOCK_ROWS = 8;  // query rows computed together: 8 x 32 scores in 16 registers
// Keys packed at a time: their transposed keys and values (512 KB at head dims 64) stay in a core's
// L2 with the strip's rows. Rectangles of 4096 rows by 4096 keys, H = 8, D = 64, computed 0.63
// pairs per ns with the keys packed whole, 0.86 in chunks of 1024 (0.85-0.87 from 512 to 2048
// keys whole); chunks of 512 and 2048 were within 1% of 1024 at n = 16384 (strided, the band, the
// union, fixed), and 2048 4.5% slower for fixed(128, 8) at 65536.
constexpr int64_t KEY_CHUNK = 1024;
constexpr int LANES = 16;
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

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
  static void store16(uint16_t *p, f32x16 x) {
#if defined(__AVX512F__)
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtps_ph((__m512)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
    for (int i = 0; i < LANES; i++) { _Float16 h = (_Float16)x[i]; memcpy(p + i, &h, 2); }
#endif
  }
};
template <> struct Elements<BFLOAT16> {
  typedef uint16_t type;
  static f32x16 load16(const uint16_t *p) {
    u32x16 bits = __builtin_convertvector(*(const u16x16_unaligned *)p, u32x16) << 16;
    return (f32x16)bits;
  }
  static void store16(uint16_t *p, f32x16 x) {
    u32x16 bits = (u32x16)x;
    bits = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    bits = x != x ? u32x16{} + 0x7fc0u : bits;  // NaN stays NaN (rounding could carry it to -0)
    *(u16x16_unaligned *)p = __builtin_convertvector(bits, u16x16);
  }
};

// 2^x for x <= 0 (a score less the row's largest), to about one float32 ulp: 2^round(x) times a
// degree-7 polynomial of the rest (|r| <= 1/2); below 2^-126 it stays 2^-126 (nothing is lost: a
// row's largest term is 1).
inline f32x16 exp2_nonpositive(f32x16 x) {
  x = x < splat(-126.f) ? splat(-126.f) : x;
  f32x16 n = (x + 12582912.0f) - 12582912.0f;  // round to nearest
  f32x16 r = x - n;
  f32x16 p = splat(1.525273380405984e-05f);
  p = p * r + 1.5403530393381606e-04f;
  p = p * r + 1.3333558146428443e-03f;
  p = p * r + 9.618129107628477e-03f;
  p = p * r + 5.550410866482158e-02f;
  p = p * r + 2.402265069591007e-01f;
  p = p * r + LN2;
  p = p * r + 1.0f;
  i32x16 scale = (__builtin_convertvector(n, i32x16) + 127) << 23;
  return p * (f32x16)scale;
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
// B = 8, 4, 2, 1 in turn transposes it.
template <int B> inline void swap_blocks(f32x16 *m) {
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
  for (int r = 0; r < 16; r++) {
    if (r & B) continue;
    f32x16 a = m[r], b = m[r + B];
    m[r] = __builtin_shuffle(a, b, lower);
    m[r + B] = __builtin_shuffle(a, b, upper);
  }
}

inline void transpose16(f32x16 *m) {
  swap_blocks<8>(m);
  swap_blocks<4>(m);
  swap_blocks<2>(m);
  swap_blocks<1>(m);
}

struct Call {
  const void *q, *k, *v;
  void *out;
  float *lse;
  const float *seed_out, *seed_lse;  // a partial over other keys that the rows continue, or null
  // Problem (i, c) for i < n, c < classes reads keys and values of problem (i / n_group,
  // c / class_group). Strides in elements: [i, c, row].
  int64_t n, classes, n_group, class_group, q_rows, k_rows, dim, v_dim, first, last, strip_rows;
  int64_t row_shift, rows_per_step, keys_per_step, causal;
  int64_t q_stride[3], k_stride[3], v_stride[3], out_stride[3], lse_stride[3], seed_out_stride[3], seed_lse_stride[3];
  float scale;
  int64_t begin, end;  // this thread's work items: (problem, strip)
};

inline int64_t clamp(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : x > hi ? hi : x; }

inline void prefetch_rows(const char *base, int64_t stride_bytes, int64_t r0, int64_t r1, int64_t bytes) {
  for (int64_t r = r0; r < r1; r++)
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(base + r * stride_bytes + b, 0, 3);
}

// One work item's place: its problem's q, k, v rows, its rows and the keys they see.
template <typename In> struct Item {
  const In *q, *k, *v;
  int64_t i, c, row_begin, row_end, key_begin, key_end;
};

template <int IN, int OUT> struct Worker {
  typedef typename Elements<IN>::type In;
  typedef typename Elements<OUT>::type Out;
  const Call &a;
  int64_t width;  // keys a row of the buffers holds: a chunk's, a multiple of 16, and 16 more
  float *keys_t, *values, *scores, *queries, *acc, *row_top, *row_sum;

  explicit Worker(const Call &call) : a(call) {
    int64_t keys = 0;  // the most any of this thread's strips sees in one chunk
    for (int64_t w = a.begin; w < a.end; w++) {
      Item<In> it = item(w);
      keys = it.key_end - it.key_begin > keys ? it.key_end - it.key_begin : keys;
    }
    keys = keys < KEY_CHUNK ? keys : KEY_CHUNK;
    width = (keys + LANES - 1) / LANES * LANES + LANES;
    size_t floats = a.dim * width + width * a.v_dim + BLOCK_ROWS * width + BLOCK_ROWS * a.dim +
                    a.strip_rows * (a.v_dim + 2);
    keys_t = (float *)aligned_alloc(64, (sizeof(float) * floats + 127) / 64 * 64);
    values = keys_t + a.dim * width;
    scores = values + width * a.v_dim;
    queries = scores + BLOCK_ROWS * width;
    acc = queries + BLOCK_ROWS * a.dim;
    row_top = acc + a.strip_rows * a.v_dim;
    row_sum = row_top + a.strip_rows;
  }
  ~Worker() { free(keys_t); }
  bool ok() const { return keys_t != nullptr; }

  int64_t anchor(int64_t row) const { return (row + a.row_shift) / a.rows_per_step * a.keys_per_step; }
  int64_t keys_from(int64_t row) const { return clamp(anchor(row) + a.first, 0, a.k_rows); }
  int64_t keys_to(int64_t row) const {  // past the last
    int64_t to = anchor(row) + a.last + 1;
    if (a.causal && to > row + a.row_shift + 1) to = row + a.row_shift + 1;
    return clamp(to, 0, a.k_rows);
  }

  Item<In> item(int64_t w) const {
    int64_t strips = (a.q_rows + a.strip_rows - 1) / a.strip_rows, p = w / strips, t = w % strips;
    Item<In> it;
    it.i = p / a.classes;
    it.c = p % a.classes;
    int64_t ki = it.i / a.n_group, kc = it.c / a.class_group;
    it.q = (const In *)a.q + it.i * a.q_stride[0] + it.c * a.q_stride[1];
    it.k = (const In *)a.k + ki * a.k_stride[0] + kc * a.k_stride[1];
    it.v = (const In *)a.v + ki * a.v_stride[0] + kc * a.v_stride[1];
    it.row_begin = t * a.strip_rows;
    it.row_end = it.row_begin + a.strip_rows < a.q_rows ? it.row_begin + a.strip_rows : a.q_rows;
    it.key_begin = keys_from(it.row_begin);
    it.key_end = keys_to(it.row_end - 1);
    if (it.key_end < it.key_begin) it.key_end = it.key_begin;
    return it;
  }

  void run() {
    for (int64_t w = a.begin; w < a.end; w++) strip(item(w), w + 1 < a.end ? w + 1 : -1);
  }

  // Keys [0, keys) from k transposed into keys_t (dim x width, zeros to a multiple of 16 and 16
  // past), their values into `values` (keys x v_dim).
  void pack(const In *k, const In *v, int64_t keys) {
    int64_t padded = (keys + LANES - 1) / LANES * LANES + LANES;
    for (int64_t j0 = 0; j0 < padded; j0 += LANES) {
      for (int64_t d0 = 0; d0 < a.dim; d0 += LANES) {
        f32x16 tile[LANES];
        for (int r = 0; r < LANES; r++)
          tile[r] = j0 + r < keys ? Elements<IN>::load16(k + (j0 + r) * a.k_stride[2] + d0) : splat(0.f);
        transpose16(tile);
        for (int c = 0; c < LANES; c++) store(keys_t + (d0 + c) * width + j0, tile[c]);
      }
    }
    for (int64_t j = 0; j < keys; j++)
      for (int64_t d = 0; d < a.v_dim; d += LANES)
        store(values + j * a.v_dim + d, Elements<IN>::load16(v + j * a.v_stride[2] + d));
  }

  // scores[r][j] = q_r . k_(start + j) (scaled by scale * log2 e) for the block's rows, j < keys
  // (a multiple of 16).
  void block_scores(int64_t start, int64_t keys) {
    const float *kt = keys_t + start;
    int64_t j = 0;
    for (; j + 2 * LANES <= keys; j += 2 * LANES) {
      f32x16 s0[BLOCK_ROWS], s1[BLOCK_ROWS];
#pragma GCC unroll 8
      for (int r = 0; r < BLOCK_ROWS; r++) s0[r] = s1[r] = splat(0.f);
      for (int64_t d = 0; d < a.dim; d++) {
        f32x16 k0 = load(kt + d * width + j), k1 = load(kt + d * width + j + LANES);
#pragma GCC unroll 8
        for (int r = 0; r < BLOCK_ROWS; r++) {
          float x = queries[r * a.dim + d];
          s0[r] += x * k0;
          s1[r] += x * k1;
        }
      }
#pragma GCC unroll 8
      for (int r = 0; r < BLOCK_ROWS; r++) {
        store(scores + r * width + j, s0[r]);
        store(scores + r * width + j + LANES, s1[r]);
      }
    }
    for (; j < keys; j += LANES) {
      f32x16 s0[BLOCK_ROWS];
#pragma GCC unroll 8
      for (int r = 0; r < BLOCK_ROWS; r++) s0[r] = splat(0.f);
      for (int64_t d = 0; d < a.dim; d++) {
        f32x16 k0 = load(kt + d * width + j);
#pragma GCC unroll 8
        for (int r = 0; r < BLOCK_ROWS; r++) s0[r] += queries[r * a.dim + d] * k0;
      }
#pragma GCC unroll 8
      for (int r = 0; r < BLOCK_ROWS; r++) store(scores + r * width + j, s0[r]);
    }
  }

  // A row's scores over [0, keys) as probabilities relative to the larger of the row's running
  // largest score `top` (base-2 units, -inf before any key) and the largest in [from, to), zero
  // outside [from, to); returns that larger one and writes the probabilities' sum.
  float softmax_row(float *s, int64_t from, int64_t to, int64_t keys, float top, float *sum) {
    const f32x16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const f32x16 lo = splat((float)from), hi = splat((float)to);
    f32x16 most = splat(top);
    for (int64_t j = 0; j < keys; j += LANES) {
      f32x16 at = lane + (float)j, x = load(s + j);
      x = at >= lo && at < hi ? x : splat(-INFINITY);
      most = x > most ? x : most;
    }
    float m = lanes_max(most);
    f32x16 total = splat(0.f);
    for (int64_t j = 0; j < keys; j += LANES) {
      f32x16 at = lane + (float)j, x = exp2_nonpositive(load(s + j) - m);
      x = at >= lo && at < hi ? x : splat(0.f);
      total += x;
      store(s + j, x);
    }
    *sum = lanes_sum(total);
    return m;
  }

  // Rows r0 .. r0 + rows - 1 of the strip written out from their running state (`at`: the first's
  // place in it): zeros and -inf where they saw no key.
  void finish_rows(Out *out, float *lse, int64_t r0, int64_t rows, int64_t at) {
    for (int64_t r = 0; r < rows; r++) {
      float sum = row_sum[at + r];  // acc holds nothing yet where it is 0
      for (int64_t d = 0; d < a.v_dim; d += LANES)
        Elements<OUT>::store16(out + (r0 + r) * a.out_stride[2] + d,
                               sum > 0.f ? load(acc + (at + r) * a.v_dim + d) * (1.f / sum) : splat(0.f));
    }
    write_lse(lse, r0, rows, at);
  }

  void write_lse(float *lse, int64_t r0, int64_t rows, int64_t at) {
    for (int64_t r = 0; r < rows; r++)
      lse[(r0 + r) * a.lse_stride[2]] =
          row_top[at + r] == -INFINITY ? -INFINITY : (row_top[at + r] + log2f(row_sum[at + r])) * LN2;
  }

  // The strip's keys go KEY_CHUNK at a time (packed in cache, then every row block that sees some
  // of them), each row keeping a running largest score, sum and output (`acc`) as flash attention
  // does. A block's rows are written out within the chunk that holds their last keys, as its
  // products come in (written all at the strip's end, a stride's rows s rows apart cost 15% more).
  void strip(const Item<In> &it, int64_t next) {
    Out *out = (Out *)a.out + it.i * a.out_stride[0] + it.c * a.out_stride[1];
    float *lse = a.lse + it.i * a.lse_stride[0] + it.c * a.lse_stride[1];
    const int64_t strip_rows = it.row_end - it.row_begin;
    if (a.seed_out != nullptr) {  // the seed's rows as running state: its output, a sum of 1 at its lse
      const float *seed_out = a.seed_out + it.i * a.seed_out_stride[0] + it.c * a.seed_out_stride[1];
      const float *seed_lse = a.seed_lse + it.i * a.seed_lse_stride[0] + it.c * a.seed_lse_stride[1];
      for (int64_t r = 0; r < strip_rows; r++) {
        row_top[r] = seed_lse[(it.row_begin + r) * a.seed_lse_stride[2]] * LOG2E;
        row_sum[r] = row_top[r] == -INFINITY ? 0.f : 1.f;
        for (int64_t d = 0; d < a.v_dim; d += LANES)
          store(acc + r * a.v_dim + d, load(seed_out + (it.row_begin + r) * a.seed_out_stride[2] + d));
      }
    } else {
      for (int64_t r = 0; r < strip_rows; r++) {  // acc is written before it is read (keep 0: not read)
        row_top[r] = -INFINITY;
        row_sum[r] = 0.f;
      }
    }
    Item<In> after = next >= 0 ? item(next) : it;
    const int64_t blocks = (strip_rows + BLOCK_ROWS - 1) / BLOCK_ROWS;
    // The next item's keys to fetch: those this one did not read (a strip of the same problem, as the
    // band's or fixed's next strip, shares most of them), all of another problem's.
    const bool same_problem = next >= 0 && after.i == it.i && after.c == it.c;
    const int64_t fetch_from = same_problem && after.key_begin < it.key_end ? it.key_end : after.key_begin;
    const int64_t next_keys = after.key_end > fetch_from ? after.key_end - fetch_from : 0;
    const float q_scale = a.scale * LOG2E;
    for (int64_t c0 = it.key_begin; c0 < it.key_end; c0 += KEY_CHUNK) {
      const int64_t c1 = c0 + KEY_CHUNK < it.key_end ? c0 + KEY_CHUNK : it.key_end;
      const bool last_chunk = c1 == it.key_end;
      pack(it.k + c0 * a.k_stride[2], it.v + c0 * a.v_stride[2], c1 - c0);
      for (int64_t r0 = it.row_begin; r0 < it.row_end; r0 += BLOCK_ROWS) {
        int64_t rows = it.row_end - r0 < BLOCK_ROWS ? it.row_end - r0 : BLOCK_ROWS;
        if (next >= 0 && last_chunk) {  // the next item's rows, spread over this one's blocks
          int64_t b = (r0 - it.row_begin) / BLOCK_ROWS, k0 = fetch_from + b * next_keys / blocks,
                  k1 = fetch_from + (b + 1) * next_keys / blocks;
          int64_t q0 = after.row_begin + b * BLOCK_ROWS, q1 = q0 + BLOCK_ROWS < after.row_end ? q0 + BLOCK_ROWS : after.row_end;
          prefetch_rows((const char *)after.q, a.q_stride[2] * sizeof(In), q0, q1, a.dim * sizeof(In));
          prefetch_rows((const char *)after.k, a.k_stride[2] * sizeof(In), k0, k1, a.dim * sizeof(In));
          prefetch_rows((const char *)after.v, a.v_stride[2] * sizeof(In), k0, k1, a.v_dim * sizeof(In));
        }
        // The chunk's keys the block's rows see between them, as packed-buffer columns [start, start + seen).
        int64_t from = clamp(keys_from(r0), c0, c1), to = clamp(keys_to(r0 + rows - 1), c0, c1);
        const int64_t block_end = keys_to(r0 + rows - 1), at0 = r0 - it.row_begin;
        const bool finishing = block_end <= c1 && (block_end > c0 || c0 == it.key_begin);
        if (to <= from) {
          if (finishing) finish_rows(out, lse, r0, rows, at0);
          continue;
        }
        int64_t start = from - c0, seen = to - from, padded = (seen + LANES - 1) / LANES * LANES;
        for (int64_t r = 0; r < BLOCK_ROWS; r++)
          for (int64_t d = 0; d < a.dim; d += LANES)
            store(queries + r * a.dim + d,
                  r < rows ? Elements<IN>::load16(it.q + (r0 + r) * a.q_stride[2] + d) * q_scale : splat(0.f));
        block_scores(start, padded);
        float keep[BLOCK_ROWS];  // what the running output is scaled by before this chunk adds to it (0: unread)
        for (int r = 0; r < BLOCK_ROWS; r++) {
          float *s = scores + r * width;
          int64_t at = r0 - it.row_begin + r;
          int64_t lo = r < rows ? clamp(keys_from(r0 + r), c0, c1) - from : 0;
          int64_t hi = r < rows ? clamp(keys_to(r0 + r), c0, c1) - from : 0;
          keep[r] = r < rows && row_top[at] != -INFINITY ? 1.f : 0.f;
          if (hi <= lo) {
            for (int64_t j = 0; j < padded; j += LANES) store(s + j, splat(0.f));
            continue;
          }
          float sum, top = softmax_row(s, lo, hi, padded, row_top[at], &sum);
          keep[r] = row_top[at] == -INFINITY ? 0.f : row_top[at] == top ? 1.f : exp2f(row_top[at] - top);
          row_top[at] = top;
          row_sum[at] = row_sum[at] * keep[r] + sum;
        }
        const float *vals = values + start * a.v_dim;
        float *acc_rows = acc + at0 * a.v_dim;
        float inverse[BLOCK_ROWS];
        for (int64_t r = 0; r < rows; r++) inverse[r] = row_sum[at0 + r] > 0.f ? 1.f / row_sum[at0 + r] : 0.f;
        for (int64_t d0 = 0; d0 < a.v_dim; d0 += 2 * LANES) {
          bool pair = d0 + 2 * LANES <= a.v_dim;
          f32x16 o0[BLOCK_ROWS], o1[BLOCK_ROWS];
#pragma GCC unroll 8
          for (int r = 0; r < BLOCK_ROWS; r++) o0[r] = o1[r] = splat(0.f);
          if (pair) {
            for (int64_t j = 0; j < seen; j++) {
              f32x16 x0 = load(vals + j * a.v_dim + d0), x1 = load(vals + j * a.v_dim + d0 + LANES);
#pragma GCC unroll 8
              for (int r = 0; r < BLOCK_ROWS; r++) {
                float w = scores[r * width + j];
                o0[r] += w * x0;
                o1[r] += w * x1;
              }
            }
          } else {
            for (int64_t j = 0; j < seen; j++) {
              f32x16 x0 = load(vals + j * a.v_dim + d0);
#pragma GCC unroll 8
              for (int r = 0; r < BLOCK_ROWS; r++) o0[r] += scores[r * width + j] * x0;
            }
          }
          for (int64_t r = 0; r < rows; r++) {
            float *row = acc_rows + r * a.v_dim + d0;
            f32x16 x0 = o0[r], x1 = o1[r];
            if (keep[r] != 0.f) {
              x0 += load(row) * keep[r];
              if (pair) x1 += load(row + LANES) * keep[r];
            }
            if (finishing) {
              Out *written = out + (r0 + r) * a.out_stride[2] + d0;
              Elements<OUT>::store16(written, x0 * inverse[r]);
              if (pair) Elements<OUT>::store16(written + LANES, x1 * inverse[r]);
            } else {
              store(row, x0);
              if (pair) store(row + LANES, x1);
            }
          }
        }
        if (finishing) write_lse(lse, r0, rows, at0);
      }
    }
    if (it.key_end == it.key_begin) finish_rows(out, lse, it.row_begin, strip_rows, 0);  // no key: zeros, -inf
  }
};

template <int IN, int OUT> void *run_thread(void *call) {
  Worker<IN, OUT> worker(*(const Call *)call);
  if (!worker.ok()) return (void *)1;
  worker.run();
  return nullptr;
}

typedef void *(*Runner)(void *);

template <int IN> Runner runner_for(int out) {
  switch (out) {
    case FLOAT32: return run_thread<IN, FLOAT32>;
    case FLOAT16: return run_thread<IN, FLOAT16>;
    case BFLOAT16: return run_thread<IN, BFLOAT16>;
  }
  return nullptr;
}

Runner runner(int in, int out) {
  switch (in) {
    case FLOAT32: return runner_for<FLOAT32>(out);
    case FLOAT16: return runner_for<FLOAT16>(out);
    case BFLOAT16: return runner_for<BFLOAT16>(out);
  }
  return nullptr;
}

}  // namespace

// Problems (i, c), i < n, c < classes: query row r (of q_rows), at position p = r + row_shift,
// attends the key rows a + first .. a + last, a = p / rows_per_step * keys_per_step, and none past
// p where causal (within 0 .. k_rows - 1; none: zeros and lse -inf), of problem (i / n_group, c /
// class_group) of k and v. Threads take strips of strip_rows rows of a problem (0: all of them).
// sizes: n, classes, n_group, class_group, q_rows, k_rows, dim, v_dim, first, last, strip_rows,
// row_shift (>= 0), rows_per_step (>= 1), keys_per_step (>= 0), causal (0 or 1);
// seed_out, seed_lse: float32 (out, lse) of each row over other keys, which the rows continue (their
// merge is written), or null; they may be out and lse themselves (a strip reads its rows' seed
// before it writes them).
// strides: 3 each (elements, [i, c, row]) for q, k, v, out, lse, seed_out, seed_lse; dim and v_dim
// multiples of 16.
// Returns 0, or 1 where a thread's buffers could not be allocated, 2 for an unknown dtype, 3 for a
// step out of range.
extern "C" int span_attention(const void *q, const void *k, const void *v, void *out, float *lse,
                              const float *seed_out, const float *seed_lse, int in_dtype, int out_dtype,
                              const int64_t *sizes, const int64_t *strides, float scale, int threads) {
  Runner run = runner(in_dtype, out_dtype);
  if (run == nullptr) return 2;
  Call call = {q, k, v, out, lse, seed_out, seed_lse};
  int64_t *fields[15] = {&call.n, &call.classes, &call.n_group, &call.class_group, &call.q_rows, &call.k_rows,
                         &call.dim, &call.v_dim, &call.first, &call.last, &call.strip_rows, &call.row_shift,
                         &call.rows_per_step, &call.keys_per_step, &call.causal};
  for (int f = 0; f < 15; f++) *fields[f] = sizes[f];
  if (call.row_shift < 0 || call.rows_per_step < 1 || call.keys_per_step < 0) return 3;
  if (call.strip_rows <= 0 || call.strip_rows > call.q_rows) call.strip_rows = call.q_rows;
  int64_t *targets[7] = {call.q_stride, call.k_stride, call.v_stride, call.out_stride, call.lse_stride,
                         call.seed_out_stride, call.seed_lse_stride};
  for (int t = 0; t < 7; t++) memcpy(targets[t], strides + 3 * t, 3 * sizeof(int64_t));
  call.scale = scale;
  if (call.q_rows <= 0 || call.n * call.classes <= 0) return 0;
  int64_t items = call.n * call.classes * ((call.q_rows + call.strip_rows - 1) / call.strip_rows);
  threads = (int)clamp(threads, 1, items);
  int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
  {
    Call share = call;
    int64_t t = omp_get_thread_num(), count = omp_get_num_threads();  // fewer inside another parallel region
    share.begin = items * t / count;
    share.end = items * (t + 1) / count;
    failed |= run(&share) != nullptr;
  }
  return failed ? 1 : 0;
}

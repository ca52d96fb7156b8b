// Causal attention over many small problems at once on the CPU: a stride's classes (strided.py).
//
// torch's CPU flash kernel computes such problems (a few hundred rows each) 32 or 64 query rows at
// a time, packing each block's keys anew, and reads a class's rows s rows apart from memory; here
// each thread takes whole problems: it packs a problem's keys (transposed) and values once, in
// cache, fetches the next problem's rows while it computes, and computes BLOCK_ROWS query rows at a
// time against exactly the keys their last row sees, so the causal square's empty half costs a
// block's triangle only. Scores go through an exact softmax (a row's scores fit in a buffer) in
// float32, whatever the inputs' dtype (float32, float16 or bfloat16, converted as they are packed).
//
// Built by class_kernel.py with the host compiler (-O3 -march=native); vectors are GCC's vector
// extensions (16 floats), lowered to whatever the CPU has.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <pthread.h>
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
  // Problem p = (i, c): query head row i of N, class c of `classes`; its keys and values are those
  // of row i / group. Strides in elements: [row of N, class, row of the problem].
  int64_t group, classes, q_rows, k_rows, dim, v_dim, diagonal;
  int64_t q_stride[3], k_stride[3], v_stride[3], out_stride[3], lse_stride[3];
  float scale;
  int64_t first, last;  // this thread's problems
};

inline int64_t clamp(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : x > hi ? hi : x; }

inline void prefetch_rows(const char *base, int64_t stride_bytes, int64_t r0, int64_t r1, int64_t bytes) {
  for (int64_t r = r0; r < r1; r++)
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(base + r * stride_bytes + b, 0, 3);
}

template <int IN, int OUT> struct Worker {
  typedef typename Elements<IN>::type In;
  typedef typename Elements<OUT>::type Out;
  const Call &a;
  int64_t width;  // keys a row of the buffers holds: a multiple of 32
  float *keys_t, *values, *scores, *queries;

  explicit Worker(const Call &call) : a(call) {
    int64_t keys = clamp(a.q_rows + a.diagonal, 0, a.k_rows);
    width = (keys + 31) / 32 * 32;
    size_t floats = a.dim * width + width * a.v_dim + BLOCK_ROWS * width + BLOCK_ROWS * a.dim;
    keys_t = (float *)aligned_alloc(64, (sizeof(float) * floats + 127) / 64 * 64);
    values = keys_t + a.dim * width;
    scores = values + width * a.v_dim;
    queries = scores + BLOCK_ROWS * width;
  }
  ~Worker() { free(keys_t); }
  bool ok() const { return keys_t != nullptr; }

  const In *row_of(const void *base, const int64_t *stride, int64_t p) const {
    int64_t i = p / a.classes, c = p % a.classes;
    return (const In *)base + i * stride[0] + c * stride[1];
  }

  void run() {
    for (int64_t p = a.first; p < a.last; p++) problem(p, p + 1 < a.last ? p + 1 : -1);
  }

  // Keys [0, keys) of problem p transposed into keys_t (dim x width, zeros past `keys` to a
  // multiple of 16), its values into `values` (keys x v_dim).
  void pack(const In *k, const In *v, int64_t keys) {
    for (int64_t j0 = 0; j0 < keys; j0 += LANES) {
      for (int64_t d0 = 0; d0 < a.dim; d0 += LANES) {
        f32x16 tile[LANES];
        for (int r = 0; r < LANES; r++)
          tile[r] = j0 + r < keys ? Elements<IN>::load16(k + (j0 + r) * a.k_stride[2] + d0) : splat(0.f);
        transpose16(tile);
        for (int c = 0; c < LANES; c++) store(keys_t + (d0 + c) * width + j0, tile[c]);
      }
    }
    for (int64_t j = 0; j < keys; j++)
      for (int64_t d = 0; d < a.v_dim; d += LANES) store(values + j * a.v_dim + d, Elements<IN>::load16(v + j * a.v_stride[2] + d));
  }

  // scores[i][j] = q_i . k_j (scaled by scale * log2 e) for the block's rows, keys [0, keys).
  void block_scores(int64_t keys) {
    int64_t j = 0;
    for (; j + 2 * LANES <= keys; j += 2 * LANES) {
      f32x16 s0[BLOCK_ROWS], s1[BLOCK_ROWS];
#pragma GCC unroll 8
      for (int i = 0; i < BLOCK_ROWS; i++) s0[i] = s1[i] = splat(0.f);
      for (int64_t d = 0; d < a.dim; d++) {
        f32x16 k0 = load(keys_t + d * width + j), k1 = load(keys_t + d * width + j + LANES);
#pragma GCC unroll 8
        for (int i = 0; i < BLOCK_ROWS; i++) {
          float x = queries[i * a.dim + d];
          s0[i] += x * k0;
          s1[i] += x * k1;
        }
      }
#pragma GCC unroll 8
      for (int i = 0; i < BLOCK_ROWS; i++) {
        store(scores + i * width + j, s0[i]);
        store(scores + i * width + j + LANES, s1[i]);
      }
    }
    for (; j < keys; j += LANES) {
      f32x16 s0[BLOCK_ROWS];
#pragma GCC unroll 8
      for (int i = 0; i < BLOCK_ROWS; i++) s0[i] = splat(0.f);
      for (int64_t d = 0; d < a.dim; d++) {
        f32x16 k0 = load(keys_t + d * width + j);
#pragma GCC unroll 8
        for (int i = 0; i < BLOCK_ROWS; i++) s0[i] += queries[i * a.dim + d] * k0;
      }
#pragma GCC unroll 8
      for (int i = 0; i < BLOCK_ROWS; i++) store(scores + i * width + j, s0[i]);
    }
  }

  // Row i's scores over keys [0, seen) as probabilities times their sum (keys past seen: 0);
  // returns the row's largest score (base-2 units) and writes the sum.
  float softmax_row(float *s, int64_t seen, int64_t keys, float *sum) {
    const f32x16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    f32x16 top = splat(-INFINITY);
    for (int64_t j = 0; j < keys; j += LANES) {
      f32x16 x = load(s + j);
      x = lane + (float)j < (float)seen ? x : splat(-INFINITY);
      top = x > top ? x : top;
    }
    float m = lanes_max(top);
    f32x16 total = splat(0.f);
    for (int64_t j = 0; j < keys; j += LANES) {
      f32x16 x = exp2_nonpositive(load(s + j) - m);
      x = lane + (float)j < (float)seen ? x : splat(0.f);
      total += x;
      store(s + j, x);
    }
    *sum = lanes_sum(total);
    return m;
  }

  void problem(int64_t p, int64_t next) {
    int64_t i = p / a.classes, c = p % a.classes, kv = i / a.group * a.classes + c;
    const In *q = row_of(a.q, a.q_stride, p), *k = row_of(a.k, a.k_stride, kv), *v = row_of(a.v, a.v_stride, kv);
    Out *out = (Out *)a.out + i * a.out_stride[0] + c * a.out_stride[1];
    float *lse = a.lse + i * a.lse_stride[0] + c * a.lse_stride[1];
    int64_t keys = clamp(a.q_rows + a.diagonal, 0, a.k_rows);
    pack(k, v, keys);
    const char *q_next = nullptr, *k_next = nullptr, *v_next = nullptr;
    if (next >= 0) {
      int64_t kv_next = next / a.classes / a.group * a.classes + next % a.classes;  // as kv above
      q_next = (const char *)row_of(a.q, a.q_stride, next);
      k_next = (const char *)row_of(a.k, a.k_stride, kv_next);
      v_next = (const char *)row_of(a.v, a.v_stride, kv_next);
    }
    const int64_t blocks = (a.q_rows + BLOCK_ROWS - 1) / BLOCK_ROWS;
    const float q_scale = a.scale * LOG2E;
    for (int64_t r0 = 0; r0 < a.q_rows; r0 += BLOCK_ROWS) {
      int64_t rows = a.q_rows - r0 < BLOCK_ROWS ? a.q_rows - r0 : BLOCK_ROWS;
      if (next >= 0) {  // the next problem's rows, spread over this one's blocks
        int64_t b = r0 / BLOCK_ROWS, k0 = b * keys / blocks, k1 = (b + 1) * keys / blocks;
        prefetch_rows(q_next, a.q_stride[2] * sizeof(In), r0, r0 + rows, a.dim * sizeof(In));
        prefetch_rows(k_next, a.k_stride[2] * sizeof(In), k0, k1, a.dim * sizeof(In));
        prefetch_rows(v_next, a.v_stride[2] * sizeof(In), k0, k1, a.v_dim * sizeof(In));
      }
      int64_t block_keys = clamp(r0 + rows + a.diagonal, 0, a.k_rows);  // those its last row sees
      for (int64_t r = 0; r < BLOCK_ROWS; r++)
        for (int64_t d = 0; d < a.dim; d += LANES)
          store(queries + r * a.dim + d,
                r < rows ? Elements<IN>::load16(q + (r0 + r) * a.q_stride[2] + d) * q_scale : splat(0.f));
      int64_t padded = (block_keys + LANES - 1) / LANES * LANES;
      block_scores(padded);
      float top[BLOCK_ROWS], sum[BLOCK_ROWS];
      for (int r = 0; r < BLOCK_ROWS; r++) {
        float *s = scores + r * width;
        int64_t seen = r < rows ? clamp(r0 + r + 1 + a.diagonal, 0, a.k_rows) : 0;
        if (seen == 0) {
          top[r] = -INFINITY;
          sum[r] = 0.f;
          for (int64_t j = 0; j < padded; j += LANES) store(s + j, splat(0.f));
        } else {
          top[r] = softmax_row(s, seen, padded, &sum[r]);
        }
      }
      for (int64_t d0 = 0; d0 < a.v_dim; d0 += 2 * LANES) {
        bool pair = d0 + 2 * LANES <= a.v_dim;
        f32x16 o0[BLOCK_ROWS], o1[BLOCK_ROWS];
#pragma GCC unroll 8
        for (int r = 0; r < BLOCK_ROWS; r++) o0[r] = o1[r] = splat(0.f);
        if (pair) {
          for (int64_t j = 0; j < block_keys; j++) {
            f32x16 x0 = load(values + j * a.v_dim + d0), x1 = load(values + j * a.v_dim + d0 + LANES);
#pragma GCC unroll 8
            for (int r = 0; r < BLOCK_ROWS; r++) {
              float w = scores[r * width + j];
              o0[r] += w * x0;
              o1[r] += w * x1;
            }
          }
        } else {
          for (int64_t j = 0; j < block_keys; j++) {
            f32x16 x0 = load(values + j * a.v_dim + d0);
#pragma GCC unroll 8
            for (int r = 0; r < BLOCK_ROWS; r++) o0[r] += scores[r * width + j] * x0;
          }
        }
        for (int64_t r = 0; r < rows; r++) {
          float inverse = sum[r] > 0.f ? 1.f / sum[r] : 0.f;
          Out *row = out + (r0 + r) * a.out_stride[2];
          Elements<OUT>::store16(row + d0, o0[r] * inverse);
          if (pair) Elements<OUT>::store16(row + d0 + LANES, o1[r] * inverse);
        }
      }
      for (int64_t r = 0; r < rows; r++)
        lse[(r0 + r) * a.lse_stride[2]] = top[r] == -INFINITY ? -INFINITY : (top[r] + log2f(sum[r])) * LN2;
    }
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

// Problems (i, c) for i < problems / classes: query rows [0, q_rows) of row i, class c attend the
// key rows [0, min(k_rows, r + 1 + diagonal)) of row i / group, class c (none: zeros, lse -inf).
// sizes: problems, group, classes, q_rows, k_rows, dim, v_dim, diagonal; strides: 3 each (elements,
// [row of N, class, row]) for q, k, v, out, lse. dim and v_dim are multiples of 16. Returns 0, or
// 1 where a thread's buffers could not be allocated, 2 for an unknown dtype.
extern "C" int class_attention(const void *q, const void *k, const void *v, void *out, float *lse, int in_dtype,
                               int out_dtype, const int64_t *sizes, const int64_t *strides, float scale,
                               int threads) {
  Runner run = runner(in_dtype, out_dtype);
  if (run == nullptr) return 2;
  Call call = {q, k, v, out, lse};
  int64_t problems = sizes[0];
  call.group = sizes[1];
  call.classes = sizes[2];
  call.q_rows = sizes[3];
  call.k_rows = sizes[4];
  call.dim = sizes[5];
  call.v_dim = sizes[6];
  call.diagonal = sizes[7];
  int64_t *targets[5] = {call.q_stride, call.k_stride, call.v_stride, call.out_stride, call.lse_stride};
  for (int t = 0; t < 5; t++) memcpy(targets[t], strides + 3 * t, 3 * sizeof(int64_t));
  call.scale = scale;
  constexpr int MAX_THREADS = 256;
  threads = (int)clamp(threads, 1, clamp(problems, 1, MAX_THREADS));
  Call calls[MAX_THREADS];
  pthread_t ids[MAX_THREADS];
  bool started[MAX_THREADS] = {};
  for (int t = 0; t < threads; t++) {
    calls[t] = call;
    calls[t].first = problems * t / threads;
    calls[t].last = problems * (t + 1) / threads;
  }
  int failed = 0;
  for (int t = 1; t < threads; t++) started[t] = pthread_create(&ids[t], nullptr, run, &calls[t]) == 0;
  for (int t = 1; t < threads; t++)
    if (!started[t]) failed |= run(&calls[t]) != nullptr;  // no thread: this one does its share
  failed |= run(&calls[0]) != nullptr;
  for (int t = 1; t < threads; t++) {
    void *result = nullptr;
    if (started[t]) pthread_join(ids[t], &result);
    failed |= result != nullptr;
  }
  return failed ? 1 : 0;
}

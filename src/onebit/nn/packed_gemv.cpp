// Packed 1-bit GEMV/GEMM, reading the onebit storage streams directly (no unpacking into a dense weight, no
// repacked copy). Row-wise tensors are stored in tiles of 16 rows, column-major inside
// a tile (docs/format.md), so for one tile and one column the 16 rows' sign bits are one 16-bit word and
// their scales one 16-vector. The kernel works on a tile at a time with the 16 rows in the vector lanes: per
// column it decodes the 16 weights with mask blends (no scalar bit handling) and adds w · x[col] with one FMA
// per token.
//
// layout 0 ("sign"):  per block: signs (n × w bits), mu, alpha (n × 1 fp16):  ŵ = μ ± α
// layout 1 ("braq"):  per block: salient_cols (w bits), signs (n × w), signs2 (n × k, salient columns),
//     sparse (n × (w − k), non-salient columns), mu (n × 3: conc, sparse, salient), alpha (n × 4: conc,
//     sparse, salient first, salient second plane):
//     non-salient: ŵ = sparse ? μs ± αs : μc ± αc;   salient: ŵ = μsal ± α1 ± α2
// layout 2 ("arb-rc", num_p = 1 with CGB): per block: salient_cols, signs, signs2, sparse as braq, sal_sparse
//     (n × k, salient zone bit), alpha_r (n × 6: one row scale per plane), alpha_c (2 × (w − k): column scale
//     of each non-salient zone), alpha_c_sal (4 × k: of each salient zone's two planes):
//     non-salient, zone z: ŵ = ±αr[z]·αc[z][col];   salient, zone z: ŵ = ±αr[2+2z]·αcs[2z][col] ± αr[3+2z]·αcs[2z+1][col]
// layout 3 ("arb"/"arb-x" with CGB, num_p = 1): braq's streams plus sal_sparse (salient zone bit); mu (n × 4),
//     alpha (n × 6): non-salient as braq; salient zone z: ŵ = μ[2+z] ± α[2+2z] ± α[3+2z]
// Block table rows (int64): start, width, k, then the offset of signs, signs2, sparse, salient_cols, mu, alpha,
// sal_sparse, alpha_r, alpha_c, alpha_c_sal (bit offsets into the bit stream, element offsets into the fp16
// stream; kernels/TABLE_COLUMNS).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstring>
#include <vector>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define ONEBIT_AVX512 1
#endif

namespace {

constexpr int kTile = 16;  // rows per tile (formats/packed.py TILE)
constexpr int kStart = 0, kWidth = 1, kK = 2, kS1 = 3, kS2 = 4, kSp = 5, kCol = 6, kMu = 7, kAl = 8, kSsp = 9,
              kAr = 10, kAc = 11, kAcs = 12, kCols = 13;

// Up to 16 bits starting at bit ``off`` (LSB-first), for unaligned words (odd shapes, the last short tile).
inline uint32_t read_bits(const uint8_t* p, int64_t nbytes, int64_t off, int nb) {
    const int64_t b = off >> 3;
    uint32_t v = 0;
    if (b + 4 <= nbytes) {
        std::memcpy(&v, p + b, 4);
    } else {
        for (int k = 0; b + k < nbytes && k < 4; ++k) v |= static_cast<uint32_t>(p[b + k]) << (8 * k);
    }
    return (v >> (off & 7)) & ((1u << nb) - 1u);
}

// 16 lanes = the 16 rows of a tile.
#ifdef ONEBIT_AVX512
constexpr int kChains = 4;  // independent FMA chains per token pass
using Vec = __m512;
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vset(float a) { return _mm512_set1_ps(a); }
inline Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec vsub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
inline Vec vmul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
using Sel = __mmask16;  // lane l selected when bit l of a 16-bit word is set
inline Sel vmask(uint32_t word) { return static_cast<__mmask16>(word); }
inline Vec vselect(Sel m, Vec a, Vec b) { return _mm512_mask_blend_ps(m, a, b); }
inline Vec vload_half(const at::Half* p, int rows) {
    const __m256i h = rows == kTile ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                    : _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << rows) - 1u), p);
    return _mm512_cvtph_ps(h);
}
inline void vstore(float* y, Vec v, int rows) { _mm512_mask_storeu_ps(y, static_cast<__mmask16>((1u << rows) - 1u), v); }
#else
// GCC vector extensions in the target's native width (8 lanes with AVX2, else 4: SSE, NEON). 16 lanes are a
// binary tree of named halves down to one native vector: the compiler keeps named members in registers
// (a 16-lane generic vector or an array of parts went through the stack, measured 2-5x slower)
constexpr int kChains = 1;  // 16 lanes already take 2 to 4 registers per value
#ifdef __AVX2__
constexpr int kW = 8;
#else
constexpr int kW = 4;
#endif
typedef float VN __attribute__((vector_size(4 * kW)));
typedef int32_t IN __attribute__((vector_size(4 * kW)));
template <typename T, int N>
struct Pack {
    Pack<T, N / 2> lo, hi;
};
template <typename T>
struct Pack<T, kW> {
    T v;
};
using Vec = Pack<VN, kTile>;
using Sel = Pack<IN, kTile>;  // all-ones lanes are selected
// f applied to the native vectors of the packs p, leaf by leaf
template <typename R, int N = kTile, typename F, typename... P>
inline Pack<R, N> each(F f, const P&... p) {
    if constexpr (N == kW)
        return {f(p.v...)};
    else
        return {each<R, N / 2>(f, p.lo...), each<R, N / 2>(f, p.hi...)};
}
inline Vec vzero() { return each<VN>([] { return VN{}; }); }
inline Vec vset(float a) { return each<VN>([a] { return VN{} + a; }); }
inline Vec vadd(const Vec& a, const Vec& b) { return each<VN>([](VN x, VN y) { return x + y; }, a, b); }
inline Vec vsub(const Vec& a, const Vec& b) { return each<VN>([](VN x, VN y) { return x - y; }, a, b); }
inline Vec vmul(const Vec& a, const Vec& b) { return each<VN>([](VN x, VN y) { return x * y; }, a, b); }
inline Vec vfma(const Vec& a, const Vec& b, const Vec& c) {
    return each<VN>([](VN x, VN y, VN z) { return x * y + z; }, a, b, c);
}
inline Vec vselect(const Sel& m, const Vec& a, const Vec& b) {
    return each<VN>([](IN k, VN x, VN y) {
        return reinterpret_cast<VN>((reinterpret_cast<IN>(x) & ~k) | (reinterpret_cast<IN>(y) & k));
    }, m, a, b);
}
// kW bits → kW lanes of 0 / all-ones: a word's lane masks are 16 / kW table loads
struct BitLanes {
    IN v[1 << kW];
    BitLanes() {
        for (int b = 0; b < (1 << kW); ++b)
            for (int l = 0; l < kW; ++l) v[b][l] = (b >> l & 1) ? -1 : 0;
    }
};
const BitLanes kBitLanes;
template <int N = kTile>
inline Pack<IN, N> vmask(uint32_t word) {
    if constexpr (N == kW)
        return {kBitLanes.v[word & ((1u << kW) - 1u)]};
    else
        return {vmask<N / 2>(word), vmask<N / 2>(word >> (N / 2))};
}
inline Vec vload_half(const at::Half* p, int rows) {
    float t[kTile] = {};
    for (int l = 0; l < rows; ++l) t[l] = static_cast<float>(p[l]);
    Vec r;
    std::memcpy(&r, t, sizeof(t));
    return r;
}
inline void vstore(float* y, const Vec& v, int rows) {
    float t[kTile];
    std::memcpy(t, &v, sizeof(t));
    std::memcpy(y, t, sizeof(float) * rows);
}
#endif

// +v where the sign bit is set, −v elsewhere
inline Vec vsign(const Sel& s, const Vec& v) { return vselect(s, vsub(vzero(), v), v); }

struct Problem {
    const uint8_t* bp;
    int64_t nbytes;
    const at::Half* hp;
    const int64_t* tab;
    int64_t nblk, m, n;
    int64_t layout;
    const float* x;         // (T, m)
    const uint16_t* order;  // layouts 1-3: per block, the non-salient local columns, then the salient ones
    float* y;               // (T, n)
};

// One row-wise tensor of one block, seen from one tile: column c's word / fp16 vector.
template <bool Aligned>
struct TileView {
    const Problem* P;
    int64_t base;  // bit (or element) offset of the tile's first column
    int rows;
    inline uint32_t word(int64_t c) const {
        const int64_t off = base + c * rows;
        if constexpr (Aligned) {  // full tile at a 16-bit aligned offset: one 16-bit load
            uint16_t v;
            std::memcpy(&v, P->bp + (off >> 3), 2);
            return v;
        } else {
            return read_bits(P->bp, P->nbytes, off, rows);
        }
    }
    inline Vec coef(int64_t c) const { return vload_half(P->hp + base + c * rows, rows); }
};

// acc[u][t] += ŵ(col) · x[t][col] over cnt columns, NA independent accumulators (so consecutive FMAs do not
// wait on each other's latency), TT tokens per pass (accumulators stay in registers).
template <int TT, int NA, typename Decode>
inline void columns(Vec (&acc)[NA][TT], int64_t cnt, const float* x, int64_t m, Decode decode) {
    int64_t q = 0;
    for (; q + NA <= cnt; q += NA) {
#pragma GCC unroll 4
        for (int u = 0; u < NA; ++u) {
            int64_t col;
            const Vec w = decode(q + u, col);
#pragma GCC unroll 8
            for (int t = 0; t < TT; ++t) acc[u][t] = vfma(w, vset(x[t * m + col]), acc[u][t]);
        }
    }
    for (; q < cnt; ++q) {
        int64_t col;
        const Vec w = decode(q, col);
        for (int t = 0; t < TT; ++t) acc[0][t] = vfma(w, vset(x[t * m + col]), acc[0][t]);
    }
}

// y[t0 .. t0+TT) for the rows of tile g.
template <int TT, bool Aligned>
void tile_kernel(const Problem& P, int64_t g, int64_t t0) {
    constexpr int NA = TT >= kChains ? 1 : kChains / TT;
    const int rows = static_cast<int>(std::min<int64_t>(kTile, P.n - g * kTile));
    const int64_t r0 = g * kTile;
    Vec acc[NA][TT];
    for (auto& a : acc)
        for (auto& v : a) v = vzero();
    const float* x0 = P.x + t0 * P.m;
    for (int64_t j = 0; j < P.nblk; ++j) {
        const int64_t* r = P.tab + j * kCols;
        const int64_t w = r[kWidth], k = r[kK];
        const float* x = x0 + r[kStart];
        // a row-wise (n × d1) tensor at stream offset off: its tile g starts at off + 16·g·d1
        auto view = [&](int64_t off, int64_t d1) { return TileView<Aligned>{&P, off + r0 * d1, rows}; };
        const auto s1 = view(r[kS1], w);
        if (P.layout == 0) {
            const auto mu = view(r[kMu], 1), al = view(r[kAl], 1);
            const Vec m0 = mu.coef(0), a0 = al.coef(0);
            const Vec lo = vsub(m0, a0), hi = vadd(m0, a0);
            columns<TT, NA>(acc, w, x, P.m, [&](int64_t q, int64_t& col) {
                col = q;
                return vselect(vmask(s1.word(q)), lo, hi);
            });
            continue;
        }
        const auto sp = view(r[kSp], w - k), s2 = view(r[kS2], k);
        const uint16_t* ord = P.order + r[kStart];
        if (P.layout == 2) {
            const auto ar = view(r[kAr], 6), ssp = view(r[kSsp], k);
            // row scale of each plane: non-salient zones 0, 1; salient zone 0 planes 2, 3; zone 1 planes 4, 5
            const Vec rs0 = ar.coef(0), rs1 = ar.coef(1), rs2 = ar.coef(2), rs3 = ar.coef(3), rs4 = ar.coef(4),
                      rs5 = ar.coef(5);
            const at::Half* ac = P.hp + r[kAc];    // (2, w − k), row-major
            const at::Half* acs = P.hp + r[kAcs];  // (4, k)
            columns<TT, NA>(acc, w - k, x, P.m, [&](int64_t q, int64_t& col) {
                col = ord[q];
                const Vec v = vselect(vmask(sp.word(q)), vmul(rs0, vset(ac[q])), vmul(rs1, vset(ac[w - k + q])));
                return vsign(vmask(s1.word(col)), v);
            });
            columns<TT, NA>(acc, k, x, P.m, [&](int64_t q, int64_t& col) {
                col = ord[w - k + q];
                const Sel z = vmask(ssp.word(q));
                const Vec v1 = vselect(z, vmul(rs2, vset(acs[q])), vmul(rs4, vset(acs[2 * k + q])));
                const Vec v2 = vselect(z, vmul(rs3, vset(acs[k + q])), vmul(rs5, vset(acs[3 * k + q])));
                return vadd(vsign(vmask(s1.word(col)), v1), vsign(vmask(s2.word(q)), v2));
            });
            continue;
        }
        // braq: mu (conc, sparse, salient), alpha (conc, sparse, sal1, sal2); layout 3 (arb + CGB) adds a
        // second salient zone: mu (.., sal z0, sal z1), alpha (.., z0 sal1, z0 sal2, z1 sal1, z1 sal2)
        const bool cgb = P.layout == 3;
        const auto mu = view(r[kMu], cgb ? 4 : 3), al = view(r[kAl], cgb ? 6 : 4);
        const Vec mc = mu.coef(0), ms = mu.coef(1), ac = al.coef(0), as = al.coef(1);
        const Vec c_lo = vsub(mc, ac), c_hi = vadd(mc, ac), s_lo = vsub(ms, as), s_hi = vadd(ms, as);
        columns<TT, NA>(acc, w - k, x, P.m, [&](int64_t q, int64_t& col) {
            col = ord[q];
            const Sel b1 = vmask(s1.word(col));
            return vselect(vmask(sp.word(q)), vselect(b1, c_lo, c_hi), vselect(b1, s_lo, s_hi));
        });
        // salient zone z: μ ± α1 ± α2
        const Vec m0 = mu.coef(2), a1 = al.coef(2), a2 = al.coef(3);
        const Vec z0_lo = vsub(m0, a1), z0_hi = vadd(m0, a1);
        if (!cgb) {
            columns<TT, NA>(acc, k, x, P.m, [&](int64_t q, int64_t& col) {
                col = ord[w - k + q];
                return vadd(vselect(vmask(s1.word(col)), z0_lo, z0_hi), vsign(vmask(s2.word(q)), a2));
            });
            continue;
        }
        const auto ssp = view(r[kSsp], k);
        const Vec m1 = mu.coef(3), b1 = al.coef(4), b2 = al.coef(5);
        const Vec z1_lo = vsub(m1, b1), z1_hi = vadd(m1, b1);
        columns<TT, NA>(acc, k, x, P.m, [&](int64_t q, int64_t& col) {
            col = ord[w - k + q];
            const Sel z = vmask(ssp.word(q)), p1 = vmask(s1.word(col));
            return vadd(vselect(z, vselect(p1, z0_lo, z0_hi), vselect(p1, z1_lo, z1_hi)),
                        vsign(vmask(s2.word(q)), vselect(z, a2, b2)));
        });
    }
    for (int t = 0; t < TT; ++t) {
        Vec s = acc[0][t];
        for (int u = 1; u < NA; ++u) s = vadd(s, acc[u][t]);
        vstore(P.y + (t0 + t) * P.n + r0, s, rows);
    }
}

// tokens [t0, t1) for tile g
template <bool Aligned>
void run_tile(const Problem& P, int64_t g, int64_t t0, int64_t t1) {
#ifdef ONEBIT_AVX512  // 32 zmm registers: up to 8 token accumulators
    for (; t0 + 8 <= t1; t0 += 8) tile_kernel<8, Aligned>(P, g, t0);
    for (; t0 + 4 <= t1; t0 += 4) tile_kernel<4, Aligned>(P, g, t0);
#else  // a 16-lane vector is 2 to 4 narrower registers: 2 tokens at most, or the accumulators spill
    for (; t0 + 2 <= t1; t0 += 2) tile_kernel<2, Aligned>(P, g, t0);
#endif
    for (; t0 < t1; ++t0) tile_kernel<1, Aligned>(P, g, t0);
}

}  // namespace

torch::Tensor packed_gemm(torch::Tensor x, torch::Tensor bits, torch::Tensor fp16, torch::Tensor table, int64_t n,
                          int64_t layout) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x must be (tokens, in_features) float32");
    TORCH_CHECK(bits.scalar_type() == torch::kUInt8 && fp16.scalar_type() == torch::kHalf, "bad stream dtypes");
    TORCH_CHECK(table.scalar_type() == torch::kInt64 && table.size(1) == kCols, "bad block table");
    TORCH_CHECK(layout >= 0 && layout <= 3, "unknown layout");
    auto xc = x.contiguous();
    auto tab_c = table.contiguous();
    const int64_t T = xc.size(0), m = xc.size(1), nblk = tab_c.size(0);
    const int64_t* tab = tab_c.data_ptr<int64_t>();
    const uint8_t* bp = bits.data_ptr<uint8_t>();
    const int64_t nbytes = bits.numel();

    // layouts 1-3: each block's non-salient columns then its salient ones (from the block's salient_cols
    // bitmap, 16 columns per read); full tiles take the one-load word path when every row-wise bit tensor
    // starts 16-bit aligned
    std::vector<uint16_t> order(layout == 0 ? 0 : m);
    bool aligned = true;
    for (int64_t j = 0; j < nblk; ++j) {
        const int64_t* r = tab + j * kCols;
        const int64_t w = r[kWidth], k = r[kK];
        TORCH_CHECK(w <= 65535, "block ", j, " is ", w, " columns wide; the kernel handles at most 65535");
        aligned = aligned && r[kS1] % 16 == 0 && (layout == 0 || (r[kS2] % 16 == 0 && r[kSp] % 16 == 0)) &&
                  (layout < 2 || r[kSsp] % 16 == 0);
        if (layout == 0) continue;
        auto word = [&](int64_t c) { return read_bits(bp, nbytes, r[kCol] + c, std::min<int64_t>(16, w - c)); };
        int64_t nsal = 0;
        for (int64_t c = 0; c < w; c += 16) nsal += __builtin_popcount(word(c));
        TORCH_CHECK(nsal == k, "block ", j, ": the salient column bitmap has ", nsal, " columns, the block ", k);
        int64_t ns = 0, sal = w - k;
        for (int64_t c = 0; c < w; c += 16) {
            const uint32_t bits16 = word(c);
            for (int64_t l = 0; l < std::min<int64_t>(16, w - c); ++l)
                order[r[kStart] + ((bits16 >> l & 1u) ? sal++ : ns++)] = static_cast<uint16_t>(c + l);
        }
    }
    auto y = torch::empty({T, n}, torch::kFloat32);
    const Problem P{bp, nbytes, fp16.data_ptr<at::Half>(), tab, nblk, m, n, layout, xc.data_ptr<float>(),
                    order.data(), y.data_ptr<float>()};
    const int64_t tiles = (n + kTile - 1) / kTile, full = n / kTile;
    // many tokens (prefill): chunks of kTokenChunk, so a chunk's activations stay in cache across all tiles
    constexpr int64_t kTokenChunk = 64;
    for (int64_t c0 = 0; c0 < T; c0 += kTokenChunk) {
        const int64_t c1 = std::min(T, c0 + kTokenChunk);
        at::parallel_for(0, tiles, 4, [&](int64_t g0, int64_t g1) {
            for (int64_t g = g0; g < g1; ++g) {
                if (aligned && g < full)
                    run_tile<true>(P, g, c0, c1);
                else
                    run_tile<false>(P, g, c0, c1);
            }
        });
    }
    return y;
}

bool has_avx512() {
#ifdef ONEBIT_AVX512
    return true;
#else
    return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("packed_gemm", &packed_gemm, "y = x · Ŵᵀ from onebit packed streams");
    m.def("has_avx512", &has_avx512, "compiled with the AVX-512 path");
}

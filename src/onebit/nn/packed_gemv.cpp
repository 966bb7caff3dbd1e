// Packed 1-bit GEMV/GEMM for small token counts, reading the onebit storage streams directly (no unpacking
// into a dense weight). Per 16 weights of a row, every group's contribution is one masked FMA into a per-row
// accumulator: y_i = Σ_chunks Σ_groups c_g · (mask_g ⊙ x) + scalar corrections (docs/format.md, "kernels").
//
// layout 0 ("sign"):  per block: signs (n × w bits), mu, alpha (n fp16 each):
//     y_i += Σ_j 2α·Σ_{b=1} x + (μ − α)·Σ_block x
// layout 1 ("braq"):  per block: salient_cols (w bits), signs (n × w), signs2 (n × k, salient columns),
//     sparse (n × (w − k), non-salient columns), mu (n × 3: conc, sparse, salient), alpha (n × 4):
//     y_i += 2αc·Σ[b1∧¬c] + 2(αs − αc)·Σ[b1∧sp] + (αc − μc − αs + μs)·Σ[sp] + 2α1·Σ[b1∧c] + 2α2·Σ[b2∧c]
//            + (μc − αc)·(Σblock − Σcol) + (μsal − α1 − α2)·Σcol
// Block table rows (int64): start, width, k, s1_off, s2_off, sp_off, col_off, mu_off, al_off
// (bit offsets into the bit stream, element offsets into the fp16 stream).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstring>
#include <vector>
#if defined(__AVX512F__) && defined(__BMI2__)
#include <immintrin.h>
#define ONEBIT_AVX512 1
#endif

namespace {

// Up to 64 bits starting at bit ``off`` (LSB-first); branch-free in ``nb`` (0 gives 0).
inline uint64_t read_bits(const uint8_t* p, int64_t nbytes, int64_t off, int nb) {
    const int64_t b = off >> 3;
    const int sh = static_cast<int>(off & 7);
    uint64_t lo = 0, hi = 0;
    if (b + 9 <= nbytes) {
        std::memcpy(&lo, p + b, 8);
        hi = p[b + 8];
    } else {
        for (int k = 0; b + k < nbytes && k < 8; ++k) lo |= static_cast<uint64_t>(p[b + k]) << (8 * k);
        if (b + 8 < nbytes) hi = p[b + 8];
    }
    const uint64_t v = (lo >> sh) | ((hi << 1) << (63 - sh));
#ifdef ONEBIT_AVX512
    return _bzhi_u64(v, static_cast<unsigned>(nb));
#else
    return nb >= 64 ? v : v & ((uint64_t{1} << nb) - 1);
#endif
}

inline uint64_t deposit(uint64_t bits, uint64_t mask) {
#ifdef ONEBIT_AVX512
    return _pdep_u64(bits, mask);
#else
    uint64_t out = 0;
    for (uint64_t m = mask; m; m &= m - 1) {
        if (bits & 1u) out |= m & (~m + 1u);
        bits >>= 1;
    }
    return out;
#endif
}

constexpr int kStart = 0, kWidth = 1, kK = 2, kS1 = 3, kS2 = 4, kSp = 5, kCol = 6, kMu = 7, kAl = 8, kCols = 9;

// acc[G][u] += coef · Σ_{lanes in mask} x[t0 + u][lane], 16 lanes starting at column c. TT tokens per pass
// so the accumulators stay in registers (a spilled zmm accumulator costs a store-forwarding stall per FMA);
// NG independent accumulator sets so consecutive FMAs do not wait on each other's latency.
constexpr int NG = 5;
template <int TT>
struct Acc {
    int64_t mp;
    const float* xs;
#ifdef ONEBIT_AVX512
    __m512 v[NG][TT];
    template <int G>
    inline void add(uint32_t mask, int64_t c, float coef) {  // branch-free: a zero mask is a cheap no-op FMA
        const __m512 cv = _mm512_set1_ps(coef);
#pragma GCC unroll 16
        for (int u = 0; u < TT; ++u)
            v[G][u] = _mm512_mask3_fmadd_ps(_mm512_loadu_ps(xs + u * mp + c), cv, v[G][u], static_cast<__mmask16>(mask));
    }
    inline float total(int u) const {
        __m512 s = v[0][u];
        for (int g = 1; g < NG; ++g) s = _mm512_add_ps(s, v[g][u]);
        return _mm512_reduce_add_ps(s);
    }
    inline void reset() {
        for (int g = 0; g < NG; ++g)
            for (int u = 0; u < TT; ++u) v[g][u] = _mm512_setzero_ps();
    }
#else
    float v[TT];
    template <int G>
    inline void add(uint32_t mask, int64_t c, float coef) {
        for (; mask; mask &= mask - 1) {
            const int lane = __builtin_ctz(mask);
            for (int u = 0; u < TT; ++u) v[u] += coef * xs[u * mp + c + lane];
        }
    }
    inline float total(int u) const { return v[u]; }
    inline void reset() {
        for (int u = 0; u < TT; ++u) v[u] = 0.f;
    }
#endif
};

struct Problem {
    const uint8_t* bp;
    int64_t nbytes;
    const at::Half* hp;
    const int64_t* tab;
    int64_t nblk, mp, n;
    int T;
    int64_t layout;
    const float* xs;
    const uint32_t* colmask;
    const int64_t* chunk0;
    const float* sblk;  // (blocks, T)
    const float* scol;
    float* y;  // (T, n)
};

// y[t0 .. t0+TT)[i] for one row i.
template <int TT>
void row_kernel(const Problem& P, int64_t i, int t0) {
    Acc<TT> acc{P.mp, P.xs + t0 * P.mp};
    acc.reset();
    float sc[TT] = {};
    const int T = P.T;
    for (int64_t j = 0; j < P.nblk; ++j) {
        const int64_t* r = P.tab + j * kCols;
        const int64_t w = r[kWidth], k = r[kK], start = r[kStart];
        const float* sb = P.sblk + j * T + t0;
        const float* sl = P.scol + j * T + t0;
        int64_t s1 = r[kS1] + i * w;
        if (P.layout == 0) {
            const float mu = static_cast<float>(P.hp[r[kMu] + i]), al = static_cast<float>(P.hp[r[kAl] + i]);
            int64_t q = 0;
            for (; (q + 4) * 16 <= w; q += 4, s1 += 64) {  // 64 weights per 64-bit read
                const uint64_t b = read_bits(P.bp, P.nbytes, s1, 64);
                const int64_t col = start + q * 16;
                acc.template add<0>(static_cast<uint32_t>(b & 0xffff), col, 2.f * al);
                acc.template add<1>(static_cast<uint32_t>(b >> 16 & 0xffff), col + 16, 2.f * al);
                acc.template add<2>(static_cast<uint32_t>(b >> 32 & 0xffff), col + 32, 2.f * al);
                acc.template add<3>(static_cast<uint32_t>(b >> 48), col + 48, 2.f * al);
            }
            for (; q * 16 < w; ++q, s1 += 16) {
                const int nb = static_cast<int>(std::min<int64_t>(16, w - q * 16));
                const auto b1 = static_cast<uint32_t>(read_bits(P.bp, P.nbytes, s1, nb));
                if (q & 1)
                    acc.template add<1>(b1, start + q * 16, 2.f * al);
                else
                    acc.template add<0>(b1, start + q * 16, 2.f * al);
            }
            for (int u = 0; u < TT; ++u) sc[u] += (mu - al) * sb[u];
            continue;
        }
        const at::Half* mu = P.hp + r[kMu] + 3 * i;
        const at::Half* al = P.hp + r[kAl] + 4 * i;
        const float mc = mu[0], ms = mu[1], msal = mu[2];
        const float ac = al[0], as = al[1], a1 = al[2], a2 = al[3];
        const float c_b1nc = 2.f * ac, c_b1sp = 2.f * (as - ac), c_sp = ac - mc - as + ms;
        const float c_b1c = 2.f * a1, c_b2 = 2.f * a2;
        int64_t s2 = r[kS2] + i * k, sp = r[kSp] + i * (w - k);
        int64_t q = 0;
        for (; (q + 4) * 16 <= w; q += 4, s1 += 64) {  // 64 columns per step: one read per bit plane
            const uint64_t b1 = read_bits(P.bp, P.nbytes, s1, 64);
            const uint32_t* cm = P.colmask + P.chunk0[j] + q;
            const uint64_t c = cm[0] | uint64_t{cm[1]} << 16 | uint64_t{cm[2]} << 32 | uint64_t{cm[3]} << 48;
            const uint64_t nc = ~c;
            const int pn = __builtin_popcountll(nc);
            const uint64_t spm = deposit(read_bits(P.bp, P.nbytes, sp, pn), nc);
            sp += pn;
            const int pc = __builtin_popcountll(c);
            const uint64_t b2 = deposit(read_bits(P.bp, P.nbytes, s2, pc), c);
            s2 += pc;
            const uint64_t m_b1nc = b1 & nc, m_b1sp = b1 & spm, m_b1c = b1 & c;
#pragma GCC unroll 4
            for (int h = 0; h < 4; ++h) {
                const int sh = 16 * h;
                const int64_t col = start + (q + h) * 16;
                acc.template add<0>(static_cast<uint32_t>(m_b1nc >> sh & 0xffff), col, c_b1nc);
                acc.template add<1>(static_cast<uint32_t>(m_b1sp >> sh & 0xffff), col, c_b1sp);
                // no test on the salient masks: they are sparse and random, and the mispredicted branches
                // tripled the kernel's time; an all-zero mask is a cheap no-op FMA
                acc.template add<2>(static_cast<uint32_t>(spm >> sh & 0xffff), col, c_sp);
                acc.template add<3>(static_cast<uint32_t>(m_b1c >> sh & 0xffff), col, c_b1c);
                acc.template add<4>(static_cast<uint32_t>(b2 >> sh & 0xffff), col, c_b2);
            }
        }
        for (; q * 16 < w; ++q, s1 += 16) {
            const int nb = static_cast<int>(std::min<int64_t>(16, w - q * 16));
            const uint32_t live = (1u << nb) - 1u;
            const auto b1 = static_cast<uint32_t>(read_bits(P.bp, P.nbytes, s1, nb));
            const uint32_t c = P.colmask[P.chunk0[j] + q];
            const uint32_t nc = ~c & live;
            const int pn = __builtin_popcount(nc);
            const auto spm = static_cast<uint32_t>(deposit(read_bits(P.bp, P.nbytes, sp, pn), nc));
            sp += pn;
            const int64_t col = start + q * 16;
            acc.template add<0>(b1 & nc, col, c_b1nc);
            acc.template add<1>(b1 & spm, col, c_b1sp);
            acc.template add<2>(spm, col, c_sp);
            if (c) {
                const int pc = __builtin_popcount(c);
                const auto b2 = static_cast<uint32_t>(deposit(read_bits(P.bp, P.nbytes, s2, pc), c));
                s2 += pc;
                acc.template add<3>(b1 & c, col, c_b1c);
                acc.template add<4>(b2, col, c_b2);
            }
        }
        for (int u = 0; u < TT; ++u) sc[u] += (mc - ac) * (sb[u] - sl[u]) + (msal - a1 - a2) * sl[u];
    }
    for (int u = 0; u < TT; ++u) P.y[(t0 + u) * P.n + i] = acc.total(u) + sc[u];
}

}  // namespace

torch::Tensor packed_gemm(torch::Tensor x, torch::Tensor bits, torch::Tensor fp16, torch::Tensor table, int64_t n,
                          int64_t layout) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "x must be (tokens, in_features) float32");
    TORCH_CHECK(bits.scalar_type() == torch::kUInt8 && fp16.scalar_type() == torch::kHalf, "bad stream dtypes");
    TORCH_CHECK(table.scalar_type() == torch::kInt64 && table.size(1) == kCols, "bad block table");
    TORCH_CHECK(layout == 0 || layout == 1, "unknown layout");
    const int T = static_cast<int>(x.size(0));
    const int64_t m = x.size(1);
    const int64_t mp = m + 16;  // zero tail: a 16-lane load past the last column reads zeros
    auto xs_t = torch::zeros({T, mp}, torch::kFloat32);
    xs_t.narrow(1, 0, m).copy_(x);
    const float* xs = xs_t.data_ptr<float>();
    const uint8_t* bp = bits.data_ptr<uint8_t>();
    const int64_t nbytes = bits.numel();
    const at::Half* hp = fp16.data_ptr<at::Half>();
    const int64_t nblk = table.size(0);
    auto tab_c = table.contiguous();
    const int64_t* tab = tab_c.data_ptr<int64_t>();

    // per block: salient-column masks per 16-chunk, Σ x over the block and over salient columns, per token
    std::vector<int64_t> chunk0(nblk + 1, 0);
    for (int64_t j = 0; j < nblk; ++j) chunk0[j + 1] = chunk0[j] + (tab[j * kCols + kWidth] + 15) / 16;
    std::vector<uint32_t> colmask(chunk0[nblk], 0);
    std::vector<float> sblk(nblk * T, 0.f), scol(nblk * T, 0.f);
    for (int64_t j = 0; j < nblk; ++j) {
        const int64_t* r = tab + j * kCols;
        const int64_t w = r[kWidth];
        for (int64_t q = 0; q * 16 < w; ++q) {
            const int nb = static_cast<int>(std::min<int64_t>(16, w - q * 16));
            const auto c = layout == 1 ? static_cast<uint32_t>(read_bits(bp, nbytes, r[kCol] + q * 16, nb)) : 0u;
            colmask[chunk0[j] + q] = c;
            for (int t = 0; t < T; ++t)
                for (int l = 0; l < nb; ++l) {
                    const float xv = xs[t * mp + r[kStart] + q * 16 + l];
                    sblk[j * T + t] += xv;
                    if (c >> l & 1u) scol[j * T + t] += xv;
                }
        }
    }

    auto y = torch::empty({T, n}, torch::kFloat32);
    const Problem P{bp, nbytes, hp, tab, nblk, mp, n, T, layout, xs, colmask.data(), chunk0.data(), sblk.data(),
                    scol.data(), y.data_ptr<float>()};
    at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
        for (int64_t i = r0; i < r1; ++i) {
            int t0 = 0;
            for (; t0 + 8 <= T; t0 += 8) row_kernel<8>(P, i, t0);
            for (; t0 + 4 <= T; t0 += 4) row_kernel<4>(P, i, t0);
            for (; t0 < T; ++t0) row_kernel<1>(P, i, t0);
        }
    });
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
    m.def("has_avx512", &has_avx512, "compiled with the AVX-512 + BMI2 path");
}

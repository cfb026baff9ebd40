// CPU kernels for tile-based alpha compositing of projected 2D Gaussians.
//
// This is the fast path of nerfstudio_gsloc/rendering/rasterize_to_pixels.py and tiles.py; the PyTorch
// functions there compute the same things and are the readable references the tests hold this file to.
//
// Conventions (identical to gsplat 1.4's rasterize_to_pixels):
//   means2d  [C, N, 2]  pixel coordinates of the Gaussian centres; pixel (x, y) has its centre at (x+0.5, y+0.5)
//   conics   [C, N, 3]  upper triangle (a, b, c) of the inverse 2D covariance
//   colors   [C, N, D]  per-camera features to blend (RGB, depth, ...)
//   opacities[C, N]
//   tile_offsets [C * tiles_y * tiles_x + 1] (int64): intersections of tile t are flatten_ids[off[t]:off[t+1]],
//   flatten_ids  [M] (int64) indices into the flattened C*N Gaussians, front to back within a tile.
// A pixel stops compositing before the Gaussian that would push its transmittance to <= 1e-4, and skips
// Gaussians whose alpha is below 1/255; alpha is clamped to 0.999.
//
// Speed: a tile's pixels are processed together, one Gaussian at a time, in branch-free loops over the
// tile's pixels that the compiler turns into SIMD code (exp included: exp_neg). A pixel that has terminated
// stays in the loop but is masked out. With the footprints' extents, a Gaussian is only tested on the tile
// rows its footprint reaches (a contiguous run of pixels, so the loops stay vectorised). Tiles are spread
// over ATen's thread pool. The backward pass adds each intersection's gradient straight into its Gaussian's
// row of a per-thread buffer (tiles on different threads share Gaussians), and the buffers are summed at the
// end: a row per intersection (1.2 M rows, 46 MB at 256x256 with 200k Gaussians) cost more in page faults and
// in a second summing pass than the compositing itself saved by writing without conflicts. The forward pass
// flags the intersections that composited into at least one pixel, and the backward pass skips the others
// (45% of a lego view's intersections: the footprint passes between pixel centres, or every pixel it reaches
// had already terminated); their gradient is exactly zero. Each call first packs what the pixel loops read of
// a Gaussian into one 32-byte record (Packed), and the loops prefetch the records (and colours, and in the backward
// pass the gradient rows) of the intersections a few places ahead.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr float kAlphaMin = 1.0f / 255.0f;
constexpr float kAlphaMax = 0.999f;
constexpr float kTransmittanceMin = 1e-4f;

// What the pixel loops read of one Gaussian, packed into 32 bytes so that an intersection costs one cache line
// instead of four scattered reads (centre, conic, opacity, extent): a tile visits its Gaussians in depth order,
// i.e. in random order of memory.
struct alignas(32) Packed {
  float x, y;        // centre (pixels)
  float a, b, c;     // conic
  float opacity;
  float half_height; // footprint half-height with the rounding margin (row_span)
  float sigma_max;   // largest sigma with alpha >= 1/255 (margin included); kNoEllipseTest: skip that test
};
constexpr float kNoEllipseTest = 1e30f;
// The compositing loops ask the memory for the intersection kPrefetch places ahead of the one they work on: a
// tile's Gaussians come in depth order, i.e. at random addresses, and waiting for each record cost 11-24% of the
// forward and 19-29% of the backward pass (bit-identical results; 4, 8 and 16 measured the same).
constexpr int64_t kPrefetch = 8;

struct Inputs {
  const float* xy;
  const float* conic;
  const float* color;
  const float* opacity;
  const float* background;  // nullptr when absent
  const float* extents;     // [C*N, 2] footprint half-sizes, or nullptr: every pixel of the tile is tested
  const int64_t* offsets;
  const int64_t* ids;
  int64_t C, D, width, height, tiles_x, tiles_y;
  const Packed* packed = nullptr;  // [C*N], set by pack_gaussians
};

Inputs make_inputs(const torch::Tensor& means2d, const torch::Tensor& conics, const torch::Tensor& colors,
                   const torch::Tensor& opacities, const torch::Tensor& backgrounds, const torch::Tensor& extents,
                   const torch::Tensor& tile_offsets, const torch::Tensor& flatten_ids, int64_t width,
                   int64_t height, int64_t tile_size) {
  TORCH_CHECK(extents.numel() == 0 || (extents.dtype() == torch::kFloat32 && extents.is_contiguous() &&
                                       extents.numel() == 2 * opacities.numel()),
              "rasterize_cpu: extents must be empty or contiguous float32 [C, N, 2]");
  TORCH_CHECK(means2d.dtype() == torch::kFloat32 && conics.dtype() == torch::kFloat32 &&
                  colors.dtype() == torch::kFloat32 && opacities.dtype() == torch::kFloat32,
              "rasterize_cpu: float32 inputs expected");
  TORCH_CHECK(means2d.is_contiguous() && conics.is_contiguous() && colors.is_contiguous() &&
                  opacities.is_contiguous(), "rasterize_cpu: contiguous inputs expected");
  return Inputs{means2d.data_ptr<float>(),
                conics.data_ptr<float>(),
                colors.data_ptr<float>(),
                opacities.data_ptr<float>(),
                backgrounds.numel() > 0 ? backgrounds.data_ptr<float>() : nullptr,
                extents.numel() > 0 ? extents.data_ptr<float>() : nullptr,
                tile_offsets.data_ptr<int64_t>(),
                flatten_ids.data_ptr<int64_t>(),
                means2d.size(0),
                colors.size(2),
                width,
                height,
                (width + tile_size - 1) / tile_size,
                (height + tile_size - 1) / tile_size};
}

// exp(-s), inlined so that the pixel loops stay one vectorised block (a call to the vector library's expf
// spills the registers the loop keeps its Gaussian in). 2^t with t = -s log2(e), split into floor(t) (added to
// the exponent bits) and a degree-6 polynomial of the fraction (relative error 1e-7, float32 rounding). s is
// clamped to [-80, 87]: pixels outside that have alpha < 1/255 or are invalid (s < 0) anyway.
inline float exp_neg(float s) {
  const float t = -std::min(std::max(s, -80.0f), 87.0f) * 1.44269504088896341f;
  const float whole = std::floor(t), f = t - whole;
  float p = 2.161380834877491e-4f;
  p = p * f + 1.2467376654967666e-3f;
  p = p * f + 9.675532579421997e-3f;
  p = p * f + 5.548521876335144e-2f;
  p = p * f + 2.4022932350635529e-1f;
  p = p * f + 6.931470632553101e-1f;
  p = p * f + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, sizeof(bits));
  bits += static_cast<int32_t>(whole) * (1 << 23);  // p in [1, 2): floor(t) goes into its exponent
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// Smallest sigma = 0.5 (a u^2 + c v^2) + b u v over the rectangle [ul, uh] x [vl, vh] of offsets u = gx - px,
// v = gy - py (a, c > 0): 0 when it holds the centre, otherwise on one of its four edges.
inline float min_sigma(float a, float b, float c, float ul, float uh, float vl, float vh) {
  if (ul <= 0.f && uh >= 0.f && vl <= 0.f && vh >= 0.f) return 0.f;
  auto sigma = [&](float u, float v) { return 0.5f * (a * u * u + c * v * v) + b * u * v; };
  auto clampf = [](float x, float lo, float hi) { return std::min(std::max(x, lo), hi); };
  float best = sigma(ul, clampf(-b * ul / c, vl, vh));
  best = std::min(best, sigma(uh, clampf(-b * uh / c, vl, vh)));
  best = std::min(best, sigma(clampf(-b * vl / a, ul, uh), vl));
  best = std::min(best, sigma(clampf(-b * vh / a, ul, uh), vh));
  return best;
}

// Packs every Gaussian's centre, conic, opacity and row-span data (see Packed) once per call, and points
// in.packed at them: the returned vector owns the records, keep it alive while `in` is used.
std::vector<Packed> pack_gaussians(Inputs& in, int64_t count) {
  std::vector<Packed> packed(count);
  at::parallel_for(0, count, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      Packed& q = packed[g];
      q.x = in.xy[2 * g];
      q.y = in.xy[2 * g + 1];
      q.a = in.conic[3 * g];
      q.b = in.conic[3 * g + 1];
      q.c = in.conic[3 * g + 2];
      q.opacity = in.opacity[g];
      q.half_height = in.extents ? in.extents[2 * g + 1] * 1.0001f + 1e-3f : 0.0f;
      // alpha = op exp(-sigma) >= 1/255 needs sigma <= log(255 op); a margin keeps rounding on the safe side
      q.sigma_max = (q.a > 0.f && q.c > 0.f && q.opacity > 0.f) ? std::log(q.opacity / kAlphaMin) * 1.001f + 1e-3f
                                                                 : kNoEllipseTest;
    }
  });
  in.packed = packed.data();
  return packed;
}

// The pixels [p_begin, p_end) of a TS x TS tile with corner (x0, y0) that Gaussian q can reach: whole rows
// whose pixel centres lie within its footprint's half-height (alpha < 1/255 beyond it, see projection.py),
// with a margin for rounding; none when alpha < 1/255 at every pixel centre of those rows (the footprint
// ellipse misses them although its bounding box overlaps the tile). Without extents: the whole tile.
template <int TS>
inline void row_span(const Inputs& in, const Packed& q, int64_t x0, int64_t y0, int& p_begin, int& p_end) {
  p_begin = 0;
  p_end = TS * TS;
  if (!in.extents) return;
  const float lo = std::ceil(q.y - q.half_height - 0.5f - static_cast<float>(y0));
  const float hi = std::floor(q.y + q.half_height - 0.5f - static_cast<float>(y0));
  const int r0 = static_cast<int>(std::max(lo, 0.0f));
  const int r1 = static_cast<int>(std::min(hi, static_cast<float>(TS - 1)));
  p_begin = r0 * TS;
  p_end = r1 >= r0 ? (r1 + 1) * TS : p_begin;
  if (p_end == p_begin || q.sigma_max >= kNoEllipseTest) return;
  const float px_lo = static_cast<float>(x0) + 0.5f, px_hi = static_cast<float>(x0 + TS) - 0.5f;
  const float py_lo = static_cast<float>(y0 + r0) + 0.5f, py_hi = static_cast<float>(y0 + r1) + 0.5f;
  if (min_sigma(q.a, q.b, q.c, q.x - px_hi, q.x - px_lo, q.y - py_hi, q.y - py_lo) > q.sigma_max) p_end = p_begin;
}

// Forward pass over one tile of TS x TS pixels.
template <int TS>
void forward_tile(const Inputs& in, int64_t t, float* out, float* out_alpha, int32_t* out_last, uint8_t* out_used) {
  constexpr int P = TS * TS;
  const int64_t n_tiles = in.tiles_x * in.tiles_y;
  const int64_t cam = t / n_tiles, tile = t % n_tiles;
  const int64_t x0 = (tile % in.tiles_x) * TS, y0 = (tile / in.tiles_x) * TS;
  const int64_t start = in.offsets[t], count = in.offsets[t + 1] - start;
  const int64_t D = in.D;

  alignas(64) float px[P], py[P], T[P], active[P];
  alignas(64) int32_t last[P];
  std::vector<float> acc(D * P, 0.0f);
  for (int p = 0; p < P; ++p) {
    px[p] = x0 + p % TS + 0.5f;
    py[p] = y0 + p / TS + 0.5f;
    T[p] = 1.0f;
    const bool inside = (x0 + p % TS) < in.width && (y0 + p / TS) < in.height;
    active[p] = inside ? 1.0f : 0.0f;
    last[p] = static_cast<int32_t>(count);
  }

  int64_t k = 0;
  for (; k < count; ++k) {
    const int64_t g = in.ids[start + k];
    if (k + kPrefetch < count) {
      const int64_t gn = in.ids[start + k + kPrefetch];
      __builtin_prefetch(in.packed + gn);
      __builtin_prefetch(in.color + D * gn);
    }
    const Packed& q = in.packed[g];
    const float gx = q.x, gy = q.y, qa = q.a, qb = q.b, qc = q.c, op = q.opacity;
    const float* c = in.color + D * g;
    int p0, p1;
    row_span<TS>(in, q, x0, y0, p0, p1);
    alignas(64) float w[P];
    float w_total = 0.0f;
    for (int p = p0; p < p1; ++p) {
      const float dx = gx - px[p], dy = gy - py[p];
      const float sigma = 0.5f * (qa * dx * dx + qc * dy * dy) + qb * dx * dy;
      const float alpha = std::min(kAlphaMax, op * exp_neg(sigma));
      const bool valid = (sigma >= 0.0f) & (alpha >= kAlphaMin) & (active[p] > 0.0f);
      const float next_T = T[p] * (1.0f - alpha);
      const bool stop = valid & (next_T <= kTransmittanceMin);
      const bool take = valid & !stop;
      w[p] = take ? alpha * T[p] : 0.0f;
      T[p] = take ? next_T : T[p];
      last[p] = stop ? static_cast<int32_t>(k) : last[p];
      active[p] = stop ? 0.0f : active[p];
    }
    for (int p = p0; p < p1; ++p) w_total += w[p];  // a separate loop keeps the one above vectorised
    out_used[start + k] = w_total > 0.0f;
    // Most tile/Gaussian pairs touch no pixel (the bounding box only grazes the tile): skip the blend.
    for (int64_t d = 0; d < D && w_total > 0.0f; ++d) {
      const float cd = c[d];
      float* a = acc.data() + d * P;
      for (int p = p0; p < p1; ++p) a[p] += w[p] * cd;
    }
    if ((k & 15) == 15) {  // every 16 Gaussians: stop once every pixel of the tile has terminated
      float any = 0.0f;
      for (int p = 0; p < P; ++p) any += active[p];
      if (any == 0.0f) break;
    }
  }

  for (int p = 0; p < P; ++p) {
    const int64_t x = x0 + p % TS, y = y0 + p / TS;
    if (x >= in.width || y >= in.height) continue;
    const int64_t pix = (cam * in.height + y) * in.width + x;
    for (int64_t d = 0; d < D; ++d)
      out[pix * D + d] = acc[d * P + p] + (in.background ? T[p] * in.background[cam * D + d] : 0.0f);
    out_alpha[pix] = 1.0f - T[p];
    out_last[pix] = last[p];
  }
}

// Backward pass over one tile: walks each pixel's composited Gaussians back to front and adds their gradients
// to `grads` [C*N, 6 + D] (the calling thread's buffer, indexed by flat Gaussian id).
template <int TS>
void backward_tile(const Inputs& in, int64_t t, const float* alphas, const int32_t* last_ids, const uint8_t* used,
                   const float* v_render, const float* v_alphas, float* grads) {
  constexpr int P = TS * TS;
  const int64_t n_tiles = in.tiles_x * in.tiles_y;
  const int64_t cam = t / n_tiles, tile = t % n_tiles;
  const int64_t x0 = (tile % in.tiles_x) * TS, y0 = (tile / in.tiles_x) * TS;
  const int64_t start = in.offsets[t];
  const int64_t D = in.D, G = 6 + D;

  alignas(64) float px[P], py[P], T[P], T_final[P], v_T_final[P];
  alignas(64) int32_t last[P];
  std::vector<float> behind(D * P, 0.0f), vo(D * P, 0.0f);
  int32_t max_last = 0;
  for (int p = 0; p < P; ++p) {
    const int64_t x = x0 + p % TS, y = y0 + p / TS;
    px[p] = x + 0.5f;
    py[p] = y + 0.5f;
    if (x >= in.width || y >= in.height) {
      T[p] = T_final[p] = 1.0f;
      v_T_final[p] = 0.0f;
      last[p] = 0;
      continue;
    }
    const int64_t pix = (cam * in.height + y) * in.width + x;
    T_final[p] = 1.0f - alphas[pix];
    T[p] = T_final[p];
    last[p] = last_ids[pix];
    max_last = std::max(max_last, last[p]);
    // d loss / d T_final, through the background term and the alpha output (alpha = 1 - T_final).
    float vt = -v_alphas[pix];
    for (int64_t d = 0; d < D; ++d) {
      vo[d * P + p] = v_render[pix * D + d];
      if (in.background) vt += in.background[cam * D + d] * v_render[pix * D + d];
    }
    v_T_final[p] = vt;
  }

  for (int64_t k = max_last - 1; k >= 0; --k) {
    if (k >= kPrefetch) {
      const int64_t gn = in.ids[start + k - kPrefetch];
      __builtin_prefetch(in.packed + gn);
      __builtin_prefetch(in.color + D * gn);
      __builtin_prefetch(grads + G * gn, 1);
    }
    if (!used[start + k]) continue;  // no pixel composited it: no gradient
    const int64_t g = in.ids[start + k];
    const Packed& q = in.packed[g];
    const float gx = q.x, gy = q.y, qa = q.a, qb = q.b, qc = q.c, op = q.opacity;
    const float* c = in.color + D * g;
    int p0, p1;
    row_span<TS>(in, q, x0, y0, p0, p1);
    alignas(64) float w[P], inv_one_minus[P], v_alpha[P], dxs[P], dys[P], raw[P], vis_[P];
    float w_total = 0.0f;
    for (int p = p0; p < p1; ++p) {
      const float dx = gx - px[p], dy = gy - py[p];
      const float sigma = 0.5f * (qa * dx * dx + qc * dy * dy) + qb * dx * dy;
      const float vis = exp_neg(sigma);
      const float raw_alpha = op * vis;
      const float alpha = std::min(kAlphaMax, raw_alpha);
      const bool valid = (sigma >= 0.0f) & (alpha >= kAlphaMin) & (k < last[p]);
      const float inv = 1.0f / (1.0f - alpha);
      const float T_before = valid ? T[p] * inv : T[p];  // transmittance in front of this Gaussian
      w[p] = valid ? alpha * T_before : 0.0f;
      T[p] = T_before;
      inv_one_minus[p] = valid ? inv : 0.0f;
      // the background / alpha-output term: everything behind is scaled by (1 - alpha)
      v_alpha[p] = valid ? -T_final[p] * inv * v_T_final[p] : 0.0f;
      dxs[p] = dx;
      dys[p] = dy;
      raw[p] = (valid & (raw_alpha <= kAlphaMax)) ? raw_alpha : 0.0f;
      vis_[p] = (valid & (raw_alpha <= kAlphaMax)) ? vis : 0.0f;
    }
    for (int p = p0; p < p1; ++p) w_total += w[p];
    if (w_total == 0.0f) continue;  // the forward pass said otherwise, but keep the guard: nothing to add
    float* gk = grads + g * G;
    for (int64_t d = 0; d < D; ++d) {
      const float cd = c[d];
      float* b = behind.data() + d * P;
      const float* v = vo.data() + d * P;
      float g_color = 0.0f;
      for (int p = p0; p < p1; ++p) {
        g_color += w[p] * v[p];
        // colour: c_g * T contributes directly; everything behind is scaled by (1 - alpha)
        v_alpha[p] += (w[p] > 0.0f) ? (cd * T[p] - b[p] * inv_one_minus[p]) * v[p] : 0.0f;
        b[p] += w[p] * cd;
      }
      gk[6 + d] += g_color;
    }
    float g_x = 0.0f, g_y = 0.0f, g_a = 0.0f, g_b = 0.0f, g_c = 0.0f, g_op = 0.0f;
    for (int p = p0; p < p1; ++p) {
      const float v_sigma = -raw[p] * v_alpha[p];
      g_x += v_sigma * (qa * dxs[p] + qb * dys[p]);
      g_y += v_sigma * (qb * dxs[p] + qc * dys[p]);
      g_a += 0.5f * v_sigma * dxs[p] * dxs[p];
      g_b += v_sigma * dxs[p] * dys[p];
      g_c += 0.5f * v_sigma * dys[p] * dys[p];
      g_op += vis_[p] * v_alpha[p];
    }
    gk[0] += g_x;
    gk[1] += g_y;
    gk[2] += g_a;
    gk[3] += g_b;
    gk[4] += g_c;
    gk[5] += g_op;
  }
}

template <typename Fn>
void dispatch_tile_size(int64_t tile_size, Fn&& fn) {
  if (tile_size == 8) {
    fn(std::integral_constant<int, 8>{});
  } else if (tile_size == 16) {
    fn(std::integral_constant<int, 16>{});
  } else {
    TORCH_CHECK(false, "rasterize_cpu: tile_size must be 8 or 16, got ", tile_size);
  }
}

}  // namespace

// Returns (render [C,H,W,D], alphas [C,H,W], last_ids [C,H,W] int32: the end (exclusive) of the pixel's
// front-to-back walk through its tile list, used [M] uint8: whether intersection m composited into any pixel;
// the backward pass skips the others, whose gradient is zero).
std::vector<torch::Tensor> rasterize_forward(torch::Tensor means2d, torch::Tensor conics, torch::Tensor colors,
                                             torch::Tensor opacities, torch::Tensor backgrounds,
                                             torch::Tensor extents, torch::Tensor tile_offsets,
                                             torch::Tensor flatten_ids, int64_t width, int64_t height,
                                             int64_t tile_size) {
  Inputs in = make_inputs(means2d, conics, colors, opacities, backgrounds, extents, tile_offsets, flatten_ids,
                          width, height, tile_size);
  const std::vector<Packed> packed = pack_gaussians(in, opacities.numel());
  auto render = torch::zeros({in.C, height, width, in.D}, means2d.options());
  auto alphas = torch::zeros({in.C, height, width}, means2d.options());
  auto last_ids = torch::zeros({in.C, height, width}, means2d.options().dtype(torch::kInt32));
  auto used = torch::zeros({flatten_ids.numel()}, means2d.options().dtype(torch::kUInt8));
  float* out = render.data_ptr<float>();
  float* out_a = alphas.data_ptr<float>();
  int32_t* out_last = last_ids.data_ptr<int32_t>();
  uint8_t* out_used = used.data_ptr<uint8_t>();
  dispatch_tile_size(tile_size, [&](auto ts) {
    at::parallel_for(0, in.C * in.tiles_x * in.tiles_y, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) forward_tile<decltype(ts)::value>(in, t, out, out_a, out_last, out_used);
    });
  });
  return {render, alphas, last_ids, used};
}

// Returns per-Gaussian gradients [C*N, 6 + D]: (d means2d x, y | d conic a, b, c | d opacity | d colors).
std::vector<torch::Tensor> rasterize_backward(torch::Tensor means2d, torch::Tensor conics, torch::Tensor colors,
                                              torch::Tensor opacities, torch::Tensor backgrounds,
                                              torch::Tensor extents, torch::Tensor tile_offsets,
                                              torch::Tensor flatten_ids, int64_t width, int64_t height,
                                              int64_t tile_size, torch::Tensor alphas, torch::Tensor last_ids,
                                              torch::Tensor used, torch::Tensor v_render, torch::Tensor v_alphas) {
  TORCH_CHECK(used.dtype() == torch::kUInt8 && used.is_contiguous() && used.numel() == flatten_ids.numel(),
              "rasterize_backward: `used` must be the forward pass's uint8 [M] flags");
  Inputs in = make_inputs(means2d, conics, colors, opacities, backgrounds, extents, tile_offsets, flatten_ids,
                          width, height, tile_size);
  const std::vector<Packed> packed = pack_gaussians(in, opacities.numel());
  // One buffer per thread of the pool: a thread runs its chunks of tiles one after the other, so only tiles on
  // different threads add to the same Gaussian at the same time, each into its own buffer.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads()), rows = in.C * opacities.size(1);
  auto grads = torch::zeros({threads, rows, 6 + in.D}, means2d.options());
  const float* a = alphas.data_ptr<float>();
  const int32_t* last = last_ids.data_ptr<int32_t>();
  const uint8_t* u = used.data_ptr<uint8_t>();
  const float* vr = v_render.data_ptr<float>();
  const float* va = v_alphas.data_ptr<float>();
  float* gr = grads.data_ptr<float>();
  dispatch_tile_size(tile_size, [&](auto ts) {
    at::parallel_for(0, in.C * in.tiles_x * in.tiles_y, 1, [&](int64_t begin, int64_t end) {
      const int64_t thread = at::get_thread_num();
      // a thread number beyond the buffers would make two threads share one: fail rather than race
      TORCH_CHECK(thread >= 0 && thread < threads, "rasterize_backward: thread ", thread, " of ", threads);
      float* mine = gr + thread * rows * (6 + in.D);
      for (int64_t t = begin; t < end; ++t) backward_tile<decltype(ts)::value>(in, t, a, last, u, vr, va, mine);
    });
  });
  return {threads == 1 ? grads[0] : grads.sum(0)};
}

// Monotonic unsigned key of a float: a < b (as floats, not NaN) exactly when key(a) < key(b), except that -0
// sorts before +0 (visible Gaussians have depths beyond the near plane, never either).
static inline uint32_t float_sort_key(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// The ids sorted by depth[id], stable (equal depths keep their order): the order of std::stable_sort with <, by an
// LSD radix sort on the 32-bit keys (4 passes of 8 bits, a pass skipped when every key shares its byte). Linear
// time and sequential memory access: the indirect comparison sort took 12% of a lego query's CPU (2026-12-03).
static std::vector<int64_t> sort_ids_by_depth(const int64_t* ids, int64_t K, const float* depth) {
  std::vector<int64_t> order(ids, ids + K), scratch(K);
  std::vector<uint32_t> keys(K), keys_scratch(K);
  for (int64_t i = 0; i < K; ++i) keys[i] = float_sort_key(depth[ids[i]]);
  for (int shift = 0; shift < 32; shift += 8) {
    int64_t start[257] = {0};
    for (int64_t i = 0; i < K; ++i) ++start[((keys[i] >> shift) & 0xFFu) + 1];
    if (std::any_of(start + 1, start + 257, [K](int64_t n) { return n == K; })) continue;
    for (int b = 0; b < 256; ++b) start[b + 1] += start[b];
    for (int64_t i = 0; i < K; ++i) {
      const int64_t dst = start[(keys[i] >> shift) & 0xFFu]++;
      keys_scratch[dst] = keys[i];
      scratch[dst] = order[i];
    }
    keys.swap(keys_scratch);
    order.swap(scratch);
  }
  return order;
}

// Tile binning by counting sort. `visible` [K] lists the flat ids (c * N + n) of the visible Gaussians in
// increasing order; they are sorted front to back by `depths` [C,N] (stable: ties keep id order, as
// torch.argsort(stable=True)), then each is appended to every tile its bounding box (centre +- extents
// [C,N,2]) touches, so every tile's list comes out front to back. Returns (offsets [C*tiles+1], flatten_ids [M]).
std::vector<torch::Tensor> bin_tiles(torch::Tensor means2d, torch::Tensor extents, torch::Tensor depths,
                                     torch::Tensor visible, int64_t width, int64_t height, int64_t tile_size) {
  TORCH_CHECK(means2d.dtype() == torch::kFloat32 && extents.dtype() == torch::kFloat32 &&
                  depths.dtype() == torch::kFloat32 && visible.dtype() == torch::kInt64 && depths.is_contiguous() &&
                  visible.is_contiguous(),
              "bin_tiles: float32 means2d, extents and depths, contiguous int64 visible ids expected");
  const int64_t C = means2d.size(0), N = means2d.size(1), K = visible.size(0);
  const float* depth = depths.data_ptr<float>();
  const std::vector<int64_t> sorted = sort_ids_by_depth(visible.data_ptr<int64_t>(), K, depth);
  const int64_t* ord = sorted.data();
  const int64_t tiles_x = (width + tile_size - 1) / tile_size, tiles_y = (height + tile_size - 1) / tile_size;
  const int64_t n_tiles = tiles_x * tiles_y;
  const float* xy = means2d.data_ptr<float>();
  const float* ext = extents.data_ptr<float>();

  // Tile rectangle [x_lo, x_hi) x [y_lo, y_hi) of every listed Gaussian.
  std::vector<int32_t> rect(4 * K);
  for (int64_t i = 0; i < K; ++i) {
    const int64_t g = ord[i];
    const float rx = ext[2 * g], ry = ext[2 * g + 1];
    const float x = xy[2 * g], y = xy[2 * g + 1];
    auto clampi = [](float v, int64_t hi) { return static_cast<int32_t>(std::min<float>(std::max(v, 0.0f), hi)); };
    rect[4 * i] = clampi(std::floor((x - rx) / tile_size), tiles_x);
    rect[4 * i + 1] = clampi(std::ceil((x + rx) / tile_size), tiles_x);
    rect[4 * i + 2] = clampi(std::floor((y - ry) / tile_size), tiles_y);
    rect[4 * i + 3] = clampi(std::ceil((y + ry) / tile_size), tiles_y);
  }
  auto offsets = torch::zeros({C * n_tiles + 1}, torch::kInt64);
  int64_t* off = offsets.data_ptr<int64_t>();
  for (int64_t i = 0; i < K; ++i) {
    const int64_t base = (ord[i] / N) * n_tiles;
    for (int32_t ty = rect[4 * i + 2]; ty < rect[4 * i + 3]; ++ty)
      for (int32_t tx = rect[4 * i]; tx < rect[4 * i + 1]; ++tx) ++off[base + ty * tiles_x + tx + 1];
  }
  for (int64_t t = 0; t < C * n_tiles; ++t) off[t + 1] += off[t];
  auto flatten_ids = torch::empty({off[C * n_tiles]}, torch::kInt64);
  int64_t* ids = flatten_ids.data_ptr<int64_t>();
  std::vector<int64_t> cursor(off, off + C * n_tiles);
  for (int64_t i = 0; i < K; ++i) {
    const int64_t base = (ord[i] / N) * n_tiles;
    for (int32_t ty = rect[4 * i + 2]; ty < rect[4 * i + 3]; ++ty)
      for (int32_t tx = rect[4 * i]; tx < rect[4 * i + 1]; ++tx) ids[cursor[base + ty * tiles_x + tx]++] = ord[i];
  }
  return {offsets, flatten_ids};
}

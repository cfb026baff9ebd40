// CPU kernels for tile-based alpha compositing of projected 2D Gaussians.
//
// This is the fast path of nerfstudio_gsloc/rendering/rasterize_to_pixels.py; the PyTorch function
// `rasterize_to_pixels_torch` in that file computes the same thing and is the readable reference.
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
// Threads: tiles are independent, so they are spread over ATen's thread pool. The backward pass writes
// one gradient row per intersection (each intersection belongs to one tile, so no two threads write the
// same row); the caller sums them per Gaussian with index_add_.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace {

constexpr float kAlphaMin = 1.0f / 255.0f;
constexpr float kAlphaMax = 0.999f;
constexpr float kTransmittanceMin = 1e-4f;

struct TileGrid {
  int64_t width, height, tile_size, tiles_x, tiles_y;
};

}  // namespace

// Returns (render [C,H,W,D], alphas [C,H,W], last_ids [C,H,W] int32: number of intersections of the pixel's
// tile list that the pixel walked through, i.e. the end of its front-to-back loop).
std::vector<torch::Tensor> rasterize_forward(
    torch::Tensor means2d, torch::Tensor conics, torch::Tensor colors, torch::Tensor opacities,
    torch::Tensor backgrounds, torch::Tensor tile_offsets, torch::Tensor flatten_ids,
    int64_t width, int64_t height, int64_t tile_size) {
  TORCH_CHECK(means2d.dtype() == torch::kFloat32, "means2d must be float32");
  const int64_t C = means2d.size(0), N = means2d.size(1), D = colors.size(2);
  const TileGrid g{width, height, tile_size, (width + tile_size - 1) / tile_size,
                   (height + tile_size - 1) / tile_size};
  auto render = torch::zeros({C, height, width, D}, means2d.options());
  auto alphas = torch::zeros({C, height, width}, means2d.options());
  auto last_ids = torch::zeros({C, height, width}, means2d.options().dtype(torch::kInt32));

  const float* xy = means2d.data_ptr<float>();
  const float* con = conics.data_ptr<float>();
  const float* col = colors.data_ptr<float>();
  const float* opa = opacities.data_ptr<float>();
  const bool has_bg = backgrounds.numel() > 0;
  const float* bg = has_bg ? backgrounds.data_ptr<float>() : nullptr;
  const int64_t* off = tile_offsets.data_ptr<int64_t>();
  const int64_t* ids = flatten_ids.data_ptr<int64_t>();
  float* out = render.data_ptr<float>();
  float* out_a = alphas.data_ptr<float>();
  int32_t* out_last = last_ids.data_ptr<int32_t>();
  const int64_t n_tiles = g.tiles_x * g.tiles_y;

  at::parallel_for(0, C * n_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(D);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t cam = t / n_tiles, tile = t % n_tiles;
      const int64_t tx = tile % g.tiles_x, ty = tile / g.tiles_x;
      const int64_t start = off[t], stop = off[t + 1];
      for (int64_t py = ty * tile_size; py < std::min(height, (ty + 1) * tile_size); ++py) {
        for (int64_t px = tx * tile_size; px < std::min(width, (tx + 1) * tile_size); ++px) {
          const float fx = px + 0.5f, fy = py + 0.5f;
          float T = 1.0f;
          std::fill(acc.begin(), acc.end(), 0.0f);
          int64_t k = start;
          for (; k < stop; ++k) {
            const int64_t gid = ids[k];
            const float dx = xy[2 * gid] - fx, dy = xy[2 * gid + 1] - fy;
            const float* q = con + 3 * gid;
            const float sigma = 0.5f * (q[0] * dx * dx + q[2] * dy * dy) + q[1] * dx * dy;
            if (sigma < 0.0f) continue;
            const float alpha = std::min(kAlphaMax, opa[gid] * std::exp(-sigma));
            if (alpha < kAlphaMin) continue;
            const float next_T = T * (1.0f - alpha);
            if (next_T <= kTransmittanceMin) break;
            const float w = alpha * T;
            const float* c = col + D * gid;
            for (int64_t d = 0; d < D; ++d) acc[d] += w * c[d];
            T = next_T;
          }
          const int64_t pix = (cam * height + py) * width + px;
          for (int64_t d = 0; d < D; ++d) out[pix * D + d] = acc[d] + (has_bg ? T * bg[cam * D + d] : 0.0f);
          out_a[pix] = 1.0f - T;
          out_last[pix] = static_cast<int32_t>(k - start);
        }
      }
    }
  });
  return {render, alphas, last_ids};
}

// Returns per-intersection gradients [M, 6 + D]: (d means2d x, y | d conic a, b, c | d opacity | d colors).
std::vector<torch::Tensor> rasterize_backward(
    torch::Tensor means2d, torch::Tensor conics, torch::Tensor colors, torch::Tensor opacities,
    torch::Tensor backgrounds, torch::Tensor tile_offsets, torch::Tensor flatten_ids,
    int64_t width, int64_t height, int64_t tile_size, torch::Tensor alphas, torch::Tensor last_ids,
    torch::Tensor v_render, torch::Tensor v_alphas) {
  const int64_t C = means2d.size(0), D = colors.size(2);
  const int64_t M = flatten_ids.size(0);
  const TileGrid g{width, height, tile_size, (width + tile_size - 1) / tile_size,
                   (height + tile_size - 1) / tile_size};
  const int64_t G = 6 + D;
  auto grads = torch::zeros({M, G}, means2d.options());

  const float* xy = means2d.data_ptr<float>();
  const float* con = conics.data_ptr<float>();
  const float* col = colors.data_ptr<float>();
  const float* opa = opacities.data_ptr<float>();
  const bool has_bg = backgrounds.numel() > 0;
  const float* bg = has_bg ? backgrounds.data_ptr<float>() : nullptr;
  const int64_t* off = tile_offsets.data_ptr<int64_t>();
  const int64_t* ids = flatten_ids.data_ptr<int64_t>();
  const float* a_final = alphas.data_ptr<float>();
  const int32_t* last = last_ids.data_ptr<int32_t>();
  const float* v_out = v_render.data_ptr<float>();
  const float* v_a = v_alphas.data_ptr<float>();
  float* gr = grads.data_ptr<float>();
  const int64_t n_tiles = g.tiles_x * g.tiles_y;

  at::parallel_for(0, C * n_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> behind(D);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t cam = t / n_tiles, tile = t % n_tiles;
      const int64_t tx = tile % g.tiles_x, ty = tile / g.tiles_x;
      const int64_t start = off[t];
      for (int64_t py = ty * tile_size; py < std::min(height, (ty + 1) * tile_size); ++py) {
        for (int64_t px = tx * tile_size; px < std::min(width, (tx + 1) * tile_size); ++px) {
          const int64_t pix = (cam * height + py) * width + px;
          const float fx = px + 0.5f, fy = py + 0.5f;
          const float T_final = 1.0f - a_final[pix];
          const float* vo = v_out + pix * D;
          // d loss / d T_final, through the background term and the alpha output (alpha = 1 - T_final).
          float v_T_final = -v_a[pix];
          if (has_bg)
            for (int64_t d = 0; d < D; ++d) v_T_final += bg[cam * D + d] * vo[d];
          float T = T_final;
          std::fill(behind.begin(), behind.end(), 0.0f);
          // Walk back to front over the Gaussians the forward pass composited.
          for (int64_t k = start + last[pix] - 1; k >= start; --k) {
            const int64_t gid = ids[k];
            const float dx = xy[2 * gid] - fx, dy = xy[2 * gid + 1] - fy;
            const float* q = con + 3 * gid;
            const float sigma = 0.5f * (q[0] * dx * dx + q[2] * dy * dy) + q[1] * dx * dy;
            if (sigma < 0.0f) continue;
            const float vis = std::exp(-sigma);
            const float raw_alpha = opa[gid] * vis;
            const float alpha = std::min(kAlphaMax, raw_alpha);
            if (alpha < kAlphaMin) continue;
            const float one_minus = 1.0f - alpha;
            T = T / one_minus;  // transmittance in front of this Gaussian
            const float w = alpha * T;
            const float* c = col + D * gid;
            float* gk = gr + k * G;
            float v_alpha = 0.0f;
            for (int64_t d = 0; d < D; ++d) {
              gk[6 + d] += w * vo[d];
              // colour: c_g * T contributes directly; everything behind is scaled by (1 - alpha).
              v_alpha += (c[d] * T - behind[d] / one_minus) * vo[d];
              behind[d] += w * c[d];
            }
            v_alpha += -T_final / one_minus * v_T_final;
            if (raw_alpha <= kAlphaMax) {
              const float v_sigma = -raw_alpha * v_alpha;
              gk[0] += v_sigma * (q[0] * dx + q[1] * dy);
              gk[1] += v_sigma * (q[1] * dx + q[2] * dy);
              gk[2] += 0.5f * v_sigma * dx * dx;
              gk[3] += v_sigma * dx * dy;
              gk[4] += 0.5f * v_sigma * dy * dy;
              gk[5] += vis * v_alpha;
            }
          }
        }
      }
    }
  });
  return {grads};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rasterize_forward", &rasterize_forward, "tile rasterization forward (CPU)");
  m.def("rasterize_backward", &rasterize_backward, "tile rasterization backward (CPU)");
}

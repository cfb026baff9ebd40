// SSIM of a rendered image against its photo, and its gradient with respect to the render, fused (the training
// loss's D-SSIM term; nerfstudio_gsloc/fused_ssim.py is the Python side and pytorch_msssim the reference the
// tests hold this file to).
//
// Conventions (identical to pytorch_msssim.ssim with win_size 11, compensation 1, nonnegative_ssim False):
//   X, Y [N, C, H, W] float32: the photo (no gradient) and the render;
//   win  [K]: the 1-D Gaussian window, applied along H and then along W without padding ("valid": the maps
//             are (H - K + 1) x (W - K + 1));
//   ssim_map = (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1) * (2 s_xy + C2) / (s_xx + s_yy + C2),
//   s_xx = G(X^2) - mu_x^2, s_yy = G(Y^2) - mu_y^2, s_xy = G(XY) - mu_x mu_y, mu = G(.) the filtered image;
//   the result is the mean of the map per (image, channel): [N, C].
//
// Why: pytorch_msssim filters five images with two depthwise convolutions each and autograd keeps a dozen
// intermediate maps; on a 3 x 200 x 200 lego view that was 12 ms of forward + backward, about a sixth of a
// training step. Here the forward pass filters the five images in one sweep and also returns the derivative of
// each map pixel with respect to the three filtered quantities that depend on Y (mu_y, G(Y^2), G(XY)); the
// backward pass filters those three maps back (the transposed, "full" filter) and combines them:
//   dL/dY = G^T(d_mu) + 2 Y G^T(d_yy) + X G^T(d_xy).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <vector>

namespace {

// out[i][j] = sum_k w[k] in[i + k][j] for the valid rows i < H - K + 1 (all W columns).
void filter_rows(const float* in, int64_t H, int64_t W, const float* w, int64_t K, float* out) {
  const int64_t Hv = H - K + 1;
  for (int64_t i = 0; i < Hv; ++i) {
    float* o = out + i * W;
    for (int64_t j = 0; j < W; ++j) o[j] = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
      const float wk = w[k];
      const float* r = in + (i + k) * W;
      for (int64_t j = 0; j < W; ++j) o[j] += wk * r[j];
    }
  }
}

// out[i][j] = sum_k w[k] in[i][j + k] for the valid columns j < W - K + 1; `in` has rows of length W.
void filter_cols(const float* in, int64_t H, int64_t W, const float* w, int64_t K, float* out) {
  const int64_t Wv = W - K + 1;
  for (int64_t i = 0; i < H; ++i) {
    float* o = out + i * Wv;
    const float* r = in + i * W;
    for (int64_t j = 0; j < Wv; ++j) o[j] = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
      const float wk = w[k];
      for (int64_t j = 0; j < Wv; ++j) o[j] += wk * r[j + k];
    }
  }
}

// The transpose of filter_cols(filter_rows(.)): g [Hv, Wv] -> out [H, W], out[y][x] = sum over the map pixels
// (i, j) with y - i and x - j in [0, K) of w[y - i] w[x - j] g[i][j]. `tmp` holds [H, Wv].
void filter_transposed(const float* g, int64_t H, int64_t W, const float* w, int64_t K, float* tmp, float* out) {
  const int64_t Hv = H - K + 1, Wv = W - K + 1;
  for (int64_t y = 0; y < H; ++y) {
    float* t = tmp + y * Wv;
    for (int64_t j = 0; j < Wv; ++j) t[j] = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t i = y - k;
      if (i < 0 || i >= Hv) continue;
      const float wk = w[k];
      const float* r = g + i * Wv;
      for (int64_t j = 0; j < Wv; ++j) t[j] += wk * r[j];
    }
  }
  for (int64_t y = 0; y < H; ++y) {
    float* o = out + y * W;
    const float* t = tmp + y * Wv;
    for (int64_t x = 0; x < W; ++x) o[x] = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
      const float wk = w[k];
      float* ok = o + k;  // map column j lands on x = j + k
      for (int64_t j = 0; j < Wv; ++j) ok[j] += wk * t[j];
    }
  }
}

void check_inputs(const torch::Tensor& X, const torch::Tensor& Y, const torch::Tensor& win) {
  TORCH_CHECK(X.dim() == 4 && X.sizes() == Y.sizes(), "ssim_cpu: X and Y must be [N, C, H, W] of the same shape");
  TORCH_CHECK(X.dtype() == torch::kFloat32 && Y.dtype() == torch::kFloat32 && win.dtype() == torch::kFloat32,
              "ssim_cpu: float32 inputs expected");
  TORCH_CHECK(X.is_contiguous() && Y.is_contiguous() && win.is_contiguous() && win.dim() == 1,
              "ssim_cpu: contiguous inputs and a 1-D window expected");
  TORCH_CHECK(X.size(2) >= win.size(0) && X.size(3) >= win.size(0), "ssim_cpu: image smaller than the window");
}

}  // namespace

// Returns (ssim per image and channel [N, C], d_mu, d_yy, d_xy [N, C, Hv, Wv]): the derivatives of that mean with
// respect to mu_y, G(Y^2) and G(XY) at every map pixel (empty tensors when need_grad is false).
std::vector<torch::Tensor> ssim_forward(torch::Tensor X, torch::Tensor Y, torch::Tensor win, double C1, double C2,
                                        bool need_grad) {
  check_inputs(X, Y, win);
  const int64_t N = X.size(0), C = X.size(1), H = X.size(2), W = X.size(3), K = win.size(0);
  const int64_t Hv = H - K + 1, Wv = W - K + 1, planes = N * C;
  auto opts = X.options();
  auto result = torch::empty({N, C}, opts);
  auto d_mu = need_grad ? torch::empty({N, C, Hv, Wv}, opts) : torch::empty({0}, opts);
  auto d_yy = need_grad ? torch::empty({N, C, Hv, Wv}, opts) : torch::empty({0}, opts);
  auto d_xy = need_grad ? torch::empty({N, C, Hv, Wv}, opts) : torch::empty({0}, opts);
  const float *xp = X.data_ptr<float>(), *yp = Y.data_ptr<float>(), *wp = win.data_ptr<float>();
  float* rp = result.data_ptr<float>();
  float *dmp = need_grad ? d_mu.data_ptr<float>() : nullptr, *dyp = need_grad ? d_yy.data_ptr<float>() : nullptr;
  float* dxp = need_grad ? d_xy.data_ptr<float>() : nullptr;
  const float c1 = static_cast<float>(C1), c2 = static_cast<float>(C2), inv_count = 1.0f / (Hv * Wv);

  at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    // the five images to filter (X, Y, X^2, Y^2, XY), their row-filtered [Hv, W] and filtered [Hv, Wv] maps
    std::vector<float> sq(3 * H * W), rows(Hv * W), maps(5 * Hv * Wv);
    for (int64_t plane = begin; plane < end; ++plane) {
      const float* x = xp + plane * H * W;
      const float* y = yp + plane * H * W;
      float *xx = sq.data(), *yy = xx + H * W, *xy = yy + H * W;
      for (int64_t p = 0; p < H * W; ++p) {
        xx[p] = x[p] * x[p];
        yy[p] = y[p] * y[p];
        xy[p] = x[p] * y[p];
      }
      const float* sources[5] = {x, y, xx, yy, xy};
      for (int s = 0; s < 5; ++s) {
        filter_rows(sources[s], H, W, wp, K, rows.data());
        filter_cols(rows.data(), Hv, W, wp, K, maps.data() + s * Hv * Wv);
      }
      const float *mx = maps.data(), *my = mx + Hv * Wv, *gxx = my + Hv * Wv, *gyy = gxx + Hv * Wv,
                  *gxy = gyy + Hv * Wv;
      float* dm = need_grad ? dmp + plane * Hv * Wv : nullptr;
      float* dy = need_grad ? dyp + plane * Hv * Wv : nullptr;
      float* dx = need_grad ? dxp + plane * Hv * Wv : nullptr;
      double total = 0.0;
      for (int64_t i = 0; i < Hv; ++i) {
        float row_sum = 0.0f;
        for (int64_t j = 0; j < Wv; ++j) {
          const int64_t p = i * Wv + j;
          const float mu_x = mx[p], mu_y = my[p];
          const float s_xx = gxx[p] - mu_x * mu_x, s_yy = gyy[p] - mu_y * mu_y, s_xy = gxy[p] - mu_x * mu_y;
          const float a1 = 2.0f * mu_x * mu_y + c1, b1 = mu_x * mu_x + mu_y * mu_y + c1;
          const float a2 = 2.0f * s_xy + c2, b2 = s_xx + s_yy + c2;
          const float l = a1 / b1, cs = a2 / b2;
          row_sum += l * cs;
          if (dm) {
            // ssim = l cs with l(mu_y), cs(s_yy(G(Y^2), mu_y), s_xy(G(XY), mu_y)); scaled by 1 / count (the mean)
            const float d_cs_d_sxy = 2.0f / b2, d_cs_d_syy = -cs / b2;
            const float d_l_d_muy = (2.0f * mu_x - 2.0f * mu_y * l) / b1;
            dy[p] = inv_count * l * d_cs_d_syy;
            dx[p] = inv_count * l * d_cs_d_sxy;
            // s_yy and s_xy also depend on mu_y: d s_yy / d mu_y = -2 mu_y, d s_xy / d mu_y = -mu_x
            dm[p] = inv_count * (d_l_d_muy * cs + l * (d_cs_d_syy * -2.0f * mu_y + d_cs_d_sxy * -mu_x));
          }
        }
        total += row_sum;
      }
      rp[plane] = static_cast<float>(total * inv_count);
    }
  });
  return {result, d_mu, d_yy, d_xy};
}

// dL/dY [N, C, H, W] from dL/d(ssim per image and channel) [N, C] and ssim_forward's derivative maps.
torch::Tensor ssim_backward(torch::Tensor X, torch::Tensor Y, torch::Tensor win, torch::Tensor d_mu, torch::Tensor d_yy,
                            torch::Tensor d_xy, torch::Tensor v_result) {
  check_inputs(X, Y, win);
  const int64_t N = X.size(0), C = X.size(1), H = X.size(2), W = X.size(3), K = win.size(0);
  const int64_t Hv = H - K + 1, Wv = W - K + 1, planes = N * C;
  TORCH_CHECK(v_result.dtype() == torch::kFloat32 && v_result.is_contiguous() && v_result.numel() == planes,
              "ssim_backward: contiguous float32 [N, C] gradient expected");
  auto v_Y = torch::empty_like(Y);
  const float *xp = X.data_ptr<float>(), *yp = Y.data_ptr<float>(), *wp = win.data_ptr<float>();
  const float *dmp = d_mu.data_ptr<float>(), *dyp = d_yy.data_ptr<float>(), *dxp = d_xy.data_ptr<float>();
  const float* vr = v_result.data_ptr<float>();
  float* out = v_Y.data_ptr<float>();
  at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scaled(Hv * Wv), tmp(H * Wv), back(3 * H * W);
    for (int64_t plane = begin; plane < end; ++plane) {
      const float v = vr[plane];
      const float* maps[3] = {dmp + plane * Hv * Wv, dyp + plane * Hv * Wv, dxp + plane * Hv * Wv};
      for (int s = 0; s < 3; ++s) {
        for (int64_t p = 0; p < Hv * Wv; ++p) scaled[p] = v * maps[s][p];
        filter_transposed(scaled.data(), H, W, wp, K, tmp.data(), back.data() + s * H * W);
      }
      const float* x = xp + plane * H * W;
      const float* y = yp + plane * H * W;
      const float *b_mu = back.data(), *b_yy = b_mu + H * W, *b_xy = b_yy + H * W;
      float* o = out + plane * H * W;
      for (int64_t p = 0; p < H * W; ++p) o[p] = b_mu[p] + 2.0f * y[p] * b_yy[p] + x[p] * b_xy[p];
    }
  });
  return v_Y;
}

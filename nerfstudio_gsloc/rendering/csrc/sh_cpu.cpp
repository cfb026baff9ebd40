// View-dependent colours from spherical harmonics, fused, with a hand-written backward pass (CPU).
//
// The fast path of `evaluate_sh_colors` in nerfstudio_gsloc/rendering/projection.py (the PyTorch reference
// it is tested against): colour = max(0, sum_b basis_b(normalize(mean - camera centre)) * coeffs_b + 0.5),
// real SH of degree 0..3 with the constants and sign conventions of 3DGS / gsplat.
//   coeffs [N,K,3] (K >= (degree+1)^2), means [N,3], campos [C,3]  ->  colors [C,N,3]

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr float C0 = 0.28209479177387814f, C1 = 0.4886025119029199f;
constexpr float C2[5] = {1.0925484305920792f, -1.0925484305920792f, 0.31539156525252005f, -1.0925484305920792f,
                         0.5462742152960396f};
constexpr float C3[7] = {-0.5900435899266435f, 2.890611442640554f, -0.4570457994644658f, 0.3731763325901154f,
                         -0.4570457994644658f, 1.445305721320277f, -0.5900435899266435f};

// Basis values b[0..B) at the unit direction (x, y, z); with grad != nullptr also d b / d(x, y, z) as grad[3*i..].
inline void sh_basis(int degree, float x, float y, float z, float* b, float* grad) {
  b[0] = C0;
  if (grad) grad[0] = grad[1] = grad[2] = 0.f;
  if (degree < 1) return;
  b[1] = -C1 * y; b[2] = C1 * z; b[3] = -C1 * x;
  if (grad) {
    const float g[9] = {0.f, -C1, 0.f, 0.f, 0.f, C1, -C1, 0.f, 0.f};
    std::copy(g, g + 9, grad + 3);
  }
  if (degree < 2) return;
  const float xx = x * x, yy = y * y, zz = z * z;
  b[4] = C2[0] * x * y; b[5] = C2[1] * y * z; b[6] = C2[2] * (2.f * zz - xx - yy); b[7] = C2[3] * x * z;
  b[8] = C2[4] * (xx - yy);
  if (grad) {
    const float g[15] = {C2[0] * y, C2[0] * x, 0.f,
                         0.f, C2[1] * z, C2[1] * y,
                         -2.f * C2[2] * x, -2.f * C2[2] * y, 4.f * C2[2] * z,
                         C2[3] * z, 0.f, C2[3] * x,
                         2.f * C2[4] * x, -2.f * C2[4] * y, 0.f};
    std::copy(g, g + 15, grad + 12);
  }
  if (degree < 3) return;
  b[9] = C3[0] * y * (3.f * xx - yy);
  b[10] = C3[1] * x * y * z;
  b[11] = C3[2] * y * (4.f * zz - xx - yy);
  b[12] = C3[3] * z * (2.f * zz - 3.f * xx - 3.f * yy);
  b[13] = C3[4] * x * (4.f * zz - xx - yy);
  b[14] = C3[5] * z * (xx - yy);
  b[15] = C3[6] * x * (xx - 3.f * yy);
  if (grad) {
    const float g[21] = {C3[0] * 6.f * x * y, C3[0] * (3.f * xx - 3.f * yy), 0.f,
                         C3[1] * y * z, C3[1] * x * z, C3[1] * x * y,
                         C3[2] * -2.f * x * y, C3[2] * (4.f * zz - xx - 3.f * yy), C3[2] * 8.f * y * z,
                         C3[3] * -6.f * x * z, C3[3] * -6.f * y * z, C3[3] * (6.f * zz - 3.f * xx - 3.f * yy),
                         C3[4] * (4.f * zz - 3.f * xx - yy), C3[4] * -2.f * x * y, C3[4] * 8.f * x * z,
                         C3[5] * 2.f * x * z, C3[5] * -2.f * y * z, C3[5] * (xx - yy),
                         C3[6] * (3.f * xx - 3.f * yy), C3[6] * -6.f * x * y, 0.f};
    std::copy(g, g + 21, grad + 27);
  }
}

// Unit direction from the camera centre to the mean, as F.normalize (norm clamped at 1e-12).
inline float unit_dir(const float* mean, const float* cam, float* d) {
  for (int i = 0; i < 3; ++i) d[i] = mean[i] - cam[i];
  const float norm = std::max(std::sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2]), 1e-12f);
  for (int i = 0; i < 3; ++i) d[i] /= norm;
  return norm;
}

void check(const torch::Tensor& coeffs, const torch::Tensor& means, const torch::Tensor& campos, int64_t degree) {
  TORCH_CHECK(degree >= 0 && degree <= 3, "sh: degree must be in 0..3");
  for (const auto& t : {coeffs, means, campos})
    TORCH_CHECK(t.dtype() == torch::kFloat32 && t.is_contiguous(), "sh: contiguous float32 inputs expected");
  TORCH_CHECK(coeffs.size(1) >= (degree + 1) * (degree + 1) && coeffs.size(2) == 3, "sh: too few coefficients");
}

}  // namespace

torch::Tensor sh_forward(torch::Tensor coeffs, torch::Tensor means, torch::Tensor campos, int64_t degree) {
  check(coeffs, means, campos, degree);
  const int64_t N = means.size(0), C = campos.size(0), K = coeffs.size(1), B = (degree + 1) * (degree + 1);
  auto colors = torch::empty({C, N, 3}, means.options());
  const float *co = coeffs.data_ptr<float>(), *mp = means.data_ptr<float>(), *cp = campos.data_ptr<float>();
  float* out = colors.data_ptr<float>();
  at::parallel_for(0, N, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t c = 0; c < C; ++c)
      for (int64_t n = begin; n < end; ++n) {
        float d[3], b[16];
        unit_dir(mp + 3 * n, cp + 3 * c, d);
        sh_basis(degree, d[0], d[1], d[2], b, nullptr);
        const float* k = co + n * K * 3;
        float rgb[3] = {0.5f, 0.5f, 0.5f};
        for (int64_t i = 0; i < B; ++i)
          for (int j = 0; j < 3; ++j) rgb[j] += b[i] * k[3 * i + j];
        for (int j = 0; j < 3; ++j) out[(c * N + n) * 3 + j] = std::max(rgb[j], 0.0f);
      }
  });
  return colors;
}

// Returns (v_coeffs [N,K,3], v_means [N,3], v_campos [C,3]).
// With need_gauss false (pose refinement: the scene is frozen) only v_campos is computed; the others are empty.
std::vector<torch::Tensor> sh_backward(torch::Tensor coeffs, torch::Tensor means, torch::Tensor campos, int64_t degree,
                                       torch::Tensor v_colors, bool need_gauss) {
  check(coeffs, means, campos, degree);
  TORCH_CHECK(v_colors.dtype() == torch::kFloat32 && v_colors.is_contiguous(), "sh: contiguous float32 grads expected");
  const int64_t N = means.size(0), C = campos.size(0), K = coeffs.size(1), B = (degree + 1) * (degree + 1);
  auto v_coeffs = need_gauss ? torch::zeros_like(coeffs) : torch::zeros({0, K, 3}, coeffs.options());
  auto v_means = need_gauss ? torch::zeros_like(means) : torch::zeros({0, 3}, means.options());
  const float *co = coeffs.data_ptr<float>(), *mp = means.data_ptr<float>(), *cp = campos.data_ptr<float>();
  const float* vc = v_colors.data_ptr<float>();
  float *r_co = v_coeffs.data_ptr<float>(), *r_m = v_means.data_ptr<float>();
  const int64_t grain = 4096, num_chunks = (N + grain - 1) / grain;
  std::vector<double> v_cam_chunks(std::max<int64_t>(num_chunks, 1) * C * 3, 0.0);
  at::parallel_for(0, num_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk)
      for (int64_t n = chunk * grain; n < std::min(N, (chunk + 1) * grain); ++n) {
        const float* k = co + n * K * 3;
        float* vk = need_gauss ? r_co + n * K * 3 : nullptr;
        for (int64_t c = 0; c < C; ++c) {
          const float* v = vc + (c * N + n) * 3;
          if (v[0] == 0.f && v[1] == 0.f && v[2] == 0.f) continue;  // drew nothing in this camera: no gradient
          float d[3], b[16], g[48];
          const float norm = unit_dir(mp + 3 * n, cp + 3 * c, d);
          sh_basis(degree, d[0], d[1], d[2], b, g);
          float rgb[3] = {0.5f, 0.5f, 0.5f};
          for (int64_t i = 0; i < B; ++i)
            for (int j = 0; j < 3; ++j) rgb[j] += b[i] * k[3 * i + j];
          float vr[3];
          for (int j = 0; j < 3; ++j) vr[j] = rgb[j] >= 0.0f ? v[j] : 0.0f;  // clamp_min passes at >= 0
          float vd[3] = {0.f, 0.f, 0.f};
          for (int64_t i = 0; i < B; ++i) {
            const float vb = vr[0] * k[3 * i] + vr[1] * k[3 * i + 1] + vr[2] * k[3 * i + 2];
            for (int j = 0; j < 3; ++j) vd[j] += vb * g[3 * i + j];
            if (vk)
              for (int j = 0; j < 3; ++j) vk[3 * i + j] += b[i] * vr[j];
          }
          // d = raw / |raw|: v_raw = (vd - d (d . vd)) / |raw|; raw = mean - campos
          const float proj = d[0] * vd[0] + d[1] * vd[1] + d[2] * vd[2];
          double* vcam = v_cam_chunks.data() + (chunk * C + c) * 3;
          for (int j = 0; j < 3; ++j) {
            const float v_raw = (vd[j] - d[j] * proj) / norm;
            if (need_gauss) r_m[3 * n + j] += v_raw;
            vcam[j] -= v_raw;
          }
        }
      }
  });
  auto v_campos = torch::zeros({C, 3}, means.options());
  float* r_cam = v_campos.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c)
    for (int j = 0; j < 3; ++j) {
      double acc = 0.0;
      for (int64_t chunk = 0; chunk < num_chunks; ++chunk) acc += v_cam_chunks[(chunk * C + c) * 3 + j];
      r_cam[3 * c + j] = static_cast<float>(acc);
    }
  return {v_coeffs, v_means, v_campos};
}

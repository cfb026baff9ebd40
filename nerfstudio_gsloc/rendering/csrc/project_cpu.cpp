// Fused CPU projection of 3D Gaussians (EWA splatting) and its hand-written backward pass.
//
// The fast path of nerfstudio_gsloc/rendering/projection.py: `quat_scale_to_covariance` followed by
// `project_gaussians`, computed per (camera, Gaussian) in one pass instead of dozens of PyTorch ops. The
// PyTorch functions there are the reference this file is tested against (forward values and gradients).
//
// Conventions (those of projection.py and gsplat 1.4):
//   means [N,3] world; quats [N,4] (w,x,y,z), not necessarily normalised; scales [N,3] standard deviations;
//   opacities [N]; viewmats [C,4,4] OpenCV world-to-camera; Ks [C,3,3] pinhole, pixel centres at +0.5.
//   The perspective Jacobian uses x/z and y/z clamped to 30% beyond the image (gsplat's clamp).
// Outputs: means2d [C,N,2], conics [C,N,3] (a, b, c of the inverse 2D covariance), depths [C,N] (camera z),
//   opacities [C,N] (times Mip-Splatting's compensation when antialiased), radii [C,N] int32 and
//   extents [C,N,2] (footprint bounding box half-sizes; 0 = culled; no gradient).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr float kAlphaThreshold = 1.0f / 255.0f;

struct Camera {
  float W[9], t[3];
  float fx, fy, cx, cy;
  float lim_x_pos, lim_x_neg, lim_y_pos, lim_y_neg;
};

Camera make_camera(const float* vm, const float* K, int64_t width, int64_t height) {
  Camera cam;
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 3; ++j) cam.W[3 * i + j] = vm[4 * i + j];
    cam.t[i] = vm[4 * i + 3];
  }
  cam.fx = K[0];
  cam.fy = K[4];
  cam.cx = K[2];
  cam.cy = K[5];
  const float tan_x = 0.5f * width / cam.fx, tan_y = 0.5f * height / cam.fy;
  cam.lim_x_pos = (width - cam.cx) / cam.fx + 0.3f * tan_x;
  cam.lim_x_neg = cam.cx / cam.fx + 0.3f * tan_x;
  cam.lim_y_pos = (height - cam.cy) / cam.fy + 0.3f * tan_y;
  cam.lim_y_neg = cam.cy / cam.fy + 0.3f * tan_y;
  return cam;
}

// Rotation matrix (row-major) of the normalised quaternion q = (w, x, y, z).
inline void quat_to_rot(const float* q, float* R) {
  const float w = q[0], x = q[1], y = q[2], z = q[3];
  R[0] = 1.f - 2.f * (y * y + z * z); R[1] = 2.f * (x * y - w * z);       R[2] = 2.f * (x * z + w * y);
  R[3] = 2.f * (x * y + w * z);       R[4] = 1.f - 2.f * (x * x + z * z); R[5] = 2.f * (y * z - w * x);
  R[6] = 2.f * (x * z - w * y);       R[7] = 2.f * (y * z + w * x);       R[8] = 1.f - 2.f * (x * x + y * y);
}

// Normalised quaternion, its norm as F.normalize takes it (max(|q|, 1e-12)), rotation R, M = R diag(s), Sigma = M M^T.
struct Shape {
  float qn[4], qnorm, R[9], M[9], S[9];
};

inline Shape make_shape(const float* q, const float* s) {
  Shape sh;
  sh.qnorm = std::max(std::sqrt(q[0] * q[0] + q[1] * q[1] + q[2] * q[2] + q[3] * q[3]), 1e-12f);
  for (int i = 0; i < 4; ++i) sh.qn[i] = q[i] / sh.qnorm;
  quat_to_rot(sh.qn, sh.R);
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) sh.M[3 * i + j] = sh.R[3 * i + j] * s[j];
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j)
      sh.S[3 * i + j] = sh.M[3 * i] * sh.M[3 * j] + sh.M[3 * i + 1] * sh.M[3 * j + 1] + sh.M[3 * i + 2] * sh.M[3 * j + 2];
  return sh;
}

inline void matvec(const float* A, const float* v, float* out) {
  for (int i = 0; i < 3; ++i) out[i] = A[3 * i] * v[0] + A[3 * i + 1] * v[1] + A[3 * i + 2] * v[2];
}
inline float dot3(const float* a, const float* b) { return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]; }

// Everything the forward pass computes for one (camera, Gaussian) that the backward pass needs again.
struct Projected {
  float pc[3];       // camera-frame mean
  bool in_range;     // near < z < far
  float zs;          // z, or 1 outside the depth range (as the PyTorch reference)
  float u, v;        // x/z and y/z, clamped
  bool u_free, v_free;  // not clamped: u, v depend on x, y, z
  float m0[3], m1[3];   // rows of J W
  float Sm0[3], Sm1[3];
  float a, b, c;     // 2D covariance before the low-pass filter
  float ap, cp, det; // after it
  bool valid;
  float det_safe;
};

inline Projected project_one(const Camera& cam, const float* p, const Shape& sh, float near, float far, float eps2d) {
  Projected o;
  matvec(cam.W, p, o.pc);
  for (int i = 0; i < 3; ++i) o.pc[i] += cam.t[i];
  const float z = o.pc[2];
  o.in_range = (z > near) && (z < far);
  o.zs = o.in_range ? z : 1.0f;
  const float ru = o.pc[0] / o.zs, rv = o.pc[1] / o.zs;
  o.u = std::min(std::max(ru, -cam.lim_x_neg), cam.lim_x_pos);
  o.v = std::min(std::max(rv, -cam.lim_y_neg), cam.lim_y_pos);
  o.u_free = (ru > -cam.lim_x_neg) && (ru < cam.lim_x_pos);
  o.v_free = (rv > -cam.lim_y_neg) && (rv < cam.lim_y_pos);
  const float g0 = cam.fx / o.zs, g1 = cam.fy / o.zs;
  for (int j = 0; j < 3; ++j) {
    o.m0[j] = g0 * (cam.W[j] - o.u * cam.W[6 + j]);
    o.m1[j] = g1 * (cam.W[3 + j] - o.v * cam.W[6 + j]);
  }
  matvec(sh.S, o.m0, o.Sm0);
  matvec(sh.S, o.m1, o.Sm1);
  o.a = dot3(o.m0, o.Sm0);
  o.b = dot3(o.m1, o.Sm0);
  o.c = dot3(o.m1, o.Sm1);
  o.ap = o.a + eps2d;
  o.cp = o.c + eps2d;
  o.det = o.ap * o.cp - o.b * o.b;
  o.valid = o.in_range && (o.det > 0.0f);
  o.det_safe = o.valid ? o.det : 1.0f;
  return o;
}

}  // namespace

// Returns (means2d [C,N,2], conics [C,N,3], depths [C,N], opacities [C,N], radii [C,N] int32, extents [C,N,2]).
std::vector<torch::Tensor> project_forward(torch::Tensor means, torch::Tensor quats, torch::Tensor scales,
                                           torch::Tensor opacities, torch::Tensor viewmats, torch::Tensor Ks,
                                           int64_t width, int64_t height, double near, double far, double eps2d,
                                           bool antialiased) {
  for (const auto& t : {means, quats, scales, opacities, viewmats, Ks})
    TORCH_CHECK(t.dtype() == torch::kFloat32 && t.is_contiguous(), "project_forward: contiguous float32 inputs expected");
  const int64_t N = means.size(0), C = viewmats.size(0);
  auto opts = means.options();
  auto means2d = torch::empty({C, N, 2}, opts), conics = torch::empty({C, N, 3}, opts);
  auto depths = torch::empty({C, N}, opts), opac = torch::empty({C, N}, opts);
  auto radii = torch::empty({C, N}, opts.dtype(torch::kInt32)), extents = torch::empty({C, N, 2}, opts);
  const float *mp = means.data_ptr<float>(), *qp = quats.data_ptr<float>(), *sp = scales.data_ptr<float>();
  const float *op = opacities.data_ptr<float>(), *vp = viewmats.data_ptr<float>(), *kp = Ks.data_ptr<float>();
  float *o_xy = means2d.data_ptr<float>(), *o_conic = conics.data_ptr<float>(), *o_depth = depths.data_ptr<float>();
  float *o_op = opac.data_ptr<float>(), *o_ext = extents.data_ptr<float>();
  int32_t* o_rad = radii.data_ptr<int32_t>();
  std::vector<Camera> cams;
  for (int64_t c = 0; c < C; ++c) cams.push_back(make_camera(vp + 16 * c, kp + 9 * c, width, height));
  const float fnear = near, ffar = far, feps = eps2d;

  at::parallel_for(0, N, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const Shape sh = make_shape(qp + 4 * n, sp + 3 * n);
      for (int64_t c = 0; c < C; ++c) {
        const Camera& cam = cams[c];
        const Projected o = project_one(cam, mp + 3 * n, sh, fnear, ffar, feps);
        const int64_t i = c * N + n;
        o_conic[3 * i] = o.cp / o.det_safe;
        o_conic[3 * i + 1] = -o.b / o.det_safe;
        o_conic[3 * i + 2] = o.ap / o.det_safe;
        float opacity = op[n];
        if (antialiased) opacity *= std::sqrt(std::max((o.a * o.c - o.b * o.b) / o.det_safe, 0.0f));
        o_op[i] = opacity;
        const float u = cam.fx * o.pc[0] / o.zs + cam.cx, v = cam.fy * o.pc[1] / o.zs + cam.cy;
        o_xy[2 * i] = u;
        o_xy[2 * i + 1] = v;
        o_depth[i] = o.pc[2];
        // Footprint where alpha = opacity * exp(-sigma) falls to 1/255, along the larger eigen-axis.
        const float mid = 0.5f * (o.ap + o.cp);
        const float lambda_max = mid + std::sqrt(std::max(mid * mid - o.det, 0.01f));
        const float sigma_cut = 2.0f * std::log(std::max(opacity / kAlphaThreshold, 1.0f));
        const float radius = std::ceil(std::sqrt(sigma_cut * lambda_max));
        const bool on_image = (u + radius > 0) && (u - radius < width) && (v + radius > 0) && (v - radius < height);
        const bool keep = o.valid && on_image && radius > 0;
        o_rad[i] = keep ? static_cast<int32_t>(radius) : 0;
        o_ext[2 * i] = keep ? std::ceil(std::sqrt(sigma_cut * o.ap)) : 0.0f;
        o_ext[2 * i + 1] = keep ? std::ceil(std::sqrt(sigma_cut * o.cp)) : 0.0f;
      }
    }
  });
  return {means2d, conics, depths, opac, radii, extents};
}

// Returns (v_means [N,3], v_quats [N,4], v_scales [N,3], v_opacities [N], v_viewmats [C,4,4]). With need_gauss
// false (pose refinement: the scene is frozen) only v_viewmats is computed and the others are empty.
std::vector<torch::Tensor> project_backward(torch::Tensor means, torch::Tensor quats, torch::Tensor scales,
                                            torch::Tensor opacities, torch::Tensor viewmats, torch::Tensor Ks,
                                            int64_t width, int64_t height, double near, double far, double eps2d,
                                            bool antialiased, torch::Tensor v_means2d, torch::Tensor v_conics,
                                            torch::Tensor v_depths, torch::Tensor v_opac, bool need_gauss) {
  for (const auto& t : {v_means2d, v_conics, v_depths, v_opac})
    TORCH_CHECK(t.dtype() == torch::kFloat32 && t.is_contiguous(), "project_backward: contiguous float32 grads expected");
  const int64_t N = means.size(0), C = viewmats.size(0);
  auto opts = means.options();
  const int64_t NG = need_gauss ? N : 0;
  auto v_means = torch::zeros({NG, 3}, opts), v_quats = torch::zeros({NG, 4}, opts);
  auto v_scales = torch::zeros({NG, 3}, opts), v_opacities = torch::zeros({NG}, opts);
  const float *mp = means.data_ptr<float>(), *qp = quats.data_ptr<float>(), *sp = scales.data_ptr<float>();
  const float *op = opacities.data_ptr<float>(), *vp = viewmats.data_ptr<float>(), *kp = Ks.data_ptr<float>();
  const float *g_xy = v_means2d.data_ptr<float>(), *g_conic = v_conics.data_ptr<float>();
  const float *g_depth = v_depths.data_ptr<float>(), *g_op = v_opac.data_ptr<float>();
  float *r_means = v_means.data_ptr<float>(), *r_quats = v_quats.data_ptr<float>();
  float *r_scales = v_scales.data_ptr<float>(), *r_op = v_opacities.data_ptr<float>();
  std::vector<Camera> cams;
  for (int64_t c = 0; c < C; ++c) cams.push_back(make_camera(vp + 16 * c, kp + 9 * c, width, height));
  const float fnear = near, ffar = far, feps = eps2d;
  // d/d viewmat [C, 12] (rows 0..2 of the 4x4), summed per chunk of Gaussians and then over chunks in order.
  const int64_t grain = 2048, num_chunks = (N + grain - 1) / grain;
  std::vector<double> v_view_chunks(std::max<int64_t>(num_chunks, 1) * C * 12, 0.0);

  at::parallel_for(0, num_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      double* vv_chunk = v_view_chunks.data() + chunk * C * 12;
      for (int64_t n = chunk * grain; n < std::min(N, (chunk + 1) * grain); ++n) {
        const Shape sh = make_shape(qp + 4 * n, sp + 3 * n);
        const float* p = mp + 3 * n;
        float vSigma[9] = {0}, vp_world[3] = {0}, vop_total = 0.0f;
        for (int64_t c = 0; c < C; ++c) {
          const Camera& cam = cams[c];
          const Projected o = project_one(cam, p, sh, fnear, ffar, feps);
          const int64_t i = c * N + n;
          const float D = o.det_safe;
          float v_a = 0.f, v_b = 0.f, v_c = 0.f, v_D = 0.f;
          // opacity (and Mip-Splatting's compensation sqrt(det_raw / det_safe))
          if (antialiased) {
            const float det_raw = o.a * o.c - o.b * o.b;
            const float r = det_raw / D;
            const float comp = std::sqrt(std::max(r, 0.0f));
            vop_total += g_op[i] * comp;
            if (r > 0.0f) {
              const float v_r = g_op[i] * op[n] * 0.5f / comp;
              const float v_det_raw = v_r / D;
              v_D += -v_r * det_raw / (D * D);
              v_a += v_det_raw * o.c;
              v_c += v_det_raw * o.a;
              v_b += -2.0f * o.b * v_det_raw;
            }
          } else {
            vop_total += g_op[i];
          }
          // conic = (c', -b, a') / D
          const float q0 = g_conic[3 * i], q1 = g_conic[3 * i + 1], q2 = g_conic[3 * i + 2];
          v_c += q0 / D;
          v_b += -q1 / D;
          v_a += q2 / D;
          v_D += -(q0 * o.cp - q1 * o.b + q2 * o.ap) / (D * D);
          if (o.valid) {  // D = a' c' - b^2
            v_a += v_D * o.cp;
            v_c += v_D * o.ap;
            v_b += -2.0f * o.b * v_D;
          }
          // a = m0.S.m0, b = m1.S.m0, c = m1.S.m1
          float v_m0[3], v_m1[3];
          for (int j = 0; j < 3; ++j) {
            v_m0[j] = 2.0f * v_a * o.Sm0[j] + v_b * o.Sm1[j];
            v_m1[j] = 2.0f * v_c * o.Sm1[j] + v_b * o.Sm0[j];
          }
          if (need_gauss)
            for (int r = 0; r < 3; ++r)
              for (int s = 0; s < 3; ++s)
                vSigma[3 * r + s] += v_a * o.m0[r] * o.m0[s] + v_b * o.m1[r] * o.m0[s] + v_c * o.m1[r] * o.m1[s];
          // m0 = g0 (w0 - u w2), g0 = fx / zs; m1 = g1 (w1 - v w2), g1 = fy / zs
          const float* w0 = cam.W;
          const float* w1 = cam.W + 3;
          const float* w2 = cam.W + 6;
          const float g0 = cam.fx / o.zs, g1 = cam.fy / o.zs;
          float e0[3], e1[3];
          for (int j = 0; j < 3; ++j) {
            e0[j] = w0[j] - o.u * w2[j];
            e1[j] = w1[j] - o.v * w2[j];
          }
          const float v_g0 = dot3(v_m0, e0), v_g1 = dot3(v_m1, e1);
          const float v_u = -g0 * dot3(v_m0, w2), v_v = -g1 * dot3(v_m1, w2);
          float v_W[9];
          for (int j = 0; j < 3; ++j) {
            v_W[j] = g0 * v_m0[j];
            v_W[3 + j] = g1 * v_m1[j];
            v_W[6 + j] = -g0 * o.u * v_m0[j] - g1 * o.v * v_m1[j];
          }
          const float zs = o.zs, x = o.pc[0], y = o.pc[1];
          float v_x = 0.f, v_y = 0.f, v_zs = -cam.fx / (zs * zs) * v_g0 - cam.fy / (zs * zs) * v_g1;
          if (o.u_free) {
            v_x += v_u / zs;
            v_zs += -v_u * x / (zs * zs);
          }
          if (o.v_free) {
            v_y += v_v / zs;
            v_zs += -v_v * y / (zs * zs);
          }
          // means2d = (fx x / zs + cx, fy y / zs + cy)
          const float gu = g_xy[2 * i], gv = g_xy[2 * i + 1];
          v_x += cam.fx * gu / zs;
          v_y += cam.fy * gv / zs;
          v_zs += -(cam.fx * x * gu + cam.fy * y * gv) / (zs * zs);
          const float v_z = g_depth[i] + (o.in_range ? v_zs : 0.0f);
          const float v_pc[3] = {v_x, v_y, v_z};
          // pc = W p + t
          for (int j = 0; j < 3; ++j) vp_world[j] += cam.W[j] * v_pc[0] + cam.W[3 + j] * v_pc[1] + cam.W[6 + j] * v_pc[2];
          double* vv = vv_chunk + c * 12;
          for (int r = 0; r < 3; ++r) {
            for (int s = 0; s < 3; ++s) vv[4 * r + s] += v_W[3 * r + s] + v_pc[r] * p[s];
            vv[4 * r + 3] += v_pc[r];
          }
        }
        if (!need_gauss) continue;
        for (int j = 0; j < 3; ++j) r_means[3 * n + j] = vp_world[j];
        r_op[n] = vop_total;
        // S = M M^T: v_M = (vS + vS^T) M; M = R diag(s)
        float vM[9], vR[9];
        for (int r = 0; r < 3; ++r)
          for (int s = 0; s < 3; ++s) {
            float acc = 0.f;
            for (int k = 0; k < 3; ++k) acc += (vSigma[3 * r + k] + vSigma[3 * k + r]) * sh.M[3 * k + s];
            vM[3 * r + s] = acc;
          }
        const float* sc = sp + 3 * n;
        for (int s = 0; s < 3; ++s) {
          float acc = 0.f;
          for (int r = 0; r < 3; ++r) {
            vR[3 * r + s] = vM[3 * r + s] * sc[s];
            acc += vM[3 * r + s] * sh.R[3 * r + s];
          }
          r_scales[3 * n + s] = acc;
        }
        // R(q) with q = (w, x, y, z) normalised
        const float w = sh.qn[0], x = sh.qn[1], y = sh.qn[2], z = sh.qn[3];
        float vq[4];
        vq[0] = 2.f * (-z * vR[1] + y * vR[2] + z * vR[3] - x * vR[5] - y * vR[6] + x * vR[7]);
        vq[1] = 2.f * (y * vR[1] + z * vR[2] + y * vR[3] - 2.f * x * vR[4] - w * vR[5] + z * vR[6] + w * vR[7] - 2.f * x * vR[8]);
        vq[2] = 2.f * (-2.f * y * vR[0] + x * vR[1] + w * vR[2] + x * vR[3] + z * vR[5] - w * vR[6] + z * vR[7] - 2.f * y * vR[8]);
        vq[3] = 2.f * (-2.f * z * vR[0] - w * vR[1] + x * vR[2] + w * vR[3] - 2.f * z * vR[4] + y * vR[5] + x * vR[6] + y * vR[7]);
        // q_n = q / |q|: v_q = (v_qn - q_n (q_n . v_qn)) / |q|
        const float proj = w * vq[0] + x * vq[1] + y * vq[2] + z * vq[3];
        for (int j = 0; j < 4; ++j) r_quats[4 * n + j] = (vq[j] - sh.qn[j] * proj) / sh.qnorm;
      }
    }
  });
  auto v_viewmats = torch::zeros({C, 4, 4}, opts);
  float* r_view = v_viewmats.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c)
    for (int k = 0; k < 12; ++k) {
      double acc = 0.0;
      for (int64_t chunk = 0; chunk < num_chunks; ++chunk) acc += v_view_chunks[(chunk * C + c) * 12 + k];
      r_view[16 * c + k] = static_cast<float>(acc);
    }
  return {v_means, v_quats, v_scales, v_opacities, v_viewmats};
}

// One Adam step of a contiguous float32 parameter in a single pass over its memory (training the Gaussians).
//
// The update is torch.optim.Adam's single-tensor one (no weight decay, no amsgrad, not maximizing), element by
// element with the same formulas (the compiler may round differently: the tests hold it to torch to 2e-6):
//   m = m + (1 - beta1) (g - m)                      exp_avg.lerp_(grad, 1 - beta1)
//   v = v beta2 + (1 - beta2) g g                    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
//   p = p - step_size m / (sqrt(v) / bc2_sqrt + eps) param.addcdiv_(exp_avg, denom, -step_size)
// with step_size = lr / (1 - beta1^step) and bc2_sqrt = sqrt(1 - beta2^step) computed by the caller. torch runs
// those as six passes with two temporaries; on the 3 million numbers of a 50k-Gaussian scene that was about a
// tenth of a CPU training step.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>

void adam_step(torch::Tensor param, torch::Tensor grad, torch::Tensor exp_avg, torch::Tensor exp_avg_sq, double beta1,
               double beta2, double eps, double step_size, double bias_correction2_sqrt) {
  for (const auto* t : {&param, &grad, &exp_avg, &exp_avg_sq}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == torch::kFloat32 && t->is_contiguous(),
                "adam_step: contiguous float32 CPU tensors expected");
    TORCH_CHECK(t->numel() == param.numel(), "adam_step: every tensor must have the parameter's size");
  }
  const float* starts[] = {param.data_ptr<float>(), grad.data_ptr<float>(), exp_avg.data_ptr<float>(),
                           exp_avg_sq.data_ptr<float>()};
  const int64_t n = param.numel();
  for (int i = 0; i < 4; ++i)
    for (int j = i + 1; j < 4; ++j)
      TORCH_CHECK(n == 0 || starts[i] + n <= starts[j] || starts[j] + n <= starts[i],
                  "adam_step: the four tensors must not overlap in memory");
  float* p = param.data_ptr<float>();
  const float* g = grad.data_ptr<float>();
  float* m = exp_avg.data_ptr<float>();
  float* v = exp_avg_sq.data_ptr<float>();
  const float w1 = static_cast<float>(1.0 - beta1), b2 = static_cast<float>(beta2), w2 = static_cast<float>(1.0 - beta2);
  const float e = static_cast<float>(eps), neg_step = static_cast<float>(-step_size);
  const float bc2 = static_cast<float>(bias_correction2_sqrt);
  at::parallel_for(0, param.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
    // four distinct buffers of the same size (checked above): no aliasing, so the loop vectorises
    float* __restrict__ pp = p;
    const float* __restrict__ gp = g;
    float* __restrict__ mp = m;
    float* __restrict__ vp = v;
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      const float gi = gp[i];
      const float mi = mp[i] + w1 * (gi - mp[i]);
      const float vi = vp[i] * b2 + w2 * gi * gi;
      mp[i] = mi;
      vp[i] = vi;
      pp[i] = pp[i] + neg_step * (mi / (std::sqrt(vi) / bc2 + e));
    }
  });
}

// Python bindings of the CPU kernels (rasterize_cpu.cpp: compositing and binning; project_cpu.cpp: projection;
// sh_cpu.cpp: SH colours; adam_cpu.cpp: the training optimizer's step; ssim_cpu.cpp: the training loss's SSIM).

#include <torch/extension.h>

#include <vector>

std::vector<torch::Tensor> rasterize_forward(torch::Tensor means2d, torch::Tensor conics, torch::Tensor colors,
                                             torch::Tensor opacities, torch::Tensor backgrounds,
                                             torch::Tensor extents, torch::Tensor tile_offsets,
                                             torch::Tensor flatten_ids, int64_t width, int64_t height,
                                             int64_t tile_size);
std::vector<torch::Tensor> rasterize_backward(torch::Tensor means2d, torch::Tensor conics, torch::Tensor colors,
                                              torch::Tensor opacities, torch::Tensor backgrounds,
                                              torch::Tensor extents, torch::Tensor tile_offsets,
                                              torch::Tensor flatten_ids, int64_t width, int64_t height,
                                              int64_t tile_size, torch::Tensor alphas, torch::Tensor last_ids,
                                              torch::Tensor used, torch::Tensor v_render, torch::Tensor v_alphas);
std::vector<torch::Tensor> bin_tiles(torch::Tensor means2d, torch::Tensor extents, torch::Tensor depths,
                                     torch::Tensor visible, int64_t width, int64_t height, int64_t tile_size);
std::vector<torch::Tensor> project_forward(torch::Tensor means, torch::Tensor quats, torch::Tensor scales,
                                           torch::Tensor opacities, torch::Tensor viewmats, torch::Tensor Ks,
                                           int64_t width, int64_t height, double near, double far, double eps2d,
                                           bool antialiased);
std::vector<torch::Tensor> project_backward(torch::Tensor means, torch::Tensor quats, torch::Tensor scales,
                                            torch::Tensor opacities, torch::Tensor viewmats, torch::Tensor Ks,
                                            int64_t width, int64_t height, double near, double far, double eps2d,
                                            bool antialiased, torch::Tensor v_means2d, torch::Tensor v_conics,
                                            torch::Tensor v_depths, torch::Tensor v_opac, bool need_gauss);

torch::Tensor sh_forward(torch::Tensor coeffs, torch::Tensor means, torch::Tensor campos, int64_t degree);
std::vector<torch::Tensor> sh_backward(torch::Tensor coeffs, torch::Tensor means, torch::Tensor campos, int64_t degree,
                                       torch::Tensor v_colors, bool need_gauss);
void adam_step(torch::Tensor param, torch::Tensor grad, torch::Tensor exp_avg, torch::Tensor exp_avg_sq, double beta1,
               double beta2, double eps, double step_size, double bias_correction2_sqrt);
std::vector<torch::Tensor> ssim_forward(torch::Tensor X, torch::Tensor Y, torch::Tensor win, double C1, double C2,
                                        bool need_grad);
torch::Tensor ssim_backward(torch::Tensor X, torch::Tensor Y, torch::Tensor win, torch::Tensor d_mu, torch::Tensor d_yy,
                            torch::Tensor d_xy, torch::Tensor v_result);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rasterize_forward", &rasterize_forward, "tile rasterization forward (CPU)");
  m.def("rasterize_backward", &rasterize_backward, "tile rasterization backward (CPU)");
  m.def("bin_tiles", &bin_tiles, "tile binning by counting sort (CPU)");
  m.def("project_forward", &project_forward, "fused EWA projection forward (CPU)");
  m.def("project_backward", &project_backward, "fused EWA projection backward (CPU)");
  m.def("sh_forward", &sh_forward, "fused SH colours forward (CPU)");
  m.def("sh_backward", &sh_backward, "fused SH colours backward (CPU)");
  m.def("adam_step", &adam_step, "one-pass Adam step of a contiguous float32 parameter (CPU)");
  m.def("ssim_forward", &ssim_forward, "fused SSIM per image and channel, with the maps its gradient needs (CPU)");
  m.def("ssim_backward", &ssim_backward, "gradient of the fused SSIM with respect to Y (CPU)");
}

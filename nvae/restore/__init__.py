"""Image restoration with a trained NVAE as the prior (issue 28; PnP-HVAE, Prost et al., ICCV 2023,
arXiv 2303.11217). So far: the degradation operators with exact adjoints (:mod:`nvae.restore.operators`)."""
from nvae.restore.operators import (AvgPool, Blur, Downsample, GaussianBlur, Identity, Mask, Operator,
                                    conjugate_gradient, gaussian_kernel, parse_operator)

__all__ = ["AvgPool", "Blur", "Downsample", "GaussianBlur", "Identity", "Mask", "Operator",
           "conjugate_gradient", "gaussian_kernel", "parse_operator"]

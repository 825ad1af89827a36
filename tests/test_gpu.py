"""GPU checks (skipped without CUDA): bf16 grouped experts on CUDA against the fp32 CPU reference."""

import pytest
import torch

from models.expert_math import grouped_swiglu

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")]


def test_grouped_swiglu_cuda_bf16_matches_cpu_fp32():
    g = torch.Generator().manual_seed(0)
    E, D, F, S = 8, 256, 512, 300
    counts = torch.multinomial(torch.ones(E), S, replacement=True, generator=g).bincount(minlength=E).tolist()
    x, gu, dn = torch.randn(S, D, generator=g), torch.randn(E, D, 2 * F, generator=g) / D ** 0.5, \
        torch.randn(E, F, D, generator=g) / F ** 0.5
    ref = grouped_swiglu(x, counts, gu, dn)
    out = grouped_swiglu(*(t.cuda().bfloat16() for t in (x,)), counts, gu.cuda().bfloat16(), dn.cuda().bfloat16())
    torch.testing.assert_close(out.float().cpu(), ref, atol=0.1, rtol=0.05)

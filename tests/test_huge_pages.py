"""Packed weights on huge-page-advised memory: the allocator's contract (shape, dtype, alignment, no overlap, memory
freed with its tensors) and, where this kernel offers transparent huge pages, a loaded model's weights on them."""

import gc
import weakref
from pathlib import Path

import pytest
import torch

from models import cpu_kernels, huge_pages


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "absent"
    return text[text.index("[") + 1:text.index("]")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_empty_gives_aligned_disjoint_tensors_of_the_asked_shape(dtype):
    a = huge_pages.empty((3, 5, 7), dtype)
    b = huge_pages.empty((0, 4), dtype)
    c = huge_pages.empty((huge_pages.CHUNK // 4 + 5,), dtype)  # bigger than a chunk: a mapping of its own
    d = huge_pages.empty((11,), dtype)
    for t, shape in ((a, (3, 5, 7)), (b, (0, 4)), (c, (huge_pages.CHUNK // 4 + 5,)), (d, (11,))):
        assert t.shape == shape and t.dtype == dtype and t.is_contiguous() and t.device.type == "cpu"
        assert t.data_ptr() % huge_pages.ALIGN == 0
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in (a, c, d))
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:])), spans
    a.fill_(1), c.fill_(2), d.fill_(3)  # writable, and writing one leaves the others alone
    assert (a == 1).all() and (c == 2).all() and (d == 3).all()


def test_a_large_weight_has_a_mapping_of_its_own_freed_with_its_last_tensor():
    small = huge_pages.empty((16,), torch.float32)
    big = huge_pages.empty((huge_pages.CHUNK // 4,), torch.float32)  # over half a chunk
    after = huge_pages.empty((16,), torch.float32)
    lo, hi = big.data_ptr(), big.data_ptr() + big.numel() * 4
    assert not lo <= after.data_ptr() < hi and not lo <= small.data_ptr() < hi  # small ones stay in the chunk
    assert big.data_ptr() % huge_pages.HUGE_PAGE == 0
    ref = weakref.ref(big.untyped_storage())  # the storage of the uint8 view over the mmap
    view = big[5:9]
    del big
    gc.collect()
    assert ref() is not None  # a view still uses it
    del view
    gc.collect()
    freed = ref() is None
    assert freed


@pytest.mark.skipif(cpu_kernels.library() is None, reason="no AVX2/FMA CPU or no C compiler here")
@pytest.mark.skipif(_thp_mode() not in ("madvise", "always"), reason="this kernel offers no transparent huge pages")
def test_loaded_models_packed_weights_sit_on_huge_pages(ckpt):
    from models.loading import load_model

    model = load_model(ckpt, weight_dtype=torch.float32)
    qkv = model.layers[0].self_attn.qkv_packed
    experts = next(iter(model.experts.gate_up_EDF2.values()))
    assert qkv.dim() == 3 and experts.dim() == 4  # packed for the kernels
    assert huge_pages.huge_page_bytes(qkv) >= huge_pages.HUGE_PAGE
    assert huge_pages.huge_page_bytes(experts) >= huge_pages.HUGE_PAGE
    assert huge_pages.huge_page_bytes(torch.empty(1 << 16)) == 0  # ordinary allocations are not

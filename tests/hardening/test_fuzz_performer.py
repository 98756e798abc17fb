"""Property-based fuzzing of performer_attention on every backend that runs here, against the float64 reference.

Random leading dims (none, (B,), (B, H), (B, H, X), with 1s), T and E (1, odd, the model's 64), m, input scale,
layouts (the kqv split, transposed, strided tokens, stride-0 broadcasts, q = k = v aliased), w layout and dtype,
eps, dtypes and grad modes; y and the gradients of q, k, v against float64 autograd of the reference.
A failure prints its case; rerun it with hardening_utils.check_performer(case, backend, device).
"""
import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from hardening_utils import (
    PERFORMER_BACKENDS, PERFORMER_LAYOUTS, PerformerCase, backend_params, check_performer, count_case,
    draw_dtype_seed_grad_mode, examples_for, fuzz_inputs,
)

pytestmark = pytest.mark.usefixtures("single_intraop_thread")


@st.composite
def performer_cases(draw, dtypes, small: bool):
    lead = tuple(draw(st.lists(st.integers(1, 3), max_size=2 if small else 3)))
    if small:
        T, E, m = draw(st.integers(1, 24)), draw(st.integers(1, 24)), draw(st.integers(1, 16))
    else:
        T = draw(st.one_of(st.integers(1, 80), st.sampled_from([127, 200])))
        E = draw(st.one_of(st.integers(1, 48), st.just(64)))
        m = draw(st.one_of(st.integers(1, 40), st.just(32)))
    # many small cases find more than a few big ones: at most 16k elements per tensor (e.g. (2, 2), 64, 64)
    assume(math.prod(lead) * T * E <= 16384)
    return PerformerCase(
        lead=lead, T=T, E=E, m=m,
        scale=draw(st.sampled_from([0.05, 0.25, 0.5, 1.0])),
        layout=draw(st.sampled_from(sorted(PERFORMER_LAYOUTS))),
        w_layout=draw(st.sampled_from(["contiguous", "transposed"])),
        w_dtype=draw(st.sampled_from(["float32", "same"])),
        eps=draw(st.sampled_from([1e-8, 1e-4, 1.0])),
        **draw_dtype_seed_grad_mode(draw, dtypes),
    )


@pytest.mark.parametrize("device,backend", backend_params())
def test_performer_matches_float64_reference(device, backend, request):
    dtypes, small, _ = fuzz_inputs(PERFORMER_BACKENDS, backend, device)  # no known crashes to leave out

    @settings(max_examples=examples_for(backend, device, "performer_attention"))
    @given(case=performer_cases(dtypes, small))
    def run(case):
        count_case(request.node.nodeid, case, backend, device)
        check_performer(case, backend, device)

    run()


def test_the_case_generator_covers_the_edges():
    """The generator reaches no leading dims, 1, 2 and 3 of them, T = E = m = 1, odd sizes, E = 64 with m = 32,
    every layout and grad mode."""
    seen = set()

    @settings(max_examples=400, derandomize=True)
    @given(case=performer_cases(["float32"], small=False))
    def collect(case):
        seen.update({f"lead_dims={len(case.lead)}", f"layout={case.layout}", f"grad_mode={case.grad_mode}",
                     f"w={case.w_layout}"})
        seen.update(f"{name}=1" for name in ("T", "E", "m") if getattr(case, name) == 1)
        if case.T % 2 and case.E % 2 and case.T > 1 and case.E > 1:
            seen.add("odd T and E")
        if case.E == 64 and case.m == 32:
            seen.add("model widths")

    collect()
    wanted = ({f"lead_dims={n}" for n in range(4)} | {f"layout={name}" for name in PERFORMER_LAYOUTS}
              | {"grad_mode=no_grad", "grad_mode=inference_mode", "w=transposed", "T=1", "E=1", "m=1",
                 "odd T and E", "model widths"})
    assert wanted <= seen, wanted - seen

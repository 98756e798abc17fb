"""Property-based fuzzing of soft_split on every backend that runs here, against float64 F.unfold.

Random batch (incl. 0 and 1), channels, odd image sizes, kernel/stride/padding (square or not, stride > kernel,
padding up to 3), memory layouts (channels_last, slices, token views, stride-0 broadcasts), dtypes, and grad modes.
The forward must be exact (a soft split only copies); the input gradient must be within the rounding of its sums.
A failure prints its case; rerun it with hardening_utils.check_soft_split(case, backend, device).
"""
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from hardening_utils import (
    SOFT_SPLIT_BACKENDS, SOFT_SPLIT_CRASH_PROBES, SOFT_SPLIT_LAYOUTS, SoftSplitCase, assert_no_crash, backend_params,
    check_soft_split, count_case, draw_dtype_seed_grad_mode, draw_split_geometry, examples_for, fuzz_inputs, probe_id,
)

pytestmark = pytest.mark.usefixtures("single_intraop_thread")


@st.composite
def soft_split_cases(draw, dtypes, small: bool):
    return SoftSplitCase(
        **draw_split_geometry(draw, small),
        layout=draw(st.sampled_from(sorted(SOFT_SPLIT_LAYOUTS))),
        **draw_dtype_seed_grad_mode(draw, dtypes),
    )


@pytest.mark.parametrize("device,backend", backend_params())
def test_soft_split_matches_float64_unfold(device, backend, request):
    dtypes, small, crashing = fuzz_inputs(SOFT_SPLIT_BACKENDS, backend, device, SOFT_SPLIT_CRASH_PROBES)

    @settings(max_examples=examples_for(backend, device, "soft_split"))
    @given(case=soft_split_cases(dtypes, small))
    def run(case):
        assume(not any(probe.applies(case) for probe in crashing))
        count_case(request.node.nodeid, case, backend, device)
        check_soft_split(case, backend, device)

    run()


@pytest.mark.parametrize("probe", SOFT_SPLIT_CRASH_PROBES, ids=probe_id)
@pytest.mark.parametrize("device,backend", backend_params())
def test_no_crash(device, backend, probe):
    """Inputs that once crashed a kernel, run in a subprocess: a crash fails this test, not the whole session."""
    if backend == "eager":
        pytest.skip("eager is F.unfold itself")
    assert_no_crash(probe, SOFT_SPLIT_BACKENDS, backend, device)


def test_the_case_generator_covers_the_edges():
    """The generator reaches the edges the issue names: B = 1 and 0, stride > kernel, padding > kernel // 2,
    non-square kernels, every layout, the grad-free modes. (Checked on a sample; a shrunk generator would fail.)"""
    seen = set()

    @settings(max_examples=300, derandomize=True)
    @given(case=soft_split_cases(["float32"], small=False))
    def collect(case):
        k = case.kernel_size if isinstance(case.kernel_size, int) else case.kernel_size[0]
        s = case.stride if isinstance(case.stride, int) else case.stride[0]
        p = case.padding if isinstance(case.padding, int) else case.padding[0]
        seen.update({f"layout={case.layout}", f"grad_mode={case.grad_mode}", f"B={min(case.B, 2)}"})
        if s > k:
            seen.add("stride>kernel")
        if 2 * p > k:
            seen.add("wide padding")
        if not isinstance(case.kernel_size, int) and case.kernel_size[0] != case.kernel_size[1]:
            seen.add("non-square kernel")
        if case.H % 2 and case.W % 2:
            seen.add("odd image")

    collect()
    wanted = {f"layout={name}" for name in SOFT_SPLIT_LAYOUTS} | {
        "grad_mode=no_grad", "grad_mode=inference_mode", "B=0", "B=1", "stride>kernel", "wide padding",
        "non-square kernel", "odd image"}
    assert wanted <= seen, wanted - seen

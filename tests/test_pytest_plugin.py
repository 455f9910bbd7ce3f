"""The pytest plugin nixl-core installs (entry point pytest11) stays out of other projects' way."""

from __future__ import annotations

import pytest


def test_only_prefixed_markers_are_skipped_without_a_gpu(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a host without a GPU, a test marked ``nixl_gpu`` is skipped, while another project's
    own ``gpu`` marker means what that project says: its test runs."""
    pytester.makeini("[pytest]\nmarkers =\n    gpu: this project's own marker\n")
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.gpu
        def test_theirs():
            pass

        @pytest.mark.nixl_gpu
        def test_ours():
            pass

        @pytest.mark.nixl_multi_gpu
        def test_ours_twice():
            pass
        """
    )
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    result = pytester.runpytest_subprocess("-rs", "--strict-markers")
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.fnmatch_lines(["*nixl_gpu: needs 1 CUDA device(s), 0 visible*"])

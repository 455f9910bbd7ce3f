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


_USES_ETCD = """
def test_needs_etcd(nixl_etcd):
    pass
"""


def test_etcd_fixture_skips_without_etcd(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no etcd binary on PATH a test using ``nixl_etcd`` is skipped, saying why."""
    pytester.makepyfile(_USES_ETCD)
    monkeypatch.setenv("PATH", str(pytester.path / "no-bin"))
    monkeypatch.delenv("NIXL_ETCD_BIN", raising=False)
    monkeypatch.delenv("NIXL_REQUIRE_ETCD", raising=False)
    result = pytester.runpytest_subprocess("-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*no etcd binary on PATH*"])


def test_etcd_fixture_fails_when_etcd_is_required(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NIXL_REQUIRE_ETCD=1 (CI) turns that skip into an error."""
    pytester.makepyfile(_USES_ETCD)
    monkeypatch.setenv("PATH", str(pytester.path / "no-bin"))
    monkeypatch.delenv("NIXL_ETCD_BIN", raising=False)
    monkeypatch.setenv("NIXL_REQUIRE_ETCD", "1")
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*no etcd binary on PATH*NIXL_REQUIRE_ETCD=1*"])


def test_etcd_fixture_gives_each_test_its_own_namespace(pytester: pytest.Pytester) -> None:
    """Two tests share one etcd but not their keys: each has a namespace, emptied after it."""
    from nixl_core.testing.etcd import etcd_binary

    if etcd_binary() is None:
        pytest.skip("no etcd binary on PATH")
    pytest.importorskip("etcd3gw")
    pytester.makepyfile(
        """
        seen = []

        def test_first(nixl_etcd):
            store = nixl_etcd.store()
            store.publish("a", "metadata", b"m")
            seen.append((nixl_etcd.server, nixl_etcd.namespace))

        def test_second(nixl_etcd):
            from nixl_core.discovery.etcd import EtcdStore

            server, namespace = seen[0]
            assert nixl_etcd.server is server and nixl_etcd.namespace != namespace
            with EtcdStore(nixl_etcd.endpoint, namespace=namespace) as old:
                assert old.agents() == []
            assert nixl_etcd.store().agents() == []
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:randomly")
    result.assert_outcomes(passed=2)

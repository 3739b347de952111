pytest_plugins = ["pytester"]


def test_gpu_marker_skips_with_reason(pytester):
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.gpu(64)
        def test_needs_many():
            raise AssertionError("must not run")

        def test_fixture(fake_strategy, tiny_model):
            assert fake_strategy.accumulated_gradient == 4 and tiny_model.config.vocab_size == 64
        """
    )
    result = pytester.runpytest("-rs")  # the plugin is loaded through its pytest11 entry point
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*needs 64 CUDA GPU(s)*"])

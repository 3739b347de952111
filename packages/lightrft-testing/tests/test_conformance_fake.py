"""The conformance suite against FakeStrategy (in process, one rank)."""

from lightrft.testing.conformance import StrategyConformanceSuite


class TestFakeConformance(StrategyConformanceSuite):
    strategy_name = "fake"
    world_size = 1

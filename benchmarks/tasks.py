"""Tasks of the benchmarks."""

from triggers.task import TriggerTask


class Noop(TriggerTask):
    name = "benchmarks.tasks.Noop"

    def _run(self, context):
        return None

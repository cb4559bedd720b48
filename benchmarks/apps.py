from django.apps import AppConfig


class BenchmarksConfig(AppConfig):
    name = "benchmarks"

    def ready(self):
        from benchmarks import tasks  # noqa: F401 - registers the benchmark tasks

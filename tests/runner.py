"""Makes ``python manage.py test`` run the pytest suite."""



class PytestTestRunner:
    def __init__(self, verbosity=1, failfast=False, keepdb=False, **kwargs):
        self.verbosity = verbosity
        self.failfast = failfast

    @classmethod
    def add_arguments(cls, parser):
        pass

    def run_tests(self, test_labels, **kwargs):
        import pytest

        argv = list(test_labels)
        if self.verbosity == 0:
            argv.append("--quiet")
        elif self.verbosity > 1:
            argv.append("--verbose")
        if self.failfast:
            argv.append("--exitfirst")
        return pytest.main(argv)

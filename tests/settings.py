"""Settings of the test project. Services are the real ones on loopback.

Override with environment variables: TRIGGERS_TEST_REDIS_URL,
TRIGGERS_TEST_BROKER_URL.
"""

import os

from tests.celery import app as celery_app  # noqa: F401 - loads the Celery app with Django

SECRET_KEY = "triggers-tests"
DEBUG = False
USE_TZ = True
ALLOWED_HOSTS = ["*"]

REDIS_URL = os.environ.get("TRIGGERS_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
BROKER_URL = os.environ.get("TRIGGERS_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "triggers",
    "tests.app",
]

MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "tests.urls"
STATIC_URL = "/static/"
TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates",
    "APP_DIRS": True,
    "OPTIONS": {"context_processors": [
        "django.template.context_processors.request",
        "django.contrib.auth.context_processors.auth",
        "django.contrib.messages.context_processors.messages",
    ]},
}]

HERE = os.path.dirname(os.path.abspath(__file__))
DATABASES = {
    # SQLite, the embedded default. A file (not memory) so that threads share it.
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.path.join(HERE, "db.sqlite3"),
        "OPTIONS": {"timeout": 30},
        "TEST": {"NAME": os.environ.get("TRIGGERS_TEST_SQLITE_NAME",
                                 os.path.join(HERE, "test-db.sqlite3"))},
    },
    # The real PostgreSQL on loopback (trust auth). Child processes of the tests get
    # the name of the test database in TRIGGERS_TEST_PG_NAME.
    "postgres": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ.get("TRIGGERS_TEST_PG_NAME", "test"),
        "HOST": os.environ.get("TRIGGERS_TEST_PG_HOST", "127.0.0.1"),
        "PORT": os.environ.get("TRIGGERS_TEST_PG_PORT", "5432"),
        "USER": os.environ.get("TRIGGERS_TEST_PG_USER", "postgres"),
        "TEST": {"NAME": os.environ.get("TRIGGERS_TEST_PG_NAME", "test_triggers")},
    },
}

CACHES = {
    # django-redis: the recommended production cache for triggers.
    "default": {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "triggers-tests",
    },
    # Django's own Redis cache backend.
    "builtin_redis": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "triggers-tests-builtin",
    },
    # A Redis server that test_faults.py starts, stops and restarts itself.
    "restartable": {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": "redis://127.0.0.1:6391/0",
        "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 1, "SOCKET_TIMEOUT": 2},
    },
    # Local memory: single-process use.
    "locmem": {
        "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
        "LOCATION": "triggers-tests",
    },
}

# Each test run (and the workers it starts) uses queues of its own.
TEST_QUEUE = os.environ.setdefault("TRIGGERS_TEST_QUEUE", f"triggers-tests-{os.getpid()}")
CELERY_TASK_DEFAULT_QUEUE = TEST_QUEUE
CELERY_TASK_ROUTES = {"tests.Routed": {"queue": f"{TEST_QUEUE}-routed"},
                      "tests.CountAlone": {"queue": f"{TEST_QUEUE}-alone"}}
CELERY_BROKER_URL = BROKER_URL
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True

TEST_RUNNER = "tests.runner.PytestTestRunner"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
}

if os.environ.get("TRIGGERS_TEST_LEASE"):  # a worker started with a short lease
    TRIGGERS = {"LEASE": float(os.environ["TRIGGERS_TEST_LEASE"])}
if os.environ.get("TRIGGERS_TEST_SETTINGS"):  # a child process with settings of its own
    import json

    TRIGGERS = {**globals().get("TRIGGERS", {}), **json.loads(os.environ["TRIGGERS_TEST_SETTINGS"])}
if os.environ.get("TRIGGERS_TEST_ACKS_LATE"):  # a worker with the recommended Celery settings
    CELERY_TASK_ACKS_LATE = True
    CELERY_TASK_REJECT_ON_WORKER_LOST = True
if os.environ.get("TRIGGERS_TEST_BROKER_OPTIONS"):  # e.g. a Redis broker's visibility_timeout
    import json

    CELERY_BROKER_TRANSPORT_OPTIONS = json.loads(os.environ["TRIGGERS_TEST_BROKER_OPTIONS"])

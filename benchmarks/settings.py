"""Django settings for the benchmarks: django-redis on a Redis database of their own (13),
SQLite in /tmp and a PostgreSQL database of their own (bench_triggers)."""

import os

SECRET_KEY = "triggers-benchmarks"
USE_TZ = True
INSTALLED_APPS = ["triggers", "benchmarks"]
REDIS_URL = os.environ.get("TRIGGERS_BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
CACHES = {
    "default": {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "bench",
    },
}
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("TRIGGERS_BENCH_SQLITE", "/tmp/triggers-bench.sqlite3"),
        "OPTIONS": {"timeout": 30},
    },
    "postgres": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ.get("TRIGGERS_BENCH_PG_NAME", "bench_triggers"),
        "HOST": "127.0.0.1",
        "USER": os.environ.get("TRIGGERS_BENCH_PG_USER", "postgres"),
    },
}
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "root": {"handlers": [], "level": "ERROR"},
}

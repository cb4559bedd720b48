"""Django settings for the benchmarks: django-redis on a Redis database of their own."""

import os

SECRET_KEY = "triggers-benchmarks"
USE_TZ = True
INSTALLED_APPS = ["triggers", "benchmarks"]
REDIS_URL = os.environ.get("TRIGGERS_BENCH_REDIS_URL", "redis://127.0.0.1:6379/10")
CACHES = {
    "default": {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "bench",
    },
}
DATABASES = {}
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "root": {"handlers": [], "level": "ERROR"},
}

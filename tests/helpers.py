"""Configurations and storage factories shared by the tests."""

from triggers.storages.cache import CacheStorageBackend

QUESTIONNAIRE = {
    "t_importSubject": {
        "after": ["firstPageReceived", "questionnaireComplete"],
        "run": "app.tasks.ImportSubject",
    },
    "t_importResponses": {
        "after": ["t_importSubject"],
        "andEvery": "pageReceived",
        "run": "app.tasks.ImportResponses",
    },
    "t_importBrowserMetadata": {
        "after": ["t_importSubject", "pageReceived"],
        "unless": ["isEmbeddedApplication"],
        "run": "app.tasks.ImportBrowserMetadata",
    },
}

#: Storage kinds every behaviour is checked on: the cache backend on django-redis,
#: on Django's own RedisCache and on LocMem, the database backend on SQLite and on
#: PostgreSQL, and a custom whole-session backend.
STORAGE_KINDS = ["django_redis", "builtin_redis", "locmem", "redis", "redis_cluster", "memory",
                 "db_sqlite", "db_postgres", "dict"]
#: Kinds that need the test databases.
DB_KINDS = {"db_sqlite": "default", "db_postgres": "postgres"}


def make_storage(kind, uid):
    if kind == "django_redis":
        return CacheStorageBackend(uid, cache="default")
    if kind == "builtin_redis":
        return CacheStorageBackend(uid, cache="builtin_redis")
    if kind == "locmem":
        return CacheStorageBackend(uid, cache="locmem")
    if kind in DB_KINDS:
        from triggers.storages.database import DatabaseStorageBackend

        return DatabaseStorageBackend(uid, using=DB_KINDS[kind])
    if kind == "redis":
        from django.conf import settings

        from triggers.storages.redis import RedisStorageBackend

        return RedisStorageBackend(uid, url=settings.REDIS_URL, prefix="triggers-tests-redis:")
    if kind == "redis_cluster":
        import os

        from triggers.storages.redis import RedisStorageBackend

        url = os.environ.get("TRIGGERS_TEST_CLUSTER_URL")
        if not url:
            from tests.cluster import shared_cluster

            url = shared_cluster().url
        return RedisStorageBackend(uid, url=url, cluster=True)
    if kind == "memory":
        from triggers.storages.memory import MemoryStorageBackend

        return MemoryStorageBackend(uid, namespace="tests")
    if kind == "dict":
        from triggers_testdist import DictStorage

        return DictStorage(uid)
    raise ValueError(kind)


def statuses(storage):
    """{instance name: status value} of a session."""
    return {instance.name: instance.status.value for instance in storage}

"""``manage.py triggers``: inspect sessions, replay or skip failures, recover stuck instances."""

from __future__ import annotations

import json
from argparse import ArgumentParser
from typing import Any, TextIO, cast

from django.core.management.base import BaseCommand, CommandError, CommandParser

from triggers.exceptions import TriggersError
from triggers.manager import TriggerManager, build_manager


def _json_argument(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError as exc:
        raise CommandError(f"Not valid JSON: {value!r} ({exc})") from exc


_UNSET: Any = object()


def _timeout_argument(value: str) -> int | None:
    if value.lower() == "none":
        return None
    try:
        return int(value)
    except ValueError as exc:
        raise CommandError(f"--timeout takes a number of seconds or 'none', got {value!r}") from exc


class Command(BaseCommand):
    help = "Inspect trigger sessions, replay or skip failed instances, recover stuck ones."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True, parser_class=ArgumentParser)

        def common(command: ArgumentParser) -> None:
            command.add_argument("--manager", help="registry key of the trigger manager "
                                 "(default: TRIGGERS['MANAGER'])")
            command.add_argument("--storage", help="registry key of the storage backend "
                                 "(default: TRIGGERS['STORAGE'])")
            command.add_argument("--database", help="database alias of the database storage "
                                 "(default: TRIGGERS['DATABASE'])")
            command.add_argument("--cache", help="cache alias of the cache storage "
                                 "(default: TRIGGERS['CACHE'])")
            command.add_argument("--timeout", type=_timeout_argument, default=_UNSET,
                                 help="key timeout of the cache storage, as the application uses "
                                      "it: seconds, or 'none' (default: TRIGGERS['TIMEOUT'])")

        inspect = sub.add_parser("inspect", help="show a session's tasks and instances")
        inspect.add_argument("uid")
        inspect.add_argument("--json", action="store_true", help="print the session as JSON")
        common(inspect)

        replay = sub.add_parser("replay", help="replay a failed instance")
        replay.add_argument("uid")
        replay.add_argument("instance")
        replay.add_argument("--kwargs", type=_json_argument,
                            help="replacement kwargs as JSON: {trigger: {kwarg: value}}")
        common(replay)

        skip = sub.add_parser("skip", help="skip a failed instance")
        skip.add_argument("uid")
        skip.add_argument("instance")
        skip.add_argument("--cascade", action="store_true", help="fire the task's name")
        skip.add_argument("--result", type=_json_argument, help="cascade kwargs as JSON")
        common(skip)

        recover = sub.add_parser("recover", help="re-dispatch instances stuck in scheduled/running")
        recover.add_argument("uids", nargs="*", metavar="uid")
        recover.add_argument("--all", action="store_true",
                             help="every session of the storage: the database, or a Redis cache")
        recover.add_argument("--rerun-failed", action="store_true",
                             help="a recovery run: also replay failed instances (or skip them, "
                                  "for tasks with onRecovery 'skip'); finished ones stay")
        recover.add_argument("--older-than", type=float,
                             help="seconds an instance must have been stuck "
                                  "(default: TRIGGERS['RECOVER_AFTER'])")
        common(recover)

        demo = sub.add_parser("demo", help="run the questionnaire demo workflow")
        demo.add_argument("--celery", action="store_true",
                          help="run it on Redis with a real Celery worker it starts and stops")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            getattr(self, f"do_{options['action']}")(options)
        except TriggersError as exc:
            raise CommandError(str(exc)) from exc

    def storage_key_and_options(self, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """The storage's registry key and keyword arguments: the settings, then the flags
        (``--cache``, ``--database``, ``--timeout``) for a storage that takes them."""
        import inspect

        from triggers.conf import triggers_settings
        from triggers.storages import storage_backends

        storage = options["storage"] or triggers_settings.STORAGE
        storage_options = triggers_settings.storage_options(storage)
        accepted = inspect.signature(storage_backends.get_class(storage)).parameters
        for flag, name in (("cache", "cache"), ("database", "using"), ("timeout", "timeout")):
            value = options.get(flag)
            if value not in (None, _UNSET) and name in accepted:
                storage_options[name] = value
        return storage, storage_options

    def manager(self, uid: str, options: dict[str, Any]) -> TriggerManager:
        from triggers.conf import triggers_settings

        storage, storage_options = self.storage_key_and_options(options)
        return build_manager(options["manager"] or triggers_settings.MANAGER, storage, uid,
                             storage_options)

    def do_inspect(self, options: dict[str, Any]) -> None:
        storage = self.manager(options["uid"], options).storage
        if options["json"]:
            self.stdout.write(json.dumps(storage.debug_repr(), indent=2, sort_keys=True,
                                         default=str))
            return
        self.stdout.write(f"Session {storage.uid}")
        self.stdout.write("Tasks:")
        unresolved = {config.name for config in storage.get_unresolved_tasks()}
        for name, config in storage.tasks.items():
            state = "unresolved" if name in unresolved else "resolved"
            self.stdout.write(f"  {name:<30} {state:<10} {json.dumps(config.to_dict())}")
        self.stdout.write("Instances:")
        for instance in storage:
            line = f"  {instance.name:<30} {instance.status.value:<10}"
            if instance.status.value == "failed":
                line += f" {instance.metadata.get('exc_type')}: {instance.metadata.get('exc_message')}"
            elif "result" in instance.metadata:
                line += f" result={json.dumps(instance.metadata['result'], default=str)}"
            if instance.metadata.get("dispatch_error"):
                line += f" dispatch_error={instance.metadata['dispatch_error']}"
            self.stdout.write(line)
            if instance.status.value == "failed" and instance.metadata.get("exc_traceback"):
                for tb_line in str(instance.metadata["exc_traceback"]).rstrip().splitlines():
                    self.stdout.write(f"      {tb_line}")

    def do_replay(self, options: dict[str, Any]) -> None:
        manager = self.manager(options["uid"], options)
        clone = manager.replay_failed_instance(options["instance"], options["kwargs"])
        self.stdout.write(f"{options['instance']} replayed as {clone.name} ({clone.status.value})")

    def do_skip(self, options: dict[str, Any]) -> None:
        manager = self.manager(options["uid"], options)
        manager.skip_failed_instance(options["instance"], cascade=options["cascade"],
                                     result=options["result"])
        self.stdout.write(f"{options['instance']} skipped"
                          + (" (cascade fired)" if options["cascade"] else ""))

    def do_recover(self, options: dict[str, Any]) -> None:
        from triggers.run import flush_spool

        flushed = flush_spool()
        if flushed:
            self.stdout.write(f"Recorded {flushed} spooled outcome(s)")
        uids = list(options["uids"])
        if options["all"]:
            from triggers.storages import storage_backends

            storage, storage_options = self.storage_key_and_options(options)
            try:
                uids += storage_backends.get_class(storage).session_uids(**storage_options)
            except NotImplementedError as exc:
                raise CommandError(f"--all cannot list the sessions of storage {storage!r}: "
                                   f"{exc}; name the session UIDs") from exc
        if not uids:
            raise CommandError("Name the session UIDs to recover, or use --all")
        from triggers.conf import triggers_settings

        older_than = options["older_than"]
        if older_than is None:
            older_than = triggers_settings.RECOVER_AFTER
        total, failures = 0, []
        for uid in uids:
            try:
                manager = self.manager(uid, options)
                if options["rerun_failed"]:
                    report = manager.recovery_run(older_than)
                    for key in ("recovered", "replayed", "skipped"):
                        for name in report[key]:
                            self.stdout.write(f"{uid}: {key} {name}")
                    total += sum(len(names) for names in report.values())
                    continue
                recovered = manager.recover(older_than)
            except TriggersError as exc:
                failures.append(uid)
                self.stderr.write(f"{uid}: not recovered: {exc}")
                continue
            for instance in recovered:
                self.stdout.write(f"{uid}: re-dispatched {instance.name} "
                                  f"(was {instance.metadata.get('recovered_from')})")
            total += len(recovered)
        self.stdout.write(f"Recovered {total} instance(s) in {len(uids) - len(failures)} "
                          f"session(s).")
        if failures:
            raise CommandError(f"{len(failures)} session(s) could not be recovered: "
                               f"{', '.join(failures)}")

    def do_demo(self, options: dict[str, Any]) -> None:
        if options["celery"]:
            # The Celery flavour runs standalone: a worker of the project would not know
            # the demo's tasks, so it starts its own.
            import subprocess
            import sys

            code = subprocess.call([sys.executable, "-m", "triggers.demo", "--celery"])
            if code:
                raise CommandError("The demo did not finish its workflow")
            return
        import uuid

        from triggers.conf import triggers_settings
        from triggers.contrib.demo import run_demo
        from triggers.manager import build_manager

        manager = build_manager("finalizing", triggers_settings.STORAGE,
                                f"demo-{uuid.uuid4().hex[:8]}", triggers_settings.storage_options())
        if not run_demo(cast(TextIO, self.stdout), manager=manager):
            raise CommandError("The demo did not finish its workflow")

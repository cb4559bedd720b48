"""``manage.py triggers``: inspect sessions, replay or skip failures, recover stuck instances,
sweep the due work.

Every error ends the command with one line (``CommandError: …``) and exit status 1,
without a traceback (``manage.py triggers --traceback …`` shows it); a usage error
(a missing or unknown argument) with one line and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator
from typing import Any, NoReturn, TextIO, cast

from django.core.management.base import BaseCommand, CommandError, CommandParser

from triggers.exceptions import InvalidArgument, TriggersError
from triggers.manager import TriggerManager, build_manager, unsent_instances
from triggers.storages.base import BaseTriggerStorage
from triggers.timers import format_time
from triggers.types import STATUS_RUNNING, STATUS_SCHEDULED, now


def one_line(text: str) -> str:
    """A message on one line: the lines of a multi-line one joined (``; ``)."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    joined = lines[0] if lines else ""
    for line in lines[1:]:
        joined += (" " if joined.endswith(":") else "; ") + line.lstrip("- ")
    return joined


def _json_option(options: dict[str, Any], name: str) -> Any:
    value = options.get(name)
    if value is None:
        return None
    try:
        return json.loads(value)
    except ValueError as exc:
        raise CommandError(f"Not valid JSON for --{name}: {value!r} ({exc})") from exc


_UNSET: Any = object()


def _timeout_option(value: Any) -> Any:
    if not isinstance(value, str):
        return value  # _UNSET, or given by call_command(..., timeout=...)
    if value.lower() == "none":
        return None
    try:
        return int(value)
    except ValueError as exc:
        raise CommandError(f"--timeout takes a number of seconds or 'none', got {value!r}") \
            from exc


def _where(storage: BaseTriggerStorage) -> str:
    where = getattr(storage, "_where", None)
    return str(where()) if callable(where) else type(storage).__name__


def _missing_table(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "no such table" in text or ("relation" in text and "does not exist" in text)


def _describe_event(event: dict[str, Any]) -> str:
    subject = ""
    if event.get("trigger") is not None:
        subject = str(event["trigger"])
        if event.get("size") is not None:
            subject += f" ({event['size']} bytes)"
    elif event.get("event") == "configured" and event.get("size") is not None:
        subject = f"{event['size']} task(s)"
    if event.get("instance") is not None:
        subject = f"{subject} {event['instance']}".strip()
    if event.get("run") is not None:
        subject += f" (run {event['run']})"
    return subject


class _OneLineParser(CommandParser):
    """A usage error is one line, as every error of the command is (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        if self.called_from_command_line:
            self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        raise CommandError(f"Error: {message}")


@contextlib.contextmanager
def _option_named(argument: str, option: str) -> Iterator[None]:
    """A refused argument is named as the command's option (``--kwargs``), not as the
    manager's parameter."""
    try:
        yield
    except InvalidArgument as exc:
        raise CommandError(str(exc).replace(argument, option, 1)) from exc


def _not_stuck(manager: TriggerManager, older_than: float) -> list[tuple[str, bool]]:
    """The scheduled and running instances that recovery leaves alone, as recovery reckons
    it: a line for each, and whether it is merely too recent (``--older-than 0`` would take
    it) rather than waiting out a delay or cooldown."""
    found = []
    moment = now()
    for instance in manager.storage.get_unresolved_instances():
        metadata = instance.metadata
        if instance.status == STATUS_SCHEDULED:
            since = float(metadata.get("scheduled", metadata.get("modified", 0)) or 0)
            due = float(instance.start_after or 0)
            if due > moment:
                found.append((f"not yet due: {instance.name} (scheduled, waiting out its "
                              f"delay or cooldown: due in {due - moment:.0f} s)", False))
                continue
        elif instance.status == STATUS_RUNNING:
            since = float(metadata.get("started", metadata.get("modified", 0)) or 0)
        else:
            continue
        if moment - since < older_than:
            found.append((f"not yet stuck: {instance.name} ({instance.status.value} for "
                          f"{max(moment - since, 0):.0f} s, less than --older-than "
                          f"{older_than:g})", True))
    return found


class Command(BaseCommand):
    help = "Inspect trigger sessions, replay or skip failed instances, recover stuck ones."

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        if type(parser) is CommandParser:
            parser.__class__ = _OneLineParser  # the same parser; its errors on one line
        return parser

    def add_arguments(self, parser: CommandParser) -> None:
        called_from_command_line = parser.called_from_command_line

        class SubcommandParser(_OneLineParser):
            def __init__(self, **kwargs: Any) -> None:
                kwargs.setdefault("called_from_command_line", called_from_command_line)
                super().__init__(**kwargs)

        sub = parser.add_subparsers(dest="action", required=True, parser_class=SubcommandParser)

        def django_options(command: CommandParser) -> None:
            # Django's own options are read before the subcommand too; accepted after it
            # as well (``triggers inspect UID --settings proj.settings``).
            for flags, extra in ((("--settings",), {}), (("--pythonpath",), {}),
                                 (("--traceback",), {"action": "store_true"}),
                                 (("--no-color",), {"action": "store_true"}),
                                 (("--force-color",), {"action": "store_true"}),
                                 (("--skip-checks",), {"action": "store_true"}),
                                 (("-v", "--verbosity"), {"type": int,
                                                          "choices": [0, 1, 2, 3]})):
                command.add_argument(*flags, default=argparse.SUPPRESS,
                                     help=argparse.SUPPRESS, **extra)

        def common(command: CommandParser) -> None:
            django_options(command)
            command.add_argument("--manager", help="registry key of the trigger manager "
                                 "(default: TRIGGERS['MANAGER'])")
            command.add_argument("--storage", help="registry key of the storage backend "
                                 "(default: TRIGGERS['STORAGE'])")
            command.add_argument("--database", help="database alias of the database storage "
                                 "(default: TRIGGERS['DATABASE'])")
            command.add_argument("--cache", help="cache alias of the cache storage "
                                 "(default: TRIGGERS['CACHE'])")
            command.add_argument("--timeout", default=_UNSET,
                                 help="key timeout of the cache storage, as the application uses "
                                      "it: seconds, or 'none' (default: TRIGGERS['TIMEOUT'])")

        inspect = sub.add_parser("inspect", help="show a session's tasks and instances")
        inspect.add_argument("uid")
        inspect.add_argument("--json", action="store_true", help="print the session as JSON")
        inspect.add_argument("--timeline", action="store_true",
                             help="also print the session's history, oldest first")
        common(inspect)

        replay = sub.add_parser("replay", help="replay a failed instance")
        replay.add_argument("uid")
        replay.add_argument("instance")
        replay.add_argument("--kwargs",
                            help="replacement kwargs as JSON: {trigger: {kwarg: value}}")
        common(replay)

        skip = sub.add_parser("skip", help="skip a failed instance")
        skip.add_argument("uid")
        skip.add_argument("instance")
        skip.add_argument("--cascade", action="store_true", help="fire the task's name")
        skip.add_argument("--result", help="cascade kwargs as JSON")
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

        sweep = sub.add_parser("sweep", help="do the time-driven work that is due: owed "
                               "dispatches, timers, expired leases, spooled outcomes")
        sweep.add_argument("--loop", action="store_true",
                           help="sweep again every --interval seconds until stopped")
        sweep.add_argument("--interval", type=float,
                           help="seconds between passes (default: TRIGGERS['SWEEP_INTERVAL'])")
        sweep.add_argument("--limit", type=int, default=1000,
                           help="sessions one pass looks at, at most")
        common(sweep)

        demo = sub.add_parser("demo", help="run the questionnaire demo workflow")
        demo.add_argument("--celery", action="store_true",
                          help="run it on Redis with a real Celery worker it starts and stops")
        demo.add_argument("--keep", action="store_true",
                          help="keep the demo's session (to look at it in the admin or with "
                               "inspect); by default it is deleted at the end")
        django_options(demo)

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            options["timeout"] = _timeout_option(options.get("timeout", _UNSET))
            getattr(self, f"do_{options['action']}")(options)
        except CommandError as exc:
            raise CommandError(one_line(str(exc)), returncode=exc.returncode) from exc
        except TriggersError as exc:
            raise CommandError(one_line(str(exc))) from exc
        except Exception as exc:
            # A store that cannot be reached, a misconfigured alias …: one line as well
            # (``manage.py triggers --traceback …`` shows where it came from).
            raise CommandError(one_line(f"{type(exc).__name__}: {exc}")) from exc

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
        # Everything is read before anything is printed: an error is the only output.
        data = storage.debug_repr()
        history = storage.history() if options["timeline"] else []
        latest = data["metadata"].get("latest_kwargs")
        if not data["tasks"] and not data["instances"] and not latest and not (
                history or storage.history(1)):
            raise CommandError(
                f"No session {storage.uid!r} in {_where(storage)}: nothing is stored under "
                "this UID (check the UID, and --storage, --database or --cache)")
        if options["json"]:
            if options["timeline"]:
                data["history"] = [{**event, "time": format_time(event["at"])}
                                   for event in history]
            self.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str))
            return
        tasks = storage.tasks
        unresolved = {config.name for config in storage.get_unresolved_tasks()}
        instances = list(storage)
        self.stdout.write(f"Session {storage.uid}")
        self.stdout.write("Tasks:")
        for name, config in tasks.items():
            state = "unresolved" if name in unresolved else "resolved"
            self.stdout.write(f"  {name:<30} {state:<10} {json.dumps(config.to_dict())}")
        self.stdout.write("Instances:")
        for instance in instances:
            line = f"  {instance.name:<30} {instance.status.value:<10}"
            if instance.status.value == "failed":
                line += f" {instance.metadata.get('exc_type')}: {instance.metadata.get('exc_message')}"
            elif "result" in instance.metadata:
                line += f" result={json.dumps(instance.metadata['result'], default=str)}"
            if instance.metadata.get("dispatch_error"):
                line += f" dispatch_error={one_line(instance.metadata['dispatch_error'])}"
            if instance.metadata.get("task_id"):
                line += f" task_id={instance.metadata['task_id']}"
            self.stdout.write(line)
            if instance.status.value == "failed" and instance.metadata.get("exc_traceback"):
                for tb_line in str(instance.metadata["exc_traceback"]).rstrip().splitlines():
                    self.stdout.write(f"      {tb_line}")
        if options["timeline"]:
            self.write_timeline(history)

    def write_timeline(self, history: list[dict[str, Any]]) -> None:
        from triggers.conf import triggers_settings

        self.stdout.write("Timeline (oldest first):")
        if not history:
            self.stdout.write("  (no events kept: TRIGGERS['HISTORY_LIMIT'] is 0)"
                              if triggers_settings.HISTORY_LIMIT == 0 else "  (no events)")
            return
        first = float(history[0]["at"])
        for event in history:
            at = float(event["at"])
            self.stdout.write(
                f"  {format_time(at)}  {f'+{at - first:.3f}s':>10}  {event.get('event', '?'):<10} "
                f"{_describe_event(event):<40} {event.get('process', '')}".rstrip())

    def do_replay(self, options: dict[str, Any]) -> None:
        kwargs = _json_option(options, "kwargs")
        manager = self.manager(options["uid"], options)
        with _option_named("replacement_kwargs", "--kwargs"):
            clone = manager.replay_failed_instance(options["instance"], kwargs)
        unsent = self.unsent(unsent_instances(manager.storage), {}, [clone.name])
        self.stdout.write(f"{options['instance']} replayed as {clone.name} "
                          f"({clone.status.value}{', not sent' if unsent else ''})")

    def do_skip(self, options: dict[str, Any]) -> None:
        result = _json_option(options, "result")
        manager = self.manager(options["uid"], options)
        before = unsent_instances(manager.storage)
        with _option_named("result", "--result"):
            manager.skip_failed_instance(options["instance"], cascade=options["cascade"],
                                         result=result)
        self.stdout.write(f"{options['instance']} skipped"
                          + (" (cascade fired)" if options["cascade"] else ""))
        if options["cascade"]:
            self.unsent(unsent_instances(manager.storage), before, [])

    def unsent(self, now: dict[str, str], before: dict[str, str], sent: list[str]
               ) -> list[str]:
        """The instances this command left unsent — those it sent, or whose send error is
        new — each said on stderr, on one line."""
        found = [name for name, error in now.items()
                 if name in sent or error != before.get(name)]
        for name in found:
            self.stderr.write(f"{name} is scheduled but could not be sent: "
                              f"{one_line(now[name])}; `manage.py triggers sweep` (or recover) "
                              "sends it again once the broker is reachable")
        return found

    def do_recover(self, options: dict[str, Any]) -> None:
        from triggers.run import flush_spool

        older_than = options["older_than"]
        if older_than is not None and not older_than >= 0:
            raise CommandError(f"--older-than takes a number of seconds >= 0, got {older_than}")
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
            except Exception as exc:
                using = storage_options.get("using", "default")
                hint = (". The tables of triggers are missing or out of date: run "
                        f"`manage.py migrate{'' if using == 'default' else ' --database ' + using}`"
                        if _missing_table(exc) else "")
                raise CommandError(f"Could not list the sessions of storage {storage!r}: "
                                   f"{type(exc).__name__}: {exc}{hint}") from exc
        if not uids:
            raise CommandError("Name the session UIDs to recover, or use --all")
        from triggers.conf import triggers_settings

        if older_than is None:
            older_than = triggers_settings.RECOVER_AFTER
        total, failures, young = 0, [], 0
        counts = {"recovered": 0, "replayed": 0, "skipped": 0}
        for uid in uids:
            try:
                manager = self.manager(uid, options)
                # What recovery will leave alone, read first: afterwards, what it (and a
                # recovery run's replays) scheduled would look recent too.
                not_stuck = _not_stuck(manager, older_than)
                if options["rerun_failed"]:
                    report = manager.recovery_run(older_than)
                    for key in ("recovered", "replayed", "skipped"):
                        for name in report[key]:
                            self.stdout.write(f"{uid}: {key} {name}")
                        counts[key] += len(report[key])
                else:
                    instances = manager.recover(older_than)
                    for instance in instances:
                        self.stdout.write(f"{uid}: re-dispatched {instance.name} "
                                          f"(was {instance.metadata.get('recovered_from')})")
                    total += len(instances)
            except TriggersError as exc:
                if len(uids) == 1:
                    raise CommandError(f"{uid}: not recovered: {one_line(str(exc))}") from exc
                failures.append(uid)
                self.stderr.write(f"{uid}: not recovered: {one_line(str(exc))}")
                continue
            for line, recent in not_stuck:
                self.stdout.write(f"{uid}: {line}")
                young += recent
        sessions = len(uids) - len(failures)
        if options["rerun_failed"]:
            self.stdout.write(f"Recovered {counts['recovered']}, replayed {counts['replayed']} "
                              f"and skipped {counts['skipped']} instance(s) in {sessions} "
                              "session(s).")
        else:
            self.stdout.write(f"Recovered {total} instance(s) in {sessions} session(s).")
        if young:
            self.stdout.write(
                f"Skipped {young} instance(s) scheduled or running for less than "
                f"{older_than:g} s (--older-than): they may still be on their way. "
                "To include them, once you know their runs are over: --older-than 0")
        if failures:
            raise CommandError(f"{len(failures)} session(s) could not be recovered: "
                               f"{', '.join(failures)}")

    def do_sweep(self, options: dict[str, Any]) -> None:
        from triggers.sweep import SweepReport, sweep, sweep_forever

        interval = options.get("interval")
        if interval is not None and not interval > 0:
            raise CommandError(f"--interval must be a positive number of seconds, got {interval}")
        if options["limit"] < 1:
            raise CommandError(f"--limit must be at least 1, got {options['limit']}")
        storage, storage_options = self.storage_key_and_options(options)

        def write(outcome: SweepReport | Exception) -> None:
            if isinstance(outcome, Exception):  # --loop: the next pass tries again
                text = one_line(f"{type(outcome).__name__}: {outcome}")
                self.stderr.write(f"The sweep failed: {text}")
                return
            self.stdout.write(str(outcome))
            for uid, name, kind in outcome.sent:
                self.stdout.write(f"{uid}: {name} {kind}")
            for uid, error in outcome.errors:
                self.stderr.write(f"{uid}: not swept: {one_line(error)}")
            self.stdout.flush()

        if options["loop"]:
            sweep_forever(interval, storage, limit=options["limit"], manager=options["manager"],
                          on_pass=write, **storage_options)
            return
        report = sweep(storage, limit=options["limit"], manager=options["manager"],
                       **storage_options)
        write(report)
        if report.errors:
            raise CommandError(f"{len(report.errors)} session(s) could not be swept")

    def do_demo(self, options: dict[str, Any]) -> None:
        if options["celery"] and options.get("keep"):
            raise CommandError("--keep keeps the demo's session in your project's storage; "
                               "--celery runs the standalone demo on Redis instead: use one")
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
        uid = manager.storage.uid
        if not run_demo(cast(TextIO, self.stdout), manager=manager):
            raise CommandError(f"The demo did not finish its workflow; its session is kept: "
                               f"manage.py triggers inspect {uid} --timeline")
        if options.get("keep"):
            self.stdout.write(f"Kept session {uid}: manage.py triggers inspect {uid} --timeline")
        else:
            manager.storage.delete()
            self.stdout.write(f"Deleted session {uid} (--keep keeps it).")

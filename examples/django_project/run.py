"""The Django example, from one command: migrate, a worker that deduplicates, two HA beats.

    python examples/django_project/run.py

The project (``shopsite``, app ``shop``) configures Celery from Django's settings
(``app.config_from_object("django.conf:settings", namespace="CELERY")``), so the lock settings
are ``CELERY_SINGLETON_LOCK_*`` in ``shopsite/settings.py``. django-celery-beat's
``DatabaseScheduler`` is made highly available with ``SingletonSchedulerMixin``
(``shopsite/schedulers.py``). This script:

1. runs ``manage.py migrate`` on an sqlite database in a temporary directory;
2. starts a worker (``celery -A shopsite worker``) and sends ``send_invoice(order_id=1)`` three
   times at once: one runs, two are rejected as duplicates, one invoice is written;
3. stores a PeriodicTask (every second) in the database and starts two beats
   (``celery -A shopsite beat``, the scheduler comes from ``CELERY_BEAT_SCHEDULER``): one leads,
   the other stands by and sends nothing, and the task runs.

Uses $REDIS_URL (broker, results) and $SINGLETON_LOCK_URL (locks) when set; otherwise it starts
private redis-server processes (a broker and three Redlock masters) and stops them at the end,
with the worker and the beats, however the script ends. Exits non-zero if a check fails.

Run the pieces by hand the same way, from this directory::

    python manage.py migrate
    celery -A shopsite worker --loglevel INFO
    celery -A shopsite beat --loglevel INFO     # twice, on two hosts
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

#: The beat leader lock: CELERY_SINGLETON_LOCK_KEY_PREFIX, then {beat:<app name>}.
LEADER_KEY = "shop:{beat:shopsite}"


def main() -> int:
    from harness import Checks, Children, holder_pid, redis_topology, wait_for_holder, wait_until

    checks = Checks()
    with tempfile.TemporaryDirectory(prefix="csl-django-") as tmp, \
            redis_topology(masters=3) as topology:
        workdir = Path(tmp)
        env = {**topology.environ(), "DJANGO_DB_PATH": str(workdir / "shop.sqlite3"),
               "DJANGO_SETTINGS_MODULE": "shopsite.settings"}
        os.environ.update(env)
        print(f"servers: {topology.describe()}\ndatabase: {env['DJANGO_DB_PATH']}\n")

        migrate = subprocess.run([sys.executable, "manage.py", "migrate", "--no-input"],
                                 cwd=HERE, capture_output=True, text=True, timeout=120,
                                 check=False)
        applied = migrate.stdout.count(" OK")
        if not checks.check(migrate.returncode == 0, "manage.py migrate",
                            f"{applied} migrations applied"):
            print(migrate.stdout + migrate.stderr)
            return checks.exit_code

        import django

        django.setup()
        from django_celery_beat.models import IntervalSchedule, PeriodicTask
        from shop.models import IndexBuild, Invoice
        from shop.tasks import send_invoice

        from celery_singleton_lock import DuplicateTaskError

        children = Children(workdir, env)
        try:
            hostname = f"shop@{socket.gethostname()}"
            children.start("worker", "-A", "shopsite", "worker", "-P", "prefork", "-c", "2",
                           "-n", hostname, "--without-mingle", "--without-gossip",
                           "--loglevel", "INFO", cwd=HERE)
            from shopsite import celery_app

            wait_until(lambda: celery_app.control.ping([hostname], timeout=0.5), 60,
                       "the worker to answer")

            print("send_invoice(order_id=1) sent three times at once:")
            results = [send_invoice.delay(order_id=1) for _ in range(3)]
            outcomes = []
            for result in results:
                try:
                    outcomes.append(("ran", result.get(timeout=30)))
                except DuplicateTaskError as exc:
                    outcomes.append(("rejected", f"duplicate of {exc.holder_id}"))
                print(f"  {outcomes[-1][0]:<9} {outcomes[-1][1]}")
            ran = sum(1 for o, _ in outcomes if o == "ran")
            invoices = Invoice.objects.filter(order_id=1).count()
            checks.check(ran == 1 and invoices == 1,
                         "the worker deduplicates: one ran, the others were rejected",
                         f"{ran} ran, {len(outcomes) - ran} rejected, {invoices} invoice written")

            every_second, _ = IntervalSchedule.objects.get_or_create(
                every=1, period=IntervalSchedule.SECONDS)
            PeriodicTask.objects.update_or_create(
                name="rebuild the search index",
                defaults={"task": "shop.rebuild_search_index", "interval": every_second})
            beats = [children.start(name, "-A", "shopsite", "beat", "--loglevel", "INFO",
                                    "-s", str(workdir / f"{name}-schedule"), cwd=HERE)
                     for name in ("beat-1", "beat-2")]
            pids = {b.pid: b.name for b in beats}
            leader = wait_for_holder(topology.lock_urls, LEADER_KEY, pids, 60)
            print(f"\n{pids[leader]} (pid {leader}) leads, the other stands by")
            wait_until(lambda: IndexBuild.objects.count() >= 4, 30,
                       "4 runs of the periodic task")
            runs = IndexBuild.objects.count()
            # Celery's beat logs this line for every entry it is about to send.
            standby = [b for b in beats if b.pid != leader]
            quiet = all("Sending due task" not in b.log_text() for b in standby)
            checks.check(holder_pid(topology.lock_urls, LEADER_KEY) == leader and all(
                b.alive() for b in beats), "two beats run and one leads",
                f"{pids[leader]} holds {LEADER_KEY}")
            checks.check(quiet, "the standby sends nothing",
                         f"{standby[0].name} logged no 'Sending due task'")
            checks.check(runs >= 4, "the periodic task from the database runs",
                         f"{runs} runs")
            # The leader's claim of a tick is refused only when the tick was sent already: a
            # DatabaseScheduler that reloads a changed schedule may see a sent tick as due again.
            log = next(b for b in beats if b.pid == leader).log_text()
            refused = log.count("was already sent for this due time")
            reloads = log.count("DatabaseScheduler: Schedule changed.")
            checks.check(refused <= reloads, "the leader's own ticks are claimed at once",
                         f"{refused} claims refused, after {reloads} schedule reloads")
        except Exception:
            print(children.logs(), file=sys.stderr)
            raise
        finally:
            children.stop_all()
    return checks.exit_code


if __name__ == "__main__":
    from harness import run

    run(main)

"""The huey application of bench/peers.py: one task that runs a script.

Imported by huey's consumer (``huey_consumer _huey_app.huey``) and by the
benchmark, which sets BENCH_HUEY_DB to the SQLite file of the queue.
"""

import os
import subprocess

from huey import SqliteHuey

huey = SqliteHuey("bench", filename=os.environ["BENCH_HUEY_DB"])


@huey.task()
def run_script(python: str, script: str, folder: str, env: dict) -> int:
    """Run the script as msp's subprocess executor does: own session,
    scrubbed environment, no stdin, stdout and stderr to files."""
    os.makedirs(folder)
    with open(os.path.join(folder, "stdout.log"), "wb") as out, \
            open(os.path.join(folder, "stderr.log"), "wb") as err:
        return subprocess.run(
            [python, script], cwd=folder, env=env,
            stdin=subprocess.DEVNULL, stdout=out, stderr=err,
            start_new_session=True, close_fds=True,
        ).returncode

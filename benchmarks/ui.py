"""The desktop app's speed: time to open with the demo data, and a tab switch's redraw.

    python benchmarks/ui.py [--repeats 3] [--switches 20] [--home DIR]

Seeds the demo (`xeno-fl ui --demo`'s data: a user and a short real federation) once in a
temporary folder (or --home), then opens the app `--repeats` times, each in a fresh process
so that every import is paid: `open_s` is from the start of that process to the window
shown with its first tab's data (wall clock; `open_cpu_s` the process's CPU time). In the
last process it waits for the background warm-up, visits each tab once (`first_visit_ms`,
loading its data), then switches tabs `--switches` times around all five and times each
switch until the new tab is painted (`switch_ms_*`). Offscreen Qt: no display needed.
Targets: open_s <= 2, switch_ms_max <= 100. Prints one JSON line.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

USER = "demo"


def child(home: Path, switches: int, tabs: bool) -> dict[str, object]:
    os.environ["QT_QPA_PLATFORM"] = "offscreen"
    from xeno.ui.app import MainWindow, application, warm_up
    from xeno.ui.backend import Session

    app = application()
    session = Session.open(USER, home=home, db=f"sqlite:///{home}/xeno.db")
    window = MainWindow(session)
    window.show()
    app.processEvents()
    out: dict[str, object] = {
        "open_s": round(time.perf_counter() - STARTED, 3),
        "open_cpu_s": round(time.process_time(), 3),
    }
    if tabs:
        warm_up(session).join()
        first: dict[str, float] = {}
        for i in range(1, 5):
            t = time.perf_counter()
            window.tabs.setCurrentIndex(i)
            app.processEvents()
            first[window.tabs.tabText(i).split(" ", 1)[1]] = round(
                (time.perf_counter() - t) * 1000, 1
            )
        out["first_visit_ms"] = first
        times = []
        for k in range(switches):
            i = k % 5
            t = time.perf_counter()
            window.tabs.setCurrentIndex(i)
            app.processEvents()
            page = window.tabs.currentWidget()
            assert page is not None
            page.repaint()
            times.append((time.perf_counter() - t) * 1000)
        out["switch_ms"] = times
    window.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--switches", type=int, default=20)
    p.add_argument("--home", default="")
    p.add_argument("--child", default="")
    p.add_argument("--tabs", action="store_true")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child), args.switches, args.tabs)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(args.home or tmp)
        os.environ["XENO_DEVICE_KEY_FILE"] = str(home / "device.key")
        t = time.perf_counter()
        from xeno.ui.demo import seed_demo

        seed_demo(home, f"sqlite:///{home}/xeno.db", USER)
        seed_s = time.perf_counter() - t
        runs = []
        for r in range(args.repeats):
            cmd = [sys.executable, __file__, "--child", str(home), "--switches", str(args.switches)]
            if r == args.repeats - 1:
                cmd.append("--tabs")
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    opens = [float(r["open_s"]) for r in runs]
    switch = sorted(runs[-1]["switch_ms"])
    print(
        json.dumps(
            {
                "benchmark": "ui",
                "seed_demo_s": round(seed_s, 2),
                "open_s_median": round(statistics.median(opens), 3),
                "open_s_max": round(max(opens), 3),
                "open_cpu_s_median": round(
                    statistics.median(float(r["open_cpu_s"]) for r in runs), 3
                ),
                "first_visit_ms": runs[-1]["first_visit_ms"],
                "switch_ms_median": round(statistics.median(switch), 1),
                "switch_ms_p95": round(switch[int(0.95 * (len(switch) - 1))], 1),
                "switch_ms_max": round(switch[-1], 1),
                "switches": len(switch),
                "load_average_1m": round(os.getloadavg()[0], 1),
                "cpus": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()

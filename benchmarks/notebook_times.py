"""Wall time of each tutorial notebook run top to bottom (nbclient), in smoke mode unless --full.

python benchmarks/notebook_times.py            # CAPI_LAB_SMOKE=1
python benchmarks/notebook_times.py --full
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="full mode instead of smoke mode")
    p.add_argument("notebooks", nargs="*", default=sorted(str(x) for x in (ROOT / "notebooks").glob("*.ipynb")))
    args = p.parse_args()
    if args.full:
        os.environ.pop("CAPI_LAB_SMOKE", None)
    else:
        os.environ["CAPI_LAB_SMOKE"] = "1"
    for path in args.notebooks:
        nb = nbformat.read(path, as_version=4)
        t0 = time.perf_counter()
        NotebookClient(
            nb,
            timeout=3600,
            kernel_name="python3",
            store_widget_state=False,
            resources={"metadata": {"path": str(ROOT / "notebooks")}},
        ).execute()
        mode = "full" if args.full else "smoke"
        print(json.dumps({"notebook": Path(path).name, "mode": mode, "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
